"""Optional robust aggregation: coordinate-wise median and trimmed mean, next to the plain
example-weighted mean, for federations that expect some hostile clients.

Every rule works per tensor over exactly the contributions that hold it (for Split-Mix: each
base over the clients that trained it), as ``strategies.base.weighted_average`` does, and per
*entry* for sparse contributions (``(mask, values)`` entries, as produced for sparse clients):
an entry is aggregated over the clients whose mask holds it. Entries and tensors nobody holds
keep their previous value.

Rules (``AGGREGATORS``):

- ``mean``: the example-weighted mean — exactly ``strategies.base.weighted_average`` (called,
  not re-implemented). Not robust: one client sending a ×−10 update moves every coordinate.
- ``median``: the coordinate-wise median (Yin et al., 2018). For an even number of values it
  is the mean of the two middle ones (NumPy's convention). Unweighted: every client counts once,
  whatever number of examples it claims.
- ``trimmed-mean``: per coordinate, sort the n values, drop ``k = floor(β·n)`` from each end and
  average the rest (scipy.stats.trim_mean's convention), with ``0 <= β < 0.5``. Unweighted in
  ``aggregate``/``aggregate_record``; :func:`trimmed_mean` itself optionally weights the kept
  values by their clients' weights (trimming is always by count).

Few clients: the median of one value is that value and of two is their mean. The trimmed mean
trims nothing while ``β·n < 1`` (e.g. β = 0.2 needs n ≥ 5 holders of a tensor before one value
is dropped from each end); with fewer holders it equals the unweighted mean. With Split-Mix each
base is trained by only part of the sampled clients, so pick β with the per-base count in mind.

Dtypes: values are combined in float64 and cast back to the target dtype (the previous global
tensor's, else the first contribution's). Integer and bool tensors (e.g. BN's
``num_batches_tracked`` counters): the median is the *lower* median (always a value some client
sent; exact up to 2**53), the trimmed mean is rounded to the nearest integer; a bool tensor's
median is a majority vote (ties give False).

Robust rules cost more than the mean: they stack the n contributions of a tensor (float64) and
sort along the client axis, O(n log n) per coordinate and n × tensor-size memory per tensor (one
tensor at a time).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from flwr.app import ArrayRecord

from splitmix.protocol.codec import decode, encode
from strategies.base import weighted_average

AGGREGATORS = ("mean", "median", "trimmed-mean")
DEFAULT_TRIM_FRACTION = 0.1

# key -> plain tensor, or (bool mask or None for dense, values with the tensor's full shape)
Entry = torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]
Contribution = tuple[Mapping[str, Entry], float]


# --------------------------------------------------------------------------- per-tensor rules
def _check_trim_fraction(trim_fraction: float) -> float:
    beta = float(trim_fraction)
    if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
        raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction!r}")
    return beta


def _stack(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    held = torch.stack(
        [torch.ones(shape, dtype=torch.bool) if m is None else m.detach().cpu().to(torch.bool).expand(shape) for m in masks]
    )
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


def _cast(result: torch.Tensor, dtype: torch.dtype, integer_round: bool) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return result.to(dtype)
    if dtype == torch.bool:
        return result > 0.5
    return (torch.round(result) if integer_round else result).to(dtype)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


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
    return _cast(result, dtype, integer_round=True)


def coordinate_median(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """The coordinate-wise median of equally shaped tensors, in the first tensor's dtype.

    Even counts give the mean of the two middle values for float dtypes and the lower middle
    value for integer/bool dtypes (a value some tensor holds). ``masks`` (optional, one per
    tensor, ``None`` = all held) restrict each coordinate to the tensors holding it; a float
    coordinate nobody holds is NaN (:func:`aggregate` keeps the previous value there instead).
    """
    values, held = _stack(tensors, masks)
    dtype = tensors[0].dtype
    return _finish(_median_values(values, held, lower=_is_integer(dtype)), dtype)


def trimmed_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    trim_fraction: float = DEFAULT_TRIM_FRACTION,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The coordinate-wise β-trimmed mean of equally shaped tensors, in the first tensor's dtype.

    Per coordinate the n values are sorted, ``k = floor(β·n)`` are dropped from each end and
    the remaining ``n − 2k`` averaged — with ``weights`` (one per tensor, > 0) as a weighted mean
    of the kept values, else unweighted. Trimming is by count, never by weight; ``β·n < 1``
    trims nothing. ``masks``: as in :func:`coordinate_median` (n, and so k, per coordinate).
    Integer results are rounded to the nearest integer.
    """
    beta = _check_trim_fraction(trim_fraction)
    values, held = _stack(tensors, masks)
    return _finish(_trimmed_values(values, held, _weights(weights, values.shape[0]), beta), tensors[0].dtype)


