"""Residual add / mul: operands with a full channel axis share it with the result."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.nn import SparseConv2d
from sparsify.passes.compact import compact
from sparsify.passes.rules import Role
from sparsify.passes.trace import trace

from .helpers import assert_same, build, group, through_every_pass


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = F.relu(self.c0(x))
        b = self.c2(F.relu(self.c1(a)))
        return self.head(F.relu(a + b))


def test_residual_add_merges_both_operands():
    cg = build(Residual())
    g = group(cg, "c0")
    assert group(cg, "c2") is g and group(cg, "add") is g
    assert {m.target for m in g.roles(Role.OUT)} == {"c0", "c2"}
    assert {m.target for m in g.roles(Role.IN)} == {"c1", "head"}
    assert group(cg, "c1") is not g
    dm, _, _ = through_every_pass(Residual(), (1, 3, 8, 8))
    assert dm.model.c0.out_channels == dm.model.c2.out_channels == dm.model.head.in_channels == 4


class SEGate(nn.Module):
    """Squeeze-and-excitation: a [N, C, 1, 1] gate scales the channels it was computed from."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.c(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(y * s)


def test_se_gate_ties_the_gate_to_the_gated_channels():
    cg = build(SEGate())
    g = group(cg, "c")
    assert group(cg, "fc2") is g and group(cg, "mul") is g
    dm, _, _ = through_every_pass(SEGate(), (1, 3, 8, 8))
    assert dm.model.fc2.out_channels == dm.model.c.out_channels


class SpatialGate(nn.Module):
    """A [N, 1, H, W] map broadcast over channels couples no channels; a mean over channels keeps
    its input group whole (compaction may not remove a channel the mean reads)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.c(x))
        return self.head(y * torch.sigmoid(y.mean(1, keepdim=True)))


def test_spatial_gate_broadcasts_and_keeps_the_reduced_group_whole():
    cg = build(SpatialGate())
    g = group(cg, "c")
    assert not g.frozen and g.whole
    dm, compacted, report = through_every_pass(SpatialGate(), (1, 3, 8, 8))
    assert dm.model.c.out_channels == 4
    # a channel the head no longer reads still feeds the mean over channels: it must stay
    model = SpatialGate().eval()
    model.head = SparseConv2d.from_dense(model.head)
    with torch.no_grad():
        model.head.mask[:, 3] = 0
        model.head.apply_mask_()
    x = torch.randn(2, 3, 8, 8)
    out, report = compact(trace(model), x, align=1)
    assert out.c.out_channels == 8 and any("kept whole" in k["reason"] for k in report.kept)
    assert_same(model, out, (1, 3, 8, 8))
