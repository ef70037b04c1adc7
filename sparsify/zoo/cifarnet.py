"""CifarNet: the TensorFlow CIFAR-10 tutorial net used by Changpinyo et al. (2 conv layers + FC 384-192)."""
from __future__ import annotations

import torch
from torch import nn

from sparsify.zoo._layers import init_weights


def _stage(in_ch: int, out_ch: int, batch_norm: bool) -> list[nn.Module]:
    """Conv5x5 ('same') [+ BN] + ReLU + 3x3/2 max-pool (halves the side, like TF's SAME pooling)."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 5, padding=2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    return layers + [nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]


class CifarNet(nn.Module):
    """conv5x5 3->64, pool, conv5x5 64->64, pool (32->16->8), FC 4096-384-192-classes.

    The tutorial's local response normalisation is left out: it mixes neighbouring channels, which
    channel-level sparsity cannot reason about; ``batch_norm=True`` adds BN instead (the paper used BN).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(*_stage(in_channels, 64, batch_norm), *_stage(64, 64, batch_norm))
        self.fc = nn.Sequential(
            nn.Linear(64 * 8 * 8, 384), nn.ReLU(inplace=True), nn.Linear(384, 192), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Linear(192, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(torch.flatten(self.features(x), 1)))


def cifarnet(num_classes: int = 10, in_channels: int = 3, batch_norm: bool = False) -> CifarNet:
    """The TF CIFAR-10 tutorial net for 3x32x32 inputs."""
    return CifarNet(num_classes, in_channels, batch_norm)
