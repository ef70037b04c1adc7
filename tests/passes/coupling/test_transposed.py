"""ConvTranspose2d (issue 9, item 8): weight axes [Cin, Cout/g, k, k]; its groups resize."""
from __future__ import annotations

import torch
import torch.nn as nn

from sparsify.passes.rules import Role

from .helpers import build, group, through_every_pass


class Decoder(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.t1 = nn.ConvTranspose2d(16, 16, 3, padding=1)
        self.t2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=groups)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.t1(x))
        return self.c2(torch.relu(self.t2(x)))


def test_transposed_conv_reads_axis_0_and_writes_axis_1():
    cg = build(Decoder())
    g = group(cg, "t1")
    assert not g.frozen
    assert [(m.target, m.axis) for m in g.roles(Role.OUT)] == [("t1", 1)]
    assert [(m.target, m.axis) for m in g.roles(Role.IN)] == [("t2", 0)]
    dm, compacted, _ = through_every_pass(Decoder(), (1, 3, 8, 8))
    m = dm.model
    assert (m.c1.out_channels, m.t1.in_channels, m.t1.out_channels, m.t2.in_channels, m.t2.out_channels,
            m.c2.in_channels) == (8, 8, 8, 8, 4, 4)
    assert m.t1.weight.shape == (8, 8, 3, 3)


def test_grouped_transposed_conv_keeps_multiples():
    dm, _, _ = through_every_pass(Decoder(groups=2), (1, 3, 8, 8), alpha=0.4)
    t2 = dm.model.t2
    assert t2.groups == 2 and t2.in_channels % 2 == 0 and t2.out_channels % 2 == 0
    assert t2.weight.shape == (t2.in_channels, t2.out_channels // 2, 4, 4)
