"""Compaction: one test per coupling pattern with hand-made dead channels, and a fuzz test."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import PassError
from sparsify.nn import SparseConv2d, SparseLinear
from sparsify.passes.compact import certify, compact, fold_batchnorm
from sparsify.passes.trace import trace


def _sc(cin: int, cout: int, k: int = 3, pad: int = 1, groups: int = 1, **kw) -> SparseConv2d:
    return SparseConv2d(cin, cout, k, padding=pad, groups=groups, **kw)


@torch.no_grad()
def _kill_out(conv: nn.Module, channels: list[int], bias: float | None = 0.0) -> None:
    """Mask whole filters; optionally set their bias (the constant they emit)."""
    conv.mask[channels] = 0
    conv.apply_mask_()
    if bias is not None and conv.bias is not None:
        conv.bias[channels] = bias


def _run(model: nn.Module, shape: tuple[int, ...]):
    model.eval()
    x = torch.randn(shape)
    gm = trace(model)
    out, report = compact(gm, x, align=1)  # the coupling tests remove every dead channel
    with torch.no_grad():
        for _ in range(2):
            xx = torch.randn(shape) * 3
            torch.testing.assert_close(out(xx), model(xx), rtol=1e-5, atol=1e-5)
    assert report.params_after <= report.params_before
    return out, report


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = _sc(3, 8), _sc(8, 8), _sc(8, 4)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_plain_chain_dead_and_unread() -> None:
    torch.manual_seed(0)
    m = Chain()
    _kill_out(m.c1, [1, 6], bias=-1.0)       # relu(-1) = 0: removable
    with torch.no_grad():
        m.c2.mask[:, 3] = 0                  # nobody reads c1's channel 3
        m.c2.apply_mask_()
    out, report = _run(m, (2, 3, 8, 8))
    assert out.c1.out_channels == 5 and out.c2.in_channels == 5
    assert out.c2.mask.shape == (8, 5) and out.c1.weight.shape[0] == 5
    reasons = {r["reason"] for r in report.removed}
    assert "unread" in reasons and "constant 0" in reasons
    assert report.channels_removed == 3


def test_nonzero_constant_before_padded_conv_is_kept() -> None:
    torch.manual_seed(1)
    m = Chain()
    _kill_out(m.c1, [2], bias=0.5)           # relu(0.5) = 0.5 flows into a zero-padded 3x3 conv
    out, report = _run(m, (2, 3, 6, 6))
    assert out.c1.out_channels == 8
    assert any("zero-padded" in k["reason"] for k in report.kept)


class BNFold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = _sc(3, 6), nn.BatchNorm2d(6)
        self.c2 = _sc(6, 4, k=3, pad=0)       # no padding: a constant input folds into the bias exactly

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_bn_constant_folded_into_unpadded_conv() -> None:
    torch.manual_seed(2)
    m = BNFold()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.bias.fill_(0.3)
    _kill_out(m.c1, [0, 4], bias=0.0)
    out, report = _run(m, (2, 3, 7, 7))
    assert out.c1.out_channels == 4 and out.bn.num_features == 4 and out.c2.in_channels == 4
    assert any("folded" in r["reason"] for r in report.removed)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1, self.c2, self.head = _sc(3, 8), _sc(8, 8), _sc(8, 8), _sc(8, 5, k=1, pad=0)

    def forward(self, x):
        x = torch.relu(self.c0(x))
        y = torch.relu(self.c1(x)) + x
        y = torch.relu(self.c2(y)) + y
        return self.head(y)


def test_residual_add_needs_every_member_dead() -> None:
    torch.manual_seed(3)
    m = Residual()
    _kill_out(m.c1, [2, 5], bias=-1.0)       # dead in one branch only: channel still carries x
    _kill_out(m.c0, [5], bias=-1.0)          # channel 5 dead in every member
    _kill_out(m.c2, [5], bias=-1.0)
    out, report = _run(m, (2, 3, 6, 6))
    assert out.c0.out_channels == 7 and out.c1.out_channels == 7 and out.c2.out_channels == 7
    assert out.head.in_channels == 7
    assert report.channels_removed == 1


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _sc(3, 4), _sc(3, 6), _sc(10, 5)

    def forward(self, x):
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_concat_positions() -> None:
    torch.manual_seed(4)
    m = Concat()
    _kill_out(m.a, [1], bias=-2.0)
    _kill_out(m.b, [0, 5], bias=0.0)
    out, report = _run(m, (2, 3, 6, 6))
    assert out.a.out_channels == 3 and out.b.out_channels == 4 and out.c.in_channels == 7
    assert report.channels_removed == 3


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw1, self.bn = _sc(3, 8, k=1, pad=0), nn.BatchNorm2d(8)
        self.dw = _sc(8, 8, groups=8)
        self.pw2 = _sc(8, 4, k=1, pad=0)

    def forward(self, x):
        return self.pw2(torch.relu(self.dw(torch.relu(self.bn(self.pw1(x))))))


def test_depthwise_shrinks_groups() -> None:
    torch.manual_seed(5)
    m = Depthwise()
    with torch.no_grad():
        m.bn.bias.fill_(-5.0)                # a dead pw1 filter gives relu(bn(0)) = 0
        m.bn.running_mean.zero_()
    _kill_out(m.pw1, [3, 7], bias=0.0)
    _kill_out(m.dw, [3, 7], bias=0.0)
    out, report = _run(m, (2, 3, 6, 6))
    assert out.dw.groups == out.dw.in_channels == out.dw.out_channels == 6
    assert out.pw1.out_channels == 6 and out.pw2.in_channels == 6 and out.dw.mask.shape == (6, 1)


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = _sc(3, 6), SparseLinear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c(x)), 1))


def test_flatten_linear_folds_constant() -> None:
    torch.manual_seed(6)
    m = FlattenLinear()
    _kill_out(m.c, [1], bias=0.0)            # zero: removed
    _kill_out(m.c, [4], bias=0.7)            # nonzero constant: folded into the linear bias
    out, report = _run(m, (2, 3, 4, 4))
    assert out.c.out_channels == 4 and out.fc.in_features == 4 * 16 and out.fc.mask.shape == (5, 64)
    assert any("folded" in r["reason"] for r in report.removed)


def test_model_output_channels_are_never_removed() -> None:
    torch.manual_seed(7)
    m = Chain()
    _kill_out(m.c3, [0, 1], bias=0.0)
    out, _ = _run(m, (2, 3, 6, 6))
    assert out.c3.out_channels == 4


class SizeAsValue(nn.Module):
    """A channel count the forward computes with: 1/sqrt(C) scaling, a division by the count (of
    the tensor, of the layer's weight), a scale from numel; beside it, a view that only sizes a tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.c1, self.c2, self.c3 = how, _sc(3, 8), _sc(8, 8), _sc(8, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        if self.how == "sqrt":
            y = self.c2(h) * (1.0 / math.sqrt(h.shape[1]))
        elif self.how == "div":
            y = self.c2(h).div(h.size(1))
        elif self.how == "weight":  # the count read off the layer's weight
            y = self.c2(h) / self.c1.weight.shape[0]
        elif self.how == "numel":
            y = self.c2(h) * (h.numel() / h.shape[0]) ** -0.5
        else:
            y = self.c2(h)
        n, c = y.shape[:2]
        return self.c3(torch.relu(y.view(n, c, -1).view(y.shape)))


@pytest.mark.parametrize("how", ["sqrt", "div", "weight", "numel"])
def test_a_channel_count_computed_with_keeps_its_group_whole(how) -> None:
    # removing c1's dead channels changed h.shape[1] and the output: compaction failed its
    # certificate ("not exact ... please report it")
    torch.manual_seed(9)
    m = SizeAsValue(how)
    _kill_out(m.c1, [0, 2, 5], bias=-1.0)
    out, report = _run(m, (2, 3, 6, 6))
    assert out.c1.out_channels == 8
    with torch.no_grad():  # and where nothing reads the count, the same dead channels go
        m.how = "none"
    assert _run(m, (2, 3, 6, 6))[0].c1.out_channels == 5


def test_original_untouched_and_certificate_catches_difference() -> None:
    torch.manual_seed(8)
    m = Chain().eval()
    _kill_out(m.c1, [0], bias=-1.0)
    gm = trace(m)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    out, _ = compact(gm, torch.randn(1, 3, 6, 6), align=1)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    with torch.no_grad():
        out.c3.bias.add_(1.0)
    with pytest.raises(PassError, match="not exact"):
        certify(gm, out, torch.randn(2, 3, 6, 6))


def test_fold_batchnorm_exact_and_mask_preserving() -> None:
    torch.manual_seed(9)
    m = BNFold().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    _kill_out(m.c1, [1], bias=0.0)
    folded, names = fold_batchnorm(trace(m))
    assert names == ["bn"] and not hasattr(folded, "bn")
    assert torch.equal(folded.c1.weight[1], torch.zeros_like(folded.c1.weight[1]))
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)


