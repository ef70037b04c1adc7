"""Issue 9, item 1: code that runs differently in training must not be frozen into the graph.

Each model below behaves differently under ``train()`` and ``eval()``; after any transform,
training must see the training behaviour and ``eval()`` / export the eval behaviour (deterministic,
no random op in the ONNX file), and a run directory must rebuild the same two-mode model.
"""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.onnx import is_in_onnx_export

import sparsify
from sparsify.passes.channel_graph import ChannelGraph
from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import (ModeGraphModule, dropped_train_overrides, grad_mode_note, graphs, mode_differences,
                                   trace)
from sparsify.runtime.export import export_model

torch.fx.wrap("stochastic_depth")


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool) -> torch.Tensor:
    """torchvision.ops.stochastic_depth's contract (fx-wrapped there too, so it is one node)."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype).bernoulli_(keep)
    return x * noise.div_(keep)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"  # the rule matches it by name


class Base(nn.Module):
    def __init__(self, in_ch: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def head(self, x):
        return self.fc(x.mean((2, 3)))


class FunctionalDropout(Base):
    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.dropout(x, p=0.3, training=self.training)
        x = F.dropout2d(F.relu(self.c2(x)), 0.2, self.training)
        return self.fc(F.alpha_dropout(x.mean((2, 3)), p=0.1, training=self.training))


class TorchDropout(Base):
    def forward(self, x):
        x = torch.dropout(F.relu(self.bn1(self.c1(x))), 0.3, self.training)
        x = torch.nn.functional.dropout(F.relu(self.c2(x)), p=0.5, training=self.training)
        return self.head(x)


class TrainingBranch(Base):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout2d(0.2)

    def forward(self, x):
        x = self.drop(F.relu(self.bn1(self.c1(x))))
        x = F.relu(self.c2(x))
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return self.head(x)


class InlineStochasticDepth(Base):
    """torchvision's stochastic depth written inline: nothing at all in eval mode."""

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        y = F.relu(self.c2(x))
        if self.training:
            keep = torch.empty_like(y[:, :1, :1, :1]).bernoulli_(0.8)
            y = y * keep.div_(0.8)
        return self.head(x + y)


class FactoryStochasticDepth(Base):
    """Stochastic depth drawn with a tensor factory over the traced batch size (timm-style
    ``torch.rand(x.shape[0], 1, 1, 1, device=x.device)``), which torch.fx alone cannot trace."""

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        y = F.relu(self.c2(x))
        if self.training:
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= 0.5
            y = y * keep / 0.5
        return self.head(x + y)


class WrappedStochasticDepth(Base):
    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        return self.head(x + stochastic_depth(F.relu(self.c2(x)), 0.2, "row", self.training))


