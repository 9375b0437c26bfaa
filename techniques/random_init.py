"""Random pruning at initialization (Yang & Wang, arXiv 2203.14328).

Every weight matrix / convolution kernel loses each entry independently with probability ``p``;
biases and normalisation parameters stay dense. Optionally the kept weights are multiplied by
``1/sqrt(1-p)``.

Why the rescale preserves the NTK: a pre-activation ``h_i = sum_j W_ij x_j / sqrt(n)`` keeps about
``(1-p)·n`` of its ``n`` terms, so its variance — and with it the forward covariance of every
later layer and the size of every back-propagated gradient — shrinks by ``(1-p)``; for a ReLU
network without biases each pruned layer then multiplies the limiting NTK by ``(1-p)`` (the mask
also removes a ``p`` share of that layer's gradient terms, and the forward/backward shrinkage of
the other layers' terms is the same factor). Multiplying the kept weights by ``1/sqrt(1-p)``
restores every variance, and in the NTK parametrisation — weights are the N(0,1) initialisation
variables θ, the layer computes ``s·(M⊙θ)x/sqrt(n)`` with ``s = 1/sqrt(1-p)`` — the gradient with
respect to each kept θ carries the same ``s``, so each layer's kernel term is a mean over the
``(1-p)·n`` kept connections of the dense term's summands and converges to the dense NTK as the
width grows (the mask noise averages out at rate ~ sqrt(p/((1-p)·width))). That needs the layer's
fan-in to grow with the width: a pruned *input* layer (fan-in = input dimension) keeps its mask
noise and leaves a floor on the error (``tools/ntk_study.py`` keeps it dense by default). ``weight_jacobian``
gives that ``∂w/∂θ = s·M`` for ``tools.ntk.empirical_ntk``. Note: the kernel with respect to the
*stored* (already rescaled) weights is ``(1-p)`` times smaller per pruned layer — training the
rescaled network matches the dense NTK with the learning rate of pruned weights times ``1/(1-p)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def prunable_weights(module: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Parameters named ``weight`` with at least two dimensions (Linear, Conv, StackedLinear,
    StackedConv2d, NTK layers); 1-D norm weights and biases are never pruned. ``skip`` lists
    qualified module names (as in ``named_modules``) to leave dense."""
    skipped = set(skip)
    found: dict[str, nn.Parameter] = {}
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if name in skipped or not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue
        found[f"{name}.weight" if name else "weight"] = weight
    return found


def rescale_factor(p: float, rescale: bool) -> float:
    """``1/sqrt(1-p)`` when rescaling, else 1."""
    return 1.0 / math.sqrt(1.0 - p) if rescale else 1.0


@torch.no_grad()
def random_prune_(
    module: nn.Module,
    p: float,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    skip: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Zero each prunable weight independently with probability ``p``, in place.

    Returns ``{parameter name: bool mask}`` (True = kept). Masks are drawn on the CPU from
    ``generator`` in ``named_modules`` order, so the same seed gives the same masks on any device.
    With ``rescale`` the kept weights are multiplied by ``1/sqrt(1-p)``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"pruning probability must be in [0, 1), got {p}")
    scale = rescale_factor(p, rescale)
    masks: dict[str, torch.Tensor] = {}
    for name, weight in prunable_weights(module, skip).items():
        keep = torch.rand(weight.shape, generator=generator) >= p  # P(keep) = 1 - p
        keep = keep.to(weight.device)
        weight.mul_(keep)
        if rescale:
            weight.mul_(scale)
        masks[name] = keep
    return masks


@torch.no_grad()
def apply_masks_(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Re-zero pruned weights (e.g. after an optimizer step or an aggregation round)."""
    params = dict(module.named_parameters())
    for name, keep in masks.items():
        params[name].mul_(keep.to(params[name].device))


def weight_jacobian(masks: Mapping[str, torch.Tensor], p: float, rescale: bool) -> dict[str, torch.Tensor]:
    """``∂w/∂θ = s·M`` per pruned weight: the stored weight ``w = s·M⊙θ`` as a function of the
    initialisation variables θ, the parametrisation in which the paper's NTK is taken."""
    scale = rescale_factor(p, rescale)
    return {name: keep.to(torch.get_default_dtype()) * scale for name, keep in masks.items()}
