"""PGD L∞ adversarial examples (Madry et al.), used for local adversarial training and for
the server's robust evaluation.

The loss is a closure so the same attack serves per-base training (every base attacked with its
own input copy, in one batched pass) and attacks on a mixture of bases (one shared input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PGDConfig:
    eps: float = 0.1
    alpha: float = 0.036
    steps: int = 7
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.eps < 0 or self.alpha <= 0 or self.steps < 1:
            raise ValueError(f"invalid PGD settings: eps={self.eps}, alpha={self.alpha}, steps={self.steps}")


def pgd_linf(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cfg: PGDConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise ``loss_fn`` within the L∞ ball of radius ``eps`` around ``x`` (inputs in [0, 1]).

    ``loss_fn`` maps an input batch to a scalar loss; parameters' gradients are left untouched
    (only the input's gradient is computed).
    """
    x = x.detach()
    if cfg.random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
        delta = (2.0 * noise - 1.0) * cfg.eps
    else:
        delta = torch.zeros_like(x)
    x_adv = (x + delta).clamp(0.0, 1.0)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
        with torch.no_grad():
            x_adv = x_adv + cfg.alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps).clamp(0.0, 1.0)
    return x_adv.detach()
