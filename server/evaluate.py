"""Centralized evaluation of every width a method serves, at every robustness level λ.

Clean accuracy of the served model at each width × λ, and (when asked) robust accuracy under PGD
L∞ against that served model itself — for Split-Mix the attacker sees the mixture of bases.
Methods with static or client-local batch norm re-estimate BN statistics on the (unlabelled)
test inputs first (``strategies/registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from splitmix.adversarial import PGDConfig, pgd_linf
from splitmix.data import ArrayData
from strategies.registry import Method


@dataclass
class WidthScores:
    """``accuracy[λ][i]`` and ``robust[λ][i]`` for ``widths[i]`` (robust is empty when not evaluated)."""

    widths: list[float]
    accuracy: dict[float, list[float]]
    robust: dict[float, list[float]]


class Evaluator:
    def __init__(
        self,
        method: Method,
        test: ArrayData,
        lambdas: list[float],
        pgd: PGDConfig,
        device: torch.device | str = "cpu",
        batch_size: int = 1024,
    ) -> None:
        self.method, self.test, self.lambdas, self.pgd = method, test, lambdas, pgd
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _batches(self):
        for i in range(0, len(self.test), self.batch_size):
            yield self.test.x[i : i + self.batch_size].to(self.device), self.test.y[i : i + self.batch_size].to(self.device)

    def _model(self, state: dict[str, torch.Tensor], width: float, lam: float):
        model = self.method.eval_model(state, width, lam, self.test.x).to(self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _robust_accuracy(self, model, seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        correct = 0
        for x, y in self._batches():
            # B023: pgd_linf calls the loss right away, within this iteration
            x_adv = pgd_linf(lambda z: F.cross_entropy(model(z), y), x, self.pgd, gen)  # noqa: B023
            with torch.no_grad():
                correct += int((model(x_adv).argmax(-1) == y).sum())
        return correct / len(self.test)

    def evaluate(self, state: dict[str, torch.Tensor], robust: bool) -> WidthScores:
        widths = self.method.widths()
        x, y = self.test.x.to(self.device), self.test.y.to(self.device)
        state = {k: v.to(self.device) for k, v in state.items()}
        accuracy = {lam: self.method.clean_accuracy(state, x, y, lam) for lam in self.lambdas}
        robust_acc: dict[float, list[float]] = {}
        if robust:
            for lam in self.lambdas:
                robust_acc[lam] = [self._robust_accuracy(self._model(state, w, lam), seed=i + 1) for i, w in enumerate(widths)]
        return WidthScores(widths, accuracy, robust_acc)
