"""FedAvg and FedBN: the full-width network.

FedAvg trains one full-width model; as in the Split-Mix paper, by default only the clients whose
budget affords the full width take part (``fedavg-clients = "capable"``), or, as an ideal reference
that breaks the budgets, every client (``"all"``). FedBN is FedAvg whose batch-norm parameters and
statistics stay on the clients: they are never sent and never overwritten by the server.
"""

from __future__ import annotations

from strategies.base import NodeProfile
from strategies.heterofl import WidthOf


def full_width(all_clients: bool) -> WidthOf:
    def width_of(profile: NodeProfile) -> float | None:
        return 1.0 if all_clients or profile.budget >= 1.0 - 1e-9 else None

    return width_of
