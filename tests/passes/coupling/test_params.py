"""Per-channel parameters: get_attr layer scales, PReLU slopes, functional conv weights."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.rules import Role

from .helpers import build, group, through_every_pass


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.c(x) * self.gamma)


def test_get_attr_parameter_follows_the_channels_it_scales():
    cg = build(LayerScale())
    g = group(cg, "c")
    assert cg.group_of("gamma", 0) is g and not g.frozen
    assert g.roles(Role.PARAM)[0].target == "gamma"
    dm, _, _ = through_every_pass(LayerScale(), (1, 3, 8, 8))
    assert dm.model.gamma.shape == (4, 1, 1)


class PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.act, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.act(self.c(x)))


def test_per_channel_prelu_resizes_with_its_group():
    cg = build(PReLUNet())
    g = group(cg, "c")
    assert not g.frozen and g.roles(Role.CHANNELWISE)[0].target == "act"
    dm, compacted, _ = through_every_pass(PReLUNet(), (1, 3, 8, 8))
    assert dm.model.act.num_parameters == dm.model.c.out_channels == 4
    assert compacted.act.weight.shape[0] == compacted.c.out_channels


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(8))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.relu(F.conv2d(x, self.w1, self.b1, padding=1)))


def test_functional_conv_weights_join_the_groups():
    cg = build(FunctionalConv())
    g = group(cg, "conv2d")
    assert cg.group_of("w1", 0) is g and cg.group_of("b1", 0) is g and not g.frozen
    dm, _, _ = through_every_pass(FunctionalConv(), (1, 3, 8, 8), maskable=False)
    assert dm.model.w1.shape == (4, 3, 3, 3) and dm.model.b1.shape == (4,)
