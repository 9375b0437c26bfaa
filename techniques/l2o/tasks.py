"""Optimizee tasks for learned optimizers: a small ReLU MLP on scikit-learn's digits.

Why digits: it ships inside scikit-learn (offline), and a 64-h-10 MLP takes a few hundred
microseconds per step, so meta-training thousands of inner steps fits a CPU budget.

Variants that make an optimizee "held out" for evaluation:

- ``seed``: the model initialisation and the minibatch order (a fresh seed per trajectory);
- ``hidden``: the width of the hidden layer (meta-training uses 32, evaluation e.g. 64);
- ``partition``: the digits train split is cut once (fixed permutation) into two halves,
  ``meta`` (meta-training) and ``heldout`` (evaluation); ``all`` is both. The digits test split
  gives the accuracy.

The optimizer sees one flat parameter vector (``FlatModel``): coordinate-wise learned optimizers
treat every scalar the same way, so the flat view is exact and makes unrolls vectorised.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

PARTITIONS = ("meta", "heldout", "all")


@lru_cache(maxsize=2)
def _digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened digits standardised with the train split's statistics (cached per process)."""
    from splitmix.data import load_split

    train_split = load_split("digits", "", True)
    x_train = train_split.x.reshape(len(train_split), -1)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    split = train_split if train else load_split("digits", "", False)
    x = (split.x.reshape(len(split), -1) - mean) / std
    return x.contiguous(), split.y.clone()


def task_data(partition: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(N, 64)`` and labels of one partition of the digits train split."""
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition '{partition}'; allowed: {', '.join(PARTITIONS)}")
    x, y = _digits(True)
    if partition == "all":
        return x, y
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    half = len(y) // 2
    idx = order[:half] if partition == "meta" else order[half:]
    return x[idx], y[idx]


@dataclass(frozen=True)
class MLPTask:
    """A 64-``hidden``-10 ReLU MLP with cross-entropy on one digits partition."""

    hidden: int = 32
    partition: str = "meta"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition '{self.partition}'; allowed: {', '.join(PARTITIONS)}")
        if self.hidden < 1 or self.batch_size < 2:
            raise ValueError("hidden must be >= 1 and batch_size >= 2")

    def model(self, seed: int) -> nn.Module:
        """A freshly initialised model (torch's default init, seeded)."""
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return task_data(self.partition)

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless, seeded stream of minibatches (reshuffled every epoch)."""
        x, y = self.data()
        gen = torch.Generator().manual_seed(10_000 + seed)
        while True:
            order = torch.randperm(len(y), generator=gen)
            for first in range(0, len(y) - self.batch_size + 1, self.batch_size):
                idx = order[first : first + self.batch_size]
                yield x[idx], y[idx]

    def full_loss(self, model: nn.Module) -> float:
        """Training loss over the whole partition: the smooth objective evaluation reports."""
        x, y = self.data()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    def test_accuracy(self, model: nn.Module) -> float:
        x, y = _digits(False)
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())


class FlatModel:
    """Evaluate a module at a flat parameter vector (differentiably, via ``functional_call``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)

    def flat(self) -> torch.Tensor:
        """The module's current parameters as one detached vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.module, self.unflatten(theta), (x,)), y)

    def ndims(self) -> torch.Tensor:
        """Per coordinate, the rank (ndim) of the tensor it belongs to."""
        return torch.cat([torch.full((n,), len(s), dtype=torch.long) for n, s in zip(self.sizes, self.shapes)])

    def load(self, theta: torch.Tensor) -> None:
        """Copy a flat vector back into the module's parameters."""
        with torch.no_grad():
            for p, t in zip(self.module.parameters(), torch.split(theta, self.sizes)):
                p.copy_(t.view_as(p))


def loss_and_grad(flat: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch loss (kept in the graph of ``theta``) and its detached gradient.

    Why detached: the first-order approximation of L2O meta-training (no second derivatives)."""
    if not theta.requires_grad:
        theta = theta.detach().requires_grad_(True)
    loss = flat.loss(theta, x, y)
    (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
    return loss, grad.detach()