class AuxOutputs(Base):
    """GoogLeNet-style: an auxiliary head used only in training changes the output structure."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.aux_fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        aux = self.aux_fc(self.aux(x).mean((2, 3))) if self.training else None
        x = self.head(F.relu(self.c2(x)))
        if self.training:
            return x, aux
        return x


MODELS = [FunctionalDropout, TorchDropout, TrainingBranch, InlineStochasticDepth, FactoryStochasticDepth,
          WrappedStochasticDepth, AuxOutputs]


def _calibrated(cls):
    torch.manual_seed(0)
    m = cls()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, 16, 16))
    return m


def _first(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("cls", MODELS)
def test_trace_keeps_one_graph_per_mode(cls):
    model = _calibrated(cls)
    gm = trace(model)
    assert isinstance(gm, ModeGraphModule) and len(graphs(gm)) == 2
    assert "runs differently in training" in mode_differences(gm)
    x = torch.randn(4, 3, 16, 16)
    gm.eval()
    model.eval()
    with torch.no_grad():
        a, b = gm(x), gm(x)
        assert torch.equal(a, b), "eval outputs must be deterministic"
        torch.testing.assert_close(a, model(x))
    gm.train()
    torch.manual_seed(1)
    y1 = gm(x)
    torch.manual_seed(2)
    y2 = gm(x)
    if cls is not AuxOutputs:  # the others draw random numbers in training
        assert not torch.equal(_first(y1), _first(y2)), "training must keep its randomness"
    assert type(y1) is type(model.train()(x))


def test_a_model_without_mode_dependent_code_keeps_one_graph():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()))
    assert not isinstance(gm, ModeGraphModule) and mode_differences(gm) is None


@pytest.mark.parametrize("cls", MODELS)
def test_sparse_transform_keeps_both_modes_and_equals_the_original_at_density_1(cls):
    model = _calibrated(cls).eval()
    x = torch.randn(2, 3, 16, 16)
    res = SparseRandomPass(1.0, include_linear=True, rescale_init=False)(trace(model), x)
    m = res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x))
    m.train()
    assert type(m(x)) is type(model.train()(x))


def test_passes_replace_modules_in_both_graphs_and_resize_train_only_layers():
    model = _calibrated(AuxOutputs)
    gm = trace(model)
    x = torch.randn(2, 3, 16, 16)
    cg = ChannelGraph.build(gm, x)
    aux_group = cg.group_of("train/aux_0")
    assert aux_group is not None and not aux_group.frozen
    res = SparseRandomPass(0.5, include_linear=True)(gm, x)
    assert type(res.model.get_submodule("aux.0")).__name__ == "SparseConv2d"  # train-only layers are masked too
    dm = DepthMultiplierPass(0.5)(gm, x).model
    assert dm.get_submodule("aux.0").out_channels == 4 and dm.aux_fc.in_features == 4
    assert dm.c1.out_channels == 8 and dm.get_submodule("aux.0").in_channels == 8
    dm.train()
    logits, aux = dm(x)
    assert logits.shape == aux.shape == (2, 10)


@pytest.mark.parametrize("cls", [FunctionalDropout, TrainingBranch, FactoryStochasticDepth, WrappedStochasticDepth,
                                 AuxOutputs])
def test_export_has_the_eval_behaviour_and_no_random_op(cls, tmp_path):
    model = _calibrated(cls).eval()
    x = torch.randn(2, 3, 16, 16)
    res = SparseRandomPass(0.3, include_linear=True)(trace(model), x)
    rep = export_model(res.model, (1, 3, 16, 16), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not ops & {"RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal", "Bernoulli",
                      "Dropout"}
    assert rep.errors["function-body"] <= 1e-4 * 10 and len(rep.output_names) == 1


FILE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 3, 16, 16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        x = F.dropout(F.relu(self.c2(x)).mean((2, 3)), 0.5, training=self.training)
        return self.fc(x)
'''


def test_run_directory_rebuilds_both_modes_and_notes_them(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(FILE)
    path, res = sparsify.transform_to_dir(str(src), "sparse-random", density=0.2, out=tmp_path / "run")
    assert any("runs differently in training" in n for n in res.summary["notes"])
    run = sparsify.load(path)
    assert isinstance(run.model, ModeGraphModule)
    x = torch.randn(3, 3, 16, 16)
    m = run.model.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x)) and torch.equal(m(x), res.model.eval()(x))
    rep = sparsify.export(path, tmp_path / "m.onnx")
    assert rep.errors["function-body"] <= 1e-4
    metrics = sparsify.train(path, data="synthetic", epochs=1)
    assert "test_acc" in metrics


def test_stochastic_depth_leaves_the_residual_group_free():
    """The training graph's ``empty_like(y[:, :1, :1, :1])`` slices channels only as a shape
    template: the residual group stays resizable (the depth multiplier shrinks it)."""
    for cls in (InlineStochasticDepth, FactoryStochasticDepth, WrappedStochasticDepth):
        gm = trace(_calibrated(cls))
        x = torch.randn(2, 3, 16, 16)
        cg = ChannelGraph.build(gm, x)
        assert not cg.group_of("c1").frozen, cls.__name__
        dm = DepthMultiplierPass(0.5)(gm, x).model
        assert dm.c1.out_channels == dm.c2.out_channels == 8
        dm.train()
        assert dm(x).shape == (2, 10)


def test_a_slice_whose_values_are_used_still_freezes():
    class FirstChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

        def forward(self, x):
            y = self.c(x)
            return self.fc((y * torch.sigmoid(y[:, :1])).mean((2, 3)))

    cg = ChannelGraph.build(trace(FirstChannel()), torch.randn(1, 3, 8, 8))
    assert cg.group_of("c").frozen


def test_a_flatten_in_both_graphs_lays_out_one_group():
    """The flatten before the classifier appears in the eval and the training graph; its spatial
    parts are different (fixed-size) groups in each, which must not freeze the channels."""

    class FlattenDropout(Base):
        def forward(self, x):
            x = F.adaptive_avg_pool2d(F.relu(self.c2(F.relu(self.bn1(self.c1(x))))), 1)
            return self.fc(F.dropout(torch.flatten(x, 1), 0.2, self.training))

    gm = trace(_calibrated(FlattenDropout))
    cg = ChannelGraph.build(gm, torch.randn(2, 3, 16, 16))
    assert isinstance(gm, ModeGraphModule) and not cg.group_of("c2").frozen


class NormEval(Base):
    """mmdetection's norm_eval: BatchNorm stays in eval mode while the model trains."""

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.bn1.eval()
        return self

    def forward(self, x):
        return self.head(F.relu(self.c2(F.relu(self.bn1(self.c1(x))))))


