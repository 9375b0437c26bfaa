"""A small CNN for digit-sized images (8×8 by default; 28×28 and 32×32 work too).

Three 3×3 conv layers with batch norm, two max-pools, a global 2×2 pool and two linear layers.
At width 1 the channels are 64-128-256 with a 512-unit hidden layer; Split-Mix bases use width
r (default 1/8: 8-16-32, 64 hidden).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import StackedConv2d, StackedLinear, StackedNet, expand_to_bases, make_norm, scaled_channels
from models.registry import register_model


class DigitCNN(StackedNet):
    def __init__(
        self,
        width: float = 1.0,
        num_bases: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        dual_bn: bool = False,
        channels: tuple[int, int, int] = (64, 128, 256),
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {image_size}")
        c1, c2, c3 = (scaled_channels(c, width) for c in channels)
        h = scaled_channels(hidden, width)
        k = num_bases
        self.num_bases, self.num_classes = k, num_classes
        self.conv1 = StackedConv2d(in_channels, c1, 3, k, padding=1)
        self.bn1 = make_norm(k * c1, dual_bn)
        self.conv2 = StackedConv2d(c1, c2, 3, k, padding=1)
        self.bn2 = make_norm(k * c2, dual_bn)
        self.conv3 = StackedConv2d(c2, c3, 3, k, padding=1)
        self.bn3 = make_norm(k * c3, dual_bn)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = StackedLinear(c3 * 4, h, k)
        self.bn4 = make_norm(k * h, dual_bn, dims=1)
        self.fc2 = StackedLinear(h, num_classes, k)

    def fusable_pairs(self) -> list[tuple[str, str]]:
        """(layer, batch norm) pairs that inference can fold into one layer."""
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("fc1", "bn4")]

    def forward_bases(self, x: torch.Tensor) -> torch.Tensor:
        x = expand_to_bases(x, self.num_bases)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = self.pool(x).flatten(1)
        x = F.relu(self.bn4(self.fc1(x)))
        return self.fc2(x).view(x.shape[0], self.num_bases, self.num_classes)


@register_model("cnn")
def cnn(width: float = 1.0, **kwargs) -> DigitCNN:
    return DigitCNN(width=width, **kwargs)
