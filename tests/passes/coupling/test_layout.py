"""Interpolation, expand_as, max-unpooling and stochastic depth resize with their channels; split,
chunk, slicing and literal sizes freeze (where a guess would be wrong)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import build, group, through_every_pass


class Interp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = F.interpolate(F.relu(self.b(a)), size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat([a, self.up(F.max_pool2d(b, 2))], 1))


def test_interpolation_keeps_channels():
    cg = build(Interp())
    assert group(cg, "interpolate") is group(cg, "b") and not group(cg, "b").frozen
    dm, _, _ = through_every_pass(Interp(), (1, 3, 8, 8))
    assert dm.model.out.in_channels == 8


class UnpoolExpand(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Conv2d(3, 8, 3, padding=1)
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.e(x))
        y, idx = self.pool(x)
        y = self.unpool(F.relu(self.mid(y)), idx)
        g = torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True))).expand_as(y)
        return self.out(y * g + x)


def test_unpool_and_expand_as_tie_channels():
    cg = build(UnpoolExpand())
    g = group(cg, "e")
    assert group(cg, "unpool") is g and group(cg, "mid") is g and group(cg, "expand_as") is g
    assert not g.frozen
    dm, _, _ = through_every_pass(UnpoolExpand(), (1, 3, 8, 8))
    assert dm.model.e.out_channels == dm.model.mid.out_channels == dm.model.gate.out_channels == 4


class Splits(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 12, 1)
        self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if self.how == "split":
            p, q = torch.split(y, [4, 8], dim=1)
        elif self.how == "chunk":
            p, q, r = y.chunk(3, 1)
            q = torch.cat([q, r], 1)
        else:
            p, q = y[:, :4], y[:, 4:]
        return self.out(torch.cat([self.b(p), self.c(q)], 1))


@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_split_chunk_and_slicing_freeze_the_channels_they_cut(how):
    cg = build(Splits(how))
    assert group(cg, "a").frozen
    assert not group(cg, "b").frozen
    dm, _, _ = through_every_pass(Splits(how), (1, 3, 8, 8))
    assert dm.model.a.out_channels == 12 and dm.model.b.out_channels == 2


class QKV(nn.Module):
    """Chunked qkv: the chunk and the attention products are frozen, the projection is free."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        return self.head(torch.relu(self.proj(a @ v)).mean(1))


def test_chunked_qkv_is_frozen_not_over_pruned():
    cg = build(QKV(), (1, 5, 8))
    assert group(cg, "qkv", 2).frozen
    assert not group(cg, "proj", 2).frozen
