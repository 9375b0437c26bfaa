"""Nested width slices (HeteroFL): a width-w network is the leading w-fraction of the channels of
every layer of the full network, so its tensors are the leading sub-blocks of the full tensors.

Because every layer scales its channels as ``round(C·w)`` and flattening is channel-major, the
leading block in every dimension is exactly the sub-network's tensor (first-layer inputs and
class outputs keep their full size, as the shapes say).
"""

from __future__ import annotations

import torch


def leading_slices(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def slice_state(full: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The width-w sub-network's tensors, given its state shapes."""
    out = {}
    for key, shape in shapes.items():
        tensor = full[key]
        if tensor.dim() != len(shape) or any(s > f for s, f in zip(shape, tensor.shape)):
            raise ValueError(f"'{key}': slice {shape} does not fit in the full tensor {tuple(tensor.shape)}")
        out[key] = tensor[leading_slices(shape)].clone()
    return out
