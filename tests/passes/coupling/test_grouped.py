"""Depthwise, depthwise with a channel multiplier, and grouped convs (ResNeXt / RegNet)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from sparsify.passes.rules import Role

from .helpers import build, group, through_every_pass


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.dw(self.pw(x)))


def test_depthwise_conv_ties_input_to_output():
    cg = build(Depthwise())
    g = group(cg, "pw")
    assert group(cg, "dw") is g
    assert g.roles(Role.CHANNELWISE)[0].target == "dw" and not g.frozen
    dm, _, _ = through_every_pass(Depthwise(), (1, 3, 8, 8))
    assert dm.model.dw.groups == dm.model.dw.in_channels == dm.model.pw.out_channels == 4


class Multiplier(nn.Module):
    """groups = Cin, Cout = 2 * Cin: output channel 2c + r reads input channel c."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.dw(torch.relu(self.pw(x))))))


def test_depthwise_multiplier_lays_out_its_output_from_its_input():
    cg = build(Multiplier())
    gin, gout = group(cg, "pw"), group(cg, "dw")
    assert gout.derivation.kind == "flatten" and gout.derivation.parts[0] == (gin.id, 8)
    np.testing.assert_array_equal(cg.positions(gin.id)[gout.id][3], [6, 7])
    dm, compacted, report = through_every_pass(Multiplier(), (1, 3, 8, 8))
    assert dm.model.dw.out_channels == 2 * dm.model.dw.in_channels == 2 * dm.model.dw.groups == 8
    assert compacted.dw.out_channels == 2 * compacted.dw.groups


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, groups=2)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(self.g(self.a(x)))


def test_grouped_conv_keeps_multiples_and_is_kept_whole():
    cg = build(Grouped())
    ga, gg = group(cg, "a"), group(cg, "g")
    assert not ga.frozen and not gg.frozen
    assert ga.multiple == 2 and gg.multiple == 2
    assert any("grouped conv" in r for r in ga.whole)
    dm, compacted, report = through_every_pass(Grouped(), (1, 3, 8, 8), alpha=0.4)
    assert dm.model.g.groups == 2 and dm.model.a.out_channels % 2 == 0 and dm.model.g.out_channels % 2 == 0
    assert compacted.g.in_channels == 8 and compacted.g.out_channels == 12


class TwoGroupCounts(nn.Module):
    """One channel group read by a conv of groups=2 and (through a residual) one of groups=8."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.g2 = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.g8 = nn.Conv2d(32, 32, 3, padding=1, groups=8)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.g2(torch.relu(self.stem(x))))
        x = x + torch.relu(self.g8(x))
        return self.fc(x.mean((2, 3)))


def test_the_depth_multiplier_note_names_every_grouped_conv_behind_a_multiple():
    # The note named only the first reader ("a multiple of 8 (grouped conv g2 (groups=2))").
    dm, _, _ = through_every_pass(TwoGroupCounts(), (1, 3, 8, 8), alpha=0.3)
    note = next(n for n in dm.notes if "a multiple of 8" in n)
    assert "g8 (groups=8)" in note and "g2 (groups=2)" in note, note
    assert dm.model.g8.in_channels % 8 == 0


class ResNeXtBlock(nn.Module):
    """A bottleneck whose 3x3 conv has groups=4 inside a residual (the P10 kind)."""

    def __init__(self, ch=16, width=16, groups=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(width, ch, 1, bias=False), nn.BatchNorm2d(ch))
        self.fc = nn.Linear(ch, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.c(self.b(self.a(x))))
        return self.fc(x.mean((2, 3)))


def test_resnext_block_scales_group_widths():
    dm, compacted, _ = through_every_pass(ResNeXtBlock(), (1, 3, 8, 8), alpha=0.5)
    b = dm.model.get_submodule("b.0")
    assert b.groups == 4 and b.in_channels == 8 and b.out_channels == 8
