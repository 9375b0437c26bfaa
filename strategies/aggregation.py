"""The one aggregation kernel: a masked reduction over client contributions, per entry of every
global tensor, with the reducer (``mean``, ``median``, ``trimmed-mean``) plugged in.

Every method reduces the same way; only *where* a client's tensor sits differs, so robust rules
work for every method, not only Split-Mix:

- a contribution is ``(tensors, weight)``: ``weight`` is the client's number of examples and each
  entry of ``tensors`` a tensor (dense: it holds all its entries) or ``(mask | None, values)`` (a
  sparse client holds only the entries its bool mask keeps; values off the mask are ignored);
- a *placement* maps a contribution's tensor into the global one: :func:`whole_tensor` (Split-Mix
  bases, FedAvg) or :func:`leading_slice` (HeteroFL's nested width slices);
- each entry is reduced over exactly the contributions that hold it; entries (and tensors) nobody
  holds keep their previous global value.

Reducers (``AGGREGATORS``; a new one is a function registered with :func:`register`):

- ``mean``: the example-weighted mean. Float64 sums built in contribution order by one
  ``torch._foreach_add_(alpha=weight)`` per contribution, divided by the summed weight and cast to
  the global tensor's dtype (integers truncate): Split-Mix's former kernel bit for bit, so runs
  stay reproducible. Not robust: one client sending a ×−10 update moves every entry.
- ``median``: the coordinate-wise median (Yin et al., 2018), unweighted (every holder counts once,
  whatever number of examples it claims). An even count gives the mean of the two middle values
  (NumPy's convention); integer tensors take the *lower* middle value (a value some client sent),
  a bool tensor's median is a majority vote (ties give False).
- ``trimmed-mean``: per entry, sort the n holders' values, drop ``k = floor(β·n)`` from each end
  and average the rest, unweighted (scipy.stats.trim_mean's convention), ``0 <= β < 0.5``. With
  fewer than ``1/β`` holders nothing is trimmed (it is then the unweighted mean): with Split-Mix or
  HeteroFL an entry is held by only part of the sampled clients, so pick β for that count.

Robust reducers stack an entry's n values (float64) and sort along the client axis: O(n log n)
per entry and n × tensor-size memory, one tensor at a time. Integer results are rounded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord

from models.slicing import leading_slices
from splitmix.protocol.codec import to_record, unpack

DEFAULT_TRIM_FRACTION = 0.1

# key -> plain tensor (dense), or (bool mask or None for dense, values)
Entry = torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]
Contribution = tuple[Mapping[str, Entry], float]
Shape = tuple[int, ...]
# (global shape, contribution's shape) -> where the contribution sits in the global tensor; asked
# only when the shapes differ (a contribution of the global shape is the whole tensor)
Placement = Callable[[Shape, Shape], tuple[slice, ...]]


# --------------------------------------------------------------------------- placements
def whole_tensor(shape: Shape, piece: Shape) -> tuple[slice, ...]:
    """The contribution is the whole global tensor (Split-Mix bases, FedAvg)."""
    if tuple(piece) != tuple(shape):
        raise ValueError(f"shape {tuple(piece)} does not match {tuple(shape)}")
    return leading_slices(shape)


def leading_slice(shape: Shape, piece: Shape) -> tuple[slice, ...]:
    """The contribution is the leading block of the global tensor (HeteroFL width slices)."""
    if len(piece) != len(shape) or any(p > s for p, s in zip(piece, shape)):
        raise ValueError(f"slice {piece} does not fit in {shape}")
    return leading_slices(piece)


# --------------------------------------------------------------------------- what a reducer sees
class Slot(NamedTuple):
    """One contribution's part of one global tensor (a NamedTuple: thousands per round)."""

    source: int  # the contribution's index: its place in the accumulation order
    block: tuple[slice | EllipsisType, ...]  # where ``values`` sit in the global tensor
    whole: bool  # the block is the whole tensor (no slicing needed)
    mask: torch.Tensor | None  # bool, ``values``' shape; None: every entry held
    values: torch.Tensor
    weight: float


@dataclass(frozen=True)
class Column:
    """Everything contributed to one global tensor, slots in contribution order."""

    shape: Shape
    dtype: torch.dtype
    slots: list[Slot]


# Per tensor, a reducer returns float64 values over the column's shape, already rounded for
# integer dtypes, and where they are defined: a bool "held" map, or None when every entry is held.
Reduced = tuple[torch.Tensor, torch.Tensor | None]
Reducer = Callable[[Mapping[str, Column], float], dict[str, Reduced]]  # (columns, trim fraction)
ColumnReducer = Callable[[Column, float], Reduced]

