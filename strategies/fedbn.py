"""FedBN: FedAvg whose normalisation layers (BN, and LayerNorms of ViT bases) stay on the
clients: never sent, never overwritten by the server; each node keeps its own in its Context state.

The server never holds the clients' norms, so it evaluates the shared weights with BN statistics
re-estimated on the evaluation inputs and the norm affine parameters at their initial values.
"""

from __future__ import annotations

from strategies.fedavg import FedAvg
from strategies.registry import register_method


@register_method
class FedBN(FedAvg):
    name = "fedbn"
    recompute_bn = True
    local_norms = True

    def stateful_reason(self) -> str | None:
        return "method = 'fedbn' keeps each client's batch-norm entries in its node state"
