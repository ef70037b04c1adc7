"""DenseNet-121 (Huang et al. 2017, DenseNet-BC, Table 1) with torchvision's layer shapes (7,978,856 parameters)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to ``bn_size * growth`` channels, BN-ReLU-3x3 conv to ``growth`` channels,
    on the concatenation of every earlier feature map of the block (pre-activation bottleneck)."""

    def __init__(self, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    """``n`` dense layers; layer i reads all i earlier outputs plus the block input; the block
    returns all of them concatenated (``in_ch + n * growth`` channels)."""

    def __init__(self, n: int, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * growth, growth, bn_size) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv halving the channels, 2x2 average pool halving the side."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """7x7/2 stem (64) + BN-ReLU + 3x3/2 max-pool, dense blocks joined by transitions, final BN,
    ReLU, global average pool, Linear ``classifier``."""

    def __init__(self, blocks: Sequence[int] = (6, 12, 24, 16), growth: int = 32, stem: int = 64, bn_size: int = 4,
                 num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        ch = stem
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, ch, growth, bn_size))
            ch += n * growth
            if i != len(blocks) - 1:
                layers.append(Transition(ch, ch // 2))
                ch //= 2
        layers.append(nn.BatchNorm2d(ch))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():            # torchvision's init: Kaiming-normal (fan-in) convs, zero Linear bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(x, 1))


def densenet121(num_classes: int = 1000, in_channels: int = 3) -> DenseNet:
    """DenseNet-121 (growth 32, blocks 6/12/24/16, bottleneck 4x) for 3x224x224 inputs with
    torchvision's layer shapes (7,978,856 parameters); random init, no weights."""
    return DenseNet((6, 12, 24, 16), 32, 64, 4, num_classes, in_channels)
