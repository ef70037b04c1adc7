"""Sizes the model computes from tensor sizes (``n, c, h, w = x.shape``; ``c // 2``): a channel
shuffle resizes with a multiple of its group count, a reshape sized from another group's channels
follows that group, and a computed size that cannot follow freezes what it involves -- the depth
multiplier never builds a graph that does not run."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.depth_multiplier import DepthCounter, DepthMultiplierPass
from sparsify.passes.trace import trace

from .helpers import assert_same, build, calibrate, group, through_every_pass

SHAPE = (1, 3, 8, 8)


def shuffle(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "reshape":  # ShuffleNet V1/V2
        n, c, h, w = x.shape
        return x.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
    if how == "view-flatten":  # groups last, merged back with flatten
        n, c, h, w = x.shape
        return torch.flatten(x.view(n, c // 2, 2, h, w).transpose(1, 2), 1, 2)
    if how == "inferred":  # -1 instead of c // 2
        n, _, h, w = x.size()
        return x.view(n, 2, -1, h, w).transpose(1, 2).reshape(n, -1, h, w)
    return x.view(x.size(0), 2, x.size(1) // 2, x.size(2), x.size(3)).transpose(1, 2).flatten(1, 2)


class ShuffleBlock(nn.Module):
    """ShuffleNet V1: grouped 1x1 conv, channel shuffle, grouped 1x1 conv (group count 2)."""

    def __init__(self, how: str = "reshape", width: int = 8, mid: int = 6):
        super().__init__()
        self.how = how
        self.a, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, width, 1, groups=2)
        self.c = nn.Conv2d(width, mid, 1)
        self.fc = nn.Linear(mid, 4)

    def forward(self, x):
        y = shuffle(F.relu(self.bn(self.a(x))), self.how)
        y = shuffle(F.relu(self.b(y)), self.how)
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


def _transformed(model: nn.Module, alpha: float):
    model = calibrate(model, SHAPE)
    return model, DepthMultiplierPass(alpha)(trace(model), torch.randn(*SHAPE))


@pytest.mark.parametrize("how", ["reshape", "view-flatten", "inferred", "size"])
def test_channel_shuffle_resizes_to_a_multiple_of_its_groups(how):
    cg = build(ShuffleBlock(how))
    g = group(cg, "a")
    assert not g.frozen and g.multiple == 2 and g.whole  # resized, never compacted (the shuffle moves channels)
    model, dm = _transformed(ShuffleBlock(how), 0.3)
    assert dm.model.a.out_channels == dm.model.b.out_channels == 4  # ceil(0.3 * 8) = 3, rounded up to 2 * 2
    # the same function as the architecture built at that width with the same weights
    narrow = ShuffleBlock(how, width=4, mid=2)
    narrow.load_state_dict(dm.model.state_dict())
    assert_same(dm.model, narrow, SHAPE)
    _, same = _transformed(model, 1.0)
    assert_same(model, same.model, SHAPE)
    through_every_pass(ShuffleBlock(how), SHAPE, alpha=0.3)


class NonLocal(nn.Module):
    """A non-local block (CRNN): the reshape back to an image takes c // 2 from the block's input."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.g, self.out = nn.Conv2d(width, width // 2, 1), nn.Conv2d(width // 2, width, 1)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        n, c, h, w = x.shape
        y = torch.tanh(self.g(x)).flatten(2).transpose(1, 2)   # [N, HW, C/2]
        y = y.transpose(1, 2).reshape(n, c // 2, h, w)
        return self.fc((x + self.out(y)).mean((2, 3)))


def test_reshape_sized_from_another_group_follows_it():
    model, dm = _transformed(NonLocal(), 0.3)  # 16 -> 6 (even), g's 8 -> 3: "does not run" before
    assert (dm.model.stem.out_channels, dm.model.g.out_channels, dm.model.out.in_channels) == (6, 3, 3)
    assert "group of 8 channels scaled to 3 (sized by relu.shape[1] // 2 in reshape() at reshape from group 1)" \
        in dm.notes
    narrow = NonLocal(width=6)
    narrow.load_state_dict(dm.model.state_dict())
    assert_same(dm.model, narrow, SHAPE)
    _, same = _transformed(model, 1.0)
    assert_same(model, same.model, SHAPE)
    counter = DepthCounter(trace(NonLocal()), torch.randn(*SHAPE))
    assert counter.counts(0.3)["total"] == sum(p.numel() for p in dm.model.parameters())
    cg = build(NonLocal())
    lead, follower = group(cg, "stem"), group(cg, "g")
    assert follower.follows[0] == lead.id and not lead.frozen and lead.multiple == 2
    through_every_pass(NonLocal(), SHAPE, alpha=0.3)


class HeadsAttention(nn.Module):
    """ViT attention: heads split from qkv with C // heads, merged back with C from the tokens."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.patch = nn.Conv2d(8, 16, 4, 4)
        self.qkv, self.proj, self.head = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        t = self.patch(F.relu(self.stem(x))).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 4, c // 4).permute(2, 0, 3, 1, 4).unbind(0)
        y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.head((t + self.proj(y)).mean(1))


def test_computed_size_that_cannot_follow_freezes_with_its_reason():
    """matmul has no rule (its output keeps 16 channels): the reshape back to c channels would break
    if the tokens' channels changed, so they are kept, and the note says why."""
    model = calibrate(HeadsAttention(), (1, 3, 16, 16))
    dm = DepthMultiplierPass(0.5)(trace(model), torch.randn(1, 3, 16, 16))  # "does not run" before
    assert dm.model.stem.out_channels == 4 and dm.model.patch.out_channels == 16
    assert ("group of 16 channels kept (size transpose.shape[2] in reshape() at reshape_1 would not match its axis "
            "after a resize)") in dm.notes
    cg = build(HeadsAttention(), (1, 3, 16, 16))
    assert group(cg, "patch").frozen and group(cg, "qkv", 2).frozen  # qkv: sized 3 * c from the tokens


class ChannelScale(nn.Module):
    """A per-channel scale pooled over the batch, viewed to one axis sized from the channels
    (``v.view(x.shape[1])``): a view with one size argument computed from a tensor size."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem, self.mid = nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        v = torch.sigmoid(x.mean((0, 2, 3))).view(x.shape[1])
        return self.fc(F.relu(self.mid(x * v.view(1, -1, 1, 1))).mean((2, 3)))


class ViewAs(ChannelScale):
    """A residual block whose branch is viewed / reshaped to the shape of the block's input."""

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.mid(x)).reshape_as(x) + x
        return self.fc(y.view_as(x).mean((2, 3)))


@pytest.mark.parametrize("cls", [ChannelScale, ViewAs])
def test_views_sized_from_channels_follow_them(cls):
    # ChannelScale: the view's one size argument was read as "sizes unknown", so the channels froze
    # as if the size were a literal: the depth multiplier kept the stem whole. ViewAs: view_as /
    # reshape_as were unknown ops, which froze every channel they touched.
    model, dm = _transformed(cls(), 0.5)
    assert dm.model.stem.out_channels == 8 and dm.model.mid.in_channels == 8 and dm.model.fc.in_features == 8
    narrow = cls(width=8)
    narrow.load_state_dict(dm.model.state_dict())
    assert_same(dm.model, narrow, SHAPE)
    through_every_pass(cls(), SHAPE, alpha=0.5)
