"""Building blocks shared by every model family.

Split-Mix needs k *independent* base networks that see the same batch. Instead of a Python loop
over k modules, every layer here holds the k bases side by side ("stacked"): convolutions are
grouped convolutions with ``groups=k``, linear layers are one batched matmul, and batch norm runs
over ``k * channels`` channels (per-channel statistics are already independent). Chunking any
parameter or buffer into k pieces along dim 0 yields exactly the tensors of a single base, so a
stack of k bases is interchangeable with k separately built width-r networks
(see ``models/splitmix.py``). A plain network is the special case ``num_bases=1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F


def scaled_channels(channels: int, width: float) -> int:
    """Channels of a layer at a width multiplier (at least one channel)."""
    return max(1, int(round(channels * width)))


class StackedConv2d(nn.Conv2d):
    """k independent convolutions run as one grouped convolution.

    Input ``(B, k*c_in, H, W)``, output ``(B, k*c_out, H', W')``; base i owns output channels
    ``[i*c_out, (i+1)*c_out)`` and reads input channels ``[i*c_in, (i+1)*c_in)``.
    """

    def __init__(
        self,
        in_per_base: int,
        out_per_base: int,
        kernel_size: int,
        num_bases: int = 1,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_per_base * num_bases,
            out_per_base * num_bases,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=num_bases,
            bias=bias,
        )
        self.num_bases = num_bases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups > 1 and x.shape[1] * self.groups == self.in_channels:
            # One input shared by every base: a plain convolution with the same weight tensor
            # ((k·c_out, c_in, kh, kw)) gives each base's output without copying the input k times.
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


class StackedLinear(nn.Module):
    """k independent linear layers as one batched matmul.

    Weight is stored as ``(k*out, in)`` so that chunking along dim 0 gives each base an
    ``nn.Linear``-shaped weight; input/output are ``(B, k*in)`` / ``(B, k*out)``.
    """

    def __init__(self, in_per_base: int, out_per_base: int, num_bases: int = 1, bias: bool = True):
        super().__init__()
        self.in_per_base, self.out_per_base, self.num_bases = in_per_base, out_per_base, num_bases
        self.weight = nn.Parameter(torch.empty(num_bases * out_per_base, in_per_base))
        self.bias = nn.Parameter(torch.empty(num_bases * out_per_base)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear, computed per base (fan_in = in_per_base).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_per_base)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, o, i = self.num_bases, self.out_per_base, self.in_per_base
        if k == 1:
            return F.linear(x, self.weight, self.bias)
        out = torch.einsum("bki,koi->bko", x.reshape(x.shape[0], k, i), self.weight.view(k, o, i))
        if self.bias is not None:
            out = out + self.bias.view(k, o)
        return out.reshape(x.shape[0], k * o)

    def extra_repr(self) -> str:
        return f"in={self.in_per_base}, out={self.out_per_base}, bases={self.num_bases}"


Route = str | float  # "clean", "adv", or a robustness lambda in [0, 1]


class DualBatchNorm(nn.Module):
    """A clean and an adversarial batch norm behind one layer (Split-Mix's dual BN).

    Training routes clean batches through ``clean`` and PGD batches through ``adv``. At
    inference a robustness ``lambda`` mixes the two paths at every layer:
    ``(1 - lambda) * clean(x) + lambda * adv(x)`` (the authors' "deep mix").
    """

    def __init__(self, num_features: int, dims: int = 2) -> None:
        super().__init__()
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.clean = bn(num_features)
        self.adv = bn(num_features)
        self.route: Route = "clean"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route == "clean" or route == 0.0:
            return self.clean(x)
        if route == "adv" or route == 1.0:
            return self.adv(x)
        lam = float(route)
        return (1.0 - lam) * self.clean(x) + lam * self.adv(x)


def make_norm(num_features: int, dual: bool, dims: int = 2) -> nn.Module:
    """The normalisation layer every model uses: dual BN for robustness-customisable nets."""
    if dual:
        return DualBatchNorm(num_features, dims)
    return nn.BatchNorm2d(num_features) if dims == 2 else nn.BatchNorm1d(num_features)


def set_route(model: nn.Module, route: Route) -> None:
    """Point every dual BN of ``model`` at the clean path, the adversarial path, or a mix."""
    if isinstance(route, (int, float)) and not isinstance(route, bool):
        route = float(route)
        if not 0.0 <= route <= 1.0:
            raise ValueError(f"robustness lambda must be in [0, 1], got {route}")
    elif route not in ("clean", "adv"):
        raise ValueError(f"route must be 'clean', 'adv' or a float in [0, 1], got {route!r}")
    for module in model.modules():
        if isinstance(module, DualBatchNorm):
            module.route = route


@contextmanager
def routed(model: nn.Module, route: Route) -> Iterator[nn.Module]:
    """Temporarily route every dual BN; restores the previous route afterwards."""
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    previous = [m.route for m in duals]
    set_route(model, route)
    try:
        yield model
    finally:
        for module, old in zip(duals, previous):
            module.route = old


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Batch statistics still normalise, but running statistics stay untouched.

    Used while crafting adversarial examples in training mode: the attack's forward passes must
    not pollute the running mean/var that evaluation relies on.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield model
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom


def expand_to_bases(x: torch.Tensor, num_bases: int) -> torch.Tensor:
    """The input of the first (stacked) layer.

    A 4-D input ``(B, C, H, W)`` is shared by every base and passed on as is (the first
    :class:`StackedConv2d` applies all bases' filters to it directly). A 5-D input
    ``(B, k, C, H, W)`` holds one input per base (per-base adversarial examples) and becomes
    ``(B, k·C, H, W)`` for the grouped convolution.
    """
    if x.dim() == 5:
        if x.shape[1] != num_bases:
            raise ValueError(f"per-base input has {x.shape[1]} bases, model has {num_bases}")
        return x.reshape(x.shape[0], -1, *x.shape[3:])
    return x


def per_base_inputs(x: torch.Tensor, num_bases: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, k, C, H, W)``: one input copy per base, so each base can be
    attacked separately (per-base PGD) in one batched pass."""
    return x.unsqueeze(1).expand(-1, num_bases, *x.shape[1:])


class StackedNet(nn.Module):
    """Base class of every registered model: k stacked bases, logits mixed by their mean.

    Subclasses implement ``forward_bases`` returning ``(B, k, num_classes)``; ``forward``
    returns the Split-Mix mixture, the mean of the k bases' logits.
    """

    num_bases: int
    num_classes: int

    def forward_bases(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_bases(x).mean(dim=1)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def make_static_bn_(model: ModuleT) -> ModuleT:
    """Static batch norm (SHeteroFL): no running statistics at all, batch statistics always.

    Applied after construction so every model family gets it without a constructor flag.
    """
    for bn in _batch_norms(model):
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
    return model


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalisation layers — batch norm (affine parameters and running
    statistics; the unused ``num_batches_tracked`` counters are never federated and are left out)
    and layer norm (a ViT's, what FedBN keeps local there)."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) or getattr(module, "is_layer_norm", False):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict() if k != "num_batches_tracked")
    return keys


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BN's running statistics on ``x`` (a cumulative average over batches),
    then switch to eval mode. With dual BN each path is estimated along its own route."""
    bns = _batch_norms(model)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: exact mean over the batches seen
    model.train()
    routes: list[Route] = ["clean", "adv"] if any(isinstance(m, DualBatchNorm) for m in model.modules()) else ["clean"]
    device = next(model.parameters()).device
    for route in routes:
        with routed(model, route):
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size].to(device))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()
