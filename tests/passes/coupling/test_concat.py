"""Concat along channels: a derived group whose parts sit at offsets, every copy of a repeated
part tracked (issue 9, item 3: cat([x, x]) and YOLO's SPPF cat([x, m(x), m(m(x))]))."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.compact import compact
from sparsify.passes.rules import Role
from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import trace

from .helpers import assert_same, build, calibrate, group, through_every_pass


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_is_a_derived_group_with_offsets():
    cg = build(Concat())
    ga, gb, gc = group(cg, "a"), group(cg, "b"), group(cg, "cat")
    assert gc.derivation.kind == "concat"
    assert gc.derivation.parts == ((ga.id, 0), (gb.id, 4))
    assert gc.roles(Role.IN)[0].target == "head"
    pos = cg.positions(gb.id)
    np.testing.assert_array_equal(pos[gc.id][:, 0], np.arange(4, 10))
    assert cg.derived_size(gc.id, {ga.id: 2, gb.id: 3}) == 5
    through_every_pass(Concat(), (1, 3, 8, 8))


class SelfCat(nn.Module):
    """The stem's output concatenated with itself, the way P30 does (a grey stem reads one filter)."""

    def __init__(self, in_ch=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.mix(torch.cat([x, x], 1)).mean((2, 3)))


class SPPF(nn.Module):
    """YOLOv5's SPPF: max-pool keeps the group, so one group sits three times in one concat."""

    def __init__(self, in_ch=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.m = nn.MaxPool2d(5, 1, 2)
        self.mix = nn.Sequential(nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y1 = self.m(x)
        return self.fc(self.mix(torch.cat([x, y1, self.m(y1)], 1)).mean((2, 3)))


class PoolCat(nn.Module):
    """cat([x, pool(x), pool(pool(x))]) with functional pooling and an avg pool in the chain."""

    def __init__(self, in_ch=1):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.mix = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        p = F.max_pool2d(x, 3, 1, 1)
        return self.fc(F.relu(self.mix(torch.cat([x, p, F.avg_pool2d(p, 3, 1, 1)], 1))).mean((2, 3)))


@pytest.mark.parametrize("cls,copies", [(SelfCat, 2), (SPPF, 3), (PoolCat, 3)])
def test_every_copy_of_a_repeated_part_is_tracked(cls, copies):
    cg = build(cls(), (1, 1, 8, 8))
    stem = group(cg, "stem_0" if cls is not PoolCat else "stem")
    cat = group(cg, "cat")
    pos = cg.positions(stem.id)[cat.id]
    assert pos.shape == (stem.size, copies)
    np.testing.assert_array_equal(pos[3], [3 + k * stem.size for k in range(copies)])


@pytest.mark.parametrize("cls", [SelfCat, SPPF, PoolCat])
def test_sqrt_rule_blocks_every_copy_and_compaction_removes_them(cls):
    """A grey stem keeps sqrt(D) of its filters; no layer may read a removed filter through any
    copy, and compaction removes every copy exactly."""
    model = calibrate(cls(), (1, 1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    res = SparseRandomPass(0.1, seed=0)(trace(model), x)
    m = res.model
    stem, mix = _stem_mix(m, cls)
    dead = (stem.mask.sum(1) == 0).nonzero().flatten()
    assert len(dead) == stem.out_channels - round(math.sqrt(0.1) * stem.out_channels)
    copies = mix.in_channels // stem.out_channels
    for k in range(copies):
        assert bool((mix.mask[:, dead + k * stem.out_channels] == 0).all()), f"copy {k} reads a removed filter"
    m = calibrate(m, (1, 1, 8, 8))
    out, report = compact(m, x, align=1)
    assert_same(m, out, (1, 1, 8, 8))
    assert _stem_mix(out, cls)[1].in_channels == copies * (stem.out_channels - len(dead))


def _stem_mix(m, cls):
    if cls is PoolCat:
        return m.stem, m.mix
    return m.get_submodule("stem.0"), m.get_submodule("mix.0")


@pytest.mark.parametrize("cls,copies", [(SelfCat, 2), (SPPF, 3), (PoolCat, 3)])
def test_through_every_pass(cls, copies):
    dm, _, _ = through_every_pass(cls(), (1, 1, 8, 8))
    stem, mix = _stem_mix(dm.model, cls)
    assert mix.in_channels == copies * stem.out_channels
