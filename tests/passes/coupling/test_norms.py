"""GroupNorm and LayerNorm (channels-last after a permute, as in ConvNeXt): resized by the depth
multiplier (GroupNorm in multiples of its groups), kept whole by compaction."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.passes.rules import Role

from .helpers import build, group, through_every_pass


class GN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        return self.fc(F.relu(self.n2(self.c2(x))).mean((2, 3)))


def test_group_norm_keeps_multiples_of_its_groups():
    cg = build(GN())
    g = group(cg, "c1")
    assert g.multiple == 4 and g.whole and not g.frozen
    assert g.roles(Role.CHANNELWISE)[0].target == "n1"
    dm, _, _ = through_every_pass(GN(), (1, 3, 8, 8), alpha=0.3)
    m = dm.model
    assert m.n1.num_channels == m.c1.out_channels == 8 and m.n1.num_groups == 4  # ceil(0.3 * 16) = 5 -> 8
    assert m.n2.num_features == m.c2.out_channels == 5


class ConvNeXt(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
        return self.fc((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


def test_layer_norm_after_permute_is_resized_with_the_channels():
    cg = build(ConvNeXt())
    g = group(cg, "stem")
    assert cg.group_of("permute", 3) is g and cg.group_of("gamma", 0) is g and cg.group_of("pw2", 3) is g
    assert not g.frozen and g.whole
    assert not group(cg, "pw1", 3).frozen
    dm, _, _ = through_every_pass(ConvNeXt(), (1, 3, 8, 8))
    m = dm.model
    assert m.norm.normalized_shape == (8,) and m.gamma.shape == (8,) and m.pw1.out_features == 32


class ChannelsLastLayerNorm(nn.Module):
    """The ConvNeXt repository's LayerNorm: F.layer_norm with the normalized shape a stored tuple,
    which the trace records as a constant."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.normalized_shape = (dim,)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-6)


class FunctionalConvNeXt(ConvNeXt):
    def __init__(self, dim=16):
        super().__init__(dim)
        self.norm = ChannelsLastLayerNorm(dim)


def test_functional_layer_norm_gets_the_new_channel_count():
    """The depth multiplier rewrites F.layer_norm's constant normalized_shape with the weight it
    cuts (it ran into "Expected weight to be of same shape as normalized_shape")."""
    cg = build(FunctionalConvNeXt())
    assert group(cg, "norm_weight", 0) is group(cg, "stem") and not group(cg, "stem").frozen
    dm, _, _ = through_every_pass(FunctionalConvNeXt(), (1, 3, 8, 8))
    m = dm.model
    (ln,) = [n for n in m.graph.nodes if n.target is F.layer_norm]
    assert ln.args[1] == (8,) and m.norm.weight.shape == (8,) and m.stem.out_channels == 8
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 10)


class MultiAxisLayerNorm(nn.Module):
    """LayerNorm over [C, H, W] after a conv (GAN / U-Net code) and over [H, W] alone."""

    def __init__(self):
        super().__init__()
        self.c0, self.ln_chw = nn.Conv2d(3, 16, 3, padding=1), nn.LayerNorm([16, 8, 6])
        self.c1, self.ln_hw = nn.Conv2d(16, 16, 3, padding=1), nn.LayerNorm([8, 6])
        self.c2, self.fc = nn.Conv2d(16, 12, 3, padding=1), nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.ln_chw(self.c0(x)))
        x = F.relu(self.ln_hw(self.c1(x)))
        return self.fc(F.relu(self.c2(x)).mean((2, 3)))


def test_layer_norm_over_several_axes_keeps_its_shape():
    # the depth multiplier rebuilt LayerNorm([16, 8, 6]) as LayerNorm((6,)) with fresh weights, even at
    # alpha 1 (0.1 off the original); a norm over [C, H, W] freezes C, one over [H, W] lets it resize
    cg = build(MultiAxisLayerNorm(), (1, 3, 8, 6))
    assert group(cg, "c0").frozen and not group(cg, "c1").frozen
    dm, _, _ = through_every_pass(MultiAxisLayerNorm(), (1, 3, 8, 6))
    m = dm.model
    assert m.ln_chw.normalized_shape == (16, 8, 6) and m.ln_hw.normalized_shape == (8, 6)
    assert m.c1.out_channels == 8 and m.ln_hw.weight.shape == (8, 6)
