"""MobileNetV2 (Sandler et al. 2018) at CIFAR size: stride-1 stem and one fewer early downsampling."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.zoo._layers import conv_bn, init_weights

# (expansion t, output channels c, repeats n, first stride s). ImageNet uses s=2 for the stem and for the
# 24-channel stage; at 32x32 both are 1, so the feature maps go 32 -> 16 -> 8 -> 4 (three downsamplings).
_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _round(ch: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of ``divisor``, never below 90% of it (the reference rule)."""
    out = max(divisor, int(ch + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * ch else out


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
    """3x3 stem (32), 17 inverted residual blocks, 1x1 conv to 1280, global average pool, Linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        ch = _round(32 * width_mult)
        last = _round(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn(in_channels, ch, 3, 1, act=nn.ReLU6)]
        for t, c, n, s in _CFG:
            out = _round(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        layers.append(conv_bn(ch, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for 3x32x32 inputs (width 1.0 by default)."""
    return MobileNetV2(num_classes, in_channels, width_mult)
