"""A parameter used in two places (tied weights, a module's weight also read by ``F.conv2d``) stays
one parameter: the sparse passes keep its layers dense, the depth multiplier and compaction leave
their channels as they are, and reports count it once."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.nn import live_params
from sparsify.passes.compact import compact
from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.rules import DEFAULT_RULES
from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import trace
from sparsify.report import layer_report


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.b.weight = self.a.weight
        self.c1 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        y = torch.relu(self.b(torch.relu(self.a(x))))
        dilated = F.conv2d(y, self.c1.weight, self.c1.bias, padding=2, dilation=2)  # c1's weight, twice
        return self.fc(torch.relu(self.c1(y) + dilated).mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Tied().eval()


def test_sparse_passes_keep_layers_sharing_parameters_dense_and_compaction_exact():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    res = SparseRandomPass(0.25)(trace(model), x)
    assert set(res.layers) == {"stem", "mid"}
    for name in ("a", "b", "c1"):
        assert any(n.startswith(f"{name}: kept dense because it shares its parameters") for n in res.notes), res.notes
    assert res.model.a.weight is res.model.b.weight
    compacted, _ = compact(res.model, x)
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), res.model(x))


def test_depth_multiplier_leaves_shared_parameters_whole():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    dm = DepthMultiplierPass(0.5)(trace(model), x).model
    assert dm.stem.out_channels == 8, "the free group is resized"
    assert dm.a.weight is dm.b.weight and dm.a.weight.shape == (16, 16, 3, 3)
    assert dm.c1.weight.shape == (16, 16, 3, 3)
    with torch.no_grad():
        assert dm(x).shape == (2, 4)


def test_a_shared_parameter_counts_once():
    model = _model()
    unique = sum(p.numel() for p in model.parameters())  # nn.Module.parameters() yields a tied one once
    assert live_params(model) == unique
    report = layer_report(trace(model), [(1, 3, 8, 8)], DEFAULT_RULES)
    assert report["totals"]["params"] == report["totals"]["dense_params"] == unique


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)

    def forward(self, x):
        y = self.c(torch.relu(self.c(x)))  # the same conv twice at 16x16
        return self.c(self.down(y))        # and once more at 8x8


def test_a_module_called_again_counts_its_parameters_once_and_its_macs_every_call():
    # inspect said 147,456 MACs for a conv that runs twice (294,912)
    report = layer_report(trace(CalledTwice()), [(1, 8, 16, 16)], DEFAULT_RULES)
    per_position = 8 * 8 * 9
    (c,) = [layer for layer in report["layers"] if layer["name"] == "c"]
    assert c["calls"] == 3 and c["params"] == per_position
    assert c["macs"] == c["dense_macs"] == per_position * (2 * 16 * 16 + 8 * 8)
    assert report["totals"]["macs"] == per_position * (2 * 16 * 16 + 8 * 8 + 8 * 8)
    assert report["totals"]["params"] == 2 * per_position


class ReadsDtype(nn.Module):
    """``x.to(self.stem.weight.dtype)`` (the input cast to the model's precision) reads only the weight's
    metadata: it ties nothing to the weight."""

    def __init__(self, like: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)
        self.like = like

    def forward(self, x):
        if self.like:  # x.type_as(w) / x.to(w): w's dtype and device
            x = x.type_as(self.stem.weight)
            h = torch.relu(self.stem(x)).to(self.mid.weight)
        else:
            x = x.to(self.stem.weight.dtype).to(self.mid.weight.device)
            h = torch.relu(self.stem(x)) * (1.0 / self.mid.weight.shape[0])
        return self.fc(torch.relu(self.mid(h)).mean((2, 3)))


@pytest.mark.parametrize("like", [False, True])
def test_reading_a_weights_dtype_device_or_shape_shares_nothing(like):
    # x.type_as(conv.weight) kept the conv dense ("shares its parameters"), and read as metadata the
    # depth multiplier failed (IndexError): type_as broadcast the weight against x in the channel graph.
    torch.manual_seed(0)
    model, x = ReadsDtype(like).eval(), torch.randn(2, 3, 8, 8)
    res = SparseRandomPass(0.25)(trace(model), x)
    assert set(res.layers) == {"stem", "mid"}, res.notes
    assert not any("shares its parameters" in n for n in res.notes), res.notes
    dm = DepthMultiplierPass(0.5)(trace(model), x).model
    assert dm.stem.out_channels == 8 and dm.mid.out_channels == 8
    assert dm.mid.weight.shape == (8, 8, 3, 3)
    with torch.no_grad():
        assert dm(x).shape == (2, 4)
