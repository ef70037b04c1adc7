"""ResNets (He et al. 2016): CIFAR ResNet-20 and ImageNet ResNet-18 / ResNet-50 with torchvision's layer shapes
(v1.5: the bottleneck's 3x3 conv carries the stride), all with 1x1-conv projection shortcuts."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparsify.errors import UsageError
from sparsify.zoo._layers import conv_bn, init_weights


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity, or an option-B 1x1 conv + BN projection when the stride or the width changes."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, added before the last ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn(out_ch, out_ch, 3, act=None)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision's v1.5), 1x1 expand x4, plus a shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv_bn(in_ch, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride)
        self.conv3 = conv_bn(width, out_ch, 1, act=None)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of BasicBlocks (16/32/64 wide at 32/16/8 px), global average pool, Linear."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise UsageError(f"CIFAR ResNet depth {depth} is not 6n+2; use 20, 32, 44, 56 or 110")
        n = (depth - 2) // 6
        self.stem = conv_bn(in_channels, width, 3)
        blocks: list[nn.Module] = []
        ch = width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                blocks.append(BasicBlock(ch, w, 2 if (i > 0 and j == 0) else 1))
                ch = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7/2 stem + 3x3/2 max-pool, four stages of ``block`` (64/128/256/512 wide,
    at 56/28/14/7 px for 224x224 inputs), global average pool, Linear ``fc``."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, in_channels: int = 3,
                 block: type[BasicBlock] | type[Bottleneck] = Bottleneck) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        ch = 64
        for i, (n, w) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(block(ch, w, 2 if (i > 0 and j == 0) else 1))  # w: the block's inner width
                ch = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-20 (3x3 blocks per stage) with option-B projection shortcuts, for 3x32x32 inputs."""
    return CifarResNet(20, num_classes, in_channels, width)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-18 (basic blocks 2/2/2/2) for 3x224x224 inputs, torchvision's shapes (11,689,512 parameters);
    random init, no weights."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, BasicBlock)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-50 v1.5 (bottlenecks 3/4/6/3) for 3x224x224 inputs, torchvision's shapes (25,557,032
    parameters); random init, no weights."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels)
