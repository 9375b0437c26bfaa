"""Sparse adversarial training (Chen et al., ICLR 2022, arXiv 2202.09844): masks, Robust Bird,
Flying Bird / Flying Bird+, and what a client needs to keep a mask across Flower rounds.

A mask is a ``dict[str, torch.Tensor]`` of **bool** tensors keyed by parameter name (the model's
``named_parameters`` names, or the global ``base{i}.<path>`` names after :func:`split_base_masks`),
True = the weight is kept. Only conv and linear weights are masked (:func:`prunable_parameters`).

What was taken from the paper's official code (VITA-Group/Sparsity-Win-Robust-Generalization):

- Prunable tensors: every conv and linear weight, *including* the first conv and the last
  classifier (``prune_unstructured`` prunes all ``Conv2d``/``Linear`` weights; Flying Bird masks
  every 2-D/4-D parameter), never biases or batch norm.
- Robust Bird (``Robust-Bird/utils/early_bird.py``, ``train_eb.py``): one check per epoch; the mask
  is the global (all layers together) magnitude mask at the target sparsity; the last 5 masks are
  kept and the search stops when the normalised Hamming distance between the newest mask and
  *each* of the 4 before it is ≤ 0.08. The official search runs on *standard* (clean) training
  (``--stage1 sgd``), then the network is pruned globally by L1 magnitude and trained with PGD.
  Two departures here: the search mask covers conv *and* linear weights (the official search
  mask covers convs only, its final prune both), so the mask that stops the search is the one
  that is frozen; and masks are exact top-k (the official threshold ``|w| > t`` can keep fewer on ties).
- Flying Bird (``sparselearning/core.py``, ``main_adv.py``, ``utils.py``): density 0.2 (80 %
  sparsity); random initial mask with per-layer densities from IGQ ("ideal gas quotas",
  ``--sparse_init igq``; ERK and uniform are provided too); every ΔT = 900 iterations (1200
  in the second half of training with ``--dynamic_fre``) each layer drops ``ceil(α_t · active)``
  of its smallest-magnitude active weights and regrows as many at its inactive positions with
  the largest gradient magnitude (the paper's rule, RigL-style; the official *script* default
  ``--growth random`` regrows randomly); α0 = 0.5 (``--death-rate``) decays with a cosine over the
  whole run, per iteration, to ``eta_min`` = 0.005 (here ``min_fraction``, default 0 as in the
  issue's formula α_t = α0/2·(1+cos(πt/T_end))).
- Flying Bird+ (``Masking.get_dst_ratio`` / ``magnitude_death`` / ``gradient_growth``): after
  ``--dynamic_epoch`` (100 of 200 epochs), at each topology update look at the last
  ``--epoch_range`` = 4 epoch-to-epoch changes of (a) the robust generalisation gap (train robust
  accuracy − validation robust accuracy) and (b) the validation robust loss. If at least
  ``--update_threshold`` = 50 % of the gap changes are increases, prune *more*: an extra
  ``ceil(α_t · 0.4 · active)`` (``--prune_ratio`` 0.4), so sparsity rises. If at least 50 % of the
  loss changes are increases (≥ 0), grow *more*: ``int(1.05 · regrow)`` (``--growth_ratio`` 0.05), so
  density rises. Both can fire together (then sparsity still rises: +0.4 vs +0.05).

FLOPs (:func:`flops_fraction`) follow the official ``flops.py`` idea (sparse FLOPs = dense FLOPs ×
density) but per layer: conv/linear MACs are scaled by each layer's density, assuming ideal
sparse kernels (cost ∝ non-zeros, no indexing overhead), which real dense hardware does not give.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from flwr.app import ConfigRecord
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.blocks import StackedLinear
from models.masks import Masks
from splitmix.protocol import as_bytes, as_float, as_int

Params = Mapping[str, torch.Tensor]

# ---------------------------------------------------------------------------- prunable weights


def prunable_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Conv and linear weights (``StackedConv2d``/``StackedLinear`` included), in module order.

    Biases and batch-norm parameters stay dense (the paper's code masks only 2-D/4-D weights).
    The first conv and the classifier are included, as in the official code; pass their names in
    ``exclude`` to keep them dense.
    """
    skip = set(exclude)
    out: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, StackedLinear)):
            name = f"{prefix}.weight" if prefix else "weight"
            if name not in skip and isinstance(module.weight, nn.Parameter):
                out[name] = module.weight
    return out


