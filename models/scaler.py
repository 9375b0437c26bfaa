"""HeteroFL's Scaler: in training, a width-w sub-network divides the output of every hidden
conv/linear layer by w (``src/models/conv.py``, ``Scaler``: ``input / rate if training else
input``), so that a slice's activations have the magnitude the full network's would; at
evaluation it is the identity.

Attached as forward hooks, so every model family gets it without a constructor flag. The
classifier (the last conv/linear layer) is not scaled, as in the official models. Where a BN
follows the layer — every hidden layer of the CNNs here — BN's normalisation removes the factor
up to its ε, so the Scaler changes little there; it matters for layers without a following BN.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from models.blocks import StackedConv2d, StackedLinear

PRODUCERS = (nn.Conv2d, nn.Linear, StackedConv2d, StackedLinear)


def hidden_producers(model: nn.Module) -> list[nn.Module]:
    """Every conv/linear layer but the last one registered (the classifier)."""
    layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, PRODUCERS)]
    return layers[:-1]


def attach_scaler(model: nn.Module, rate: float) -> list[RemovableHandle]:
    """Divide hidden layers' outputs by ``rate`` while ``model.training``; returns the hooks."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"scaler rate must be in (0, 1], got {rate}")

    def scale(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output / rate if module.training else output

    return [layer.register_forward_hook(scale) for layer in hidden_producers(model)]
