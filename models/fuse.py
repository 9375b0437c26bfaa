"""Inference-only rewrite of a served model: fold batch norm into the layer before it and use a
channels-last memory layout.

At inference a BN layer (and a dual BN at a fixed λ, whose output is the λ-mix of two affine
maps) is a per-channel affine map ``a·x + b``, so a conv/linear → BN pair becomes one conv/linear
with scaled weights and a bias. Model families list such pairs in ``fusable_pairs()``
(post-activation layouts like the digits CNN; pre-activation ResNets have none). The result
computes the same function (to float rounding) with fewer, cheaper kernels; it is not meant for
training.
"""

from __future__ import annotations

import copy
from typing import Protocol, cast

import torch
from torch import nn

from models.blocks import DualBatchNorm


def affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` such that an eval-mode batch norm (or a dual one at its route) is ``a·x + b``
    per channel."""
    if isinstance(norm, DualBatchNorm):
        route = norm.route
        lam = 0.0 if route == "clean" else 1.0 if route == "adv" else float(route)
        a_c, b_c = affine(norm.clean)
        a_a, b_a = affine(norm.adv)
        return (1 - lam) * a_c + lam * a_a, (1 - lam) * b_c + lam * b_a
    bn = cast(nn.modules.batchnorm._BatchNorm, norm)  # any other norm here is a batch norm
    if bn.running_mean is None:
        raise ValueError("cannot fold a batch norm without running statistics (re-estimate them first)")
    running_var = cast(torch.Tensor, bn.running_var)  # kept together with running_mean
    a = bn.weight / torch.sqrt(running_var + bn.eps)
    return a, bn.bias - a * bn.running_mean


class ChannelsLast(nn.Module):
    """Runs the wrapped model in channels-last layout (faster convolutions on CPU)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last))


class _Fusable(Protocol):
    def fusable_pairs(self) -> list[tuple[str, str]]: ...


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A folded, channels-last copy of an eval-mode model (the original is left untouched)."""
    fused = copy.deepcopy(model).eval()
    pairs = cast(_Fusable, fused).fusable_pairs() if hasattr(fused, "fusable_pairs") else []
    for layer_name, norm_name in pairs:
        layer, norm = fused.get_submodule(layer_name), fused.get_submodule(norm_name)
        a, b = affine(norm)
        weight, layer_bias = cast(torch.Tensor, layer.weight), cast(torch.Tensor | None, layer.bias)  # a conv or linear
        weight.mul_(a.view((-1,) + (1,) * (weight.dim() - 1)))
        bias = layer_bias if layer_bias is not None else torch.zeros_like(a)
        layer.bias = nn.Parameter(a * bias + b, requires_grad=False)
        parent_name, _, attr = norm_name.rpartition(".")
        setattr(fused.get_submodule(parent_name) if parent_name else fused, attr, nn.Identity())
    for p in fused.parameters():
        p.requires_grad_(False)
    return ChannelsLast(fused).eval()