def _params_of(source: nn.Module | Params) -> Params:
    return prunable_parameters(source) if isinstance(source, nn.Module) else source


def keep_count(numel: int, sparsity: float) -> int:
    """Entries a mask at ``sparsity`` keeps: round((1 − s)·N) (Python rounding, half to even)."""
    if not 0.0 <= sparsity <= 1.0 or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(numel, max(0, round((1.0 - sparsity) * numel)))


def _base_chunks(tensor: torch.Tensor, num_bases: int) -> list[torch.Tensor]:
    """Views of a stacked tensor, one per base (dim 0), as in ``models.blocks``."""
    if num_bases < 1 or tensor.shape[0] % num_bases:
        raise ValueError(f"dim 0 of shape {tuple(tensor.shape)} does not split into {num_bases} bases")
    return list(tensor.chunk(num_bases, dim=0)) if num_bases > 1 else [tensor]


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest scores; ties go to the lower position (stable sort)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask


# ---------------------------------------------------------------------------- static masks


def global_magnitude_mask(params: nn.Module | Params, sparsity: float, num_bases: int = 1) -> Masks:
    """Keep exactly ``round((1−s)·N)`` weights of largest |w| over all given tensors together.

    Ties are broken by position: earlier tensor (mapping order), then lower flat index. With
    ``num_bases`` > 1 each tensor holds that many stacked bases (dim 0) and every base gets its
    own global mask with its own exact count: bases are separate networks, trained and
    aggregated separately, so one base must not take another's budget.
    """
    params = _params_of(params)
    names = list(params)
    if not names:
        return {}
    with torch.no_grad():
        for name in names:
            if not torch.isfinite(params[name]).all():
                raise ValueError(f"parameter '{name}' holds NaN or Inf; no magnitude mask")
        per_base = [[c.detach().abs().reshape(-1) for c in _base_chunks(params[n], num_bases)] for n in names]
        kept_chunks: list[list[torch.Tensor]] = [[] for _ in names]
        for b in range(num_bases):
            parts = [per_base[i][b] for i in range(len(names))]
            flat = torch.cat([p.float() for p in parts])
            keep = _top_k_mask(flat, keep_count(flat.numel(), sparsity))
            for i, piece in enumerate(keep.split([p.numel() for p in parts])):
                kept_chunks[i].append(piece)
        return {n: torch.cat([c.view(-1, *params[n].shape[1:]) for c in kept_chunks[i]], dim=0).view(params[n].shape) for i, n in enumerate(names)}


