"""Client-local sparse (adversarial) training, arXiv 2202.09844, wired into a client's round.

A client that opts in keeps, per model unit it trains (a Split-Mix base ``base{i}``, or its one
width-slice model), a mask over the conv/linear weights as Flower Context state across rounds:

- ``static`` (Robust Bird): train dense while searching; at the end of every local epoch take the
  global-magnitude mask at the target sparsity and compare it with the previous check; once the
  Hamming distance between consecutive masks is ≤ ``search-threshold`` the mask is frozen and the
  unit trains sparse from then on (the search carries over the rounds in which the client meets
  that unit again).
- ``dynamic`` (Flying Bird): start from a random mask (per-layer densities from IGQ); every ΔT
  local steps each layer drops its smallest-magnitude active weights and regrows as many where
  the gradient is largest; the fraction decays with a cosine over the whole run (the schedule
  position is the server round, so it decays even though a client sees a unit only now and then).
- ``random`` (arXiv 2203.14328): prune at initialisation, uniformly at random (each layer keeps
  1 − p of its weights), the same mask on every client, fixed for the whole run; with
  ``sparse-rescale`` the server scales the kept initial weights by 1/sqrt(1 − p), which keeps the
  network's NTK at the dense one's (``splitmix ntk`` shows it).
- ``structured`` (arXiv 2202.04736, federated form): the t-th time a client trains a unit it
  magnitude-prunes the *received* weights to sparsity s_t = min(``sparsity``, 1 − 0.8^t) (IMP's
  20 % per step) and refills to channel sparsity s_t (per layer the channels with most surviving
  weight stay dense); it trains and uploads only those channels. Computed from the global
  weights, the channels agree across clients. No weight rewinding: the global model moves every
  round (``splitmix prune`` does IMP with rewinding on a finished run and slices physically).
- ``uvc`` (arXiv 2203.08243, for ViT clients under a FLOPs budget): each round, a short UVC
  search (``models/uvc.py``: per-block head / head-dim / MLP-neuron counts and skip gates under a
  primal-dual FLOPs constraint, distilled from the received model) on the client's own data picks
  what its bases keep, projected onto ``flops-ratio`` of the dense MACs; it trains and uploads only
  those weights (masks: the removed heads' proj columns, neurons' fc1 rows / fc2 columns, and a
  skipped block's proj and fc2 — biases stay dense, so a skipped block adds a constant).
- ``dynamic-plus`` (Flying Bird+): the same, and after each round the client scores robust accuracy
  on its training data and on a held-out share of it; when the robust generalisation gap keeps
  growing it prunes more than it regrows (sparsity rises), when the held-out robust loss stops
  falling it regrows a little more.

The model the client trains is the received (dense, aggregated) model with its own mask applied;
it uploads only the kept entries (``splitmix/protocol/sparse_codec.py``), and the server averages each entry
over the clients that hold it (``strategies/sparse_aggregation.py``). The building blocks (masks,
search, drop-and-regrow, FLOPs) are in ``techniques/sparsity.py``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from techniques.sparsity import (
    FlyingBird,
    masks_from_bytes,
    masks_to_bytes,
    global_magnitude_mask,
    FlyingBirdPlus,
    Masks,
    RobustBirdSearch,
    layer_flops,
    prunable_parameters,
    random_mask,
    remask_,
)

SPARSE_METHODS = ("none", "static", "dynamic", "dynamic-plus", "random", "structured", "uvc")


@dataclass(frozen=True)
class SparseConfig:
    method: str = "none"
    fraction: float = 1.0  # share of clients (seeded) that use it; node-config 'sparse' overrides
    sparsity: float = 0.9
    update_every: int = 20  # ΔT, local steps between drop-and-regrow updates
    drop_fraction: float = 0.5  # α0 of the cosine-decayed drop fraction
    search_threshold: float = 0.08  # Robust Bird: Hamming distance that freezes the mask
    holdout: float = 0.1  # Flying Bird+: share of local data held out to watch robust overfitting
    rescale: bool = True  # random: scale kept initial weights by 1/sqrt(1 - sparsity)
    flops_ratio: float = 0.5  # uvc: the client's MACs budget as a share of its dense bases
    uvc_steps: int = 30  # uvc: search steps on the client's data each round

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one local epoch (the recipe skips a lone leftover sample)."""
    full, rest = divmod(num_examples, batch_size)
    return full + (1 if rest >= 2 else 0)


