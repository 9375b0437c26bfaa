"""Robust Bird (arXiv 2202.09844), ``sparse-method = "static"``: train dense while searching for
a static sparse mask, then train sparse under it.

At the end of every local epoch a unit's global-magnitude mask at the target sparsity is compared
with the previous check (window 2; normalised Hamming distance); once it is within
``sparse-search-threshold`` the mask is frozen and the unit trains sparse from then on. The
search carries over the rounds in which the client meets that unit again (its state lives in the
node's Context). Mechanics: ``techniques/sparsity.py: RobustBirdSearch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord

from splitmix.sections import Section, option
from techniques.base import register_technique
from techniques.sparse_base import SparseTechnique, UnitContext, UnitMask
from techniques.sparsity import Masks, RobustBirdSearch

SEARCH_WINDOW = 2  # masks compared at each check (the newest and the one before it)


@dataclass(frozen=True)
class RobustBirdConfig(Section):
    search_threshold: float = option(
        0.08,
        "Robust Bird: Hamming distance between consecutive masks that freezes the mask",
        key="sparse-search-threshold",
        lo=0,
        hi=1,
    )


class SearchingMask(UnitMask):
    def __init__(self, search: RobustBirdSearch) -> None:
        self.search = search

    @property
    def mask(self) -> Masks | None:
        return self.search.mask

    def after_epoch(self, weights: dict[str, torch.Tensor]) -> bool:
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
        return SearchingMask(RobustBirdSearch(sparsity, threshold=self.config.search_threshold, window=SEARCH_WINDOW))
