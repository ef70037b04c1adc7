"""Issue 9, item 2: a leaf keeps its own forward.

A ``--leaf`` module is opaque to tracing; one that subclasses a known layer (a conv with dynamic
"same" padding) must never be swapped for the plain layer. Without a rule it is left dense and its
channels are frozen; with ``rules={"SameConv": "conv"}`` its channels couple like a conv's, it is
masked in place and resized, always running its own forward. A subclass that does not override
``forward`` is the layer itself. The untraceable-model message offers ``--leaf`` only where it helps.
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

import sparsify
from sparsify.errors import PassError, TraceError
from sparsify.nn import MaskedLeaf
from sparsify.passes.channel_graph import ChannelGraph
from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.rules import LayerRule, Role, slice_tensors, with_user_rules
from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import trace


class SameConv(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size in forward (untraceable by fx)."""

    def __init__(self, cin, cout, k, stride=1):
        super().__init__(cin, cout, k, stride=stride, padding=0)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        ph, pw = max((oh - 1) * sh + kh - ih, 0), max((ow - 1) * sw + kw - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.c1 = SameConv(in_ch, 16, 3, stride=2)
        self.c2 = SameConv(16, 16, 3)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


class PlainSubclass(nn.Conv2d):
    """Only a different constructor: the same forward, so it *is* a Conv2d for every pass."""

    def __init__(self, c):
        super().__init__(c, c, 3, padding=1)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), PlainSubclass(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_untraceable_submodule_is_named_as_the_leaf_to_use():
    with pytest.raises(TraceError) as info:
        trace(Net())
    msg = str(info.value)
    assert "--leaf SameConv" in msg and "--rule SameConv=conv" in msg and len(msg.splitlines()) == 1


def test_untraceable_submodule_is_named_whatever_its_self_is_called():
    """A forward written with `s` for self: the failing submodule is still the one to name."""

    class Drop(nn.Module):
        def __init__(s):
            super().__init__()
            s.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(s, x):
            if x.mean() > 0:  # control flow on a tensor value: no trace can follow it
                return s.conv(x)
            return x

    class Outer(nn.Module):
        def __init__(s):
            super().__init__()
            s.stem, s.block = nn.Conv2d(3, 8, 3, padding=1), Drop()

        def forward(s, x):
            return s.block(s.stem(x))

    with pytest.raises(TraceError) as info:
        trace(Outer())
    assert "--leaf Drop" in str(info.value) and "cannot help" not in str(info.value), str(info.value)


def test_untraceable_root_forward_does_not_offer_a_leaf():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else self.conv(-x)

    with pytest.raises(TraceError) as info:
        trace(Branchy())
    assert "--leaf cannot help" in str(info.value) and "--leaf Branchy" not in str(info.value)


def _check_same(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_leaf_without_rule_is_kept_dense_and_frozen_never_replaced():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model, ["SameConv"])
    cg = ChannelGraph.build(gm, x)
    assert cg.group_of("c1").frozen and cg.group_of("c2").frozen
    res = SparseRandomPass(1.0, rescale_init=False)(gm, x)
    assert type(res.model.c1) is SameConv and type(res.model.c2) is SameConv  # never a plain conv
    assert any("leaf SameConv" in n for n in res.notes)
    _check_same(res.model, model, x)
    with torch.no_grad():
        assert res.model.c1(x).shape[-1] == 8  # its own "same" padding: 16 -> 8, not 7
    dm = DepthMultiplierPass(0.5)(gm, x).model  # only c3 is free
    assert type(dm.c1) is SameConv and dm.c1.out_channels == 16 and dm.c3.out_channels == 8


def test_leaf_with_conv_rule_is_masked_and_resized_in_place():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    rules = with_user_rules({"SameConv": "conv"})
    gm = trace(model, ["SameConv"])
    full = SparseRandomPass(1.0, rescale_init=False, rules=rules)(gm, x).model
    assert isinstance(full.c1, MaskedLeaf) and isinstance(full.c1, SameConv)
    _check_same(full, model, x)
    sparse = SparseRandomPass(0.25, rules=rules)(gm, x).model
    w = sparse.c2.weight.detach().abs().sum((2, 3))
    assert bool((w[sparse.c2.mask == 0] == 0).all()) and sparse.c2.density < 0.5
    dense = sparse.c2.to_dense()
    assert type(dense) is SameConv and not hasattr(dense, "mask")
    with torch.no_grad():
        torch.testing.assert_close(dense(torch.randn(1, 16, 9, 9)).shape, torch.Size([1, 16, 9, 9]))
    dm = DepthMultiplierPass(0.5, rules=rules)(gm, x).model
    assert type(dm.c1) is SameConv and dm.c1.out_channels == 8 and dm.c2.in_channels == 8
    with torch.no_grad():
        assert dm(x).shape == (2, 10)


class StdConv(nn.Conv2d):
    """Weight standardisation (BiT's StdConv2d): masked zeros become -mean / std, every input is read."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    """Every conv a StdConv (BiT): as traced, each runs as F.conv2d on a computed weight."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.fc = StdConv(3, 16, 3, padding=1), StdConv(16, 24, 3, padding=1), nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(torch.relu(self.c0(x)))).mean((2, 3)))


def test_depth_multiplier_names_what_keeps_every_group_frozen():
    # "no channel group can be resized (all are frozen (model output))": the blocker was the convs
    # run as functions (no --leaf) or leaves without a rule (--leaf StdConv), never the output
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(PassError, match="c0.weight \\(conv2d\\), c1.weight \\(conv2d\\) run as functions.*"
                                         "resizable, keep StdConv whole with --leaf StdConv --rule StdConv=conv"):
        DepthMultiplierPass(0.5)(trace(StdConvNet()), x)
    with pytest.raises(PassError, match="StdConv is a leaf without a rule.*add --rule StdConv=conv"):
        DepthMultiplierPass(0.5)(trace(StdConvNet(), ["StdConv"]), x)
    dm = DepthMultiplierPass(0.5, rules=with_user_rules({"StdConv": "conv"}))(trace(StdConvNet(), ["StdConv"]), x)
    assert dm.model.c0.out_channels == 8 and dm.model.c1.out_channels == 12


class ScaledLinear(nn.Linear):
    """A linear leaf that normalises its weight rows and scales its output (honours its mask: zeros stay
    zero), or also centres its rows (does not)."""

    centre = False

    def forward(self, x):
        w = F.normalize(self.weight, dim=1)
        w = w - w.mean(1, keepdim=True) if self.centre else w
        return 2 * F.linear(x, w, self.bias)


class LeafNet(nn.Module):
    def __init__(self, conv: type, groups: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = conv(16, 16, 3, padding=1, groups=groups)
        self.fc = ScaledLinear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.out(torch.relu(self.fc(x.mean((2, 3)))))


@pytest.mark.parametrize("groups", [1, 2])
def test_a_leaf_rule_whose_forward_ignores_the_mask_is_refused(groups):
    """A leaf that transforms its weight before the conv would be reported sparse and compute dense."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    rules = with_user_rules({"StdConv": "conv", "ScaledLinear": "linear"})
    with pytest.raises(PassError, match="c2: the conv .leaf. rule for StdConv does not hold"):
        SparseRandomPass(0.25, rules=rules)(trace(LeafNet(StdConv, groups).eval(), ["StdConv"]), x)
    ok = SparseRandomPass(0.25, rules=rules, include_linear=True)(trace(LeafNet(nn.Conv2d, groups).eval(),
                                                                         ["ScaledLinear"]), x)
    assert isinstance(ok.model.fc, MaskedLeaf) and ok.model.fc.reads_masked_inputs((2, 16)) is None
    ScaledLinear.centre = True
    try:
        assert ok.model.fc.reads_masked_inputs((2, 16)) is not None
    finally:
        ScaledLinear.centre = False


def test_subclass_without_its_own_forward_is_the_layer():
    x = torch.randn(2, 3, 8, 8)
    gm = trace(Wrapper())
    res = SparseRandomPass(0.5)(gm, x)
    assert type(res.model.c2).__name__ == "SparseConv2d"
    dm = DepthMultiplierPass(0.5)(gm, x).model
    assert isinstance(dm.c2, PlainSubclass) and dm.c2.in_channels == dm.c2.out_channels == 4


MODEL_FILE = textwrap.dedent('''
    import math
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    INPUT_SHAPE = (1, 1, 16, 16)


    class SameConv(nn.Conv2d):
        def __init__(self, cin, cout, k, stride=1):
            super().__init__(cin, cout, k, stride=stride, padding=0)

        def forward(self, x):
            ih, iw = x.size()[-2:]
            ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
            pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
            if ph or pw:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = SameConv(1, 16, 3, stride=2)
            self.c2 = SameConv(16, 16, 3)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))
''')


@pytest.mark.parametrize("method,kw", [("sparse-random", {"density": 0.1}), ("psn", {"density": 0.1}),
                                       ("depth-multiplier", {"alpha": 0.5})])
def test_cli_leaf_and_rule_transform_replay_export(tmp_path, method, kw):
    """A grey (one input filter) net of leaves: the sqrt(D) rule empties stem filters through the
    leaf's rule, compaction removes them exactly, and the run replays the masked leaves."""
    from sparsify.cli import app

    src = tmp_path / "net.py"
    src.write_text(MODEL_FILE)
    args = ["transform", str(src), "--method", method, "--leaf", "SameConv", "--rule", "SameConv=conv",
            "--out", str(tmp_path / "run")]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    run = sparsify.load(tmp_path / "run")
    assert type(run.model.c1).__name__ in ("SameConv", "MaskedSameConv")
    rep = sparsify.export(tmp_path / "run", tmp_path / "m.onnx")
    assert rep.errors["function-body"] <= 1e-4
    if method == "sparse-random":
        assert rep.compaction["channels_removed"] > 0


def test_cli_rejects_an_unknown_rule(tmp_path):
    from sparsify.cli import app

    src = tmp_path / "net.py"
    src.write_text(MODEL_FILE)
    r = CliRunner().invoke(app, ["transform", str(src), "--leaf", "SameConv", "--rule", "SameConv=magic",
                                 "--density", "0.1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--rule" in r.output and not (tmp_path / "run").exists()


def test_a_rule_for_a_type_the_model_lacks_or_traces_through_is_named(tmp_path):
    # --rule Foo=conv (a typo, no such module) was recorded and silently unused; so was a rule for a
    # type the tracer goes through (Net itself is never a layer)
    from sparsify.cli import app

    src = tmp_path / "net.py"
    src.write_text(MODEL_FILE)
    base = ["transform", str(src), "--density", "0.3"]
    r = CliRunner().invoke(app, [*base, "--rule", "SameConv2d=conv", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--rule SameConv2d: " in r.output and "has no module of that type" in r.output
    assert "SameConv" in r.output.split("its types are")[1] and not (tmp_path / "a").exists()
    # a conv subclass named by a rule is kept whole by it (used, no note); Net is traced through
    r = CliRunner().invoke(app, [*base, "--rule", "SameConv=conv", "--rule", "Net=elementwise",
                                 "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and "--rule Net: no layer of that type is kept whole" in r.output, r.output
    assert "SameConv:" not in r.output and sparsify.load(tmp_path / "b").model.c2.mask.float().mean() < 1


# ---- a rule of the user's own (rules= in the API) --------------------------------------------


class ChannelScale(nn.Module):
    """A per-channel scale whose forward branches on the input's rank (untraceable by fx, which
    sees a Proxy; torch.export specialises it)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("ChannelScale takes [N, C, H, W]")
        return x * self.weight.view(1, -1, 1, 1)


class ScaleRule(LayerRule):
    """Channel c out = weight[c] * channel c in: tied, with the weight as per-channel parameters."""

    name = "channel scale"
    has_weight = False

    def couple(self, cg, node, m):
        x = node.args[0]
        cg.tie_axes(x, node, None, self.name)
        s = cg.module_space(node.target, 0, m.weight.shape[0])
        cg.tie(cg.space(node, 1), s, self.name)
        cg.member(s, Role.CHANNELWISE, node, node.target, 0, self)

    def constancy(self, env, node, m, out):
        return env.const(node.args[0])

    def slice(self, m, member, keep):
        slice_tensors(m, ("weight",), 0, keep)

    def resize(self, m, node, size):
        c = size(node, 1)
        return None if c == m.weight.shape[0] else ChannelScale(c)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.s, self.c2 = nn.Conv2d(1, 16, 3, padding=1), ChannelScale(16), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.s(self.c1(x))))).mean((2, 3)))


SCALED_FILE = '''
import sys
sys.path.insert(0, {here!r})
from test_leaf import Scaled

INPUT_SHAPE = (1, 1, 16, 16)


def build_model():
    return Scaled()
'''


def test_a_user_rule_object_couples_resizes_compacts_and_must_be_given_to_replay(tmp_path):
    import os

    from sparsify.errors import RunDirError

    src = tmp_path / "scaled.py"
    src.write_text(SCALED_FILE.format(here=os.path.dirname(__file__)))
    rules = {ChannelScale: ScaleRule()}
    x = torch.randn(2, 1, 16, 16)
    torch.manual_seed(0)
    model = Scaled().eval()
    gm = trace(model, rules=with_user_rules(rules))  # a type with a rule is a leaf by itself
    cg = ChannelGraph.build(gm, x, with_user_rules(rules))
    assert cg.group_of("c1") is cg.group_of("s") and not cg.group_of("c1").frozen
    dm = DepthMultiplierPass(0.5, rules=with_user_rules(rules))(gm, x).model
    assert dm.s.weight.shape == (8,) and dm.c1.out_channels == dm.c2.in_channels == 8
    path, res = sparsify.transform_to_dir(str(src), "sparse-random", density=0.1, rules=rules, out=tmp_path / "run")
    assert res.recipe.rules == {"ChannelScale": f"custom:{__name__}.ScaleRule"}
    with pytest.raises(RunDirError, match="custom rule for ChannelScale"):
        sparsify.load(path)
    run = sparsify.load(path, rules=rules)
    rep = sparsify.export(path, tmp_path / "m.onnx", rules=rules)
    assert rep.compaction["channels_removed"] > 0  # the sqrt(D) rule's dead stem filters, through the scale
    with torch.no_grad():
        assert run.model.eval()(x).shape == (2, 10)


class FeaturesNet(nn.Module):
    """Returns every conv's features beside the logits (a detection or distillation backbone)."""

    def __init__(self, all_features: bool = True):
        super().__init__()
        self.all_features = all_features
        self.c0, self.c1, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1), nn.Linear(24, 10)

    def forward(self, x):
        f0 = torch.relu(self.c0(x))
        f1 = torch.relu(self.c1(f0))
        logits = self.fc(f1.mean((2, 3)))
        return {"features": [f0, f1] if self.all_features else [f1], "logits": logits}


def test_depth_multiplier_names_the_returned_layers_that_fix_every_width():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(PassError, match="returns the outputs of c0, c1, fc,.*return only the final output.*"
                                         "--method sparse-random or psn"):
        DepthMultiplierPass(0.5)(trace(FeaturesNet()), x)
    # with c0's features no longer returned its group resizes: no refusal
    dm = DepthMultiplierPass(0.5)(trace(FeaturesNet(all_features=False)), x)
    assert dm.model.c0.out_channels == 8 and dm.model.c1.out_channels == 24


class _PlainSameConv(nn.Module):
    """A convolution over its own weight without nn.Conv2d's attributes (in_channels, kernel_size...)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight)


class _PlainLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def test_a_rule_for_a_module_it_cannot_read_is_one_line():
    """--rule SameConv=conv on a plain nn.Module ended in AttributeError ('no attribute in_channels');
    the linear rule likewise ('in_features')."""
    from sparsify.errors import UsageError

    net = nn.Sequential(_PlainSameConv(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), _PlainLinear())
    with pytest.raises(UsageError, match=r"--rule _PlainSameConv=conv: _PlainSameConv is not a subclass of nn\.Conv"):
        sparsify.transform(net, density=0.5, input_shape=(1, 3, 8, 8), rules={_PlainSameConv: "conv"})
    with pytest.raises(UsageError, match=r"--rule _PlainLinear=linear: _PlainLinear is not a subclass of nn\.Linear"):
        sparsify.transform(net, density=0.5, input_shape=(1, 3, 8, 8), rules={"_PlainLinear": "linear"})