REDUCERS: dict[str, Reducer] = {}


def register(name: str) -> Callable[[Reducer], Reducer]:
    """Make ``fn`` the reducer ``name``. Register in this module: ``AGGREGATORS`` (the config's
    choices) is read at import."""

    def add(fn: Reducer) -> Reducer:
        if name in REDUCERS:
            raise ValueError(f"reducer '{name}' is already registered")
        REDUCERS[name] = fn
        return fn

    return add


def per_column(fn: ColumnReducer) -> Reducer:
    """A reducer from a rule that sees one tensor at a time (every coordinate-wise rule)."""

    @functools.wraps(fn)
    def reduce(columns: Mapping[str, Column], trim_fraction: float) -> dict[str, Reduced]:
        return {key: fn(column, trim_fraction) for key, column in columns.items()}

    return reduce


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


def _round_for(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 values that cast to ``dtype`` by rounding, not truncation (bool: > 0.5)."""
    if not _is_integer(dtype):
        return result
    if dtype == torch.bool:
        return (result > 0.5).to(torch.float64)
    return torch.round(result)


# --------------------------------------------------------------------------- reducers
def _held_weight(column: Column) -> float | torch.Tensor:
    """The summed weight of the slots holding each entry, added in slot order: one float while
    every slot holds the whole tensor (so the division stays the per-tensor ``sums / weight``)."""
    total: float | torch.Tensor = 0.0
    for slot in column.slots:
        if slot.whole and slot.mask is None:
            if isinstance(total, float):
                total += slot.weight
            else:
                total.add_(slot.weight)
            continue
        if isinstance(total, float):
            total = torch.full(column.shape, total, dtype=torch.float64)
        view = total if slot.whole else total[slot.block]
        if slot.mask is None:
            view.add_(slot.weight)
        else:
            view.add_(slot.mask.to(torch.float64), alpha=slot.weight)
    return total


@register("mean")
def mean(columns: Mapping[str, Column], trim_fraction: float) -> dict[str, Reduced]:
    """Example-weighted mean: float64 sums, one fused ``_foreach_add_(alpha=weight)`` per
    contribution over all its tensors, in contribution order (hence across columns at once)."""
    sums: dict[str, torch.Tensor] = {}
    adds: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], float]] = {}
    for key, column in columns.items():
        sums[key] = acc = torch.zeros(column.shape, dtype=torch.float64)
        for slot in column.slots:
            targets, terms, _ = adds.setdefault(slot.source, ([], [], slot.weight))
            targets.append(acc if slot.whole else acc[slot.block])
            if slot.mask is None:
                terms.append(slot.values)
            else:  # off the mask: + 0 (whatever the client sent there)
                terms.append(torch.where(slot.mask, slot.values, torch.zeros((), dtype=slot.values.dtype)))
    for source in sorted(adds):
        targets, terms, weight = adds[source]
        torch._foreach_add_(targets, terms, alpha=weight)  # float32 terms promoted into float64 sums
    out: dict[str, Reduced] = {}
    for key, column in columns.items():
        total = _held_weight(column)
        if isinstance(total, float):
            out[key] = (sums[key].div_(total), None)
        else:
            held = total > 0
            out[key] = (sums[key].div_(torch.where(held, total, 1.0)), held)
    return out


def _stack(column: Column) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, *shape) float64 values and, unless every slot holds the whole tensor, (n, *shape) held."""
    slots = column.slots
    if all(s.whole and s.mask is None for s in slots):
        return torch.stack([s.values.to(torch.float64) for s in slots]), None
    values = torch.zeros((len(slots), *column.shape), dtype=torch.float64)
    held = torch.zeros((len(slots), *column.shape), dtype=torch.bool)
    for i, s in enumerate(slots):
        values[i][s.block] = s.values
        held[i][s.block] = True if s.mask is None else s.mask
    return values, held


@register("median")
@per_column
def median(column: Column, trim_fraction: float) -> Reduced:
    values, held = _stack(column)
    result = _median_values(values, held, lower=_is_integer(column.dtype))
    return _round_for(result, column.dtype), None if held is None else held.any(dim=0)


@register("trimmed-mean")
@per_column
def trimmed(column: Column, trim_fraction: float) -> Reduced:
    values, held = _stack(column)
    result = _trimmed_values(values, held, _weights(None, values.shape[0]), _check_trim_fraction(trim_fraction))
    return _round_for(result, column.dtype), None if held is None else held.any(dim=0)


AGGREGATORS = tuple(REDUCERS)


# --------------------------------------------------------------------------- the kernel
def _split(entry: Entry) -> tuple[torch.Tensor | None, torch.Tensor]:
    return (None, entry) if isinstance(entry, torch.Tensor) else entry


def _reducer(name: str) -> Reducer:
    if name not in REDUCERS:
        raise ValueError(f"unknown aggregation '{name}'; allowed: {', '.join(REDUCERS)}")
    return REDUCERS[name]


def _check_trim_fraction(trim_fraction: float) -> float:
    beta = float(trim_fraction)
    if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
        raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction!r}")
    return beta


