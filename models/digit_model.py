"""The Split-Mix paper's Digits network (``DigitModel`` in the authors' ``nets/models.py``),
registered as ``digit-cnn``.

Three 5×5 convolutions (64-64-128 channels at width 1, padding 2) with batch norm, max-pooling
after the first two, then fully connected 2048 → 512 → classes with batch norm after each hidden
layer. On the paper's 28×28 inputs it has 14.2 M parameters at width 1 and 0.224 M at width 1/8
(one Split-Mix base), as in the paper's Table 6. Any image size divisible by 4 works (the flatten
size follows it: 128·(size/4)²), so it also runs on the embedded 8×8 digits. Differences from the
official class: inputs keep their data set's channels (the official code turns grey images into 3
channels), and the optional ``rescale_init`` / ``rescale_layer`` switches (off in the paper's
Digits runs) are not provided.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from models.blocks import StackedConv2d, StackedLinear, StackedNet, expand_to_bases, make_norm, scaled_channels
from models.registry import register_model

CONV = (64, 64, 128)
FC = (2048, 512)


class DigitModel(StackedNet):
    def __init__(
        self,
        width: float = 1.0,
        num_bases: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dual_bn: bool = False,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"digit-cnn needs an image size divisible by 4 (two 2×2 max-pools), got {image_size}")
        c1, c2, c3 = (scaled_channels(c, width) for c in CONV)
        h1, h2 = (scaled_channels(h, width) for h in FC)
        k = num_bases
        self.num_bases, self.num_classes = k, num_classes
        self.conv1 = StackedConv2d(in_channels, c1, 5, k, padding=2)
        self.bn1 = make_norm(k * c1, dual_bn)
        self.conv2 = StackedConv2d(c1, c2, 5, k, padding=2)
        self.bn2 = make_norm(k * c2, dual_bn)
        self.conv3 = StackedConv2d(c2, c3, 5, k, padding=2)
        self.bn3 = make_norm(k * c3, dual_bn)
        self.fc1 = StackedLinear(c3 * (image_size // 4) ** 2, h1, k)
        self.bn4 = make_norm(k * h1, dual_bn, dims=1)
        self.fc2 = StackedLinear(h1, h2, k)
        self.bn5 = make_norm(k * h2, dual_bn, dims=1)
        self.fc3 = StackedLinear(h2, num_classes, k)

    def fusable_pairs(self) -> list[tuple[str, str]]:
        """(layer, batch norm) pairs that inference can fold into one layer."""
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("fc1", "bn4"), ("fc2", "bn5")]

    def forward_bases(self, x: torch.Tensor) -> torch.Tensor:
        k = self.num_bases
        x = expand_to_bases(x, k)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = x.flatten(1)  # channel-major: each base's (c, h, w) features stay contiguous
        x = F.relu(self.bn4(self.fc1(x)))
        x = F.relu(self.bn5(self.fc2(x)))
        return self.fc3(x).view(x.shape[0], k, self.num_classes)


@register_model("digit-cnn")
def digit_cnn(width: float = 1.0, **kwargs) -> DigitModel:
    return DigitModel(width=width, **kwargs)
