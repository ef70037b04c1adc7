"""One test per coupling pattern of the channel graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.channel_graph import ChannelGraph, classifier_node
from sparsify.passes.trace import trace


def build(model: nn.Module, shape=(1, 3, 8, 8)) -> ChannelGraph:
    gm = trace(model)
    return ChannelGraph.build(gm, torch.randn(*shape))


def group(cg: ChannelGraph, node_name: str):
    g = cg.group_of(node_name)
    assert g is not None, node_name
    return g


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


def test_plain_chain_couples_producer_with_consumer_through_activation():
    cg = build(Chain())
    g = group(cg, "c1")
    assert g.size == 8 and not g.frozen
    assert {(m.role, m.target) for m in g.members} == {("conv_out", "c1"), ("conv_in", "c2")}
    assert group(cg, "relu") is g
    # input and output are frozen
    assert group(cg, "x").frozen and "model input" in group(cg, "x").reasons
    assert group(cg, "c2").frozen and "model output" in group(cg, "c2").reasons


class WithBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.bn(self.c1(x)))


def test_batchnorm_module_shares_the_group():
    g = group(build(WithBN()), "c1")
    assert {m.role for m in g.members} == {"conv_out", "bn", "conv_in"}


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.w, self.b = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x):
        y = F.batch_norm(self.c1(x), self.rm, self.rv, self.w, self.b, False)
        return self.c2(y)


def test_functional_batch_norm_ties_its_get_attr_parameters():
    cg = build(FunctionalBN())
    g = group(cg, "c1")
    assert not g.frozen
    assert {m.target for m in g.roles("param")} == {"rm", "rv", "w", "b"}
    assert cg.group_of("w", 0) is g


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
    assert {m.target for m in g.roles("conv_out")} == {"c0", "c2"}
    assert {m.target for m in g.roles("conv_in")} == {"c1", "head"}
    assert group(cg, "c1") is not g


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
    assert gc.roles("conv_in")[0].target == "head"
    pos = cg.positions(gb.id)
    np.testing.assert_array_equal(pos[gc.id][:, 0], np.arange(4, 10))
    assert cg.derived_size(gc.id, {ga.id: 2, gb.id: 3}) == 5


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
    assert g.roles("depthwise")[0].target == "dw" and not g.frozen


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, groups=2)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(self.g(self.a(x)))


def test_grouped_conv_freezes_both_sides():
    cg = build(Grouped())
    assert group(cg, "a").frozen and group(cg, "g").frozen
    assert any("grouped conv" in r for r in group(cg, "a").reasons)


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


@pytest.mark.parametrize("cls", [FlattenLinear, ViewLinear])
def test_flatten_into_linear_expands_each_channel_to_hw_features(cls):
    cg = build(cls())
    gconv = group(cg, "c")
    flat = next(g for g in cg.groups.values() if g.derivation is not None)
    assert flat.derivation.kind == "flatten" and flat.derivation.parts == ((gconv.id, 36),)
    assert flat.roles("linear_in")[0].target == "fc"
    pos = cg.positions(gconv.id)[flat.id]
    assert pos.shape == (5, 36)
    np.testing.assert_array_equal(pos[2], np.arange(72, 108))
    assert not gconv.frozen


class LiteralView(FlattenLinear):
    def forward(self, x):
        return self.fc(self.c(x).view(-1, 180))


def test_literal_view_freezes_instead_of_guessing():
    cg = build(LiteralView())
    assert group(cg, "c").frozen


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


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.roll(y, 1, dims=1)  # mixes channels: the graph does not know it
        return self.out(self.b(y))


def test_unknown_op_freezes_the_channels_that_reach_it():
    cg = build(Unknown())
    ga = group(cg, "a")
    assert ga.frozen and any("unknown op" in r for r in ga.reasons)
    assert group(cg, "roll").frozen
    assert not group(cg, "b").frozen  # after the conv the channels are new


def test_classifier_is_the_last_weight_layer():
    gm = trace(FlattenLinear())
    assert classifier_node(gm).target == "fc"