# ---- fuzz: random small conv graphs with random masks -------------------------------------


class RandomNet(nn.Module):
    """A small net built from a list of block kinds: conv(+bn), residual, concat, depthwise."""

    def __init__(self, kinds: list[str], width: int, seed: int, p_dead: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kinds = kinds
        self.blocks = nn.ModuleList()
        c = 3
        for kind in kinds:
            if kind == "conv":
                blk = nn.ModuleDict({"conv": _sc(c, width), "bn": nn.BatchNorm2d(width)})
                c = width
            elif kind == "res":
                blk = nn.ModuleDict({"conv": _sc(c, c)})
            elif kind == "cat":
                blk = nn.ModuleDict({"a": _sc(c, width // 2 + 1, k=1, pad=0), "b": _sc(c, width // 2)})
                c = width // 2 + 1 + width // 2
            else:  # depthwise
                blk = nn.ModuleDict({"conv": _sc(c, c, groups=c)})
            self.blocks.append(blk)
        self.head = SparseLinear(c, 4)
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, SparseConv2d):
                    mod.mask.copy_((torch.rand(mod.mask.shape, generator=g) < 0.5).float())
                    dead = torch.rand(mod.mask.shape[0], generator=g) < p_dead
                    mod.mask[dead] = 0
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.5)
                    mod.apply_mask_()
                elif isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                    mod.running_var.uniform_(0.5, 1.5, generator=g)
                    mod.bias.uniform_(-1, 1, generator=g)

    def forward(self, x):
        for kind, blk in zip(self.kinds, self.blocks):
            if kind == "conv":
                x = torch.relu(blk["bn"](blk["conv"](x)))
            elif kind == "res":
                x = torch.relu(blk["conv"](x)) + x
            elif kind == "cat":
                x = torch.relu(torch.cat([blk["a"](x), blk["b"](x)], 1))
            else:
                x = torch.relu(blk["conv"](x))
        return self.head(x.mean((2, 3)))


@settings(max_examples=12, deadline=None)
@given(kinds=st.lists(st.sampled_from(["conv", "res", "cat", "dw"]), min_size=1, max_size=4),
       width=st.integers(3, 8), seed=st.integers(0, 10_000), p_dead=st.sampled_from([0.0, 0.3, 0.7]))
def test_fuzz_compacted_equals_uncompacted(kinds: list[str], width: int, seed: int, p_dead: float) -> None:
    torch.manual_seed(seed)
    model = RandomNet(["conv"] + kinds, width, seed, p_dead)
    _run(model, (2, 3, 6, 6))


def test_channels_emptied_by_sparse_momentum_are_removed(tmp_path) -> None:
    """A real trained run: the empty channels that sparse momentum leaves behind all go, exactly."""
    import sparsify
    from sparsify.report import layer_report

    path, _ = sparsify.transform_to_dir("zoo:lenet5", "sparse-random", density=0.05, include_linear=True,
                                        out=tmp_path / "run", seed=1)
    sparsify.train(path, data="digits", epochs=2, schedule="sparse-momentum", prune_rate=0.5)
    model = sparsify.load(path).model.eval()
    before = layer_report(model, (1, 1, 28, 28))["totals"]
    assert before["empty_out"] + before["empty_in"] > 0  # the trained run really has empty channels
    out, report = compact(model, torch.randn(4, 1, 28, 28))
    after = layer_report(out, (1, 1, 28, 28))["totals"]
    # every output channel left reads an input, unless a constant it emits is kept on purpose
    kept = sum(k["channels"] for k in report.kept)
    assert after["empty_out"] <= kept
    assert report.channels_removed >= before["empty_out"] - kept
    assert report.params_after < report.params_before and report.max_error <= 1e-5 * max(report.output_scale, 1)
    with torch.no_grad():
        x = torch.randn(8, 1, 28, 28)
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_groups_keep_a_multiple_of_the_alignment() -> None:
    """By default a group ends on a multiple of 8 channels (ORT's Conv is slower otherwise); still exact."""
    model = Chain().eval()
    with torch.no_grad():
        model.c1 = _sc(3, 16)
        model.c2 = _sc(16, 8)
    _kill_out(model.c1, [0, 3, 5])          # 3 dead of 16: removing them would leave 13
    gm = trace(model)
    x = torch.randn(2, 3, 8, 8)
    aligned, rep = compact(gm, x)
    exact, rep1 = compact(gm, x, align=1)
    assert aligned.c1.out_channels == 16 and aligned.c2.in_channels == 16
    assert exact.c1.out_channels == 13
    assert any("multiple of 8" in k["reason"] for k in rep.kept)
    _kill_out(model.c1, [1, 2, 4, 6, 7, 8])  # 9 dead: 7 left -> keep 8
    aligned, _ = compact(trace(model), x)
    assert aligned.c1.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), model(x), rtol=1e-5, atol=1e-5)


