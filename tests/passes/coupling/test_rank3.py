"""Rank-3 tensors (issue 9, item 4): [N, C, L] signals through Conv1d / BatchNorm1d, and [N, T, C]
tokens concatenated along tokens; never a crash, frozen where not understood."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.nn import SparseConv1d
from sparsify.passes.rules import Role

from .helpers import build, group, through_every_pass


class Signal(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 3, padding=1)
        self.c3 = nn.Conv1d(16, 8, 3, padding=1)
        self.fc1, self.b2 = nn.Linear(8 * 8, 16), nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.b1(self.c1(x))), 2)
        x = F.avg_pool1d(F.relu(self.c2(x)), 2)
        x = F.relu(self.c3(x))
        return self.fc(F.relu(self.b2(self.fc1(torch.flatten(x, 1)))))


def test_conv1d_gets_masks_depth_multiplier_and_compaction():
    cg = build(Signal(), (1, 1, 32))
    g = group(cg, "c1")
    assert not g.frozen and {m.role for m in g.members} == {Role.OUT, Role.CHANNELWISE, Role.IN}
    flat = group(cg, "flatten")
    assert flat.derivation.kind == "flatten" and cg.positions(group(cg, "c3").id)[flat.id].shape == (8, 8)
    assert not group(cg, "fc1").frozen  # BatchNorm1d on [N, C] features couples like on [N, C, L]
    dm, compacted, report = through_every_pass(Signal(), (1, 1, 32))
    m = dm.model
    assert m.c1.out_channels == m.b1.num_features == m.c2.in_channels == 8
    assert m.fc1.in_features == m.c3.out_channels * 8 and m.b2.num_features == m.fc1.out_features == 8
    assert isinstance(compacted.c2, SparseConv1d) and report.channels_removed > 0


class TokenCat(nn.Module):
    """Concat along the token axis of [N, T, C]: the channel axis is tied across the parts."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 5, 16) * 0.02)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.mlp(self.norm(t))
        return self.head(t[:, 0])


def test_token_concat_ties_channels_and_lays_out_tokens():
    cg = build(TokenCat())
    g = group(cg, "patch")
    assert cg.group_of("cat", 2) is g and cg.group_of("cls", 2) is g and cg.group_of("pos", 2) is g
    tokens = cg.group_of("cat", 1)
    assert tokens.derivation is not None and tokens.derivation.kind == "concat"
    assert not g.frozen and g.whole  # LayerNorm normalises over it: resized, never compacted
    dm, _, _ = through_every_pass(TokenCat(), (1, 3, 8, 8))
    m = dm.model
    assert m.patch.out_channels == m.cls.shape[2] == m.pos.shape[2] == m.norm.normalized_shape[0] == 8
    assert m.pos.shape[1] == 5  # the token axis never changes


class Rank3Unknown(nn.Module):
    """A reshape that splits channels into heads (not understood): frozen, not a crash."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        n, t, c = x.shape
        h = self.fc1(x).view(n, t, 4, c // 4).transpose(1, 2)
        return self.fc2((h.softmax(-1) * h).transpose(1, 2).reshape(n, t, c))


def test_heads_split_is_frozen():
    cg = build(Rank3Unknown(), (1, 6, 16))
    assert group(cg, "fc1", 2).frozen


class Volume(nn.Module):
    """[N, C, D, H, W] volumes: Conv3d + BatchNorm3d + pooling are resized and compacted like 2-D."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.c2 = nn.Conv3d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.b1(self.c1(x))), 2)
        return self.fc(F.relu(self.c2(x)).mean((2, 3, 4)))


def test_conv3d_is_resized_and_compacted():
    cg = build(Volume(), (1, 1, 4, 8, 8))
    assert not group(cg, "c1").frozen
    dm, compacted, _ = through_every_pass(Volume(), (1, 1, 4, 8, 8), maskable=False)
    assert dm.model.c1.out_channels == dm.model.b1.num_features == dm.model.c2.in_channels == 4
