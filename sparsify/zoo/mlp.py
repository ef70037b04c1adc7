"""Fully connected nets on flattened images: the PSN-paper MLP and LeNet-300-100."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then Linear+ReLU for each hidden width, then a Linear classifier (``classifier``)."""

    def __init__(self, hidden: Sequence[int] = (300, 100), num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(torch.flatten(x, 1)))


def mlp(hidden: Sequence[int] = (300, 100), num_classes: int = 10, in_features: int = 784) -> MLP:
    """The PSN-paper style MLP (784-300-100-10 by default); ``hidden`` sets the hidden widths."""
    return MLP(tuple(hidden), num_classes, in_features)


def lenet300_100(num_classes: int = 10, in_features: int = 784) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998): 784-300-100-10, 266,610 parameters for MNIST."""
    return MLP((300, 100), num_classes, in_features)
