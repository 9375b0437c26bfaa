"""NTK-parametrised MLP and its empirical neural tangent kernel (torch.func).

In the NTK parametrisation every weight is N(0, 1) and each layer divides by ``sqrt(fan_in)``,
so the empirical NTK converges to a deterministic kernel as the width grows (Jacot et al. 2018);
that is the regime in which the random-pruning results of arXiv 2203.14328 are stated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn import functional as F


class NTKLinear(nn.Module):
    """``y = W x / sqrt(fan_in) (+ b)`` with ``W ~ N(0, 1)``: a linear layer in NTK parametrisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=generator))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * (1.0 / math.sqrt(self.in_features)), self.bias)


class NTKMLP(nn.Module):
    """``depth`` hidden ReLU layers of ``width`` units and a linear read-out, NTK parametrised.

    No biases by default: ReLU is positively homogeneous, so without biases the effect of an
    unrescaled pruned layer on the kernel is an exact scalar in the wide limit.
    Module names: ``layers.0`` (input layer, fan-in ``in_dim``) … ``layers.<depth>`` (read-out).
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int = 2,
        out_dim: int = 1,
        bias: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"need depth >= 1 and width >= 1, got depth={depth}, width={width}")
        dims = [in_dim] + [width] * depth + [out_dim]
        self.layers = nn.ModuleList(NTKLinear(a, b, bias, generator) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def empirical_ntk(
    model: nn.Module,
    x: torch.Tensor,
    weight_jacobian: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Empirical NTK ``K = J Jᵀ`` of ``model`` on inputs ``x`` (n, …), shape ``(n·out, n·out)``.

    Rows/columns are ordered sample-major (sample i, output o at ``i·out + o``); a scalar-output
    model gives ``(n, n)``. ``J`` holds per-sample Jacobians from ``vmap(jacrev(...))``.

    ``weight_jacobian[name]`` (same shape as the parameter) is ``∂w/∂θ`` when the stored weight
    ``w`` is an elementwise function of the trained variable θ; for a pruned net it is
    ``s·mask`` (``techniques.random_init.weight_jacobian``), which zeroes the gradient of removed
    weights — they are not parameters of the pruned network — and applies the rescale ``s``.
    """
    weight_jacobian = weight_jacobian or {}
    params = {name: p.detach() for name, p in model.named_parameters()}
    unknown = set(weight_jacobian) - set(params)
    if unknown:
        raise KeyError(f"weight_jacobian names no parameter of the model: {sorted(unknown)}")

    def f(theta: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, theta, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # name -> (n, out, *param shape)
    n = x.shape[0]
    kernel: torch.Tensor | None = None
    for name, j in jac.items():
        j = j.reshape(n * j.shape[1], -1)
        if name in weight_jacobian:
            j.mul_(weight_jacobian[name].reshape(1, -1).to(j))
        term = j @ j.T
        kernel = term if kernel is None else kernel + term
    return cast(torch.Tensor, kernel)  # one term per parameter tensor: set by the loop
