"""Flatten / view into a linear layer; literal sizes and axis splits freeze instead of guessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparsify.passes.rules import Role

from .helpers import build, group, through_every_pass


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(5 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.c(x), 1))


class ViewLinear(FlattenLinear):
    def forward(self, x):
        y = self.c(x)
        return self.fc(y.view(y.size(0), -1))


class ReshapeLinear(FlattenLinear):
    def forward(self, x):
        y = self.c(x)
        return self.fc(y.reshape(y.shape[0], -1))


@pytest.mark.parametrize("cls", [FlattenLinear, ViewLinear, ReshapeLinear])
def test_flatten_into_linear_expands_each_channel_to_hw_features(cls):
    cg = build(cls())
    gconv = group(cg, "c")
    flat = next(g for g in cg.groups.values() if g.derivation is not None and g.roles(Role.IN))
    assert flat.derivation.kind == "flatten" and flat.derivation.parts[0] == (gconv.id, 5)
    assert [k for _, k in flat.derivation.parts] == [5, 6, 6]
    assert flat.roles(Role.IN)[0].target == "fc"
    pos = cg.positions(gconv.id)[flat.id]
    assert pos.shape == (5, 36)
    np.testing.assert_array_equal(pos[2], np.arange(72, 108))
    assert not gconv.frozen
    dm, _, _ = through_every_pass(cls(), (1, 3, 8, 8))
    assert dm.model.fc.in_features == dm.model.c.out_channels * 36


class LiteralView(FlattenLinear):
    def forward(self, x):
        return self.fc(self.c(x).view(-1, 180))


class LiteralShuffle(nn.Module):
    """A channel shuffle written with literal sizes (the one computed from y.shape resizes: see
    test_computed_sizes.py)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, _, h, w = y.shape
        y = y.view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w)
        return self.b(y)


@pytest.mark.parametrize("cls", [LiteralView, LiteralShuffle])
def test_literal_sizes_and_split_axes_freeze_instead_of_guessing(cls):
    cg = build(cls())
    node = "c" if cls is LiteralView else "a"
    assert group(cg, node).frozen
    through_every_pass(cls(), (1, 3, 8, 8), resizable=False)


class Tokens(nn.Module):
    """flatten(2).transpose(1, 2): channels move to the last axis of [N, T, C] tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t.mean(1))


def test_channels_follow_a_transpose_into_token_tensors():
    cg = build(Tokens())
    g = group(cg, "patch")
    assert cg.group_of("transpose", 2) is g and cg.group_of("fc2", 2) is g
    assert not g.frozen and not group(cg, "fc1", 2).frozen
    dm, _, _ = through_every_pass(Tokens(), (1, 3, 8, 8))
    assert dm.model.fc1.in_features == dm.model.patch.out_channels == dm.model.fc2.out_features == 4
