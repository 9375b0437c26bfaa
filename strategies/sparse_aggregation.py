"""Entry-wise weighted means for sparse client updates.

With sparse training each client's mask keeps different weights; averaging whole tensors would
pull every entry a client does not hold towards zero. Here each entry is averaged over exactly
the clients whose mask holds it (weights renormalised per entry), and an entry nobody holds keeps
its previous global value: the per-tensor rule of ``strategies.base.weighted_average`` applied
per entry. A dense contribution (mask ``None``) holds every entry of that tensor.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from flwr.app import ArrayRecord

from splitmix.protocol.codec import decode, encode

# key -> (bool mask or None for dense, dense values with zeros off the mask), or a plain tensor
Entry = tuple[torch.Tensor | None, torch.Tensor] | torch.Tensor
Contribution = tuple[Mapping[str, Entry], float]


def _split(entry: Entry) -> tuple[torch.Tensor | None, torch.Tensor]:
    return (None, entry) if isinstance(entry, torch.Tensor) else entry


def sparse_weighted_average_tensors(
    contributions: Sequence[Contribution], previous: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per entry: Σ_c w_c·v_c / Σ_c w_c over the contributions c whose mask holds it.

    Entries (and tensors) nobody holds keep ``previous``. Values off a contribution's mask are
    ignored even if non-zero. Float64 sums in the given order (deterministic); results are cast
    to the previous tensor's dtype. Only keys of ``previous`` are returned.
    """
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for tensors, weight in contributions:
        if not weight > 0:
            raise ValueError(f"contribution weight must be positive, got {weight}")
        for key, entry in tensors.items():
            if key not in previous:
                raise KeyError(f"contribution has '{key}', which the model does not")
            mask, values = _split(entry)
            shape = previous[key].shape
            if values.shape != shape or (mask is not None and mask.shape != shape):
                raise ValueError(f"'{key}': shape {tuple(values.shape)} does not match {tuple(shape)}")
            if key not in sums:
                sums[key] = torch.zeros(shape, dtype=torch.float64)
                weights[key] = torch.zeros(shape, dtype=torch.float64)
            v = values.detach().cpu().to(torch.float64)
            if mask is None:
                sums[key].add_(v, alpha=weight)
                weights[key].add_(weight)
            else:
                m = mask.detach().cpu().to(torch.bool)
                sums[key].add_(torch.where(m, v, 0.0), alpha=weight)
                weights[key].add_(m.to(torch.float64), alpha=weight)
    out: dict[str, torch.Tensor] = {}
    for key, old in previous.items():
        if key not in sums:
            out[key] = old
            continue
        held = weights[key] > 0
        mean = sums[key] / torch.where(held, weights[key], 1.0)
        out[key] = torch.where(held, mean, old.detach().cpu().to(torch.float64)).to(old.dtype)
    return out


def sparse_weighted_average(contributions: Sequence[Contribution], previous: ArrayRecord) -> ArrayRecord:
    """:func:`sparse_weighted_average_tensors` on an ArrayRecord (as ``weighted_average``):
    tensors nobody sent keep their previous ``Array`` object as is."""
    touched = {key for tensors, _ in contributions for key in tensors}
    unknown = sorted(touched - set(previous.keys()))
    if unknown:
        raise KeyError(f"contributions hold tensors the model does not, e.g. {unknown[:3]}")
    old = {key: torch.from_numpy(decode(previous[key]).copy()) for key in previous.keys() if key in touched}
    new = sparse_weighted_average_tensors(contributions, old)
    out = ArrayRecord()
    for key, array in previous.items():
        out[key] = encode(new[key]) if key in new else array
    return out
