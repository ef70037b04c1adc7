"""A model's own no-gradient regions (``with torch.no_grad():``, a ``@torch.no_grad()`` forward) and
frozen weights survive tracing: training the traced graph sends no gradient there, and the sparse
passes keep those layers dense (training could not recover what a mask removed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import graphs, trace


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    @torch.no_grad()
    def forward(self, x):
        return torch.relu(self.conv(x))


class Net(nn.Module):
    """A stem under ``with torch.no_grad():`` (its shape read there too), a frozen block traced through, a
    dropout so that training and eval graphs differ, a trainable head reading both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.frozen = Frozen()
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        with torch.no_grad():
            f = torch.relu(self.stem(x))
            n = f.shape[1]
        y = torch.relu(self.body(self.frozen(f))) + f[:, :n]
        return self.fc(nn.functional.dropout(y.mean((2, 3)), 0.2, self.training))


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draw in both models
    model(x).pow(2).sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_traced_model_sends_gradients_where_the_model_does(mode):
    torch.manual_seed(0)
    model = Net().train(mode == "train")
    x = torch.randn(2, 3, 10, 10)
    gm = trace(model)
    assert len(graphs(gm)) == 2, "training and eval graphs differ (dropout)"
    expected, got = _grads(model, x), _grads(gm, x)
    assert {n for n, g in expected.items() if g is None} == {"stem.weight", "stem.bias", "frozen.conv.weight",
                                                              "frozen.conv.bias"}
    assert {n for n, g in got.items() if g is None} == {n for n, g in expected.items() if g is None}
    for name, g in expected.items():
        if g is not None:
            torch.testing.assert_close(got[name], g)


def test_tracing_under_no_grad_marks_only_the_models_own_regions():
    model = Net().train()
    with torch.no_grad():
        gm = trace(model)
    grads = _grads(gm, torch.randn(2, 3, 10, 10))
    assert grads["body.weight"] is not None and grads["stem.weight"] is None


def test_sparse_passes_keep_untrained_layers_dense():
    torch.manual_seed(0)
    model = Net().eval()
    model.body.weight.requires_grad_(False)
    x = torch.randn(2, 3, 10, 10)
    res = SparseRandomPass(0.25, include_linear=True, include_classifier=True)(trace(model), x)
    assert set(res.layers) == {"fc"}
    for name, why in (("stem", "torch.no_grad()"), ("frozen.conv", "torch.no_grad()"), ("body", "frozen")):
        assert type(res.model.get_submodule(name)) is nn.Conv2d
        assert any(n.startswith(f"{name}: kept dense because") and why in n for n in res.notes), res.notes


class Backbone(nn.Module):
    """A frozen stem (requires_grad=False), a stem run under no_grad, and a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Conv2d(3, 16, 3, padding=1)
        self.frozen.requires_grad_(False)
        self.stem = nn.Conv2d(16, 16, 3, padding=1)
        self.h1 = nn.Conv2d(16, 32, 3, padding=1)
        self.h2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        with torch.no_grad():
            x = torch.relu(self.stem(torch.relu(self.frozen(x))))
        return self.fc(torch.relu(self.h2(torch.relu(self.h1(x)))).mean((2, 3)))


def test_depth_multiplier_keeps_untrained_layers_as_they_are():
    from sparsify.passes.depth_multiplier import DepthMultiplierPass

    torch.manual_seed(0)
    model, x = Backbone().eval(), torch.randn(2, 3, 8, 8)
    res = DepthMultiplierPass(0.5)(trace(model), x)
    dm = res.model
    assert (dm.frozen.out_channels, dm.stem.in_channels, dm.stem.out_channels, dm.h1.in_channels) == (16, 16, 16, 16)
    torch.testing.assert_close(dm.frozen.weight, model.frozen.weight)
    assert dm.h1.out_channels == dm.h2.in_channels == 16 and dm.h2.out_channels == 16, "the trained part is scaled"
    assert any("torch.no_grad()" in n for n in res.notes) and any("requires_grad=False" in n for n in res.notes)
