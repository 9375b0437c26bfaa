"""Robust Bird (arXiv 2202.09844), ``sparse-method = "static"``: train dense while searching for
a static sparse mask, then train sparse under it.

The official search (VITA-Group/Sparsity-Win-Robust-Generalization, ``Robust-Bird``) checks once
per epoch of cheap *clean* training: the global magnitude mask at the target sparsity is kept in
a window of the last 5 and the search stops when the newest is within normalised Hamming
distance 0.08 of *each* of the 4 before it; the network is then pruned and trained adversarially.

Federated schedule: a client checks once per round in which it trains the unit, at the end of
its local training. With the small local data sets of a federation one local epoch is one or two
SGD steps, so per-epoch checks would compare almost identical weights and freeze at the earliest
possible check; a round — the received global weights plus the local steps — is the federated
counterpart of an epoch (every client's data moved the weights once). The window
(``sparse-search-window``, official 5) and threshold (``sparse-search-threshold``, 0.08) are the
official ones, so the earliest possible freeze is the window-th round a client trains the unit.
While a unit searches, an adversarial client trains it clean (the official stage 1;
``sparse-search-adversarial = true`` searches with the client's adversarial loss), and from the
round after its mask froze it trains adversarially under the mask. The search carries over the
rounds in which the client meets that unit again (its state lives in the node's Context). Each
round's row counts the masks that froze (``sparse-frozen``), the units still searching
(``sparse-searching``) and the checks the frozen ones took; ``summary.json`` gives the
distribution of freeze rounds. Mechanics: ``techniques/sparsity.py: RobustBirdSearch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord

from splitmix.protocol import SUM_PREFIX
from splitmix.sections import Section, option
from techniques.base import ClientRound, register_technique
from techniques.sparse_base import SparseRound, SparseTechnique, UnitContext, UnitMask
from techniques.sparsity import Masks, RobustBirdSearch

if TYPE_CHECKING:
    from clients.recipe import TrainResult
    from splitmix.config import RunConfig

FROZEN, SEARCHING, CHECKS = "sparse-frozen", "sparse-searching", "sparse-freeze-checks"  # round-row keys


@dataclass(frozen=True)
class RobustBirdConfig(Section):
    search_threshold: float = option(
        0.08,
        "Robust Bird: Hamming distance to each earlier mask in the window that freezes the mask",
        key="sparse-search-threshold",
        lo=0,
        hi=1,
    )
    search_window: int = option(5, "Robust Bird: masks in the window (the newest vs each earlier one); official 5", key="sparse-search-window", lo=2)
    search_adversarial: bool = option(
        False, "Robust Bird: search with the client's adversarial loss (official: clean training)", key="sparse-search-adversarial"
    )


class SearchingMask(UnitMask):
    def __init__(self, search: RobustBirdSearch) -> None:
        self.search = search

    @property
    def mask(self) -> Masks | None:
        return self.search.mask

    def after_round(self, weights: dict[str, torch.Tensor]) -> bool:
        return self.search.mask is None and self.search.check(weights)

    def to_config(self) -> ConfigRecord:
        return self.search.to_config()


@register_technique
class RobustBird(SparseTechnique[RobustBirdConfig]):
    name = "static"
    Config = RobustBirdConfig

    def unit_mask(self, ctx: UnitContext) -> UnitMask:
        if ctx.record is not None:
            return SearchingMask(RobustBirdSearch.from_config(ctx.record))
        sparsity = self.sparse_config(ctx.rnd.task).sparsity
        return SearchingMask(RobustBirdSearch(sparsity, threshold=self.config.search_threshold, window=self.config.search_window))

    def client_round(self, rnd: ClientRound) -> SparseRound | None:
        return SearchRound(self, rnd) if rnd.profile.sparse else None

    def summary(self, rounds: list[dict], run: RunConfig) -> dict[str, Any]:
        out = super().summary(rounds, run)
        froze = {int(r["round"]): int(r.get(FROZEN, 0)) for r in rounds if r.get(FROZEN)}
        total = sum(froze.values())
        checks = sum(float(r.get(CHECKS, 0)) for r in rounds)
        out["sparse"]["robust_bird"] = {
            "freeze_rounds": {str(r): n for r, n in sorted(froze.items())},  # masks (client × unit) frozen per round
            "frozen": total,
            "searching_last_round": int(rounds[-1].get(SEARCHING, 0)) if rounds else 0,
            "mean_checks_at_freeze": checks / total if total else None,
            "window": self.config.search_window,
            "threshold": self.config.search_threshold,
        }
        return out


class SearchRound(SparseRound):
    """A Robust Bird client round: clean training for the units still searching (unless the
    search is adversarial), one check per unit at the end, freeze counts in the metrics."""

    technique: RobustBird

    def __init__(self, technique: RobustBird, rnd: ClientRound) -> None:
        super().__init__(technique, rnd)
        if not technique.config.search_adversarial:
            self.adversarial_share = self._frozen_units

    def _frozen_units(self) -> torch.Tensor:
        return torch.tensor([float(self.masks[u].mask is not None) for u in self.units])

    def after_training(self, rnd: ClientRound, result: TrainResult) -> None:
        froze = checks = 0
        for j, unit in enumerate(self.units):
            search = self.masks[unit]
            if isinstance(search, SearchingMask) and search.after_round(self.views(j)):
                froze += 1
                checks += search.search.checks
        searching = sum(self.masks[u].mask is None for u in self.units)
        super().after_training(rnd, result)
        rnd.metrics.update({SUM_PREFIX + FROZEN: froze, SUM_PREFIX + SEARCHING: searching, SUM_PREFIX + CHECKS: checks})
