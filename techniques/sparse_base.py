"""What every sparse technique shares: the ``sparse`` config section, per-unit masks kept in the
node's Context state, masked training, sparse uploads, and the sparse served model.

A sparse technique (one module each: ``robust_bird.py``, ``flying_bird.py``, ``random_pruning.py``,
``structured.py``, ``uvc.py``) subclasses :class:`SparseTechnique` and says only how a unit's mask
starts, is restored from Context state and changes during training (:meth:`SparseTechnique.unit_mask`
returning a :class:`UnitMask`). A *unit* is what a client trains as one model: a Split-Mix base
(``base3``) or its width-slice model (``width``). The mask of each unit lives in the node's
Context state under ``sparse.<unit>``; the client trains the received (dense, aggregated) weights
under it and uploads only the kept entries (``splitmix/protocol/sparse_codec.py``); the server
averages each entry over the clients that hold it (``strategies/aggregation.py``).

The mask mechanics (magnitude masks, Robust Bird's search, Flying Bird's drop-and-regrow, FLOPs)
are in ``techniques/sparsity.py``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from flwr.app import ConfigRecord
from torch import nn
from torch.nn import functional as F

from models.blocks import StackedNet
from splitmix.protocol import MEAN_PREFIX, as_bytes, as_int
from splitmix.sections import ConfigError, Section, option
from techniques.base import TECHNIQUES, ClientRound, ConfigT, RoundHooks, ServerContext, State, Technique, register_section
from techniques.sparsity import Masks, global_magnitude_mask, layer_flops, masks_from_bytes, masks_to_bytes, prunable_parameters, random_mask, remask_

if TYPE_CHECKING:
    from clients.recipe import TrainResult
    from splitmix.config import RunConfig


UNIT_DENSITY = "density."  # round-row key prefix: the mean density the unit's clients trained at


def sparse_methods() -> tuple[str, ...]:
    """``none`` and every registered sparse technique (the allowed ``sparse-method`` values)."""
    return ("none", *(name for name, cls in TECHNIQUES.items() if issubclass(cls, SparseTechnique)))


@register_section("sparse")
@dataclass(frozen=True)
class SparseConfig(Section):
    method: str = option("none", "client-local sparse technique (docs/techniques.md)", key="sparse-method", choices=sparse_methods)
    fraction: float = option(1.0, "share of clients (seeded) that train sparse; node-config `sparse` overrides", key="sparse-fraction", lo=0, hi=1)
    sparsity: float = option(0.9, "target share of removed conv/linear weights", key="sparsity", lo=0, hi=1, hi_open=True)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one local epoch (the recipe skips a lone leftover sample)."""
    full, rest = divmod(num_examples, batch_size)
    return full + (1 if rest >= 2 else 0)