def layer_densities(shapes: Mapping[str, Sequence[int]], density: float, method: str = "igq") -> dict[str, float]:
    """Per-layer densities whose weighted mean is ``density`` (Flying Bird's initial mask).

    ``igq``: ideal gas quotas (official default): kept_l = N_l/(f·N_l + 1), f by bisection, so
    large layers are sparser. ``erk``: Erdős–Rényi-Kernel, density_l ∝ Σ shape / Π shape, capped
    at 1 (capped layers become dense). ``uniform``: every layer ``density``.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    counts = {n: int(np.prod(s)) for n, s in shapes.items()}
    total = sum(counts.values())
    if method == "uniform" or density in (0.0, 1.0) or not counts:
        return {n: density for n in counts}
    target = density * total
    if method == "igq":
        # kept(f) = Σ N_l/(f·N_l + 1) falls from N (f = 0) towards 0: bracket, then bisect.
        def kept(f: float) -> float:
            return sum(c / (f * c + 1.0) for c in counts.values())

        low, high = 0.0, 1e-12
        while kept(high) > target:
            low, high = high, high * 2.0
        for _ in range(200):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if kept(mid) > target else (low, mid)
        f = 0.5 * (low + high)
        return {n: 1.0 / (f * c + 1.0) for n, c in counts.items()}
    if method == "erk":
        dense: set[str] = set()
        while True:
            raw = {n: sum(shapes[n]) / counts[n] for n in counts if n not in dense}
            budget = target - sum(counts[n] for n in dense)
            eps = budget / sum(raw[n] * counts[n] for n in raw)
            over = [n for n in raw if eps * raw[n] > 1.0]
            if not over:
                return {n: 1.0 if n in dense else eps * raw[n] for n in counts}
            dense.update(over)
    raise ValueError(f"unknown density method '{method}' (igq, erk, uniform)")


def random_mask(
    params: nn.Module | Params,
    sparsity: float,
    method: str = "igq",
    generator: torch.Generator | None = None,
    num_bases: int = 1,
) -> Masks:
    """A random mask with per-layer densities from :func:`layer_densities` (Flying Bird's start).

    Layer counts are rounded by largest remainder so the total is exactly ``round((1−s)·N)``
    (per base with ``num_bases`` > 1); positions inside a layer are uniform (``generator``).
    """
    params = _params_of(params)
    density = 1.0 - sparsity
    chunk_shapes = {n: (p.shape[0] // num_bases, *p.shape[1:]) for n, p in params.items()}
    dens = layer_densities(chunk_shapes, density, method)
    sizes = {n: int(np.prod(s)) for n, s in chunk_shapes.items()}
    total_keep = keep_count(sum(sizes.values()), sparsity)
    exact = {n: dens[n] * sizes[n] for n in sizes}
    counts = {n: min(sizes[n], int(math.floor(exact[n]))) for n in sizes}
    spare = total_keep - sum(counts.values())
    for n in sorted(sizes, key=lambda n: (-(exact[n] - math.floor(exact[n])), list(sizes).index(n))):
        if spare <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            spare -= 1
    masks: Masks = {}
    for n, p in params.items():
        chunks = []
        for _ in range(num_bases):
            flat = torch.zeros(sizes[n], dtype=torch.bool)
            flat[torch.randperm(sizes[n], generator=generator)[: counts[n]]] = True
            chunks.append(flat.view(chunk_shapes[n]))
        masks[n] = torch.cat(chunks, dim=0).to(p.device)
    return masks


# ---------------------------------------------------------------------------- applying masks


def _check_mask(name: str, mask: torch.Tensor, param: torch.Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != param.shape:
        raise ValueError(f"mask '{name}' is {mask.dtype} {tuple(mask.shape)}, parameter is {tuple(param.shape)}")


def _named(source: nn.Module | Params, masks: Masks) -> dict[str, torch.Tensor]:
    params = dict(source.named_parameters()) if isinstance(source, nn.Module) else dict(source)
    missing = sorted(set(masks) - set(params))
    if missing:
        raise KeyError(f"masks name unknown parameters, e.g. {missing[:3]}")
    for n, m in masks.items():
        _check_mask(n, m, params[n])
    return {n: params[n] for n in masks}


@torch.no_grad()
def apply_mask_(source: nn.Module | Params, masks: Masks) -> None:
    """Zero the masked-out weights in place (after init, after every optimizer step)."""
    for n, p in _named(source, masks).items():
        p.mul_(masks[n].to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def mask_gradients_(source: nn.Module | Params, masks: Masks) -> None:
    """Zero gradients of masked-out weights (so momentum/weight decay never revive them).

    Call it *after* any :meth:`FlyingBird.update` that needs this step's dense gradients.
    """
    for n, p in _named(source, masks).items():
        if p.grad is not None:
            p.grad.mul_(masks[n].to(device=p.device, dtype=p.grad.dtype))


@torch.no_grad()
def mask_optimizer_state_(optimizer: torch.optim.Optimizer, source: nn.Module | Params, masks: Masks) -> None:
    """Zero per-weight optimizer state (SGD momentum, Adam moments) of masked-out weights, as
    the official ``apply_mask`` does for the momentum buffer, so a regrown weight starts clean."""
    for n, p in _named(source, masks).items():
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.mul_(masks[n].to(device=value.device, dtype=value.dtype))


def remask_(source: nn.Module | Params, masks: Masks, optimizer: torch.optim.Optimizer | None = None) -> None:
    """After ``optimizer.step()``: weights (and optimizer state) back onto the mask."""
    apply_mask_(source, masks)
    if optimizer is not None:
        mask_optimizer_state_(optimizer, source, masks)


# ---------------------------------------------------------------------------- mask statistics


def kept_counts(masks: Masks) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


def mask_density(masks: Masks) -> float:
    """Kept fraction over all masked entries (1 − sparsity)."""
    total = sum(m.numel() for m in masks.values())
    return sum(kept_counts(masks).values()) / total if total else 1.0


def hamming_distance(first: Masks, second: Masks) -> float:
    """Fraction of entries (over all tensors) where two masks differ; 0 = identical."""
    if set(first) != set(second):
        raise KeyError("masks cover different tensors")
    total = differ = 0
    for n, m in first.items():
        if m.shape != second[n].shape:
            raise ValueError(f"mask '{n}' shapes differ: {tuple(m.shape)} vs {tuple(second[n].shape)}")
        differ += int((m.cpu() != second[n].cpu()).sum())
        total += m.numel()
    return differ / total if total else 0.0


# ---------------------------------------------------------------------------- Split-Mix bases


def split_base_masks(masks: Masks, indices: Sequence[int]) -> Masks:
    """Masks of a k-stack → per-base masks named ``base{i}.<name>`` (the global tensor names),
    so a client can keep each base's mask across rounds even when its assigned bases change."""
    out: Masks = {}
    for name, mask in masks.items():
        for i, chunk in zip(indices, _base_chunks(mask, len(indices))):
            out[f"base{i}.{name}"] = chunk.clone()
    return out


def stack_base_masks(base_masks: Masks, indices: Sequence[int], names: Iterable[str]) -> Masks:
    """Per-base masks → masks of the k-stack of bases ``indices`` (inverse of
    :func:`split_base_masks`); ``KeyError`` names the first base without a mask."""
    return {n: torch.cat([base_masks[f"base{i}.{n}"] for i in indices], dim=0) for n in names}


# ---------------------------------------------------------------------------- serialisation

_MAGIC = b"SPMK\x01"


def masks_to_bytes(masks: Masks) -> bytes:
    """Masks as bytes: a JSON header (names, shapes) then each mask bit-packed (8 per byte).

    No pickle: safe to load from Flower ``Context`` state or a message.
    """
    header = json.dumps([[n, list(m.shape)] for n, m in masks.items()]).encode()
    out = io.BytesIO()
    out.write(_MAGIC + struct.pack("<I", len(header)) + header)
    for m in masks.values():
        out.write(np.packbits(m.detach().cpu().numpy().reshape(-1), bitorder="little").tobytes())
    return out.getvalue()


def masks_from_bytes(data: bytes) -> Masks:
    """Inverse of :func:`masks_to_bytes`; ``ValueError`` on any inconsistency."""
    head = len(_MAGIC) + 4
    if len(data) < head or data[: len(_MAGIC)] != _MAGIC:
        raise ValueError("not a mask blob (bad magic)")
    (length,) = struct.unpack("<I", data[len(_MAGIC) : head])
    try:
        entries = json.loads(data[head : head + length].decode())
        spec = [(str(n), tuple(int(d) for d in shape)) for n, shape in entries]
    except (ValueError, TypeError) as err:
        raise ValueError(f"mask header is corrupt: {err}") from None
    offset, masks = head + length, {}
    for name, shape in spec:
        if any(d < 0 for d in shape):
            raise ValueError(f"mask '{name}' has a negative dimension")
        count = math.prod(shape)
        size = (count + 7) // 8
        if offset + size > len(data):
            raise ValueError(f"mask blob is truncated at '{name}'")
        bits = np.unpackbits(np.frombuffer(data, np.uint8, size, offset), bitorder="little")
        if bits[count:].any():
            raise ValueError(f"mask '{name}' has non-zero padding bits")
        masks[name] = torch.from_numpy(bits[:count].astype(bool)).view(shape)
        offset += size
    if offset != len(data):
        raise ValueError(f"mask blob has {len(data) - offset} trailing bytes")
    return masks


def masks_to_config(masks: Masks, key: str = "masks") -> ConfigRecord:
    """A ``ConfigRecord`` holding the masks (store it in ``context.state``)."""
    return ConfigRecord({key: masks_to_bytes(masks)})


def masks_from_config(record: ConfigRecord, key: str = "masks") -> Masks:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"config record has no bytes under '{key}'")
    return masks_from_bytes(value)


