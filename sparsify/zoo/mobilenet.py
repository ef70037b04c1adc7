"""MobileNetV2 (Sandler et al. 2018, Table 2): at CIFAR size (stride-1 stem, one fewer early
downsampling) and at ImageNet size with torchvision's layer shapes (3,504,872 parameters)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparsify.passes.depth_multiplier import make_divisible
from sparsify.zoo._layers import conv_bn, init_weights

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 2. ImageNet uses
# s=2 for the stem and for the 24-channel stage; at 32x32 both are 1, so the feature maps go
# 32 -> 16 -> 8 -> 4 (three downsamplings) instead of 224 -> 112 -> 56 -> 28 -> 14 -> 7.
_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_IMAGENET_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t=1), 3x3 depthwise (groups=channels), 1x1 linear projection; add when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [conv_bn(in_ch, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, out_ch, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2(nn.Module):
    """3x3 stem (32), 17 inverted residual blocks, 1x1 conv to 1280, global average pool, classifier.

    ``cfg`` and ``stem_stride`` choose the CIFAR or ImageNet layout; ``dropout`` > 0 puts a Dropout
    before the Linear as torchvision does (the classifier is then ``Sequential(Dropout, Linear)``).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 cfg: Sequence[tuple[int, int, int, int]] = _CFG, stem_stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        ch = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn(in_channels, ch, 3, stem_stride, act=nn.ReLU6)]
        for t, c, n, s in cfg:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        layers.append(conv_bn(ch, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        linear = nn.Linear(last, num_classes)
        self.classifier = nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for 3x32x32 inputs (width 1.0 by default)."""
    return MobileNetV2(num_classes, in_channels, width_mult)


def mobilenetv2_imagenet(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                         dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 for 3x224x224 inputs with torchvision's layer shapes: stride-2 stem, feature maps
    112 -> 56 -> 28 -> 14 -> 7, Dropout(0.2) + Linear classifier; 3,504,872 parameters at width 1.0.
    Linear weights are drawn N(0, 0.01) as in torchvision; random init, no weights."""
    model = MobileNetV2(num_classes, in_channels, width_mult, _IMAGENET_CFG, stem_stride=2, dropout=dropout)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model
