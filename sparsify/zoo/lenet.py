"""LeNet-5-style MNIST convnet with three conv layers, as in the TensorFlow MNIST tutorial net of Changpinyo et al."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.zoo._layers import init_weights


def _conv(in_ch: int, out_ch: int, k: int, batch_norm: bool) -> list[nn.Module]:
    """Conv ('same' padding) [+ BN] + ReLU + 2x2 max-pool."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    return layers + [nn.ReLU(inplace=True), nn.MaxPool2d(2)]


class LeNet5(nn.Module):
    """conv5x5 1->32, pool, conv5x5 32->64, pool, conv3x3 64->128, pool (28->14->7->3), FC 1152-256-classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden: int = 256, batch_norm: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, 32, 5, batch_norm),
            *_conv(32, 64, 5, batch_norm),
            *_conv(64, 128, 3, batch_norm),
        )
        self.fc = nn.Sequential(nn.Linear(128 * 3 * 3, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(torch.flatten(self.features(x), 1)))


def lenet5(num_classes: int = 10, in_channels: int = 1, hidden: int = 256, batch_norm: bool = False) -> LeNet5:
    """The 3-conv MNIST net for 1x28x28 inputs; ``batch_norm=True`` adds BN after each conv (the paper's setup)."""
    return LeNet5(num_classes, in_channels, hidden, batch_norm)