def test_a_train_override_that_tracing_drops_is_noted():
    model = NormEval()
    note = dropped_train_overrides(model, trace(model))
    assert note is not None and note.startswith("NormEval overrides train()")
    assert "(bn1) stays in eval mode while training" in note
    assert dropped_train_overrides(FunctionalDropout(), trace(FunctionalDropout())) is None


@pytest.mark.parametrize("make_pass", [lambda: SparseRandomPass(0.3), lambda: DepthMultiplierPass(0.5)])
def test_modules_the_models_train_holds_in_eval_stay_in_eval_through_passes(make_pass):
    # The model's own train() holds bn1 in eval mode (fine-tuning a pretrained backbone); the traced
    # model's train() was nn.Module's, so `sparsify train` overwrote bn1's statistics (0.8 off).
    x = torch.randn(4, 3, 16, 16) * 2
    result = make_pass()(trace(NormEval()), x).model
    again = copy.deepcopy(result)
    for gm in (result, again):
        gm.train()
        assert not gm.bn1.training and gm.c1.training
        before = gm.bn1.running_mean.clone()
        gm(x)
        assert torch.equal(gm.bn1.running_mean, before)  # held: its statistics are not updated
        gm.eval()
        assert not gm.bn1.training


class _ReadsGradMode(nn.Module):
    """A forward that branches on ``torch.is_grad_enabled()``: fx bakes in the grad mode it was
    traced in (gradients on), so the run under ``torch.no_grad()`` differed from the model, silently."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), \
            nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        if torch.is_grad_enabled():
            x = torch.sigmoid(x) * 2
        return self.fc(F.relu(self.c2(x)).mean((2, 3)))


def test_a_forward_that_reads_the_grad_mode_runs_its_no_grad_branch_in_eval_and_notes_it(tmp_path):
    torch.manual_seed(0)
    model = _ReadsGradMode()
    x = torch.randn(4, 3, 8, 8) * 2
    gm = trace(model)
    assert gm.meta["reads_grad_mode"] and "torch.is_grad_enabled()" in grad_mode_note(gm)
    for m in (model, gm):
        m.eval()
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(gm(x), ref)                      # inference: the no_grad branch
    assert ref.std() > 1e-2
    model.train(), gm.train()
    torch.testing.assert_close(gm(x), model(x))                     # training: the branch with gradients
    result = sparsify.transform(model, "sparse-random", density=1.0, input_shape=(1, 3, 8, 8))
    assert any("reads the grad mode" in n for n in result.summary["notes"])
    rep = export_model(result.model.eval(), (1, 3, 8, 8), tmp_path / "g.onnx")
    assert rep.errors["function-body"] < 1e-4


class _OwnNoGrad(nn.Module):
    """A frozen branch under the model's own ``torch.no_grad()`` (no_grad reads the grad mode to
    restore it: a trace that made every read False left gradients off after the block)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        with torch.no_grad():
            x = torch.relu(self.a(x))
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))