# ---------------------------------------------------------------------------- Robust Bird


@dataclass
class RobustBirdSearch:
    """Early search for the static mask (Robust Bird).

    At each check point (an epoch, or a round in FL) :meth:`check` computes the global magnitude
    mask at ``sparsity`` and keeps the last ``window`` masks; once the newest is within
    ``threshold`` (normalised Hamming, ≤, as in the official code) of every earlier one in the
    window, that mask is frozen and :meth:`check` keeps returning True. Official values:
    window 5, threshold 0.08; ``window=2`` compares consecutive masks only.
    """

    sparsity: float
    threshold: float = 0.08
    window: int = 5
    num_bases: int = 1
    history: list[Masks] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    frozen: Masks | None = None
    checks: int = 0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be at least 2, got {self.window}")
        keep_count(1, self.sparsity)  # validates the sparsity

    def check(self, params: nn.Module | Params) -> bool:
        """Record the current mask; True once the mask is frozen (then stop searching)."""
        if self.frozen is not None:
            return True
        mask = {n: m.cpu() for n, m in global_magnitude_mask(params, self.sparsity, self.num_bases).items()}
        self.checks += 1
        self.history = (self.history + [mask])[-self.window :]
        if len(self.history) < self.window:
            self.distances = []
            return False
        self.distances = [hamming_distance(mask, old) for old in self.history[:-1]]
        if max(self.distances) <= self.threshold:
            self.frozen = mask
            self.history = []
            return True
        return False

    @property
    def mask(self) -> Masks | None:
        """The frozen mask, or None while searching."""
        return self.frozen

    def to_config(self) -> ConfigRecord:
        """Search state for Flower ``Context`` state (masks bit-packed)."""
        return ConfigRecord(
            {
                "sparsity": float(self.sparsity),
                "threshold": float(self.threshold),
                "window": int(self.window),
                "num-bases": int(self.num_bases),
                "checks": int(self.checks),
                "history": [masks_to_bytes(m) for m in self.history],
                "frozen": masks_to_bytes(self.frozen) if self.frozen is not None else b"",
            }
        )

    @classmethod
    def from_config(cls, record: ConfigRecord) -> RobustBirdSearch:
        frozen = as_bytes(record["frozen"])
        return cls(
            sparsity=as_float(record["sparsity"]),
            threshold=as_float(record["threshold"]),
            window=as_int(record["window"]),
            num_bases=as_int(record["num-bases"]),
            history=[masks_from_bytes(bytes(b)) for b in cast(list[bytes], record["history"])],
            frozen=masks_from_bytes(frozen) if frozen else None,
            checks=as_int(record["checks"]),
        )


