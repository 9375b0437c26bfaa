"""Random pruning at initialisation (arXiv 2203.14328), ``sparse-method = "random"``.

Each unit's conv/linear weights are pruned uniformly at random (each layer keeps 1 − p), the same
mask on every client and on the server (seeded by the run seed and the unit's name), fixed for
the whole run. With ``sparse-rescale`` the server scales the kept initial weights by
1/sqrt(1 − p), which keeps the network's NTK at the dense one's (``splitmix ntk`` shows it;
mechanics and the argument in ``techniques/random_init.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitmix.sections import Section, option
from techniques.base import register_technique
from techniques.sparse_base import FixedMask, SparseTechnique, UnitContext, UnitMask, initial_unit_mask, rescale_factor

if TYPE_CHECKING:
    from splitmix.config import RunConfig


@dataclass(frozen=True)
class RandomPruningConfig(Section):
    rescale: bool = option(True, "random pruning: scale kept initial weights by 1/sqrt(1 − sparsity)", key="sparse-rescale")


@register_technique
class RandomPruning(SparseTechnique[RandomPruningConfig]):
    name = "random"
    Config = RandomPruningConfig
    common_start = True
    layerwise = "uniform"

    def initial_scale(self, run: RunConfig) -> float:
        return rescale_factor(self.sparse(run).sparsity) if self.config.rescale else 1.0

    def unit_mask(self, ctx: UnitContext) -> UnitMask:
        if ctx.record is not None:
            return FixedMask.from_config(ctx.record)
        sparsity = self.sparse_config(ctx.rnd.task).sparsity
        return FixedMask(initial_unit_mask(ctx.views, sparsity, ctx.run_seed, ctx.unit, layerwise=self.layerwise))