# --------------------------------------------------------------------------- whole models
def _split(entry: Entry) -> tuple[torch.Tensor | None, torch.Tensor]:
    return (None, entry) if isinstance(entry, torch.Tensor) else entry


def _robust_tensors(
    name: str, contributions: Sequence[Contribution], previous: Mapping[str, torch.Tensor], trim_fraction: float
) -> dict[str, torch.Tensor]:
    """Median / trimmed mean of every key some contribution holds (keys must be in ``previous``,
    whose tensor gives the result dtype and the value of entries nobody holds)."""
    beta = _check_trim_fraction(trim_fraction)
    by_key: dict[str, list[tuple[torch.Tensor | None, torch.Tensor]]] = {}
    for tensors, weight in contributions:
        if not weight > 0:
            raise ValueError(f"contribution weight must be positive, got {weight}")
        for key, entry in tensors.items():
            if key not in previous:
                raise KeyError(f"contribution has '{key}', which the model does not")
            by_key.setdefault(key, []).append(_split(entry))
    out: dict[str, torch.Tensor] = {}
    for key, entries in by_key.items():
        old = previous[key]
        shape = old.shape
        for _, v in entries:
            if v.shape != shape:
                raise ValueError(f"'{key}': shape {tuple(v.shape)} does not match {tuple(shape)}")
        values, held = _stack([v for _, v in entries], [m for m, _ in entries])
        if name == "median":
            result = _median_values(values, held, lower=_is_integer(old.dtype))
        else:
            result = _trimmed_values(values, held, _weights(None, values.shape[0]), beta)
        if held is not None:  # entries nobody holds keep their previous value
            result = torch.where(torch.isnan(result), old.detach().cpu().to(torch.float64), result)
        out[key] = _cast(result, old.dtype, integer_round=True)
    return out


def aggregate_record(
    name: str, contributions: Sequence[Contribution], previous: ArrayRecord, *, trim_fraction: float = DEFAULT_TRIM_FRACTION
) -> ArrayRecord:
    """The new global ``ArrayRecord``: what a strategy's ``combine`` returns.

    ``mean`` is ``weighted_average(contributions, previous)`` itself. For the robust rules,
    tensors nobody sent keep their previous ``Array`` object as is, and results are cast to the
    previous tensor's dtype (as ``weighted_average`` does).
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation '{name}'; allowed: {', '.join(AGGREGATORS)}")
    if name == "mean":
        return weighted_average(contributions, previous)
    _check_trim_fraction(trim_fraction)
    touched = {key for tensors, _ in contributions for key in tensors}
    unknown = sorted(touched - set(previous.keys()))
    if unknown:
        raise KeyError(f"contributions hold tensors the model does not, e.g. {unknown[:3]}")
    old = {key: torch.from_numpy(decode(previous[key]).copy()) for key in previous.keys() if key in touched}
    new = _robust_tensors(name, contributions, old, trim_fraction)
    out = ArrayRecord()
    for key, array in previous.items():
        out[key] = encode(new[key]) if key in new else array
    return out


def aggregate(
    name: str,
    contributions: Sequence[Contribution],
    previous: Mapping[str, torch.Tensor] | None = None,
    *,
    trim_fraction: float = DEFAULT_TRIM_FRACTION,
) -> dict[str, torch.Tensor]:
    """Aggregate ``(tensors, weight)`` contributions with rule ``name`` (one of ``AGGREGATORS``).

    ``weight`` is the client's number of examples; only ``mean`` uses it. ``previous``
    (optional) is the current global state: its tensors fix the result dtypes, and its keys
    nobody sent (and sparse entries nobody holds) keep their value; without it the result holds
    exactly the keys some contribution sent, in the first sender's dtype.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation '{name}'; allowed: {', '.join(AGGREGATORS)}")
    _check_trim_fraction(trim_fraction)
    if previous is None:
        template: dict[str, torch.Tensor] = {}
        for tensors, _ in contributions:
            for key, entry in tensors.items():
                if key not in template:
                    mask, values = _split(entry)
                    if mask is not None:
                        raise ValueError(f"'{key}': sparse entries need the previous global state")
                    template[key] = values
        previous = template
    if name == "mean":
        record = weighted_average(contributions, ArrayRecord({k: encode(v) for k, v in previous.items()}))
        return {key: torch.from_numpy(decode(array).copy()) for key, array in record.items()}
    new = _robust_tensors(name, contributions, previous, trim_fraction)
    return {key: new.get(key, value) for key, value in previous.items()}