_WHOLE: tuple[EllipsisType] = (Ellipsis,)  # indexes the whole tensor (0-d ones too)


def _columns(contributions: Sequence[Contribution], targets: Mapping[str, tuple[Shape, torch.dtype]], placement: Placement) -> dict[str, Column]:
    columns: dict[str, Column] = {}
    for source, (tensors, weight) in enumerate(contributions):
        if not weight > 0:
            raise ValueError(f"contribution weight must be positive, got {weight}")
        for key, entry in tensors.items():
            if key not in targets:
                raise KeyError(f"contribution has '{key}', which the model does not")
            mask, values = _split(entry)
            shape, dtype = targets[key]
            piece = values.shape
            if mask is not None:
                if mask.shape != piece:
                    raise ValueError(f"'{key}': mask shape {tuple(mask.shape)} does not match values {tuple(piece)}")
                mask = mask.to(torch.bool)
            whole = piece == shape
            block: tuple[slice | EllipsisType, ...]
            if whole:
                block = _WHOLE
            else:
                try:
                    block = placement(shape, tuple(piece))
                except ValueError as err:
                    raise ValueError(f"'{key}': {err}") from None
            column = columns.get(key)
            if column is None:
                column = columns[key] = Column(shape, dtype, [])
            column.slots.append(Slot(source, block, whole, mask, values, float(weight)))
    return columns


def _reduce(
    contributions: Sequence[Contribution],
    targets: Mapping[str, tuple[Shape, torch.dtype]],
    previous64: Callable[[str], torch.Tensor],
    reducer: str,
    trim_fraction: float,
    placement: Placement,
) -> dict[str, torch.Tensor]:
    """New values of the tensors some contribution holds; ``previous64(key)`` (float64) fills
    entries nobody holds and is only called for tensors that have some."""
    reduce = _reducer(reducer)
    _check_trim_fraction(trim_fraction)
    columns = _columns(contributions, targets, placement)
    out: dict[str, torch.Tensor] = {}
    for key, (result, held) in reduce(columns, trim_fraction).items():
        if held is not None:
            result = torch.where(held, result, previous64(key))
        out[key] = result.to(columns[key].dtype)
    return out


def aggregate(
    previous: ArrayRecord,
    contributions: Sequence[Contribution],
    reducer: str = "mean",
    *,
    trim_fraction: float = DEFAULT_TRIM_FRACTION,
    placement: Placement = whole_tensor,
) -> ArrayRecord:
    """The new global ``ArrayRecord`` (packed), what every strategy's ``combine`` returns.

    Results take the previous tensor's dtype; tensors nobody sent keep their previous values
    (copied from the previous record's buffer into the new one), and only tensors with entries
    nobody holds are read as float64.
    """
    old = unpack(previous)  # read-only views of the previous buffer
    targets = {key: (tuple(value.shape), getattr(torch, value.dtype.name)) for key, value in old.items()}
    new = _reduce(
        contributions,
        targets,
        lambda key: torch.from_numpy(old[key].astype(np.float64)),
        reducer,
        trim_fraction,
        placement,
    )
    return to_record({key: new[key] if key in new else value for key, value in old.items()})


def aggregate_tensors(
    previous: Mapping[str, torch.Tensor] | None,
    contributions: Sequence[Contribution],
    reducer: str = "mean",
    *,
    trim_fraction: float = DEFAULT_TRIM_FRACTION,
    placement: Placement = whole_tensor,
) -> dict[str, torch.Tensor]:
    """:func:`aggregate` on plain tensors: untouched tensors are ``previous``'s objects.

    Without ``previous`` the result holds exactly the keys some contribution sent, in the first
    sender's dtype and shape; every entry must then be held (no sparse entries, no slices).
    """
    if previous is None:
        template: dict[str, torch.Tensor] = {}
        for tensors, _ in contributions:
            for key, entry in tensors.items():
                mask, values = _split(entry)
                if mask is not None:
                    raise ValueError(f"'{key}': sparse entries need the previous global state")
                template.setdefault(key, values)
        previous = template

    def previous64(key: str) -> torch.Tensor:
        return previous[key].detach().cpu().to(torch.float64)

    targets = {key: (tuple(t.shape), t.dtype) for key, t in previous.items()}
    new = _reduce(contributions, targets, previous64, reducer, trim_fraction, placement)
    return {key: new.get(key, value) for key, value in previous.items()}