class SparseRound:
    """One client round of sparse training over the ``units`` stacked in ``model``.

    ``units``: one state key per stacked chunk (``["base3", "base4"]`` for a 2-base Split-Mix
    stack; ``["width"]`` for a width-slice model). Hooks for ``clients.recipe.train_bases``:
    ``after_step(optimizer)`` and ``after_epoch()``; then :meth:`finish` saves the state and
    returns the masks to upload.
    """

    def __init__(
        self,
        model: nn.Module,
        units: list[str],
        cfg: SparseConfig,
        state: RecordDict,
        server_round: int,
        num_rounds: int,
        round_steps: int,
        seed: int,
        input_shape: tuple[int, ...],
        run_seed: int = 0,
        single_base: "Callable[[], nn.Module] | None" = None,
        data: "tuple[torch.Tensor, torch.Tensor] | None" = None,
    ) -> None:
        self.model, self.units, self.cfg, self.state = model, units, cfg, state
        self.run_seed = run_seed
        self._single_base = single_base
        self.k = len(units)
        self.params = prunable_parameters(model)
        self._uvc: Masks = {}
        if cfg.method == "uvc":
            if data is None:
                raise ValueError("uvc needs the client's data for its search")
            from models.uvc import uvc_masks

            device = next(model.parameters()).device
            found = uvc_masks(model, data[0].to(device), data[1].to(device), cfg.flops_ratio, steps=cfg.uvc_steps, seed=seed)
            self._uvc = {n: m for n, m in found.items() if n in self.params}
        self.techniques: dict[str, RobustBirdSearch | FlyingBird | FixedMask] = {}
        for j, unit in enumerate(units):
            record = state.config_records.get(f"sparse.{unit}")
            self.techniques[unit] = self._load(record, j, num_rounds * max(round_steps, 1))
        for technique in self.techniques.values():
            if isinstance(technique, FlyingBird):
                technique.steps = (server_round - 1) * round_steps  # the cosine follows the run
        self._flops = layer_flops(model, input_shape)
        self._dense_flops = float(sum(self._flops.values())) or 1.0
        self.steps = 0
        self.flops_used = 0.0  # in units of one dense step's FLOPs
        self._refresh()
        remask_(model, self.stacked)

    # ------------------------------------------------------------------ state
    def _load(self, record, j: int, end_step: int) -> "RobustBirdSearch | FlyingBird | FixedMask":
        cfg = self.cfg
        if cfg.method == "static":
            if record is not None:
                return RobustBirdSearch.from_config(record)
            return RobustBirdSearch(cfg.sparsity, threshold=cfg.search_threshold, window=2)
        if cfg.method == "structured":
            mask = FixedMask.from_config(record) if record is not None else FixedMask({})
            mask.steps += 1  # prune further each time this client meets the unit, from the received weights
            target = min(cfg.sparsity, 1.0 - (1.0 - STRUCTURED_RATE) ** mask.steps)
            if self._single_base is None:
                raise ValueError("structured sparsity needs a single-base model builder (single_base)")
            mask.masks = structured_mask(self._single_base(), {n: v.cpu() for n, v in self.views(j).items()}, target)
            return mask
        if cfg.method == "uvc":  # searched afresh on the received weights every round
            return FixedMask({n: (self._uvc[n].chunk(self.k, 0)[j].clone() if n in self._uvc else torch.ones_like(v, dtype=torch.bool))
                              for n, v in self.views(j).items()})
        if cfg.method == "random":
            if record is not None:
                return FixedMask.from_config(record)
            return FixedMask(initial_unit_mask(self.views(j), cfg.sparsity, self.run_seed, self.units[j], layerwise="uniform"))
        cls = FlyingBirdPlus if cfg.method == "dynamic-plus" else FlyingBird
        if record is not None:
            return cls.from_config(record)
        masks = initial_unit_mask(self.views(j), cfg.sparsity, self.run_seed, self.units[j])
        return cls(masks=masks, end_step=end_step, drop_fraction=cfg.drop_fraction, update_every=cfg.update_every)

    def views(self, j: int, grads: bool = False) -> dict[str, torch.Tensor]:
        """Unit j's chunk of every prunable tensor (views: writing them writes the stack)."""
        out = {}
        for name, p in self.params.items():
            tensor = p.grad if grads else p.detach()
            out[name] = tensor.chunk(self.k, dim=0)[j]
        return out

    def mask_of(self, unit: str) -> Masks | None:
        technique = self.techniques[unit]
        return technique.mask if isinstance(technique, RobustBirdSearch) else technique.masks

    def _refresh(self) -> None:
        """The stacked mask (all-ones for a unit still searching) and its FLOPs share."""
        per_unit = [self.mask_of(u) for u in self.units]
        self.stacked = {
            name: torch.cat(
                [(m[name].to(p.device) if m is not None else torch.ones_like(p.chunk(self.k, 0)[0], dtype=torch.bool)) for m in per_unit]
            )
            for name, p in self.params.items()
        }
        sparse = sum(f * float(self.stacked[n].float().mean()) for n, f in self._flops.items())
        self._step_share = sparse / self._dense_flops

    # ------------------------------------------------------------------ hooks
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        remask_(self.model, self.stacked, optimizer)
        changed = False
        for j, unit in enumerate(self.units):
            technique = self.techniques[unit]
            if isinstance(technique, FlyingBird):
                # regrowth is scored by this step's dense gradient (.grad is not masked)
                changed |= technique.step(self.views(j), self.views(j, grads=True))
        if changed:
            self._refresh()
            remask_(self.model, self.stacked, optimizer)  # dropped weights lose their momentum
        self.steps += 1
        update_share = 0.0
        if changed:  # a drop-and-regrow step also needs the dense weight gradient (RigL's count)
            update_share = (1.0 - self._step_share) / 3.0
        self.flops_used += self._step_share + update_share

    def after_epoch(self) -> None:
        froze = False
        for j, unit in enumerate(self.units):
            technique = self.techniques[unit]
            if isinstance(technique, RobustBirdSearch) and technique.mask is None:
                froze |= technique.check(self.views(j))
        if froze:
            self._refresh()
            remask_(self.model, self.stacked)

    def observe(self, train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor], attack) -> None:
        """Flying Bird+: per unit, robust accuracy on training data and on held-out data, and the
        held-out robust loss (``attack(model, x, y)`` → inputs to score; identity for clean)."""
        if not any(isinstance(t, FlyingBirdPlus) for t in self.techniques.values()):
            return
        scores = [_per_unit_scores(self.model, *batch, attack) for batch in (train, held_out)]
        for j, unit in enumerate(self.units):
            technique = self.techniques[unit]
            if isinstance(technique, FlyingBirdPlus):
                technique.observe(scores[0][0][j], scores[1][0][j], scores[1][1][j])

    def finish(self, key_of) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Save every unit's state; return ``{upload key: mask}`` for units with a mask and the
        round's metrics (density of the uploaded weights, training FLOPs share)."""
        masks: dict[str, torch.Tensor] = {}
        kept = total = 0
        for unit in self.units:
            technique = self.techniques[unit]
            self.state[f"sparse.{unit}"] = technique.to_config()
            unit_masks = self.mask_of(unit)
            if unit_masks is None:
                continue
            for name, mask in unit_masks.items():
                masks[key_of(unit, name)] = mask.cpu()
                kept += int(mask.sum())
                total += mask.numel()
        metrics = {
            "density": kept / total if total else 1.0,
            "flops-fraction": self.flops_used / self.steps if self.steps else 1.0,
            "sparse-units": float(sum(self.mask_of(u) is not None for u in self.units)),
        }
        return masks, metrics


