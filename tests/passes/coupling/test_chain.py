"""Plain chains: conv -> activation -> conv, BatchNorm (module and functional), unknown ops."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.channel_graph import classifier_node
from sparsify.passes.rules import Role
from sparsify.passes.trace import trace

from .helpers import build, group, through_every_pass
from .test_flatten import FlattenLinear


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
    assert {(m.role, m.target) for m in g.members} == {(Role.OUT, "c1"), (Role.IN, "c2")}
    assert group(cg, "relu") is g
    # input and output are frozen
    assert group(cg, "x").frozen and "model input" in group(cg, "x").reasons
    assert group(cg, "c2").frozen and "model output" in group(cg, "c2").reasons
    through_every_pass(Chain(), (1, 3, 8, 8))


class WithBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.bn(self.c1(x)))


def test_batchnorm_module_shares_the_group():
    g = group(build(WithBN()), "c1")
    assert {m.role for m in g.members} == {Role.OUT, Role.CHANNELWISE, Role.IN}
    assert g.roles(Role.CHANNELWISE)[0].target == "bn"
    dm, compacted, _ = through_every_pass(WithBN(), (1, 3, 8, 8))
    assert dm.model.bn.num_features == dm.model.c1.out_channels == 4


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
    assert {m.target for m in g.roles(Role.PARAM)} == {"rm", "rv", "w", "b"}
    assert cg.group_of("w", 0) is g
    dm, _, _ = through_every_pass(FunctionalBN(), (1, 3, 8, 8))
    assert dm.model.w.shape == (4,) and dm.model.rm.shape == (4,)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.roll(y, 1, dims=1)  # mixes channels: no rule knows it
        return self.out(self.b(y))


def test_unknown_op_freezes_the_channels_that_reach_it():
    cg = build(Unknown())
    ga = group(cg, "a")
    assert ga.frozen and any("unknown op" in r for r in ga.reasons)
    assert group(cg, "roll").frozen
    assert not group(cg, "b").frozen  # after the conv the channels are new
    through_every_pass(Unknown(), (1, 3, 8, 8))


def test_classifier_is_the_last_weight_layer():
    gm = trace(FlattenLinear())
    assert classifier_node(gm).target == "fc"


class Comparisons(nn.Module):
    """Comparisons and logic on activations: a hand-written leaky ReLU, a step mask, masked_fill."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.c1(x)
        x = torch.where(x > 0, x, 0.1 * x)
        x = self.c2(x)
        keep = torch.logical_and(x.ge(-1.0), ~(x < -2.0)) | torch.isnan(x)
        return self.c3(x * (x > 0).float() + x.masked_fill(keep, 0.5))


def test_comparisons_are_elementwise_not_unknown():
    # `x > 0` on a tensor was read as a Python-value op: "unknown op gt" froze both groups and the
    # depth multiplier refused the model; the groups resize and compact like any elementwise op's
    cg = build(Comparisons())
    for name in ("c1", "c2"):
        g = group(cg, name)
        assert not g.frozen, g.reasons
    assert group(cg, "gt") is group(cg, "c1")
    dm, _, report = through_every_pass(Comparisons(), (1, 3, 8, 8))
    assert dm is not None and report.channels_removed > 0


class TorchPools(nn.Module):
    """Pools called from the torch namespace (torch.max_pool2d, torch.adaptive_avg_pool1d), not F's."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.max_pool2d(F.relu(self.c1(x)), 2)
        return self.c2(x + torch.adaptive_avg_pool1d(x.flatten(2), 1).unsqueeze(-1))


def test_pools_from_the_torch_namespace_keep_channels():
    # torch.max_pool2d was an "unknown op": c1 froze and the depth multiplier kept it whole
    g = group(build(TorchPools()), "c1")
    assert not g.frozen, g.reasons
    through_every_pass(TorchPools(), (1, 3, 8, 8))
