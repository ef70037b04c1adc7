"""Every zoo model x every method: the pass's promises, checked on the result."""
from __future__ import annotations

import math

import pytest
import torch

import sparsify.api as api
from sparsify import zoo
from sparsify.nn import SparseConv2d, SparseLinear, sparse_modules
from sparsify.rundir import load_run

MODELS = [n for n in zoo.names() if zoo.get(n).dataset != "imagenet"]
METHODS = {
    "sparse-random": dict(density=0.1),
    "psn": dict(density=0.1, profile="lognormal"),
    "depth-multiplier": dict(alpha=0.5),
}


def _masks(model):
    return {n: m.mask.clone() for n, m in sparse_modules(model).items()}


@pytest.fixture(scope="module")
def results():
    return {}


# psn writes what sparse-random writes but for each unit's fan-in, and MobileNetV2's depth-multiplier
# groups are checked by test_depth_multiplier_scales_conv_params_by_alpha_squared: these run under
# -m heavy, outside CI's 15 minutes (MobileNetV2 alone took 8 s per method)
HEAVY = {("mobilenetv2", "psn"), ("mobilenetv2", "depth-multiplier"), ("vgg16n", "psn"), ("inception-mini", "psn")}


@pytest.mark.parametrize("name,method", [pytest.param(n, m, marks=[pytest.mark.slow, pytest.mark.heavy] if (n, m) in HEAVY
                                                      else [], id=f"{n}-{m}") for n in MODELS for m in METHODS])
def test_zoo_model_transforms_runs_and_replays(name, method, tmp_path):
    path, res = api.transform_to_dir(f"zoo:{name}", method, out=tmp_path / "run", seed=3, **METHODS[method])
    x = torch.randn(*res.recipe.input_shape)
    model = res.model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (res.recipe.input_shape[0], zoo.get(name).num_classes)

    if method != "depth-multiplier":
        layers = sparse_modules(model)
        assert layers, "a sparse method must produce masked layers"
        for lname, m in layers.items():
            info = res.summary["pass_layers"][lname]
            live = int(m.mask.sum())
            assert live == info["live"]
            # masked weights are exactly zero
            assert torch.all(m.weight[m.weight_mask() == 0] == 0)
            fan_in = m.mask.sum(dim=1)
            if "rule" in info:  # single input filter: sqrt(D) of the filters keep their input
                assert live == max(1, round(math.sqrt(0.1) * m.mask.shape[0]))
                continue
            assert bool((fan_in > 0).all()), f"{lname}: dead output unit"
            n_out, n_in = m.mask.shape
            want = max(round(0.1 * n_out * n_in), n_out, n_in)
            blocked = n_in - int((m.mask.sum(0) > 0).sum())
            if blocked == 0:
                assert live == min(want, n_out * n_in), f"{lname}: {live} live, wanted {want}"
                assert bool((m.mask.sum(dim=0) > 0).all()), f"{lname}: input channel feeds nothing"

    # the run directory replays bit for bit
    run = load_run(path)
    with torch.no_grad():
        y2 = run.model.eval()(x)
    assert torch.equal(y, y2)
    a, b = model.state_dict(), run.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sparse-random", "psn"])
@pytest.mark.parametrize("name", ["lenet5", "resnet20", "mlp"])
def test_same_seed_same_masks_different_seed_different_masks(name, method):
    a = _masks(api.transform(f"zoo:{name}", method, seed=1, **METHODS[method]).model)
    b = _masks(api.transform(f"zoo:{name}", method, seed=1, **METHODS[method]).model)
    c = _masks(api.transform(f"zoo:{name}", method, seed=2, **METHODS[method]).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["vgg16n", "resnet20", "inception-mini", "mobilenetv2", "lenet5"])
def test_depth_multiplier_scales_conv_params_by_alpha_squared(name):
    alpha = 0.5
    dense = api.transform(f"zoo:{name}", "none").summary
    thin = api.transform(f"zoo:{name}", "depth-multiplier", alpha=alpha).summary

    def conv_params(s):
        return sum(l["params"] for l in s["layers"] if l["type"].endswith("Conv2d") and l["groups"] == 1)

    ratio = conv_params(thin) / conv_params(dense)
    # first/last layers keep one side (input image, classes), ceil rounds up: ~alpha^2, a bit above
    assert alpha**2 * 0.9 <= ratio <= alpha * 1.05, ratio
    assert thin["totals"]["macs"] < dense["totals"]["macs"] * 0.5


def test_depth_multiplier_keeps_concat_offsets_consistent():
    res = api.transform("zoo:inception-mini", "depth-multiplier", alpha=0.3)
    y = res.model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)


def test_psn_profiles_change_fan_in_spread():
    flat = api.transform("zoo:mlp", "psn", density=0.1, profile="uniform").summary["pass_layers"]
    skew = api.transform("zoo:mlp", "psn", density=0.1, profile="lognormal",
                         profile_params={"sigma": 1.5}).summary["pass_layers"]
    for name in flat:
        assert flat[name]["fan_in_cv"] < 0.05
        assert skew[name]["fan_in_cv"] > 0.8
        assert flat[name]["live"] == skew[name]["live"]