# ---------------------------------------------------------------------------- Flying Bird


def cosine_fraction(step: int, initial: float, end_step: int, minimum: float = 0.0) -> float:
    """α_t = min + (α0 − min)/2 · (1 + cos(π·t/T_end)), constant ``min`` after T_end."""
    t = min(max(step, 0), end_step)
    return minimum + (initial - minimum) * 0.5 * (1.0 + math.cos(math.pi * t / end_step))


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 0.1·30 must give 3, not 4


@dataclass
class FlyingBird:
    """Dynamic sparsity: every ΔT steps each layer drops its smallest active weights and regrows
    as many where |gradient| is largest, so each layer's kept count stays exactly constant.

    ``masks``: the current mask (start from :func:`random_mask`, then :func:`apply_mask_`).
    Per training step: ``loss.backward(); optimizer.step(); remask_(model, fb.masks, optimizer);
    fb.step(model, optimizer=optimizer)``. :meth:`step` calls :meth:`update` when due, which
    scores regrowth by ``.grad``: it must still be this step's *dense* gradient (masked weights
    are zero but their gradients are not), so do not :func:`mask_gradients_` before it. Per base with ``num_bases``
    > 1 (each base's layer chunk keeps its own count). Newly activated weights start at zero; a
    weight dropped and regrown in the same update keeps its value (RigL's rule). Drop and regrow
    ties go to the lower flat index.
    """

    masks: Masks
    end_step: int
    drop_fraction: float = 0.5
    update_every: int = 900
    late_update_every: int | None = None
    min_fraction: float = 0.0
    num_bases: int = 1
    steps: int = 0
    updates: int = 0

    def __post_init__(self) -> None:
        if self.end_step < 1 or self.update_every < 1 or (self.late_update_every or 1) < 1:
            raise ValueError("end_step and update intervals must be positive")
        if not 0.0 <= self.min_fraction <= self.drop_fraction <= 1.0:
            raise ValueError("need 0 <= min_fraction <= drop_fraction <= 1")

    def fraction(self, step: int | None = None) -> float:
        """Drop fraction α_t at ``step`` (default: the current step)."""
        return cosine_fraction(self.steps if step is None else step, self.drop_fraction, self.end_step, self.min_fraction)

    def interval(self, step: int) -> int:
        """ΔT; ``late_update_every`` in the second half of training (official ``--dynamic_fre``)."""
        late = self.late_update_every is not None and step > self.end_step / 2
        return self.late_update_every if late else self.update_every  # type: ignore[return-value]

    def due(self, step: int) -> bool:
        return 0 < step < self.end_step and step % self.interval(step) == 0

    def step(self, params: nn.Module | Params, grads: Params | None = None, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Count one training step; update the topology when due. True if it changed."""
        self.steps += 1
        if not self.due(self.steps):
            return False
        self.update(params, grads, optimizer)
        return True

    def _amounts(self, active: int, inactive: int, alpha: float) -> tuple[int, int]:
        """(drop, grow) for one layer chunk; equal for Flying Bird."""
        n = min(_ceil(alpha * active), active)
        return n, n

    @torch.no_grad()
    def update(self, params: nn.Module | Params, grads: Params | None = None, optimizer: torch.optim.Optimizer | None = None) -> Masks:
        """Drop-and-regrow now at the current α_t; returns (and keeps) the new masks and puts
        the weights (and optimizer state) on them. ``grads`` default: each parameter's ``.grad``."""
        named = _named(params, self.masks)
        alpha = self.fraction()
        new_masks: Masks = {}
        for name, p in named.items():
            grad = grads[name] if grads is not None else p.grad
            if grad is None:
                raise ValueError(f"no gradient for '{name}': call update after backward()")
            old = self.masks[name].to(p.device)
            chunks = []
            for m, w, g in zip(*(_base_chunks(t, self.num_bases) for t in (old, p.detach(), grad.detach()))):
                chunks.append(self._update_chunk(m.reshape(-1), w.reshape(-1), g.reshape(-1), alpha).view(m.shape))
            new = torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0]
            p.masked_fill_(new & ~old, 0.0)  # newly grown weights start at zero
            new_masks[name] = new
        self.masks = new_masks
        self.updates += 1
        remask_(params, self.masks, optimizer)
        return self.masks

    def _update_chunk(self, mask: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        active = int(mask.sum())
        n_drop, n_grow = self._amounts(active, mask.numel() - active, alpha)
        # drop: the n_drop active weights of smallest |w| (inactive ones ranked last)
        magnitude = torch.where(mask, weight.abs().float(), torch.full_like(weight, math.inf, dtype=torch.float32))
        kept = mask.clone()
        if n_drop:
            kept[torch.sort(magnitude, stable=True).indices[:n_drop]] = False
        # grow: the n_grow inactive positions (just-dropped included) of largest |grad|
        n_grow = min(n_grow, kept.numel() - int(kept.sum()))
        if n_grow:
            score = torch.where(kept, torch.full_like(grad, -1.0, dtype=torch.float32), grad.abs().float())
            kept[torch.sort(score, descending=True, stable=True).indices[:n_grow]] = True
        return kept

    def to_config(self) -> ConfigRecord:
        """Scheduler state for Flower ``Context`` state (the step counter spans rounds)."""
        return ConfigRecord(
            {
                "masks": masks_to_bytes(self.masks),
                "end-step": self.end_step,
                "drop-fraction": self.drop_fraction,
                "update-every": self.update_every,
                "late-update-every": self.late_update_every or 0,
                "min-fraction": self.min_fraction,
                "num-bases": self.num_bases,
                "steps": self.steps,
                "updates": self.updates,
            }
        )

    @classmethod
    def _kwargs_from(cls, record: ConfigRecord) -> dict:
        return dict(
            masks=masks_from_bytes(as_bytes(record["masks"])),
            end_step=as_int(record["end-step"]),
            drop_fraction=as_float(record["drop-fraction"]),
            update_every=as_int(record["update-every"]),
            late_update_every=as_int(record["late-update-every"]) or None,
            min_fraction=as_float(record["min-fraction"]),
            num_bases=as_int(record["num-bases"]),
            steps=as_int(record["steps"]),
            updates=as_int(record["updates"]),
        )

    @classmethod
    def from_config(cls, record: ConfigRecord) -> FlyingBird:
        return cls(**cls._kwargs_from(record))


def _increase_share(values: Sequence[float], window: int, strict: bool) -> float | None:
    """Share of the last ``window`` consecutive changes that are increases (None: < 1 change)."""
    recent = list(values)[-(window + 1) :]
    if len(recent) < 2:
        return None
    diffs = np.diff(np.asarray(recent, dtype=np.float64))
    return float(np.mean(diffs > 0 if strict else diffs >= 0))


@dataclass
class FlyingBirdPlus(FlyingBird):
    """Flying Bird+: Flying Bird whose prune/regrow amounts adapt to robust overfitting.

    Feed :meth:`observe` once per epoch (or round) with the training robust accuracy, the
    validation robust accuracy and the validation robust loss. From ``adapt_after`` observations
    on, an update prunes an extra ``ceil(α_t·prune_extra·active)`` when the robust generalisation
    gap rose in ≥ ``vote`` of the last ``window`` changes, and regrows ``int((1+grow_extra)·n)``
    instead of n when the validation robust loss did not fall in ≥ ``vote`` of them (official:
    prune 0.4, grow 0.05, window 4, vote 0.5, from epoch 100 of 200).
    """

    prune_extra: float = 0.4
    grow_extra: float = 0.05
    window: int = 4
    vote: float = 0.5
    adapt_after: int = 0
    gaps: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    prune_updates: int = 0
    grow_updates: int = 0

    def observe(self, train_robust_acc: float, val_robust_acc: float, val_robust_loss: float) -> None:
        self.gaps.append(float(train_robust_acc) - float(val_robust_acc))
        self.losses.append(float(val_robust_loss))

    def decisions(self) -> tuple[bool, bool]:
        """(prune more, grow more) from the recorded statistics."""
        if len(self.gaps) < max(self.adapt_after, 2):
            return False, False
        gap_up = _increase_share(self.gaps, self.window, strict=True)
        loss_up = _increase_share(self.losses, self.window, strict=False)
        return (gap_up is not None and gap_up >= self.vote, loss_up is not None and loss_up >= self.vote)

    def update(self, params, grads=None, optimizer=None) -> Masks:
        self._decision = self.decisions()
        self.prune_updates += int(self._decision[0])
        self.grow_updates += int(self._decision[1])
        return super().update(params, grads, optimizer)

    def _amounts(self, active: int, inactive: int, alpha: float) -> tuple[int, int]:
        prune_more, grow_more = getattr(self, "_decision", (False, False))
        n = min(_ceil(alpha * active), active)
        drop = min(active, n + (_ceil(alpha * self.prune_extra * active) if prune_more else 0))
        grow = int(n * (1.0 + self.grow_extra)) if grow_more else n
        return drop, grow

    def to_config(self) -> ConfigRecord:
        record = super().to_config()
        record.update(
            {
                "prune-extra": self.prune_extra,
                "grow-extra": self.grow_extra,
                "window": self.window,
                "vote": self.vote,
                "adapt-after": self.adapt_after,
                "gaps": [float(g) for g in self.gaps],
                "losses": [float(v) for v in self.losses],
                "prune-updates": self.prune_updates,
                "grow-updates": self.grow_updates,
            }
        )
        return record

    @classmethod
    def from_config(cls, record: ConfigRecord) -> FlyingBirdPlus:
        return cls(
            **cls._kwargs_from(record),
            prune_extra=as_float(record["prune-extra"]),
            grow_extra=as_float(record["grow-extra"]),
            window=as_int(record["window"]),
            vote=as_float(record["vote"]),
            adapt_after=as_int(record["adapt-after"]),
            gaps=[float(g) for g in cast(list[float], record.get("gaps", []))],
            losses=[float(v) for v in cast(list[float], record.get("losses", []))],
            prune_updates=as_int(record["prune-updates"]),
            grow_updates=as_int(record["grow-updates"]),
        )


# ---------------------------------------------------------------------------- FLOPs


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Forward FLOPs of each prunable layer for one input (``torch.utils.flop_counter``, as
    ``models/cost.py``), keyed by its weight's name; measured around each module's forward."""
    layers = {name.rsplit(".", 1)[0] if "." in name else "": name for name in prunable_parameters(model)}
    modules = dict(model.named_modules())
    flops: dict[str, int] = {w: 0 for w in layers.values()}
    counter = FlopCounterMode(display=False)
    start: dict[str, int] = {}
    handles = []
    for prefix, weight_name in layers.items():
        module = modules[prefix]
        handles.append(module.register_forward_pre_hook(lambda m, a, p=prefix: start.__setitem__(p, counter.get_total_flops())))
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, p=prefix, w=weight_name: flops.__setitem__(w, flops[w] + counter.get_total_flops() - start[p])
            )
        )
    was_training = model.training
    model.eval()
    try:  # two inputs: a static-BN model (no running statistics) normalises with batch statistics
        x = torch.zeros(2, *input_shape, device=next(model.parameters()).device)
        with counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {w: f // 2 for w, f in flops.items()}


def flops_fraction(model: nn.Module, masks: Masks, input_shape: tuple[int, ...], update_every: int | None = None) -> float:
    """Share of dense *training* FLOPs a masked model needs (conv/linear only).

    Each layer's forward, input-gradient and weight-gradient cost scales with its density
    (idealised sparse kernels; batch norm, activations and unmasked layers are not counted, as
    in ``models/cost.py``), so forward, training and PGD steps share the same fraction S/D. With
    ``update_every`` = ΔT (Flying Bird) one step in ΔT also needs the *dense* weight gradient for
    regrowth: ((ΔT−1)·3S + 2S + D) / (3·D·ΔT), as RigL counts it.
    """
    per_layer = layer_flops(model, input_shape)
    dense = float(sum(per_layer.values()))
    if dense == 0:
        return 1.0
    sparse = sum(f * (float(masks[n].float().mean()) if n in masks else 1.0) for n, f in per_layer.items())
    if not update_every:
        return sparse / dense
    t = float(update_every)
    return ((t - 1) * 3 * sparse + 2 * sparse + dense) / (3 * dense * t)
