"""FedBN (Li et al., 2021): FedAvg whose normalisation layers (BN, and LayerNorms of ViT bases)
stay on the clients — never sent, never overwritten by the server; each node keeps its own, per
width model, in its Context state, with tracked running statistics as in the FedBN code.

Evaluation is the client's: each client evaluates the global weights with **its own** norms on
its own validation and test splits (a client that never trained a width has no model there and
is not counted at that width). The server holds no client's norms: where it must build a model
itself (serving a query, the generalisation gap), it re-estimates BN statistics on training
inputs with the norms' affine parameters at their initial values — documented as such.
"""

from __future__ import annotations

from typing import Any

from splitmix.protocol.codec import to_tensors
from strategies.fedavg import FedAvg
from strategies.heterofl import local_norms_record
from strategies.registry import State, register_method, width_tag


@register_method
class FedBN(FedAvg):
    name = "fedbn"
    bn_regime = "tracked"
    local_norms = True

    def stateful_reason(self) -> str | None:
        return "method = 'fedbn' keeps each client's batch-norm entries in its node state"

    def client_eval_state(self, state: State, width: float, context: Any) -> State | None:
        kept = context.state.array_records.get(local_norms_record(width))
        if kept is None:
            return None
        prefix = width_tag(width) + "/"
        return {**state, **{prefix + k: v for k, v in to_tensors(kept).items()}}
