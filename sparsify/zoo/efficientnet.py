"""EfficientNet-B0 (Tan & Le 2019, Table 1) with torchvision's layer shapes: MBConv blocks with
squeeze-and-excitation, SiLU, 3x3 and 5x5 depthwise convs, stochastic depth (5,288,548 parameters)."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.passes.depth_multiplier import make_divisible
from sparsify.zoo._layers import conv_bn, init_weights

# EfficientNet-B0's stages (Table 1): (expansion t, kernel k, first stride s, output channels c, repeats n).
_B0 = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
       (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class StochasticDepth(nn.Module):
    """Drop the residual branch of whole samples with probability ``p`` while training (Huang et al.
    2016, "row" mode), scaling kept samples by 1/(1-p); the identity in eval mode or when ``p`` is 0."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty_like(x[:, :1, :1, :1]).bernoulli_(keep)
        return x * noise.div_(keep) if keep > 0 else x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcitation(nn.Module):
    """Hu et al. 2018: global average pool, 1x1 conv to ``squeeze`` channels, SiLU, 1x1 conv back,
    sigmoid; the result scales the input channel by channel."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.activation = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    """1x1 expand + SiLU (skipped when t=1), kxk depthwise + SiLU, squeeze-and-excitation (squeeze to
    a quarter of the block's input channels), 1x1 linear projection; residual add with stochastic
    depth when stride and width allow."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, sd_prob: float) -> None:
        super().__init__()
        hidden = make_divisible(in_ch * expand)
        layers: list[nn.Module] = [conv_bn(in_ch, hidden, 1, act=nn.SiLU)] if hidden != in_ch else []
        layers += [
            conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, in_ch // 4)),
            conv_bn(hidden, out_ch, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.stochastic_depth(y) + x if self.use_residual else y


class EfficientNet(nn.Module):
    """3x3/2 stem (32) + SiLU, seven MBConv stages, 1x1 conv to 4x the last width (1280) + SiLU,
    global average pool, ``classifier`` = Dropout + Linear.

    Block i of all N blocks drops its residual branch with probability
    ``stochastic_depth_prob * i / N`` while training, as torchvision does.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2) -> None:
        super().__init__()
        stem = _B0[0][3] * 2
        layers: list[nn.Module] = [conv_bn(in_channels, stem, 3, 2, act=nn.SiLU)]
        total = sum(n for *_, n in _B0)
        ch, index = stem, 0
        for t, k, s, c, n in _B0:
            stage: list[nn.Module] = []
            for i in range(n):
                stage.append(MBConv(ch, c, k, s if i == 0 else 1, t, stochastic_depth_prob * index / total))
                ch, index = c, index + 1
            layers.append(nn.Sequential(*stage))
        last = 4 * ch
        layers.append(conv_bn(ch, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(last, num_classes))
        init_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_b0(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2,
                    stochastic_depth_prob: float = 0.2) -> EfficientNet:
    """EfficientNet-B0 for 3x224x224 inputs with torchvision's layer shapes (5,288,548 parameters);
    random init, no weights. ``stochastic_depth_prob=0`` builds it without the random branch drop."""
    return EfficientNet(num_classes, in_channels, dropout, stochastic_depth_prob)
