"""The local training recipe: train the k Split-Mix bases a client was sent.

Each base gets its own cross-entropy (the k losses are summed, so gradients never mix across
bases); the k bases run as one stacked model. A fresh SGD is built every round (the authors'
code: momentum 0.9, weight decay 5e-4); ``optimizer`` picks another one from the registry
(``techniques/optimizers.py``: Adam or a learned optimizer, whose state that technique keeps
across rounds). Adversarial clients add PGD examples routed through the adversarial BN:
loss = (1 − λ)·L_clean(clean BN) + λ·L_adv(adv BN). Techniques act through hooks
(``techniques/base.py: RoundHooks``): after each step and epoch, and a technique may own the
clean forward pass to add a loss term (Diverse-ViT's regularisers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from models.blocks import StackedNet, frozen_bn_stats, per_base_inputs, routed
from splitmix.adversarial import PGDConfig, pgd_linf
from splitmix.data import ArrayData
from techniques.optimizers import export_state, make_optimizer

if TYPE_CHECKING:
    from techniques.base import RoundHooks


@dataclass(frozen=True)
class LocalTrainConfig:
    epochs: int = 2
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    adv_lambda: float = 0.5
    pgd: PGDConfig = PGDConfig()
    optimizer: str = "sgd"  # techniques/optimizers.py: sgd, adam or a learned optimizer
    l2o_artifacts: str = ""  # learned optimizers' artifact folder ("" = the per-user cache)
    l2o_sha256: str = ""  # the server's learned-optimizer artifact digest; every node must hold the same
    masked_loss: bool = False  # HeteroFL: logits of classes absent from the client's data set to 0


@dataclass
class TrainResult:
    loss: float
    clean_loss: float
    adv_loss: float
    num_examples: int
    steps: int
    seconds: float
    diversity_loss: float = 0.0
    optimizer_state: dict | None = None  # per-parameter state worth keeping (techniques/optimizers.py)


def per_base_losses(logits: torch.Tensor, y: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Each base's mean cross-entropy, shape ``(k,)``; logits are ``(B, k, classes)``.
    ``present`` (a class mask): HeteroFL's masked cross-entropy, absent classes' logits set to 0."""
    k = logits.shape[1]
    if present is not None:
        logits = logits.masked_fill(~present.to(logits.device), 0.0)
    return F.cross_entropy(logits.transpose(1, 2), y.unsqueeze(1).expand(-1, k), reduction="none").mean(0)


def per_base_loss(logits: torch.Tensor, y: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over bases of each base's mean cross-entropy (:func:`per_base_losses`)."""
    return per_base_losses(logits, y, present).sum()


def class_loss(logits: torch.Tensor, y: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``(B, classes)`` logits, masked as :func:`per_base_loss`."""
    if present is not None:
        logits = logits.masked_fill(~present.to(logits.device), 0.0)
    return F.cross_entropy(logits, y)


def present_classes(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean mask of the classes that occur in ``y`` (HeteroFL's label split)."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=y.device)
    mask[y.unique()] = True
    return mask


def _adversarial_share(shares: list, k: int, device: torch.device | str) -> torch.Tensor | None:
    """Product of the hooks' per-base adversarial shares (None: every base adversarial)."""
    out = None
    for share in shares:
        value = share()
        if value is not None:
            value = value.to(device=device, dtype=torch.float32).reshape(k)
            out = value if out is None else out * value
    return out


def train_bases(
    model: StackedNet,
    data: ArrayData,
    cfg: LocalTrainConfig,
    lr: float,
    adversarial: bool,
    seed: int,
    device: torch.device | str = "cpu",
    hooks: Sequence[RoundHooks] = (),
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Train ``model`` (a stack of k bases) in place on ``data``; returns loss statistics.

    ``hooks`` (the round's technique hooks) see every optimizer step and the end of every epoch;
    the first hook with a ``forward`` computes the clean pass and an extra loss term."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = make_optimizer(
        cfg.optimizer,
        list(model.named_parameters()),
        lr=lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        artifacts=cfg.l2o_artifacts or None,
        state=optimizer_state,
    )
    x_all, y_all = data.x.to(device), data.y.to(device)
    n, k = len(data), model.num_bases
    totals = {"loss": 0.0, "clean": 0.0, "adv": 0.0, "diversity": 0.0}
    forward = next((h.forward for h in hooks if h.forward is not None), None)
    extra_losses = [h.extra_loss for h in hooks if h.extra_loss is not None]
    present = present_classes(y_all, model.num_classes) if cfg.masked_loss else None
    shares = [h.adversarial_share for h in hooks if h.adversarial_share is not None]
    steps = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for first in range(0, n, cfg.batch_size):
            idx = order[first : first + cfg.batch_size]
            if idx.numel() < 2:  # batch norm needs two samples; a lone leftover is skipped
                continue
            xb, yb = x_all[idx], y_all[idx]
            with routed(model, "clean"):
                if forward is not None:  # e.g. ViT diversity terms on the clean pass's tokens
                    logits, div = forward(model, xb)
                    totals["diversity"] += float(div)
                else:
                    logits, div = model.forward_bases(xb), 0.0
                clean_per_base = per_base_losses(logits, yb, present)
                extras = sum((extra(model, xb, yb) for extra in extra_losses), torch.zeros((), device=device))  # e.g. SHeteroFL's narrower widths
                clean = clean_per_base.sum() + extras
            loss = clean + div
            # per base: 1 = train adversarially, 0 = clean only (Robust Bird's units still searching)
            share = _adversarial_share(shares, k, device) if adversarial else None
            if adversarial and (share is None or bool(share.any())):
                with routed(model, "adv"):
                    per_base_x = per_base_inputs(xb, k)
                    with frozen_bn_stats(model):
                        # B023: pgd_linf calls the loss right away, within this iteration
                        x_adv = pgd_linf(lambda z: per_base_loss(model.forward_bases(z), yb, present), per_base_x, cfg.pgd, gen)  # noqa: B023
                    adv_per_base = per_base_losses(model.forward_bases(x_adv), yb, present)
                lam = cfg.adv_lambda * (share if share is not None else torch.ones(k, device=device))
                loss = ((1.0 - lam) * clean_per_base).sum() + (1.0 - lam.mean()) * extras + (lam * adv_per_base).sum() + div
                totals["adv"] += adv_per_base.sum().item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for hook in hooks:
                hook.after_step(optimizer)
            totals["loss"] += loss.item()
            totals["clean"] += clean.item()
            steps += 1
        for hook in hooks:
            hook.after_epoch()
    denom = max(steps, 1) * k  # report per-base averages
    return TrainResult(
        loss=totals["loss"] / denom,
        clean_loss=totals["clean"] / denom,
        adv_loss=totals["adv"] / denom,
        num_examples=n,
        steps=steps,
        seconds=time.perf_counter() - start,
        diversity_loss=totals["diversity"] / denom,
        optimizer_state=export_state(optimizer) if cfg.optimizer != "sgd" else None,
    )