class FixedMask:
    """A mask changed only between rounds (random pruning at init: never; structured: refilled
    further after each round, ``steps`` counting how often)."""

    def __init__(self, masks: Masks, steps: int = 0) -> None:
        self.masks = masks
        self.steps = steps

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({"masks": masks_to_bytes(self.masks), "steps": self.steps})

    @classmethod
    def from_config(cls, record: ConfigRecord) -> "FixedMask":
        return cls(masks_from_bytes(bytes(record["masks"])), int(record.get("steps", 0)))


STRUCTURED_RATE = 0.2  # channel sparsity grows as 1 − 0.8^t, IMP's 20 % per step


def structured_mask(single: nn.Module, weights: dict[str, torch.Tensor], channel_sparsity: float) -> Masks:
    """Magnitude pruning at ``channel_sparsity`` then refill to that channel sparsity, on a
    single-base model holding ``weights`` (the channel graph needs a real model).

    A deterministic function of the weights: every client that receives the same global base in
    a round (and has pruned it as often) gets the same channels, and masks at growing sparsity
    nest, so the aggregate of differently pruned clients stays coherent."""
    from techniques.pruning import global_magnitude_prune, init_masks, refill

    params = dict(single.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    if channel_sparsity <= 0:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    unstructured = global_magnitude_prune(single, init_masks(single), rate=channel_sparsity)
    masks = refill(single, unstructured, channel_sparsity=channel_sparsity)
    return {n: masks.get(n, torch.ones_like(w, dtype=torch.bool)).cpu() for n, w in weights.items()}


def initial_unit_mask(params: dict[str, torch.Tensor], sparsity: float, run_seed: int, unit: str, layerwise: str = "igq") -> Masks:
    """The starting mask of one unit: random (layer densities ``layerwise``: IGQ for Flying
    Bird, uniform for random pruning at init) but the same on every client and on the server
    (seeded by the run seed and the unit's name), so clients start on a common sparse
    sub-network and the server can zero what nobody holds from the start."""
    digest = int.from_bytes(hashlib.sha256(f"{run_seed}:{unit}".encode()).digest()[:8], "little") % (2**63)
    return random_mask(params, sparsity, method=layerwise, generator=torch.Generator().manual_seed(digest))


def group_prunable(state: dict[str, torch.Tensor], prunable_names: set[str]) -> dict[str, dict[str, str]]:
    """``{unit: {param name: state key}}``: ``base{i}.<name>`` keys group by base, plain keys
    form the single unit ``"width"``; only conv/linear weights (``prunable_names``) count."""
    groups: dict[str, dict[str, str]] = {}
    for key in state:
        unit, _, name = key.partition(".") if key.startswith("base") and key.split(".", 1)[0][4:].isdigit() else ("width", "", key)
        if name in prunable_names:
            groups.setdefault(unit, {})[name] = key
    return groups


def sparse_initial_state(state: dict[str, torch.Tensor], prunable_names: set[str], cfg: SparseConfig, run_seed: int) -> dict[str, torch.Tensor]:
    """The global model's start for a run whose clients all start from the common mask (dynamic,
    random): each unit's weights zero outside it (:func:`initial_unit_mask`); for ``random``
    with ``rescale`` the kept weights are scaled by 1/sqrt(1 − p)."""
    out = dict(state)
    layerwise = "uniform" if cfg.method == "random" else "igq"
    scale = 1.0 / math.sqrt(1.0 - cfg.sparsity) if cfg.method == "random" and cfg.rescale else 1.0
    for unit, names in group_prunable(state, prunable_names).items():
        params = {name: state[key] for name, key in names.items()}
        masks = initial_unit_mask(params, cfg.sparsity, run_seed, unit, layerwise)
        for name, key in names.items():
            out[key] = state[key] * masks[name] * scale
    return out


def prune_state(state: dict[str, torch.Tensor], prunable_names: set[str], sparsity: float) -> dict[str, torch.Tensor]:
    """Each unit's conv/linear weights magnitude-pruned (globally within the unit) to
    ``sparsity``: the sparse model a run of sparse clients serves and is evaluated as."""
    out = dict(state)
    for unit, names in group_prunable(state, prunable_names).items():
        params = {name: state[key] for name, key in names.items()}
        masks = global_magnitude_mask(params, sparsity)
        for name, key in names.items():
            out[key] = state[key] * masks[name].to(state[key].device)
    return out


def structured_state(state: dict[str, torch.Tensor], prunable_names: set[str], sparsity: float, single: nn.Module) -> dict[str, torch.Tensor]:
    """Each unit's conv/linear weights pruned to whole channels at ``sparsity`` (what a
    ``structured`` client ends at): the model such a run serves and is evaluated as."""
    out = dict(state)
    for unit, names in group_prunable(state, prunable_names).items():
        masks = structured_mask(single, {name: state[key].cpu() for name, key in names.items()}, sparsity)
        for name, key in names.items():
            out[key] = state[key] * masks[name].to(state[key].device)
    return out


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_bases(x) if hasattr(model, "forward_bases") else model(x).unsqueeze(1)


def _per_unit_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack) -> tuple[list[float], list[float]]:
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