# --------------------------------------------------------------------------- coordinate-wise rules
def _stack_tensors(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, *shape) float64 values and, when any mask is given, an (n, *shape) bool 'held'."""
    if not tensors:
        raise ValueError("no tensors to aggregate")
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape:
            raise ValueError(f"tensors have different shapes: {tuple(shape)} and {tuple(t.shape)}")
    values = torch.stack([t.detach().cpu().to(torch.float64) for t in tensors])
    if masks is None or all(m is None for m in masks):
        return values, None
    if len(masks) != len(tensors):
        raise ValueError(f"{len(masks)} masks for {len(tensors)} tensors")
    held = torch.stack([torch.ones(shape, dtype=torch.bool) if m is None else m.detach().cpu().to(torch.bool).expand(shape) for m in masks])
    return values, held


def _sorted_values(values: torch.Tensor, held: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values sorted along the client axis with entries not held pushed to the end (+inf), the
    sorting permutation, and the number of holders per coordinate."""
    n = values.shape[0]
    if held is None:
        ordered, order = torch.sort(values, dim=0, stable=True)
        return ordered, order, torch.full(values.shape[1:], n, dtype=torch.long)
    ordered, order = torch.sort(torch.where(held, values, torch.inf), dim=0, stable=True)
    return ordered, order, held.sum(dim=0)


def _median_values(values: torch.Tensor, held: torch.Tensor | None, lower: bool) -> torch.Tensor:
    """float64 coordinate-wise median (``lower``: the lower middle value); NaN where no holder."""
    ordered, _, count = _sorted_values(values, held)
    lo = ((count - 1).clamp_min(0) // 2).unsqueeze(0)
    hi = (count // 2).clamp_max(values.shape[0] - 1).unsqueeze(0)
    low = ordered.gather(0, lo).squeeze(0)
    result = low if lower else (low + ordered.gather(0, hi).squeeze(0)) / 2
    return result if held is None else torch.where(count > 0, result, torch.nan)


def _trimmed_values(values: torch.Tensor, held: torch.Tensor | None, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """float64 coordinate-wise β-trimmed (weighted) mean; NaN where no holder."""
    n = values.shape[0]
    ordered, order, count = _sorted_values(values, held)
    # floor(β·n), guarded against products like 0.29·100 = 28.999…
    k = torch.floor(beta * count.to(torch.float64) + 1e-9).to(torch.long)
    position = torch.arange(n).view(-1, *([1] * (values.dim() - 1)))
    keep = (position >= k) & (position < count - k)
    kept_w = torch.where(keep, weights[order], 0.0)
    total = kept_w.sum(dim=0)
    result = torch.where(keep, ordered, 0.0).mul(kept_w).sum(dim=0) / total.clamp_min(torch.finfo(torch.float64).tiny)
    return result if held is None else torch.where(count > 0, result, torch.nan)


def _weights(weights: Sequence[float] | None, n: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} tensors")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not bool(torch.all(torch.isfinite(w) & (w > 0))):
        raise ValueError(f"weights must be finite and positive, got {list(weights)}")
    return w


def _finish(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _is_integer(dtype) and bool(torch.isnan(result).any()):
        raise ValueError("an integer coordinate is held by no tensor; use aggregate() with the previous state")
    return _round_for(result, dtype).to(dtype)


def coordinate_median(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """The coordinate-wise median of equally shaped tensors, in the first tensor's dtype (the
    ``median`` reducer on bare tensors). ``masks`` (optional, one per tensor, ``None`` = all held)
    restrict each coordinate to the tensors holding it; a float coordinate nobody holds is NaN."""
    values, held = _stack_tensors(tensors, masks)
    dtype = tensors[0].dtype
    return _finish(_median_values(values, held, lower=_is_integer(dtype)), dtype)


def trimmed_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    trim_fraction: float = DEFAULT_TRIM_FRACTION,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The coordinate-wise β-trimmed mean of equally shaped tensors, in the first tensor's dtype
    (the ``trimmed-mean`` reducer on bare tensors). ``weights`` (one per tensor, > 0) weight the
    kept values; trimming is by count, never by weight. ``masks``: as in :func:`coordinate_median`."""
    beta = _check_trim_fraction(trim_fraction)
    values, held = _stack_tensors(tensors, masks)
    return _finish(_trimmed_values(values, held, _weights(weights, values.shape[0]), beta), tensors[0].dtype)
