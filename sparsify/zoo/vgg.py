"""VGG-16n (Changpinyo et al. 2017): VGG-16 with BN whose two 4096 FC layers become 2x2 max-pool + 3x3 conv 1024."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.zoo._layers import conv_bn, init_weights

# VGG-16 conv stages at CIFAR size. "M" is a 2x2 max-pool. The pool after stage 4 is dropped so that the
# paper's extra 2x2 max-pool + 3x3 conv still sees a 2x2 map (32 -> 16 -> 8 -> 4 -> 2), as its 3x3 conv
# sees 3x3 at ImageNet size; with all five VGG pools it would run on 1x1 and 8 of its 9 taps would be dead.
_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, 512, 512, 512)


class VGG16n(nn.Module):
    """13 conv-BN-ReLU layers, 2x2 max-pool, conv3x3 512->1024 + BN + ReLU, global average pool, Linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, head_channels: int = 1024) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(ch, int(v), 3))
                ch = int(v)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.MaxPool2d(2), conv_bn(ch, head_channels, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.features(x)))
        return self.classifier(torch.flatten(x, 1))


def vgg16n(num_classes: int = 10, in_channels: int = 3, head_channels: int = 1024) -> VGG16n:
    """VGG-16n for 3x32x32 inputs."""
    return VGG16n(num_classes, in_channels, head_channels)