def test_classifier_dense_unless_included():
    res = api.transform("zoo:mlp", "psn", density=0.1)
    assert not isinstance(res.model.get_submodule("classifier"), SparseLinear)
    res = api.transform("zoo:mlp", "psn", density=0.1, include_classifier=True)
    assert isinstance(res.model.get_submodule("classifier"), SparseLinear)


def test_sparse_random_keeps_linears_dense_by_default_in_convnets():
    res = api.transform("zoo:cifarnet", "sparse-random", density=0.2)
    kinds = {type(m) for m in res.model.modules()}
    assert SparseConv2d in kinds and SparseLinear not in kinds
    res = api.transform("zoo:cifarnet", "sparse-random", density=0.2, include_linear=True)
    assert SparseLinear in {type(m) for m in res.model.modules()}


def test_erk_allocation_reaches_the_total_density():
    res = api.transform("zoo:vgg16n", "sparse-random", density=0.1, allocation="erk")
    layers = res.summary["pass_layers"]
    live = sum(l["live"] * l["kernel"] for l in layers.values())
    total = sum(l["entries"] * l["kernel"] for l in layers.values())
    assert abs(live / total - 0.1) < 0.01
    densities = [l["density"] for l in layers.values()]
    assert max(densities) > 2 * min(densities)  # ERK is not uniform


def test_pass_does_not_edit_its_input():
    from sparsify.passes.sparsity import SparseRandomPass
    from sparsify.passes.trace import trace

    gm = trace(zoo.get("resnet20").build())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    SparseRandomPass(0.1)(gm, torch.randn(1, 3, 32, 32))
    assert not any(isinstance(m, SparseConv2d) for m in gm.modules())
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_init_is_rescaled_to_the_live_fan_in(rescale):
    dense = api.transform("zoo:resnet20", "none", seed=5).model
    sparse = api.transform("zoo:resnet20", "sparse-random", density=0.1, seed=5, rescale_init=rescale).model
    for name, m in sparse_modules(sparse).items():
        w0 = dense.get_submodule(name).weight.detach()
        live = m.mask.sum(dim=1)
        scale = torch.sqrt(m.mask.shape[1] / live) if rescale else torch.ones_like(live)
        expected = w0 * scale.reshape(-1, 1, 1, 1) * m.weight_mask()
        torch.testing.assert_close(m.weight.detach(), expected, rtol=1e-6, atol=0)


def test_rescaled_sparse_net_keeps_its_output_scale():
    """Without rescaling, each 10%-dense layer shrinks activations ~3x; with it the scale survives depth."""
    x = torch.randn(4, 3, 32, 32)
    outs = {}
    for rescale in (True, False):
        m = api.transform("zoo:vgg16n", "sparse-random", density=0.1, seed=0, rescale_init=rescale).model.eval()
        with torch.no_grad():  # BN in eval with fresh statistics is the identity: scale compounds
            y = m(x)
            outs[rescale] = (y - y.mean(0)).std().item()  # how much the output depends on the input
    assert outs[True] > 100 * outs[False], outs


def _runs_share_fan_in(mask: torch.Tensor, block: int) -> bool:
    """Every run of `block` output channels (from channel 0) has one mask row."""
    from sparsify.passes.sparsity import runs_share_fan_in

    return runs_share_fan_in(mask.numpy(), block)


@pytest.mark.parametrize("method", ["sparse-random", "psn"])
@pytest.mark.parametrize("block", [4, 3])
def test_block_sparsity_shares_fan_in_across_runs_of_output_channels(method, block):
    """--block B: every conv's runs of B output channels read the same inputs (the last run may be
    shorter), at the density asked for, every input still read; block 1 draws each channel's own
    fan-in (runs differ)."""
    res = api.transform("zoo:resnet20", method, density=0.25, block=block, seed=3)
    assert res.recipe.params["block"] == block
    layers = res.summary["pass_layers"]
    live = entries = 0
    for name, m in sparse_modules(res.model).items():
        mask = m.mask
        assert _runs_share_fan_in(mask, block), name
        assert bool((mask.sum(dim=0) > 0).all()), f"{name}: an input channel feeds no output"
        assert layers[name]["block"] == block
        live, entries = live + int(mask.sum()), entries + mask.numel()
    assert abs(live / entries - 0.25) < 0.03
    plain = api.transform("zoo:resnet20", method, density=0.25, seed=3)
    assert "block" not in plain.recipe.params
    assert not all(_runs_share_fan_in(m.mask, block) for m in sparse_modules(plain.model).values())


