"""Static batch norm's statistics, gathered federatedly from the clients' training data.

HeteroFL's *static BN* keeps no running statistics while training. Before a width is evaluated
the statistics for that width are computed from training data (the official code's ``stats()``
runs the training set through the model in train mode with ``track_running_stats=True`` and a
cumulative average). Here every client runs its own *training split* through the static-BN model
in train mode — so each BN normalises with batch statistics, exactly as in training — and reports,
per BN channel, the sum and the sum of squares of the BN's inputs and their count
(:func:`collect_moments`). The server adds the clients' moments and turns them into running
statistics (:func:`moments_to_stats`): mean = Σx / n, var = (Σx² − n·mean²) / (n − 1), the
unbiased variance BN stores. That is the pooled moment over every training example of every
client that answered (the official code averages per-batch moments; with equal batches the two
agree up to the within-batch variance term). Nothing comes from validation or test data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from models.blocks import DualBatchNorm, routed

SUM, SUMSQ, COUNT = "sum", "sumsq", "count"

AdvInputs = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _batch_norm_paths(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def _accumulate(model: nn.Module, x: torch.Tensor, paths: Mapping[str, nn.Module], out: dict[str, torch.Tensor], batch_size: int) -> None:
    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            z = inputs[0].detach().to(torch.float64)
            dims = [d for d in range(z.dim()) if d != 1]
            out[f"{name}.{SUM}"] += z.sum(dim=dims).cpu()
            out[f"{name}.{SUMSQ}"] += (z * z).sum(dim=dims).cpu()
            out[f"{name}.{COUNT}"] += z.numel() // z.shape[1]

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in paths.items()]
    try:
        for i in range(0, len(x), batch_size):
            batch = x[i : i + batch_size]
            if len(batch) >= 2:  # batch statistics need two samples (as in training)
                model(batch)
    finally:
        for handle in handles:
            handle.remove()


def collect_moments(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    adv_inputs: AdvInputs | None = None,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Per-channel ``<bn path>.sum``, ``.sumsq`` (float64) and ``.count`` of every BN's inputs
    over ``x``, with the model in train mode (static BN: batch statistics normalise).

    With dual BN the clean path sees ``x``; the adversarial path sees ``adv_inputs(model, x, y)``
    when given (an adversarially training client), otherwise it reports nothing."""
    model.train()
    paths = _batch_norm_paths(model)
    out: dict[str, torch.Tensor] = {}
    for name, bn in paths.items():
        out[f"{name}.{SUM}"] = torch.zeros(bn.num_features, dtype=torch.float64)
        out[f"{name}.{SUMSQ}"] = torch.zeros(bn.num_features, dtype=torch.float64)
        out[f"{name}.{COUNT}"] = torch.zeros((), dtype=torch.float64)
    dual = any(isinstance(m, DualBatchNorm) for m in model.modules())
    if not dual:
        _accumulate(model, x, paths, out, batch_size)
        return out
    clean = {n: m for n, m in paths.items() if n.endswith(".clean")}
    with routed(model, "clean"):
        _accumulate(model, x, clean, out, batch_size)
    adv = {n: m for n, m in paths.items() if n.endswith(".adv")}
    if adv_inputs is None or y is None:
        return {k: v for k, v in out.items() if k.rsplit(".", 1)[0] not in adv}
    with routed(model, "adv"):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if len(xb) >= 2:
                _accumulate(model, adv_inputs(model, xb, yb), adv, out, batch_size)
    return out


def add_moments(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total`` += ``part`` (entries missing in ``total`` start at zero); returns ``total``."""
    for key, value in part.items():
        value = value.to(torch.float64)
        total[key] = total[key] + value if key in total else value.clone()
    return total


def moments_to_stats(total: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Summed moments → ``<bn path>.running_mean`` / ``.running_var`` (float32; unbiased var)."""
    stats: dict[str, torch.Tensor] = {}
    for key in total:
        if not key.endswith("." + COUNT):
            continue
        path = key[: -len(COUNT) - 1]
        n = float(total[key])
        if n < 2:
            continue
        mean = total[f"{path}.{SUM}"] / n
        var = (total[f"{path}.{SUMSQ}"] - n * mean * mean).clamp_min(0.0) / (n - 1)
        stats[f"{path}.running_mean"] = mean.float()
        stats[f"{path}.running_var"] = var.float()
    return stats


def load_bn_stats(model: nn.Module, stats: dict[str, torch.Tensor]) -> nn.Module:
    """Put running statistics into a (tracked-BN) model. A BN path no client ran (the
    adversarial path of dual BN when no client trains adversarially) keeps mean 0, variance 1;
    a model without any statistics is an error."""
    loaded = 0
    for name, bn in _batch_norm_paths(model).items():
        mean, var = stats.get(f"{name}.running_mean"), stats.get(f"{name}.running_var")
        if mean is None or var is None:
            continue
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"'{name}' keeps no running statistics; build the model with tracked BN to load them")
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        loaded += 1
    if loaded == 0 and _batch_norm_paths(model):
        raise KeyError("no BN statistics for this model (static BN: gather them from the clients first)")
    return model
