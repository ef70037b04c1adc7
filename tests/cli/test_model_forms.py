"""Forms a user's model comes in. Models built with lazy layers (``nn.LazyConv2d``, ``nn.LazyLinear``: shapes known after a first
forward) and models holding a TorchScript submodule: the first are materialized on the example
input and go through every stage; the second transform (the scripted part kept whole) and export
refuses them in one line (both printed tracebacks). A float16 model is made float32 with a note
(training it in float16 lost every SGD step below the weights' rounding step, silently)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sparsify
from cli_checks import assert_ok, assert_one_error_line, invoke, write
from sparsify.runtime.export import open_session

LAZY = """
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 3, 16, 16)


class Net(nn.Module):
    def __init__(self, scripted=False):
        super().__init__()
        self.c1 = nn.LazyConv2d(16, 3, padding=1)
        self.b1 = nn.LazyBatchNorm2d()
        self.c2 = nn.LazyConv2d(16, 3, padding=1)
        if scripted:
            self.c2 = torch.jit.script(nn.Conv2d(16, 16, 3, padding=1))
        self.fc = nn.LazyLinear(10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def build_model(scripted=False):
    return Net(scripted)
"""


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_model_of_lazy_layers_transforms_trains_and_exports(tmp_cwd):
    write("lazy.py", LAZY)
    assert_ok(invoke("transform", "lazy.py", "--density", "0.25", "--seed", "3", "--out", "run"))
    run = sparsify.load("run")
    assert run.summary["totals"]["sparse_layers"] == 2
    assert tuple(run.model.get_submodule("c1").weight.shape) == (16, 3, 3, 3)
    again = sparsify.load("run").model.state_dict()  # replay draws the same initial weights
    assert all(torch.equal(v, again[k]) for k, v in run.model.state_dict().items())
    assert_ok(invoke("train", "run", "--data", "synthetic", "--epochs", "1", "--train-limit", "64", "-q"))
    assert_ok(invoke("export", "run", "--out", "m.onnx"))
    model = sparsify.load("run").model.eval()
    x = torch.randn(2, 3, 16, 16) * 2
    with torch.no_grad():
        ref = model(x).numpy()
    got = open_session(Path("m.onnx")).run(None, {"input": x.numpy()})[0]
    assert float(np.abs(ref).std()) > 1e-3 and np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_scripted_submodule_is_kept_whole_and_export_says_why(tmp_cwd):
    write("lazy.py", LAZY)
    assert_ok(invoke("transform", "lazy.py", "--model-args", '{"scripted": true}', "--density", "0.25",
                     "--out", "run"))
    assert sparsify.load("run").summary["totals"]["sparse_layers"] == 1  # c1; the scripted c2 stays whole
    r = invoke("export", "run", "--out", "m.onnx")
    assert_one_error_line(r, "c2", "TorchScript", "without torch.jit.script", nothing_at=(Path("m.onnx"),))


def test_a_float16_model_runs_in_float32_and_says_so(tmp_cwd):
    write("half.py", LAZY.replace("return Net(scripted)", "return Net(scripted).half()")
          .replace("self.c1 = nn.LazyConv2d(16, 3, padding=1)", "self.c1 = nn.Conv2d(3, 16, 3, padding=1)")
          .replace("self.b1 = nn.LazyBatchNorm2d()", "self.b1 = nn.BatchNorm2d(16)")
          .replace("self.c2 = nn.LazyConv2d(16, 3, padding=1)", "self.c2 = nn.Conv2d(16, 16, 3, padding=1)")
          .replace("self.fc = nn.LazyLinear(10)", "self.fc = nn.Linear(16, 10)")
          .replace("x = torch.relu(self.b1", "x = x.to(self.c1.weight.dtype)\n        x = torch.relu(self.b1"))
    r = invoke("transform", "half.py", "--density", "0.5", "--out", "run")
    assert_ok(r)
    assert "float16 parameters and buffers are float32 in the run" in r.output
    run = sparsify.load("run")
    assert {t.dtype for t in run.model.state_dict().values() if t.is_floating_point()} == {torch.float32}
    init = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert_ok(invoke("train", "run", "--data", "synthetic", "--epochs", "1", "--train-limit", "64", "-q"))
    trained = sparsify.load("run").model.state_dict()
    assert all(not torch.equal(trained[k], init[k]) for k in ("c2.weight", "fc.weight"))


def test_a_model_file_registering_global_hooks_is_refused_in_one_line(tmp_cwd, global_hooks_restored):
    # register_module_forward_hook at import: the hook runs around every module of the process,
    # and the sparse model, its export and a later load ran without it (silently 0.56 off).
    write("ghook.py", "import torch\nimport torch.nn as nn\n"
          "from torch.nn.modules.module import register_module_forward_hook\n\n\n"
          "def scale(module, inputs, output):\n"
          "    return output * 1.4 if isinstance(module, nn.Conv2d) else None\n\n\n"
          "register_module_forward_hook(scale)\n"
          + LAZY.split("import torch.nn as nn\n", 1)[1])
    r = invoke("transform", "ghook.py", "--density", "0.5", "--out", "run")
    assert_one_error_line(r, "register_module_forward_hook(scale) (ghook.py:6)", "layer.register_forward_hook",
                          nothing_at=(Path("run"),))


def test_trained_weights_load_into_lazy_layers(tmp_cwd):
    # --weights was loaded before the lazy layers had shapes: a traceback ("Can't access the shape of
    # an uninitialized parameter").
    write("lazy.py", LAZY)
    import importlib.util

    spec = importlib.util.spec_from_file_location("lazy_user", "lazy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trained = module.build_model()
    trained(torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    torch.save(trained.state_dict(), "trained.pt")
    assert_ok(invoke("transform", "lazy.py", "--weights", "trained.pt", "--density", "0.5", "--out", "run"))
    got = sparsify.load("run").model.state_dict()
    mask = got["c2.weight"] != 0
    assert 0.3 < mask.float().mean() < 0.7
    assert torch.equal(got["c2.weight"][mask], trained.state_dict()["c2.weight"][mask])
    assert torch.equal(got["fc.weight"], trained.state_dict()["fc.weight"])


def test_a_lazy_model_failing_its_first_forward_is_one_line(tmp_cwd):
    write("lazy.py", LAZY.replace("return self.fc(", "return self.fc(undefined_name + "))
    r = invoke("transform", "lazy.py", "--density", "0.5", "--out", "run")
    assert_one_error_line(r, "lazy layers", "(lazy.py:", "NameError", nothing_at=(Path("run"),))
