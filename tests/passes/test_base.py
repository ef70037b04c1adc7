"""sparsify.passes.base: the pass contract (requires -> call on a copy -> ensures) and shared checks."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from sparsify.errors import PassError, TraceError, UsageError
from sparsify.passes.base import GraphPass, PassResult, check_fraction
from sparsify.passes.trace import propagate_shapes, trace


def _gm():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    x = torch.randn(1, 3, 6, 6)
    propagate_shapes(gm, x)
    return gm, x


class Zero(GraphPass):
    """Zeroes every weight: a legal rewrite."""

    name = "zero"

    def call(self, gm: fx.GraphModule, example) -> PassResult:
        with torch.no_grad():
            for p in gm.parameters():
                p.zero_()
        return PassResult(gm, notes=["zeroed"])


class Widen(GraphPass):
    """Breaks the promise: the output gets more channels."""

    name = "widen"

    def call(self, gm: fx.GraphModule, example) -> PassResult:
        gm._modules["2"] = nn.Conv2d(4, 3, 1)
        return PassResult(gm)


class Break(GraphPass):
    """Breaks the graph: the middle conv reads one channel too many."""

    name = "break"

    def call(self, gm: fx.GraphModule, example) -> PassResult:
        gm._modules["2"] = nn.Conv2d(5, 2, 1)
        return PassResult(gm)


class Refuse(GraphPass):
    name = "refuse"

    def requires(self, gm, example) -> None:
        raise PassError("refuse needs something this graph lacks")

    def call(self, gm, example) -> PassResult:  # pragma: no cover - never reached
        raise AssertionError("call ran although requires refused")


def test_a_pass_rewrites_a_copy_and_leaves_the_input_alone():
    gm, x = _gm()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result = Zero()(gm, x)
    assert result.model is not gm and result.notes == ["zeroed"]
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert float(result.model(x).detach().abs().max()) == 0.0


def test_ensures_catches_a_changed_output_shape():
    gm, x = _gm()
    with pytest.raises(PassError, match="widen changed the output shape"):
        Widen()(gm, x)


def test_a_broken_rewrite_is_the_pass_fault_not_the_input_shape():
    gm, x = _gm()
    with pytest.raises(PassError, match="break produced a graph that does not run") as e:
        Break()(gm, x)
    assert "--input-shape" not in str(e.value)  # the shape ran through the original


def test_a_model_failing_on_its_input_gets_the_shape_hint():
    gm, _ = _gm()
    with pytest.raises(TraceError, match="give the right shape with --input-shape N,C,H,W$"):
        propagate_shapes(gm, torch.randn(1, 4, 6, 6))


class Conv1dNet(nn.Module):
    def __init__(self, clip: bool = False):
        super().__init__()
        self.conv, self.clip = nn.Conv1d(2, 4, 3), clip
        self.bound = nn.Parameter(torch.ones(4, 1))

    def forward(self, x):
        y = self.conv(x)
        return y.clip(0.0, self.bound) if self.clip else y


def test_the_shape_hint_takes_the_inputs_form_and_only_where_a_shape_could_cure_it():
    # a Conv1d model was told "N,C,H,W"; an error no shape can cure (TypeError: clip's float and tensor
    # bounds) was told to fix its input shape
    for wrong in (torch.randn(1, 3, 16), torch.randn(1, 2, 16, 16)):  # channels; a 2-D image's shape
        with pytest.raises(TraceError, match="give the right shape with --input-shape N,C,L$"):
            propagate_shapes(trace(Conv1dNet()), wrong)
    with pytest.raises(TraceError) as e:
        propagate_shapes(trace(Conv1dNet(clip=True)), torch.randn(1, 2, 16))
    assert "TypeError" in str(e.value) and "--input-shape" not in str(e.value)
    # [N, F] to a Conv1d model that fails at its BatchNorm first was told "N,F"
    bn_first = nn.Sequential(nn.BatchNorm1d(2), nn.Conv1d(2, 4, 3))
    with pytest.raises(TraceError, match="give the right shape with --input-shape N,C,L$"):
        propagate_shapes(trace(bn_first), torch.randn(8, 64))
    # a model that makes its conv input itself keeps the form of the input it was given
    mlp_front = nn.Sequential(nn.Linear(16, 32), nn.Unflatten(1, (2, 16)), nn.BatchNorm1d(3), nn.Conv1d(2, 4, 3))
    with pytest.raises(TraceError, match="--input-shape N,F$"):
        propagate_shapes(trace(mlp_front), torch.randn(4, 16))


def test_requires_stops_before_call():
    gm, x = _gm()
    with pytest.raises(PassError, match="refuse needs"):
        Refuse()(gm, x)


@pytest.mark.parametrize("value,words", [(None, "--density is required"), (0.0, "outside \\(0, 1\\]"),
                                         (1.5, "outside"), (float("nan"), "outside")])
def test_check_fraction_names_the_flag(value, words):
    with pytest.raises(UsageError, match=words):
        check_fraction(value, "--density", "0.1")
    assert check_fraction(1, "--alpha", "0.5") == 1.0


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 4, 3)

    def forward(self, batch):
        return self.conv(batch["signal"])


def test_a_dict_input_is_named_not_taken_for_a_shape_error():
    """It read "IndexError: too many indices ...; give the right shape", which no shape cures."""
    with pytest.raises(TraceError, match=r"reads its input batch\['signal'\].*a dict input.*wrap the model") as e:
        propagate_shapes(trace(DictInput()), torch.randn(1, 8, 64))
    assert "--input-shape" not in str(e.value)
