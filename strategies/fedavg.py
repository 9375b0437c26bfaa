"""FedAvg: the full-width network, trained with HeteroFL's machinery at width 1.

As in the Split-Mix paper, by default only the clients whose budget affords the full width take
part (``fedavg-clients = "capable"``), or, as an ideal reference that breaks the budgets, every
client (``"all"``).
"""

from __future__ import annotations

from splitmix.protocol import NodeProfile
from strategies.heterofl import HeteroFL, WidthOf
from strategies.registry import register_method


def full_width(all_clients: bool) -> WidthOf:
    def width_of(profile: NodeProfile) -> float | None:
        return 1.0 if all_clients or profile.budget >= 1.0 - 1e-9 else None

    return width_of


@register_method
class FedAvg(HeteroFL):
    name = "fedavg"
    common_sparse_start = True

    def widths(self) -> list[float]:
        return [1.0]

    def width_of(self) -> WidthOf:
        return full_width(self.fedavg_all_clients)