@pytest.mark.parametrize("make", [lambda: _calibrated(TrainingBranch), lambda: _calibrated(FunctionalDropout), _OwnNoGrad])
def test_a_model_that_does_not_read_the_grad_mode_gets_no_note(make):
    gm = trace(make())
    assert not gm.meta["reads_grad_mode"] and grad_mode_note(gm) is None


class _LayerDrop(nn.Module):
    """A residual branch skipped at random in training, drawn as a Python value (HF's LayerDrop:
    ``if self.training and torch.rand([]) < p``) or as a per-sample tensor mask."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.a(x))
        if self.form == "torch.rand([])":
            p = torch.rand([])
            if not (self.training and p < 0.3):
                x = x + F.relu(self.b(x))
        elif self.form == "random.random()":
            import random

            if not self.training or random.random() > 0.3:
                x = x + F.relu(self.b(x))
        else:  # a mask the graph carries: every step draws anew
            keep = (torch.rand(x.shape[0], 1, 1, 1) > 0.3).float() if self.training else 1.0
            x = x + F.relu(self.b(x)) * keep
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("form,noted", [("torch.rand([])", True), ("random.random()", True), ("mask", False)])
def test_random_draws_in_python_control_flow_in_training_are_noted(form, noted):
    # tracing fixes one draw: every training step then takes the same branch (silently before)
    gm = trace(_LayerDrop(form))
    assert gm.meta["draws_in_training"] is noted
    result = sparsify.transform(_LayerDrop(form), "sparse-random", density=0.5, input_shape=(1, 3, 8, 8))
    assert any("tracing fixed one draw" in n for n in result.summary["notes"]) is noted
    if not noted:  # the mask is drawn anew at every step
        gm.train()
        torch.manual_seed(0)
        with torch.no_grad():
            outs = {float(gm(torch.ones(8, 3, 8, 8)).sum()) for _ in range(4)}
        assert len(outs) > 1


class ExportOnlySoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        y = self.fc(torch.relu(self.c(x)).mean((2, 3)))
        if torch.onnx.is_in_onnx_export():
            return y.softmax(1)  # the deployment graph returns probabilities
        return y


class ImportedCheck(ExportOnlySoftmax):
    def forward(self, x):
        y = self.fc(torch.relu(self.c(x)).mean((2, 3)))
        return y.softmax(1) if is_in_onnx_export() else y  # bound by `from torch.onnx import ...`


@pytest.mark.parametrize("cls", [ExportOnlySoftmax, ImportedCheck])
def test_a_branch_for_onnx_export_only_is_noted(cls):
    # sparsify's export writes the eval graph, where it reads False: the softmax was dropped silently
    import sparsify
    from sparsify.passes.trace import onnx_export_note

    result = sparsify.transform(cls(), "sparse-random", density=0.5, input_shape=(1, 3, 8, 8))
    assert any("torch.onnx.is_in_onnx_export()" in n and "not in the ONNX file" in n for n in result.summary["notes"])
    assert is_in_onnx_export is torch.onnx.is_in_onnx_export  # put back
    assert onnx_export_note(trace(nn.Sequential(nn.Conv2d(3, 4, 1)))) is None


class CheckedNormalisation(nn.Module):
    """Buffers read in Python (`if self.std.min() < 1e-3:`), so tracing reads every buffer as a value
    and stows the normalisation's constants: no training-mode code at all."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)
        self.register_buffer("mean", torch.tensor([0.5, -0.2, 0.1]))
        self.register_buffer("std", torch.tensor([0.2, 0.3, 0.25]))

    def forward(self, x):
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        if self.std.min() < 1e-3:
            raise ValueError("bad std")
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_the_same_program_traced_twice_is_one_graph_and_leaves_no_constants_on_the_model():
    # the two traces named the same constants _tensor_constant0/1 and 2/3: "the model runs
    # differently in training (other arguments)", and the constants were left on the user's model
    from sparsify.passes.trace import mode_differences

    model = CheckedNormalisation()
    gm = trace(model)
    assert type(gm).__name__ != "ModeGraphModule" and mode_differences(gm) is None
    assert not [k for k in vars(model) if "constant" in k]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x))
