"""Centralized evaluation of every mixable width k·r and robustness level λ.

Clean accuracy: one forward pass of all N bases per λ gives every base's logits; the width-k·r
model is the mean of the first k bases' logits, so all widths come from that one pass.
Robust accuracy: PGD L∞ against each width-k·r mixture itself (the attacker sees the mixed model),
for every λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clients.adversarial import PGDConfig, pgd_linf
from clients.data import ArrayData
from models.blocks import set_route
from models.splitmix import SplitMixSpec, build_mixture, load_stacked, select_bases


@dataclass
class WidthScores:
    """``accuracy[λ][k-1]`` and ``robust[λ][k-1]`` (robust is empty when not evaluated)."""

    accuracy: dict[float, list[float]]
    robust: dict[float, list[float]]


class Evaluator:
    def __init__(
        self,
        spec: SplitMixSpec,
        test: ArrayData,
        lambdas: list[float],
        pgd: PGDConfig,
        device: torch.device | str = "cpu",
        batch_size: int = 1024,
    ) -> None:
        self.spec, self.test, self.lambdas, self.pgd = spec, test, lambdas, pgd
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._all_bases = spec.build(spec.num_bases).to(self.device)

    def _batches(self):
        for i in range(0, len(self.test), self.batch_size):
            yield self.test.x[i : i + self.batch_size].to(self.device), self.test.y[i : i + self.batch_size].to(self.device)

    @torch.no_grad()
    def clean(self, state: dict[str, torch.Tensor]) -> dict[float, list[float]]:
        model = load_stacked(self._all_bases, select_bases(state, range(self.spec.num_bases))).eval()
        n = self.spec.num_bases
        out: dict[float, list[float]] = {}
        for lam in self.lambdas:
            set_route(model, lam)
            correct = torch.zeros(n)
            for x, y in self._batches():
                logits = model.forward_bases(x)  # (B, N, C)
                mixed = logits.cumsum(dim=1) / torch.arange(1, n + 1, device=x.device).view(1, n, 1)
                correct += (mixed.argmax(-1) == y.unsqueeze(1)).sum(0).float().cpu()
            out[lam] = (correct / len(self.test)).tolist()
        return out

    def robust(self, state: dict[str, torch.Tensor], seed: int = 0) -> dict[float, list[float]]:
        out: dict[float, list[float]] = {}
        for lam in self.lambdas:
            scores = []
            for k in range(1, self.spec.num_bases + 1):
                model = build_mixture(self.spec, state, list(range(k)), lam).to(self.device)
                for p in model.parameters():
                    p.requires_grad_(False)
                gen = torch.Generator().manual_seed(seed + k)
                correct = 0
                for x, y in self._batches():
                    x_adv = pgd_linf(lambda z: torch.nn.functional.cross_entropy(model(z), y), x, self.pgd, gen)
                    with torch.no_grad():
                        correct += int((model(x_adv).argmax(-1) == y).sum())
                scores.append(correct / len(self.test))
            out[lam] = scores
        return out

    def evaluate(self, state: dict[str, torch.Tensor], robust: bool) -> WidthScores:
        return WidthScores(self.clean(state), self.robust(state) if robust else {})
