"""Flying Bird and Flying Bird+ (arXiv 2202.09844): dynamic sparse training.

``sparse-method = "dynamic"`` (Flying Bird): each unit starts from a random mask (per-layer
densities from IGQ, seeded by the run seed and the unit's name, so every client and the server
start on the same sub-network); every ΔT = ``sparse-update-every`` local steps each layer drops
its smallest-magnitude active weights and regrows as many where the dense gradient is largest;
the fraction (α0 = ``sparse-drop-fraction``) decays with a cosine over the whole run (the
schedule position is the server round, so it decays even though a client sees a unit only now
and then).

``sparse-method = "dynamic-plus"`` (Flying Bird+): the same, and after each round the client
scores robust accuracy on its training data and on a held-out share of it; when the robust
generalisation gap keeps growing it prunes more than it regrows (sparsity rises), when the
held-out robust loss stops falling it regrows a little more. Mechanics:
``techniques/sparsity.py: FlyingBird, FlyingBirdPlus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from flwr.app import ConfigRecord

from splitmix.adversarial import pgd_linf
from splitmix.sections import Section, option
from techniques.base import ClientRound, register_technique
from techniques.sparse_base import SparseRound, SparseTechnique, UnitContext, UnitMask, initial_unit_mask, per_unit_scores
from techniques.sparsity import FlyingBird as FlyingBirdMask
from techniques.sparsity import FlyingBirdPlus as FlyingBirdPlusMask
from techniques.sparsity import Masks

if TYPE_CHECKING:
    from clients.recipe import TrainResult

HOLDOUT = 0.1  # Flying Bird+: share of local data held out to watch robust overfitting


@dataclass(frozen=True)
class FlyingBirdConfig(Section):
    update_every: int = option(20, "Flying Bird(+): ΔT, local steps between drop-and-regrow updates", key="sparse-update-every", lo=1)
    drop_fraction: float = option(0.5, "Flying Bird(+): α0 of the cosine-decayed drop fraction", key="sparse-drop-fraction", lo=0, hi=1)


class DynamicMask(UnitMask):
    def __init__(self, bird: FlyingBirdMask) -> None:
        self.bird = bird

    @property
    def mask(self) -> Masks | None:
        return self.bird.masks

    def after_step(self, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> bool:
        return self.bird.step(weights, grads)

    def to_config(self) -> ConfigRecord:
        return self.bird.to_config()


@register_technique
class FlyingBird(SparseTechnique[FlyingBirdConfig | None]):  # None for dynamic-plus (it reads the "dynamic" section)
    name = "dynamic"
    Config: ClassVar[type[Section] | None] = FlyingBirdConfig
    common_start = True
    mask_class: type[FlyingBirdMask] = FlyingBirdMask

    def bird_config(self, rnd: ClientRound) -> FlyingBirdConfig:
        return rnd.task.section("dynamic")

    def unit_mask(self, ctx: UnitContext) -> UnitMask:
        if ctx.record is not None:
            bird = self.mask_class.from_config(ctx.record)
        else:
            cfg = self.bird_config(ctx.rnd)
            masks = initial_unit_mask(ctx.views, self.sparse_config(ctx.rnd.task).sparsity, ctx.run_seed, ctx.unit)
            bird = self.mask_class(masks=masks, end_step=ctx.end_step, drop_fraction=cfg.drop_fraction, update_every=cfg.update_every)
        bird.steps = (ctx.server_round - 1) * ctx.round_steps  # the cosine follows the run
        return DynamicMask(bird)


@register_technique
class FlyingBirdPlus(FlyingBird):
    name = "dynamic-plus"
    Config = None  # shares Flying Bird's keys (section "dynamic")
    mask_class = FlyingBirdPlusMask

    def prepare(self, rnd: ClientRound, sparse: SparseRound) -> None:
        """Hold a share of the client's data out of training (seeded per client)."""
        data = rnd.data
        count = max(2, int(round(HOLDOUT * len(data))))
        order = np.random.default_rng(rnd.task.seed + rnd.profile.partition_id).permutation(len(data))
        rnd.data, self.held_out = data.subset(order[count:]), data.subset(order[:count])

    def client_round(self, rnd: ClientRound) -> SparseRound | None:
        hooks = super().client_round(rnd)
        if hooks is None:
            return None
        return ObservingRound(self, rnd)


class ObservingRound(SparseRound):
    """After training: robust (adversarial clients) or clean accuracy on training vs held-out
    data, per unit, fed to each unit's Flying Bird+ statistics."""

    technique: FlyingBirdPlus

    def after_training(self, rnd: ClientRound, result: TrainResult) -> None:
        from clients.recipe import per_base_loss
        from models.blocks import frozen_bn_stats, per_base_inputs, routed

        model, profile, task = rnd.model, rnd.profile, rnd.task
        gen = torch.Generator().manual_seed(rnd.seed)
        k = model.num_bases

        def attack(m, x, y):
            if not profile.adversarial:
                return x
            with frozen_bn_stats(m):
                return pgd_linf(lambda z: per_base_loss(m.forward_bases(z), y), per_base_inputs(x, k), task.train.pgd, gen)

        held_out = self.technique.held_out
        n = len(held_out)
        batches = [(d.x[:n].to(rnd.device), d.y[:n].to(rnd.device)) for d in (rnd.data, held_out)]
        with routed(model, "adv" if profile.adversarial else "clean"):
            scores = [per_unit_scores(model, *batch, attack) for batch in batches]
        for j, unit in enumerate(self.units):
            bird = self.masks[unit].bird  # type: ignore[attr-defined]
            bird.observe(scores[0][0][j], scores[1][0][j], scores[1][1][j])
        super().after_training(rnd, result)
