"""forward's optional arguments (``mask=None``, ``return_features=False``) keep their defaults: the
model has as many inputs as shapes given (at least its required ones), and the advice on a missing
input counts the required ones only."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparsify
from cli_checks import assert_ok, assert_one_error_line, invoke, write

OPTIONAL = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask=None, return_features=False, scale=2.0, unused=None):
        f = self.body(x)
        if mask is not None:
            f = f * mask
        logits = self.fc(f.mean((2, 3))) * scale
        if return_features:
            return logits, f
        return logits


def build_model():
    torch.manual_seed(0)
    return Net()


INPUT_SHAPE = (1, 3, 8, 8)
"""

TWO_REQUIRED = """
import torch
import torch.nn as nn


class Fuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(1, 4, 1)

    def forward(self, rgb, depth, gain=1.0):
        return (self.a(rgb) + self.b(depth)) * gain
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _reference(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_model().eval()


def test_optional_arguments_keep_their_defaults():
    src = write("optional.py", OPTIONAL)
    r = invoke("transform", str(src), "--method", "none", "--out", "R")
    assert_ok(r)  # was: return_features in an `if` could not be traced
    assert ("forward's optional arguments mask=None, return_features=False, scale=2.0 are traced at their "
            "defaults") in r.output  # `unused` is never read: not named
    model = sparsify.load("R").model.eval()
    assert [n.name for n in model.graph.nodes if n.op == "placeholder"] == ["x"]
    ref = _reference(src)
    x = torch.randn(2, 3, 8, 8) * 2
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert float(expected.abs().max()) > 0.1


def test_an_optional_argument_given_a_shape_is_an_input():
    src = write("optional.py", OPTIONAL)
    assert_ok(invoke("transform", str(src), "--method", "none", "--input-shape", "1,3,8,8;1,8,8,8", "--out", "R"))
    model = sparsify.load("R").model.eval()
    assert [n.name for n in model.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    x, mask = torch.randn(2, 3, 8, 8) * 2, (torch.rand(2, 8, 8, 8) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), _reference(src)(x, mask=mask), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x, mask), model(x, torch.ones_like(mask)))


def test_a_missing_required_input_asks_for_the_required_ones_only():
    write("fuse.py", TWO_REQUIRED)
    r = invoke("transform", "fuse.py", "--density", "0.5", "--input-shape", "1,3,8,8", "--out", "bad")
    assert_one_error_line(r, "Fuse.forward(rgb, depth, gain=1.0) needs 2 inputs but 1 input shape was given",
                          '--input-shape "1,3,32,32;1,3,32,32"', nothing_at=(Path("bad"),))


def test_more_shapes_than_forward_takes():
    write("fuse.py", TWO_REQUIRED)
    r = invoke("transform", "fuse.py", "--density", "0.5", "--input-shape", "1,3,8,8;1,1,8,8;1;1", "--out", "bad")
    assert_one_error_line(r, "takes at most 3 inputs but 4 input shapes were given", nothing_at=(Path("bad"),))


def test_a_keyword_only_input_is_named_as_the_problem():
    """It read "takes at most 0 inputs but 1 input shape was given", as if the shape were wrong."""
    write("kw.py", "import torch.nn as nn\nclass K(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        self.c = nn.Conv2d(3, 8, 3)\n    def forward(self, *, x):\n        return self.c(x)\n")
    r = invoke("transform", "kw.py", "--density", "0.5", "--input-shape", "1,3,8,8", "--out", "bad")
    assert_one_error_line(r, "K.forward takes x by keyword only, but inputs are passed by position",
                          "drop the '*' before x", nothing_at=(Path("bad"),))


VARIADIC = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, *xs, **options):
        return self.b(torch.relu(self.a(xs[0]))) * options.get("scale", 2.0) + xs[1]


def build_model():
    torch.manual_seed(0)
    return Net()


INPUT_SHAPES = [(1, 3, 8, 8), (1, 8, 8, 8)]
"""


def test_star_args_and_kwargs_transform_and_export():
    # forward(self, *xs) failed in torch.onnx ("inputs has 1 elements, but dynamic_shapes has 2") and
    # **options reading .get() failed in shape propagation ("'list' object has no attribute 'get'")
    import numpy as np

    from sparsify.runtime.native import session

    path = write("var.py", VARIADIC)
    assert_ok(invoke("transform", "var.py", "--density", "0.5", "--out", "runs/v"))
    assert_ok(invoke("export", "runs/v", "--out", "v.onnx"))
    xs = [torch.randn(3, 3, 8, 8), torch.randn(3, 8, 8, 8)]
    with torch.no_grad():
        want = sparsify.load("runs/v").model.eval()(*xs).numpy()
    sess = session("v.onnx")
    got = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want).max() > 0.1 and path.exists()
