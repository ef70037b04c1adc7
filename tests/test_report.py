"""sparsify.report: the per-layer report, counted against the masks themselves."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from sparsify.passes.trace import propagate_shapes, trace
from sparsify.report import input_shapes, layer_report, param_counts, with_ratios


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.bn(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _report(model: nn.Module, shape=(2, 3, 10, 10)):
    gm = trace(model)
    propagate_shapes(gm, torch.randn(*shape))
    return layer_report(gm, shape)


def test_dense_report_counts_parameters_and_macs_from_the_shapes():
    model = Net()
    rep = _report(model)
    by = {l["name"]: l for l in rep["layers"]}
    assert set(by) == {"conv1", "conv2", "fc"} and rep["input_shape"] == [1, 3, 10, 10]
    assert by["conv1"]["params"] == model.conv1.weight.numel() + 8
    assert by["conv1"]["macs"] == model.conv1.weight.numel() * 10 * 10
    assert by["fc"]["macs"] == 6 * 5 and by["fc"]["classifier"] and not by["conv1"]["classifier"]
    assert rep["totals"]["params"] == sum(p.numel() for p in model.parameters())
    assert rep["totals"]["empty_in"] == rep["totals"]["empty_out"] == 0
    counts = param_counts(rep)
    assert counts["conv"] == by["conv1"]["params"] + by["conv2"]["params"]
    assert counts["total"] - counts["no_classifier"] == by["fc"]["params"]


def test_zeroed_kernels_show_as_density_fan_in_and_empty_channels():
    from sparsify.passes.sparsity import SparseRandomPass

    model = Net().eval()
    x = torch.randn(2, 3, 10, 10)
    gm = trace(model)
    propagate_shapes(gm, x)
    sparse = SparseRandomPass(0.5, seed=1)(gm, x).model
    rep = layer_report(sparse, x.shape)
    for l in rep["layers"]:
        if not l["sparse"]:
            continue
        mask = sparse.get_submodule(l["name"]).weight_mask()
        entries = mask.flatten(2).any(2) if mask.dim() > 2 else mask.bool()   # (out, in) kernels kept
        fan = entries.sum(1)
        assert l["density"] == entries.float().mean().item()
        assert l["fan_in_min"] == fan.min().item() and l["fan_in_max"] == fan.max().item()
        assert l["empty_out"] == int((fan == 0).sum()) and l["empty_in"] == int((~entries.any(0)).sum())
        kernel = mask[0, 0].numel() if mask.dim() > 2 else 1
        assert l["params"] == int(entries.sum()) * kernel + (0 if sparse.get_submodule(l["name"]).bias is None
                                                             else l["out"])


def test_ratios_and_several_input_shapes():
    rep = _report(Net())
    half = {"totals": {k: (v * 2 if isinstance(v, int) else v) for k, v in rep["totals"].items()}}
    ratios = with_ratios(rep, half)["ratios"]
    assert ratios["params"] == 0.5 and ratios["macs"] == 0.5
    assert input_shapes((1, 3, 8, 8)) == [(1, 3, 8, 8)]
    assert input_shapes([[1, 3], [1, 4]]) == [(1, 3), (1, 4)]


class Functional(nn.Module):
    """Convs the forward runs as functions: a module's forward called directly, F.conv2d with a
    masked weight, a strided reuse of a weight; and a module call for contrast."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                     nn.Conv2d(16, 16, 3, padding=1))
        self.register_buffer("m3", (torch.rand(16, 16, 1, 1) > 0.5).float())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2.forward(x))
        y = nn.functional.conv2d(x, self.c3.weight * self.m3, self.c3.bias, padding=1)
        y = y + nn.functional.conv2d(x[:, :, ::2, ::2], self.c2.weight, None, padding=1).repeat_interleave(2, 2) \
            .repeat_interleave(2, 3)
        return self.fc(torch.relu(y).mean((2, 3)))


