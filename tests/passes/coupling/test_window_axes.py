"""Ops that run a window along axes 2 and up (convs, pooling, interpolation, padding) and tensors
created with computed sizes: the channel axis is followed wherever it sits (``y.unsqueeze(1)``
moves it to axis 2), what runs along it is sized as the op computes or frozen, a spatial axis is
never resized, and a size computed from a literal minus a shape freezes what it reads."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.trace import trace

from .helpers import build, calibrate, group, through_every_pass

SHAPE = (1, 3, 8, 8)


class AlongChannels(nn.Module):
    """A window op over the channel axis moved to axis 2 by unsqueeze(1), between two convs."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool3d((2, 1, 1))
        self.b = nn.Conv2d(16 if how == "interpolate" else 8 if how != "pad" else 20, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, _, h, w = y.shape
        z = y.unsqueeze(1)
        if self.how == "avg_pool3d":
            z = F.avg_pool3d(z, (2, 1, 1))
        elif self.how == "MaxPool3d":
            z = self.pool(z)
        elif self.how == "strided":  # a window of 3 at stride 2: no size the graph follows
            z = F.max_pool3d(z, (3, 1, 1), (2, 1, 1), (1, 0, 0))
        elif self.how == "interpolate":
            z = F.interpolate(z, size=(16, h, w), mode="nearest")
        elif self.how == "pad":
            z = F.pad(z, (0, 0, 0, 0, 2, 2))
        return self.fc(torch.relu(self.b(z.squeeze(1))).mean((2, 3)))


@pytest.mark.parametrize("how", ["avg_pool3d", "MaxPool3d"])
def test_a_channel_axis_pooled_by_pairs_resizes_with_its_pooled_copy(how):
    cg = build(AlongChannels(how))
    lead, follower = group(cg, "a"), group(cg, "squeeze")
    assert not lead.frozen and lead.whole and lead.multiple == 2  # pooled over: never compacted
    assert follower.follows[0] == lead.id
    dm = DepthMultiplierPass(0.5)(trace(calibrate(AlongChannels(how), SHAPE)), torch.randn(*SHAPE))
    assert (dm.model.a.out_channels, dm.model.b.in_channels) == (8, 4)  # "does not run" before
    through_every_pass(AlongChannels(how), SHAPE)


@pytest.mark.parametrize("how", ["strided", "pad"])
def test_a_channel_axis_under_a_window_the_graph_cannot_follow_is_frozen(how):
    cg = build(AlongChannels(how))
    assert group(cg, "a").frozen and group(cg, "squeeze").frozen
    through_every_pass(AlongChannels(how), SHAPE, resizable=True)


def test_interpolating_channels_to_a_given_count_keeps_the_input_whole_and_the_output_size():
    cg = build(AlongChannels("interpolate"))
    assert not group(cg, "a").frozen and group(cg, "a").whole  # compaction was not exact before
    dm, _, _ = through_every_pass(AlongChannels("interpolate"), SHAPE)
    assert (dm.model.a.out_channels, dm.model.b.in_channels) == (8, 16)


class SpatialLinear(nn.Module):
    """A Linear over W of a strided conv's NCHW output, added back (MLP-Mixer style)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.lw = nn.Linear(4, 4)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = x + self.lw(x)
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))


def test_a_linear_over_a_spatial_axis_keeps_its_features():
    cg = build(SpatialLinear())
    g = group(cg, "lw", 3)
    assert g.frozen and any("a slides along it" in r for r in g.reasons)
    dm, _, _ = through_every_pass(SpatialLinear(), SHAPE)  # "a and b must have same reduction dim" before
    assert (dm.model.lw.in_features, dm.model.lw.out_features, dm.model.a.out_channels) == (4, 4, 4)


class ZeroPadded(nn.Module):
    """A shortcut padded with zeros to 16 channels by a size computed from a literal and a shape."""

    def __init__(self, how: str = "new_zeros"):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b, self.c = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        n, c, h, w = x.shape
        if self.how == "new_zeros":
            pad = x.new_zeros(n, 16 - c, h, w)
        else:
            pad = torch.zeros(n, 16 - x.shape[1], h, w)
        y = self.c(torch.relu(self.b(x))) + torch.cat([x, pad], 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("how", ["new_zeros", "torch.zeros"])
def test_a_size_of_a_literal_minus_a_shape_freezes_what_it_reads(how):
    cg = build(ZeroPadded(how))
    g = group(cg, "a")
    assert g.frozen and any("16 - " in r and "would not match its axis after a resize" in r for r in g.reasons)
    dm, _, _ = through_every_pass(ZeroPadded(how), SHAPE)  # a broadcast error before
    assert (dm.model.a.out_channels, dm.model.b.out_channels, dm.model.c.out_channels) == (8, 6, 16)


class Expanded(nn.Module):
    """A one-channel gate broadcast over the channels by expand: with a literal count, or the count
    read off the activation's shape."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.s = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 1, 1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        g = torch.sigmoid(self.s(x))
        if self.how == "literal":
            g = g.expand(-1, 16, -1, -1)
        elif self.how == "shape":
            g = g.expand(x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        else:
            g = g.expand(x.size())
        return self.fc(torch.relu(self.b(x + g)).mean((2, 3)))


@pytest.mark.parametrize("how", ["literal", "shape", "size"])
def test_expand_to_a_literal_channel_count_freezes_and_to_a_read_count_follows(how):
    g = group(build(Expanded(how)), "a")
    literal = how == "literal"
    assert g.frozen == literal
    assert not literal or any("size 16 in expand" in r for r in g.reasons), g.reasons
    dm, _, _ = through_every_pass(Expanded(how), SHAPE)  # the literal was resized: a broadcast error
    assert dm.model.a.out_channels == (16 if literal else 8)
