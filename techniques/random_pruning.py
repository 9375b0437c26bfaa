"""Random pruning at initialisation (arXiv 2203.14328), ``sparse-method = "random"``.

Each unit's conv/linear weights are pruned uniformly at random (each layer keeps 1 − p), the same
mask on every client and on the server (seeded by the run seed and the unit's name), fixed for
the whole run. With ``sparse-rescale`` the server scales the kept initial weights by
1/sqrt(1 − p), which keeps every pruned layer's pre-activation variance at initialisation — the
forward signal scale — at the dense network's.

What it does *not* do: keep the NTK at the dense one's. The paper's NTK argument (and
``splitmix ntk``, which confirms it: rescaled error falls from 0.30 to 0.09 from width 64 to
1024) holds in the NTK parameterisation, where the gradient is taken with respect to the unscaled
initialisation variables. Clients here train the stored weights of a standard-parameterised
CNN; w.r.t. those the rescaled network's kernel is (1 − p) times the dense one's per pruned layer
(measured at width 1024: scale 0.60, error 0.41, not shrinking with width). Matching the dense
NTK in this parameterisation would need the pruned weights' learning rate × 1/(1 − p); the
federated method does not do that. Mechanics and the argument: ``techniques/random_init.py``.
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
