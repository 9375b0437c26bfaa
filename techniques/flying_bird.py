"""Flying Bird and Flying Bird+ (arXiv 2202.09844): dynamic sparse training.

``sparse-method = "dynamic"`` (Flying Bird): each unit starts from a random mask (per-layer
densities from IGQ, seeded by the run seed and the unit's name, so every client and the server
start on the same sub-network); every ΔT local steps each layer drops its smallest-magnitude
active weights and regrows as many where the dense gradient is largest; the fraction (α0 =
``sparse-drop-fraction``) decays with a cosine over the whole run (the schedule position is the
server round, so it decays even though a client sees a unit only now and then).

ΔT follows the client's round: ``sparse-updates-per-round`` = u updates at local steps
⌊j·R/(u+1)⌋, j = 1..u, of a round of R steps — evenly spaced and never on the last step, so the
regrown weights (which start at zero) train before the upload. The official ΔT = 900 iterations
is ~2.3 epochs of a CIFAR-10 run (391 steps each), ~87 updates in 200 epochs; a federated client
of the default workload takes R = 2 steps per round (one per local epoch), so a fixed ΔT in
steps would change a mask only every ΔT/2 rounds, on the last step. With R = 1 the update has to
follow the round's only step.

``sparse-method = "dynamic-plus"`` (Flying Bird+): the same, and after each round the client
scores robust accuracy (clean for non-adversarial clients) and loss on its held-out share of
the data (``sparse-holdout``, at least :data:`MIN_HOLDOUT` examples) and on as many training
examples; when the robust generalisation gap keeps growing it prunes more than it regrows
(sparsity rises), when the held-out robust loss stops falling it regrows a little more. Clients
report each unit's density; the server serves every unit pruned to the mean density its clients
last reported (not the fixed target). Mechanics: ``techniques/sparsity.py: FlyingBird,
FlyingBirdPlus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from flwr.app import ConfigRecord

from splitmix.adversarial import pgd_linf
from splitmix.sections import Section, option
from techniques.base import ClientRound, ServerContext, State, register_technique
from techniques.sparse_base import UNIT_DENSITY, SparseRound, SparseTechnique, UnitContext, UnitMask, initial_unit_mask, per_unit_scores, prune_state
from techniques.sparsity import FlyingBird as FlyingBirdMask
from techniques.sparsity import FlyingBirdPlus as FlyingBirdPlusMask
from techniques.sparsity import Masks

if TYPE_CHECKING:
    from clients.recipe import TrainResult

MIN_HOLDOUT = 10  # Flying Bird+: fewest held-out examples (a robust accuracy in steps of ≤ 0.1)


@dataclass(frozen=True)
class FlyingBirdConfig(Section):
    updates_per_round: int = option(
        1, "Flying Bird(+): drop-and-regrow updates inside each local round (ΔT = round steps / (u + 1))", key="sparse-updates-per-round", lo=1
    )
    drop_fraction: float = option(0.5, "Flying Bird(+): α0 of the cosine-decayed drop fraction", key="sparse-drop-fraction", lo=0, hi=1)
    holdout: float = option(
        0.2, "Flying Bird+: share of a client's training data held out to measure the robust generalisation gap", key="sparse-holdout", lo=0, hi=0.5
    )


def update_steps(round_steps: int, updates: int) -> set[int]:
    """Local steps (1-based) after which a round of ``round_steps`` updates the topology: u evenly
    spaced steps ⌊j·R/(u+1)⌋, none on the last step (R = 1: its only step)."""
    if round_steps <= 1:
        return {1}
    return {min(round_steps - 1, max(1, (j * round_steps) // (updates + 1))) for j in range(1, updates + 1)}


class DynamicMask(UnitMask):
    def __init__(self, bird: FlyingBirdMask, due: set[int]) -> None:
        self.bird = bird
        self.due = due  # local steps of this round after which the topology changes
        self.local_step = 0

    @property
    def mask(self) -> Masks | None:
        return self.bird.masks

    def after_step(self, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> bool:
        self.local_step += 1
        self.bird.steps += 1  # the cosine's position in the run
        if self.local_step not in self.due:
            return False
        self.bird.update(weights, grads)
        return True

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
        cfg = self.bird_config(ctx.rnd)
        if ctx.record is not None:
            bird = self.mask_class.from_config(ctx.record)
        else:
            masks = initial_unit_mask(ctx.views, self.sparse_config(ctx.rnd.task).sparsity, ctx.run_seed, ctx.unit)
            interval = max(1, ctx.round_steps // (cfg.updates_per_round + 1))  # ΔT, recorded with the mask
            bird = self.mask_class(masks=masks, end_step=ctx.end_step, drop_fraction=cfg.drop_fraction, update_every=interval)
        bird.steps = (ctx.server_round - 1) * ctx.round_steps  # the cosine follows the run
        return DynamicMask(bird, update_steps(ctx.round_steps, cfg.updates_per_round))


def holdout_count(examples: int, share: float) -> int:
    """Held-out examples: ``share`` of them, at least :data:`MIN_HOLDOUT`, at most half."""
    return min(examples // 2, max(MIN_HOLDOUT, round(share * examples)))


@register_technique
class FlyingBirdPlus(FlyingBird):
    name = "dynamic-plus"
    Config = None  # shares Flying Bird's keys (section "dynamic")
    mask_class = FlyingBirdPlusMask

    def prepare(self, rnd: ClientRound, sparse: SparseRound) -> None:
        """Hold a share of the client's data out of training (seeded per client: the same
        examples every round)."""
        data = rnd.data
        count = holdout_count(len(data), self.bird_config(rnd).holdout)
        order = np.random.default_rng(rnd.task.seed + rnd.profile.partition_id).permutation(len(data))
        rnd.data, self.held_out = data.subset(order[count:]), data.subset(order[:count])

    def served_state(self, state: State, ctx: ServerContext) -> State:
        """Every unit pruned to the mean density its clients last reported: the adapted sparsity,
        not the fixed target (units no client reported yet: the target)."""
        cfg = self.sparse(ctx.run)
        if cfg.fraction != 1.0:
            return state
        adapted = {unit: 1.0 - density for unit, density in ctx.latest(UNIT_DENSITY).items()}
        return prune_state(state, ctx.prunable, cfg.sparsity, adapted)

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
