"""Inception-mini: a small GoogLeNet-style CIFAR net whose blocks join four branches with torch.cat."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.zoo._layers import conv_bn, init_weights


class InceptionBlock(nn.Module):
    """Branches 1x1 | 1x1->3x3 | 1x1->3x3->3x3 (a factorised 5x5) | 3x3 max-pool->1x1, concatenated on channels."""

    def __init__(self, in_ch: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.b1 = conv_bn(in_ch, c1, 1)
        self.b2 = nn.Sequential(conv_bn(in_ch, c3r, 1), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(in_ch, c5r, 1), conv_bn(c5r, c5, 3), conv_bn(c5, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(in_ch, pool, 1))
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionMini(nn.Module):
    """3x3 stem (64), inception blocks at 32/16/8 px with 2x2 max-pools between, global average pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 64, 3)
        a = InceptionBlock(64, 32, 48, 64, 8, 16, 16)
        b = InceptionBlock(a.out_channels, 64, 64, 96, 16, 32, 32)
        c = InceptionBlock(b.out_channels, 96, 96, 128, 24, 48, 48)
        self.blocks = nn.Sequential(a, nn.MaxPool2d(2), b, nn.MaxPool2d(2), c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c.out_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def inception_mini(num_classes: int = 10, in_channels: int = 3) -> InceptionMini:
    """Inception-mini for 3x32x32 inputs: three 4-branch blocks (128, 224 and 320 channels out)."""
    return InceptionMini(num_classes, in_channels)