class UnitMask:
    """One unit's mask and how it changes; subclasses wrap a mechanism of ``techniques/sparsity.py``."""

    @property
    def mask(self) -> Masks | None:
        """The current mask (None: still dense, e.g. Robust Bird while searching)."""
        raise NotImplementedError

    def after_step(self, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> bool:
        """After an optimizer step; True if the mask changed."""
        return False

    def to_config(self) -> ConfigRecord:
        raise NotImplementedError


class FixedMask(UnitMask):
    """A mask changed only between rounds (random pruning at init: never; structured: refilled
    further after each round, ``steps`` counting how often; UVC: searched each round)."""

    def __init__(self, masks: Masks, steps: int = 0) -> None:
        self.masks = masks
        self.steps = steps

    @property
    def mask(self) -> Masks | None:
        return self.masks

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({"masks": masks_to_bytes(self.masks), "steps": self.steps})

    @classmethod
    def from_config(cls, record: ConfigRecord) -> FixedMask:
        return cls(masks_from_bytes(as_bytes(record["masks"])), as_int(record.get("steps", 0)))


@dataclass
class UnitContext:
    """What a technique may use to start or restore one unit's mask."""

    index: int  # position of the unit in the stack
    unit: str
    views: dict[str, torch.Tensor]  # the unit's received prunable weights (views into the stack)
    record: ConfigRecord | None  # its saved state, if the node trained it before
    end_step: int  # the run's last local step (cosine schedules)
    server_round: int
    round_steps: int
    run_seed: int
    rnd: ClientRound


class SparseTechnique(Technique[ConfigT]):
    """Base of the sparse techniques: server and client hooks shared by all of them."""

    Config: ClassVar[type[Section] | None] = None
    common_start: ClassVar[bool] = False  # every client starts each unit on the same seeded mask
    layerwise: ClassVar[str] = "igq"  # layer densities of that common start

    @classmethod
    def sparse(cls, run: RunConfig) -> SparseConfig:
        return run.techniques["sparse"]  # type: ignore[return-value]

    @classmethod
    def enabled(cls, run: RunConfig) -> bool:
        return cls.sparse(run).method == cls.name

    def sparse_config(self, task: Any) -> SparseConfig:
        return task.section("sparse")

    # ------------------------------------------------------------------ server hooks
    def stateful_reason(self, run: RunConfig) -> str | None:
        if self.sparse(run).fraction > 0:
            return f"sparse-method = '{self.name}' keeps each client's sparse masks in its node state"
        return None

    def initial_state(self, state: State, ctx: ServerContext) -> State:
        """With every client sparse on a common start, the global model starts on it too."""
        cfg = self.sparse(ctx.run)
        if not (self.common_start and cfg.fraction == 1.0 and ctx.method.common_sparse_start):
            return state
        out = dict(state)
        scale = self.initial_scale(ctx.run)
        for unit, names in group_prunable(state, ctx.prunable).items():
            params = {name: state[key] for name, key in names.items()}
            masks = initial_unit_mask(params, cfg.sparsity, ctx.run.seed, unit, self.layerwise)
            for name, key in names.items():
                out[key] = state[key] * masks[name] * scale
        return out

    def initial_scale(self, run: RunConfig) -> float:
        return 1.0

    def served_state(self, state: State, ctx: ServerContext) -> State:
        """With every client sparse, the model evaluated and stored is each unit's conv/linear
        weights magnitude-pruned (globally within the unit) to the target sparsity."""
        cfg = self.sparse(ctx.run)
        if cfg.fraction != 1.0:
            return state
        return prune_state(state, ctx.prunable, cfg.sparsity)

    def summary(self, rounds: list[dict], run: RunConfig) -> dict[str, Any]:
        cfg = self.sparse(run)
        flops = [float(r.get("train-flops-fraction", 1.0)) for r in rounds]
        share = sum(flops) / len(flops) if flops else 1.0
        return {
            "sparse": {
                "method": cfg.method,
                "sparsity": cfg.sparsity,
                "fraction": cfg.fraction,
                "train_flops_fraction": share,
                "train_flops_saved": 1.0 - share,
            }
        }

    # ------------------------------------------------------------------ client hooks
    def unit_mask(self, ctx: UnitContext) -> UnitMask:
        """The unit's mask for this round: restored from ``ctx.record`` or started afresh."""
        raise NotImplementedError

    def prepare(self, rnd: ClientRound, sparse: SparseRound) -> None:
        """Once per round before the units' masks are made (e.g. UVC's search)."""

    def client_round(self, rnd: ClientRound) -> RoundHooks | None:
        if not rnd.profile.sparse:
            return None
        return SparseRound(self, rnd)


class SparseRound(RoundHooks):
    """One client round of sparse training over the units stacked in the round's model."""

    def __init__(self, technique: SparseTechnique, rnd: ClientRound) -> None:
        self.technique = technique
        self.rnd = rnd

    def before_training(self, rnd: ClientRound) -> None:
        task, model = rnd.task, rnd.model.to(rnd.device)
        self.units, self.k = rnd.units, len(rnd.units)
        self.params = prunable_parameters(model)
        self.state = rnd.context.state
        self.extra_flops = 0.0  # work outside the training steps (UVC's search), in dense training steps
        self.technique.prepare(rnd, self)  # may hold data out: the round's steps count after it
        round_steps = task.train.epochs * steps_per_epoch(len(rnd.data), task.train.batch_size)
        self.masks: dict[str, UnitMask] = {}
        for j, unit in enumerate(self.units):
            ctx = UnitContext(
                index=j,
                unit=unit,
                views=self.views(j),
                record=self.state.config_records.get(f"sparse.{unit}"),
                end_step=task.num_rounds * max(round_steps, 1),
                server_round=rnd.server_round,
                round_steps=round_steps,
                run_seed=task.seed,
                rnd=rnd,
            )
            self.masks[unit] = self.technique.unit_mask(ctx)
        spec = task.spec
        self._flops = layer_flops(model, (spec.in_channels, spec.image_size, spec.image_size))
        self._dense_flops = float(sum(self._flops.values())) or 1.0
        self.steps = 0
        self.flops_used = 0.0  # in units of one dense step's FLOPs
        self._refresh()
        remask_(model, self.stacked)

    def views(self, j: int, grads: bool = False) -> dict[str, torch.Tensor]:
        """Unit j's chunk of every prunable tensor (views: writing them writes the stack)."""
        # with grads=True this runs after backward, when every prunable tensor has its gradient
        return {name: (cast(torch.Tensor, p.grad) if grads else p.detach()).chunk(self.k, dim=0)[j] for name, p in self.params.items()}

    def _refresh(self) -> None:
        """The stacked mask (all-ones for a unit still dense) and its FLOPs share."""
        per_unit = [self.masks[u].mask for u in self.units]
        self.stacked = {
            name: torch.cat([(m[name].to(p.device) if m is not None else torch.ones_like(p.chunk(self.k, 0)[0], dtype=torch.bool)) for m in per_unit])
            for name, p in self.params.items()
        }
        sparse = sum(f * float(self.stacked[n].float().mean()) for n, f in self._flops.items())
        self._step_share = sparse / self._dense_flops

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        model = self.rnd.model
        remask_(model, self.stacked, optimizer)
        changed = False
        for j, unit in enumerate(self.units):
            # regrowth is scored by this step's dense gradient (.grad is not masked)
            changed |= self.masks[unit].after_step(self.views(j), self.views(j, grads=True))
        if changed:
            self._refresh()
            remask_(model, self.stacked, optimizer)  # dropped weights lose their momentum
        self.steps += 1
        update_share = (1.0 - self._step_share) / 3.0 if changed else 0.0  # RigL's dense-gradient count
        self.flops_used += self._step_share + update_share

    def after_training(self, rnd: ClientRound, result: TrainResult) -> None:
        """Save every unit's state; hand the masks of the upload and the round's metrics over."""
        kept = total = 0
        for unit in self.units:
            unit_mask = self.masks[unit]
            self.state[f"sparse.{unit}"] = unit_mask.to_config()
            if unit_mask.mask is None:
                continue
            unit_kept = unit_total = 0
            for name, mask in unit_mask.mask.items():
                rnd.masks[rnd.upload_key(unit, name)] = mask.cpu()
                unit_kept += int(mask.sum())
                unit_total += mask.numel()
            rnd.metrics[MEAN_PREFIX + UNIT_DENSITY + unit] = unit_kept / unit_total if unit_total else 1.0
            kept, total = kept + unit_kept, total + unit_total
        rnd.metrics.update(
            {
                "density": kept / total if total else 1.0,
                "flops-fraction": (self.flops_used + self.extra_flops) / self.steps if self.steps else 1.0,
                "sparse-units": float(sum(self.masks[u].mask is not None for u in self.units)),
            }
        )


# --------------------------------------------------------------------------- state helpers
def initial_unit_mask(params: dict[str, torch.Tensor], sparsity: float, run_seed: int, unit: str, layerwise: str = "igq") -> Masks:
    """The starting mask of one unit: random (layer densities ``layerwise``: IGQ for Flying
    Bird, uniform for random pruning at init) but the same on every client and on the server
    (seeded by the run seed and the unit's name), so clients start on a common sparse
    sub-network and the server can zero what nobody holds from the start."""
    digest = int.from_bytes(hashlib.sha256(f"{run_seed}:{unit}".encode()).digest()[:8], "little") % (2**63)
    return random_mask(params, sparsity, method=layerwise, generator=torch.Generator().manual_seed(digest))


def group_prunable(state: dict[str, torch.Tensor], prunable_names: set[str]) -> dict[str, dict[str, str]]:
    """``{unit: {param name: state key}}``: ``base{i}.<name>`` keys group by base, FedAvg's
    ``w0.5/<name>`` keys by width model (unit ``w0.5``), other plain keys form the single unit
    ``"width"``; only conv/linear weights (``prunable_names``) count. The units are the clients'."""
    groups: dict[str, dict[str, str]] = {}
    for key in state:
        is_base = key.startswith("base") and key.split(".", 1)[0][4:].isdigit()
        if is_base:
            unit, _, name = key.partition(".")
        elif "/" in key:
            unit, _, name = key.partition("/")
        else:
            unit, name = "width", key
        if name in prunable_names:
            groups.setdefault(unit, {})[name] = key
    return groups


def prune_state(state: State, prunable_names: set[str], sparsity: float, per_unit: dict[str, float] | None = None) -> State:
    """Each unit's conv/linear weights magnitude-pruned (globally within the unit) to ``sparsity``,
    or to ``per_unit[unit]`` where given (Flying Bird+'s adapted sparsity)."""
    out = dict(state)
    for unit, names in group_prunable(state, prunable_names).items():
        params = {name: state[key] for name, key in names.items()}
        masks = global_magnitude_mask(params, (per_unit or {}).get(unit, sparsity))
        for name, key in names.items():
            out[key] = state[key] * masks[name].to(state[key].device)
    return out


# --------------------------------------------------------------------------- held-out scoring
@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return cast(StackedNet, model).forward_bases(x) if hasattr(model, "forward_bases") else model(x).unsqueeze(1)


def per_unit_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Callable) -> tuple[list[float], list[float]]:
    """(accuracy per unit, mean loss per unit) on ``attack(model, x, y)``."""
    was_training = model.training
    model.eval()
    try:
        z = attack(model, x, y)
        logits = _logits(model, z)  # (B, k, classes)
        k = logits.shape[1]
        acc = (logits.argmax(-1) == y.unsqueeze(1)).float().mean(0)
        loss = F.cross_entropy(logits.transpose(1, 2), y.unsqueeze(1).expand(-1, k), reduction="none").mean(0)
    finally:
        model.train(was_training)
    return acc.tolist(), loss.tolist()


def rescale_factor(sparsity: float) -> float:
    return 1.0 / math.sqrt(1.0 - sparsity)


__all__ = [
    "ConfigError",
    "FixedMask",
    "SparseConfig",
    "SparseRound",
    "SparseTechnique",
    "UnitContext",
    "UnitMask",
    "group_prunable",
    "initial_unit_mask",
    "per_unit_scores",
    "prune_state",
    "steps_per_epoch",
    "sparse_methods",
]