# ---- the certificate on nets whose outputs are tiny (issue 9, item 10) ---------------------


class Shrinking(nn.Module):
    """An untrained deep net whose small BN scales shrink every layer: outputs ~1e-13 (as an
    untrained EfficientNet-B0's are)."""

    def __init__(self) -> None:
        super().__init__()
        layers = []
        c = 3
        for _ in range(6):
            layers += [_sc(c, 16), nn.BatchNorm2d(16), nn.SiLU()]
            c = 16
        self.body = nn.Sequential(*layers)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.fill_(0.01)
                elif isinstance(m, SparseConv2d):
                    m.bias.zero_()
            self.fc.bias.zero_()

    def forward(self, x):
        x = self.body(x)
        x = x * torch.sigmoid(self.se2(torch.nn.functional.silu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.fc(x.mean((2, 3)))


def test_certificate_judges_tiny_outputs_node_by_node() -> None:
    torch.manual_seed(10)
    model = Shrinking().eval()
    for conv in [m for m in model.modules() if isinstance(m, SparseConv2d)][1:]:
        _kill_out(conv, [0, 5], bias=0.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert float(model(x).abs().max()) < 1e-9  # the output scale alone cannot judge rounding
    gm = trace(model)
    out, report = compact(gm, x, align=1)
    assert report.channels_removed > 0 and report.nodes_checked > 0
    # a real mistake is still caught where values are not tiny, and named
    with torch.no_grad():
        out.get_submodule("body.3").bias.add_(1e-3)
    with pytest.raises(PassError, match="not exact at node body_"):
        certify(gm, out, x)


def test_fold_batchnorm_1d_and_never_into_a_leaf_with_its_own_forward() -> None:
    class StdConv(nn.Conv1d):
        """Weight standardisation: scaling the weight would be undone by its forward."""

        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2), keepdim=True)) / (w.std((1, 2), keepdim=True) + 1e-5)
            return torch.nn.functional.conv1d(x, w, self.bias, padding=1)

    torch.manual_seed(11)
    m = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
                      StdConv(6, 6, 3), nn.BatchNorm1d(6)).eval()
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    folded, names = fold_batchnorm(trace(m, ["StdConv"]))
    assert names == ["1"]
    x = torch.randn(3, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)


def test_channels_kept_for_one_reason_are_one_record() -> None:
    """Six constant channels a zero-padded conv reads were six "kept 1 removable-looking channel" lines."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 3)).eval()
    with torch.no_grad():
        m[0].weight[:6] = 0
        m[0].bias[:6] = torch.linspace(0.1, 0.6, 6)  # six different constants, one reason
    _, rep = compact(trace(m), torch.randn(2, 3, 8, 8), align=1)
    assert rep.kept == [{"group": rep.kept[0]["group"], "layers": ["0"], "channels": 6,
                         "reason": "constant, read by 2 (zero-padded, transposed or functional: not foldable)"}]