def _report_counted(model: nn.Module, shape=(1, 3, 8, 8)):
    """The report of ``model``, whose MACs must equal torch's FLOP counter's count (halved)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(*shape))
    rep = _report(model, shape)
    assert rep["totals"]["macs"] == counter.get_total_flops() // 2
    return rep


def test_functional_convs_count_in_the_macs_and_sparse_methods_say_they_stay_dense():
    # the report counted module calls only: 9,296 MACs "0.335x of dense" for a model of 359,504
    import sparsify

    model = Functional().eval()
    rep = _report_counted(model)
    assert sorted(f["weight"] for f in rep["functional"]) == ["c2.weight", "c2.weight", "c3.weight"]
    result = sparsify.transform(model, "sparse-random", density=0.3, input_shape=(1, 3, 8, 8))
    note = [n for n in result.summary["notes"] if "run as functions" in n]
    assert len(note) == 1 and "c2.weight (conv2d), c3.weight (conv2d)" in note[0], result.summary["notes"]
    assert result.summary["totals"]["macs"] > 0.9 * rep["totals"]["macs"]  # what stays dense is counted


class Normed(nn.Module):
    """Convs with weight_norm (parametrization and the older hook) and spectral_norm beside a plain one."""

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils import parametrizations, weight_norm

        self.c0 = parametrizations.weight_norm(nn.Conv2d(3, 16, 3, padding=1))
        self.c1 = weight_norm(nn.Conv2d(16, 16, 3, padding=1))
        self.c2 = parametrizations.spectral_norm(nn.Conv2d(16, 16, 1))
        self.c3, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.c1(torch.relu(self.c0(x))))
        return self.fc(torch.relu(self.c3(torch.relu(self.c2(x)))).mean((2, 3)))


def test_parametrized_convs_count_in_the_macs_as_dense_layers():
    # kept dense as frozen leaves, they were left out of the MACs: density 0.1 read "0.100x of dense"
    # for a model whose compute fell to 0.5x
    import sparsify

    model = Normed().eval()
    rep = _report_counted(model)
    assert [(f["weight"], f["kernel"]) for f in rep["functional"]] == [("c0.weight", [3, 3]), ("c1.weight", [3, 3]),
                                                                      ("c2.weight", [1, 1])]
    result = sparsify.transform(model, "sparse-random", density=0.1, input_shape=(1, 3, 8, 8))
    dense = sum(f["macs"] for f in rep["functional"])
    assert result.summary["totals"]["macs"] > dense and result.summary["ratios"]["macs"] > 0.5
    assert not any("run as functions" in n for n in result.summary["notes"])  # their own notes say why
    model.train()  # reading a spectral-normed weight in training mode runs a power iteration: not in a report
    u = model.c2.parametrizations.weight[0]._u.clone()
    _report(model, (1, 3, 8, 8))
    assert torch.equal(u, model.c2.parametrizations.weight[0]._u) and model.c2.training


class SamePadded(nn.Module):
    """A conv subclass computing "same" padding in forward, then F.conv2d on its own weight (traced
    through: a functional conv), beside a plain module call and a plain functional conv."""

    def __init__(self) -> None:
        super().__init__()
        import sys

        sys.path.insert(0, str(Path(__file__).parent / "passes"))
        from size_branch_models import SamePadConv

        self.c1, self.c2, self.c3 = SamePadConv(3, 16, 3, stride=2), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return nn.functional.conv2d(torch.relu(self.c2(torch.relu(self.c1(x)))), self.c3.weight)


def test_a_layer_subclass_run_as_a_function_is_advised_to_stay_whole_with_its_rule():
    # the note said "call the module (self.layer(x))", which the user's own SamePadConv already is;
    # kept whole as a leaf with --rule SamePadConv=conv it goes sparse
    import sparsify

    model = SamePadded().eval()
    result = sparsify.transform(model, "sparse-random", density=0.3, input_shape=(1, 3, 9, 9))
    note = next(n for n in result.summary["notes"] if "run as functions" in n)
    assert "keep SamePadConv whole with --leaf SamePadConv --rule SamePadConv=conv" in note, note
    assert "call the module (self.layer(x))" in note  # c3's weight in a plain F.conv2d
    # c2 is no classifier: a conv run as a function (c3) follows it (it was kept dense as one)
    assert {l["name"]: l["sparse"] for l in result.summary["layers"]}["c2"]
    leaf = sparsify.transform(model, "sparse-random", density=0.3, input_shape=(1, 3, 9, 9),
                              leaf_modules=["SamePadConv"], rules={"SamePadConv": "conv"})
    layers = {l["name"]: l for l in leaf.summary["layers"]}
    assert layers["c1"]["sparse"] and not any("SamePadConv" in n for n in leaf.summary["notes"])


def test_ratios_divide_by_every_weight_of_the_dense_model():
    # a user's weights with a third of the filters zeroed: the denominator counted nonzero weights
    # only, so density 1 read "1.549x of dense" and density 0.5 "0.817x"
    import sparsify

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.conv1.weight[::3] = 0
        model.conv2.weight[:, ::3] = 0
    for density, low, high in ((1.0, 0.99, 1.01), (0.5, 0.4, 0.6)):
        result = sparsify.transform(model, "sparse-random", density=density, input_shape=(1, 3, 10, 10),
                                    include_classifier=True, rescale_init=False)
        ratios = result.summary["ratios"]
        assert low < ratios["macs"] < high and low < ratios["params_no_classifier"] < high + 0.05, ratios
    none = sparsify.transform(model, "none", input_shape=(1, 3, 10, 10)).summary
    assert none["ratios"]["macs"] < 0.8  # the user's own zeros: fewer live connections than dense