def test_block_sparsity_in_grouped_convs_and_linears():
    """A grouped conv's blocks stay within its mask rows [Cout, Cin/groups]; linear layers keep one
    fan-in per unit (block sparsity is for the conv kernel)."""
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 32, 3, padding=1)
            self.g = nn.Conv2d(32, 32, 3, padding=1, groups=2)
            self.fc = nn.Linear(32, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            x = self.g(torch.relu(self.a(x)))
            return self.out(torch.relu(self.fc(x.mean((2, 3)))))

    res = api.transform(Net(), "sparse-random", density=0.25, block=4, include_linear=True, input_shape=(1, 8, 8, 8))
    mods = sparse_modules(res.model)
    assert _runs_share_fan_in(mods["g"].mask, 4) and _runs_share_fan_in(mods["a"].mask, 4)
    assert not _runs_share_fan_in(mods["fc"].mask, 4)
    assert "block" not in res.summary["pass_layers"]["fc"]


def test_a_block_as_large_as_a_layer_is_noted():
    """--block 64 on lenet5 (convs of 32 / 64 / 128 outputs; the first reads one grey filter and
    takes the single-input rule instead): at density 0.2 the 64-channel conv is too sparse for one
    block (it said "all outputs share one fan-in" while it kept its own per channel); --block 4
    says nothing."""
    notes = api.transform("zoo:lenet5", "sparse-random", density=0.2, block=64).summary["notes"]
    assert any(n.startswith("--block 64: features.3, features.6 kept one fan-in") for n in notes), notes
    assert not any("is not below" in n for n in notes)
    assert not any("--block" in n for n in api.transform("zoo:lenet5", "sparse-random", density=0.2,
                                                            block=4).summary["notes"])


def test_a_layer_too_sparse_for_blocks_is_named_and_not_said_to_share_one_fan_in():
    """--block 16 on a 16-channel conv at density 0.3 fell back to one fan-in per channel (a block
    reading every input would take more than the budget) while the note said all its outputs share
    one fan-in; ResNet-20's convs at 0.1 with --block 4 fell back with no word."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16 * 64, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    res = api.transform(Net(), "sparse-random", density=0.3, block=16, input_shape=(1, 1, 8, 8))
    mask = sparse_modules(res.model)["c2"].mask.flatten(1)
    assert len({tuple(r.tolist()) for r in mask}) > 1, "the per-channel fallback, not one shared fan-in"
    notes = res.summary["notes"]
    assert not any("share one fan-in" in n for n in notes), notes
    assert any(n.startswith("--block 16: c2 kept one fan-in per output channel (too sparse for blocks") for n in notes)
    blocked = api.transform(Net(), "sparse-random", density=0.3, block=4, input_shape=(1, 1, 8, 8))
    assert not any("--block" in n for n in blocked.summary["notes"]) and blocked.summary["pass_layers"]["c2"]["block"] == 4


@pytest.mark.parametrize("block", [0, -2, 1.5, True])
def test_bad_block_is_refused(block):
    from sparsify.errors import UsageError

    with pytest.raises(UsageError, match="--block"):
        api.transform("zoo:lenet5", "sparse-random", density=0.1, block=block)
    with pytest.raises(UsageError, match="--block"):
        api.transform("zoo:lenet5", "depth-multiplier", alpha=0.5, block=4)


def test_block_sparsity_replays_from_the_run_directory(tmp_path):
    """The recipe records block; replay draws the same masks. (lenet5's first conv reads one grey
    input filter: the single-input rule keeps a share of its filters instead, without blocks.)"""
    res = api.transform_to_dir("zoo:lenet5", out=tmp_path / "r", method="sparse-random", density=0.2, block=2)[1]
    again = load_run(tmp_path / "r").model
    blocked = [n for n, info in res.summary["pass_layers"].items() if info.get("block") == 2]
    assert blocked
    for name, m in sparse_modules(res.model).items():
        assert torch.equal(m.mask, again.get_submodule(name).mask)
        assert _runs_share_fan_in(m.mask, 2) == (name in blocked)


def test_block_sparsity_keeps_the_density_of_narrow_layers():
    """At density 0.1 resnet20's 16-channel convs are too sparse for blocks of 4 (every input read
    by some block would take 0.25 of the layer): they keep one fan-in per channel, the 64-channel
    ones share them, and the model stays at the density asked for."""
    res = api.transform("zoo:resnet20", "sparse-random", density=0.1, block=4, seed=1)
    layers = res.summary["pass_layers"]
    mods = sparse_modules(res.model)
    narrow = [n for n, m in mods.items() if m.mask.shape == (16, 16)]
    wide = [n for n, m in mods.items() if m.mask.shape == (64, 64)]
    assert narrow and wide
    assert all("block" not in layers[n] and mods[n].fan_in_block == 1 for n in narrow)
    assert all(layers[n]["block"] == 4 and mods[n].fan_in_block == 4 for n in wide)
    live = sum(int(m.mask.sum()) for m in mods.values())
    entries = sum(m.mask.numel() for m in mods.values())
    assert abs(live / entries - 0.1) < 0.01
