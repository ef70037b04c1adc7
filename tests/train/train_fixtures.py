"""Small models with masked layers for the train tests (no run directory needed)."""
from __future__ import annotations

import torch
import torch.nn as nn

from sparsify.nn import SparseConv2d, SparseLinear


def random_mask(shape: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    """A 0/1 mask with round(density * numel) ones at seeded random places."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    m = torch.zeros(n)
    m[torch.randperm(n, generator=g)[: max(1, round(density * n))]] = 1
    return m.reshape(shape)


class TinyNet(nn.Module):
    """conv(1->8, 3x3) - BN - ReLU - conv(8->16, 3x3) - pool - linear(16*4*4 -> 32) - linear(32 -> 10)."""

    def __init__(self, density: float = 0.5, seed: int = 0, in_ch: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        c1 = nn.Conv2d(in_ch, 8, 3, padding=1)
        c2 = nn.Conv2d(8, 16, 3, padding=1)
        l1 = nn.Linear(16 * 4 * 4, 32)
        self.conv1 = SparseConv2d.from_dense(c1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = SparseConv2d.from_dense(c2, random_mask((16, 8), density, seed + 1))
        self.fc1 = SparseLinear.from_dense(l1, random_mask((32, 256), density, seed + 2))
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


INPUT = (1, 1, 8, 8)
