"""Parameters and MACs of a model, measured with ``torch.utils.flop_counter``.

MACs are counted as FLOPs / 2 for the matmul-like ops the counter tracks (convolutions,
linear/einsum); element-wise ops (BN, ReLU, pooling) are not counted, as in thop-style tables.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates for one input of shape ``input_shape`` (without batch dim)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)
