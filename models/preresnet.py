"""PreActResNet-18 for CIFAR-sized images (32×32), width-scalable and base-stackable.

The layout follows the HeteroFL/Split-Mix version (channels 64-128-256-512 at width 1,
pre-activation basic blocks, 1×1 projection shortcuts).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import StackedConv2d, StackedLinear, StackedNet, expand_to_bases, make_norm, scaled_channels
from models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, k: int, dual_bn: bool) -> None:
        super().__init__()
        self.bn1 = make_norm(k * c_in, dual_bn)
        self.conv1 = StackedConv2d(c_in, c_out, 3, k, stride=stride, padding=1)
        self.bn2 = make_norm(k * c_out, dual_bn)
        self.conv2 = StackedConv2d(c_out, c_out, 3, k, padding=1)
        self.shortcut = StackedConv2d(c_in, c_out, 1, k, stride=stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(StackedNet):
    def __init__(
        self,
        width: float = 1.0,
        num_bases: int = 1,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dual_bn: bool = False,
        channels: tuple[int, int, int, int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        k = num_bases
        self.num_bases, self.num_classes = k, num_classes
        widths = [scaled_channels(c, width) for c in channels]
        self.conv1 = StackedConv2d(in_channels, widths[0], 3, k, padding=1)
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(c_in, c_out, stride, k, dual_bn))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = make_norm(k * c_in, dual_bn)
        self.fc = StackedLinear(c_in, num_classes, k)

    def forward_bases(self, x: torch.Tensor) -> torch.Tensor:
        x = expand_to_bases(x, self.num_bases)
        x = self.layers(self.conv1(x))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)
        return self.fc(x).view(x.shape[0], self.num_bases, self.num_classes)


@register_model("preresnet18")
def preresnet18(width: float = 1.0, **kwargs) -> PreActResNet18:
    return PreActResNet18(width=width, **kwargs)
