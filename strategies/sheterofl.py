"""SHeteroFL: HeteroFL with static batch norm — no running statistics while training; the server
re-estimates them on the evaluation inputs (unlabelled) before it evaluates any width."""

from __future__ import annotations

from dataclasses import replace

from models.splitmix import SplitMixSpec
from strategies.heterofl import HeteroFL
from strategies.registry import register_method


@register_method
class SHeteroFL(HeteroFL):
    name = "sheterofl"
    recompute_bn = True

    def __init__(self, spec: SplitMixSpec, fedavg_all_clients: bool = False) -> None:
        super().__init__(replace(spec, track_stats=False), fedavg_all_clients)
