"""`sparsify transform`, `sparsify inspect`, `sparsify zoo` through typer's runner, good and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import write
from sparsify.cli import app

RUN_FILES = ("recipe.json", "weights.safetensors", "summary.json")

TINY_CNN = """
import torch
import torch.nn as nn


class TinyCNN(nn.Module):
    def __init__(self, width=8, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.conv2(self.conv1(x).relu()).relu()
        x = self.pool(x).flatten(1)
        return self.classifier(self.fc(x).relu())


def build(width=8, num_classes=4):
    return TinyCNN(width, num_classes)


INPUT_SHAPE = (1, 3, 8, 8)
"""

NO_SHAPE = """
import torch.nn as nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))
"""

UNTRACEABLE = """
import torch.nn as nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


INPUT_SHAPE = (1, 3, 8, 8)
"""

AMBIGUOUS = """
import torch.nn as nn


class First(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)


class Second(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
"""

RAISES = """
import torch.nn as nn


def build_model():
    raise RuntimeError("cannot build today")
"""

NO_FACTORY = """
import torch.nn as nn

WIDTH = 3


class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()
"""


@pytest.fixture(autouse=True)
def tmp_cwd(tmp_path, monkeypatch):
    """Every test runs in its own directory so the default runs/ lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_ok(r) -> None:
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output


def assert_clean_error(r, out: Path | None, *needles: str) -> str:
    """Exit 2, exactly one non-empty line starting with 'error:', no traceback, no partial output."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error:") and len(lines[0]) > len("error: "), r.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists(), f"partial output {out} left behind"
        parent = out.parent if out.parent.exists() else Path(".")
        stray = list(parent.glob(".*.tmp")) + list(parent.glob(".*.old-*"))
        assert not stray, stray
    runs = Path("runs")
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    return lines[0]


# ---------------------------------------------------------------- transform: good input


def test_transform_lenet5_sparse_random_writes_run_dir():
    r = invoke("transform", "zoo:lenet5", "--method", "sparse-random", "--density", "0.1", "--seed", "0",
               "--out", "X")
    assert_ok(r)
    out = Path("X")
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == "zoo:lenet5" and recipe["method"] == "sparse-random"
    assert recipe["params"]["density"] == 0.1 and recipe["seed"] == 0
    assert recipe["input_shape"] == [1, 1, 28, 28]
    summary = json.loads((out / "summary.json").read_text())
    # The convs other than the single-input-channel one hit the density exactly (round(D*Cout*Cin)).
    layers = summary["pass_layers"]
    for name in ("features.3", "features.6"):
        assert layers[name]["live"] == round(0.1 * layers[name]["entries"]), layers[name]
    assert summary["totals"]["sparse_layers"] == 3
    assert "saved" in r.stdout and "X" in r.stdout
    assert not list(Path(".").glob(".*.tmp"))


def test_transform_resnet20_depth_multiplier_default_out():
    r = invoke("transform", "zoo:resnet20", "--method", "depth-multiplier", "--alpha", "0.5")
    assert_ok(r)
    out = Path("runs") / "resnet20-depth-multiplier-0.5"
    assert sorted(p.name for p in Path("runs").iterdir()) == [out.name]
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "depth-multiplier" and recipe["params"] == {"alpha": 0.5}
    ratio = json.loads((out / "summary.json").read_text())["ratios"]["params_no_classifier"]
    assert 0.2 < ratio < 0.35, ratio  # ~ alpha^2 for the conv part


def test_transform_file_factory_psn_lognormal():
    write("net.py", TINY_CNN)
    r = invoke("transform", "net.py:build", "--method", "psn", "--profile", "lognormal", "--density", "0.1")
    assert_ok(r)
    out = Path("runs") / "net-psn-0.1"
    for name in RUN_FILES + ("model_source.py",):
        assert (out / name).is_file(), name
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == f"{Path('net.py').resolve()}:build"
    assert recipe["params"]["profile"] == "lognormal" and recipe["params"]["density"] == 0.1
    summary = json.loads((out / "summary.json").read_text())
    for layer in summary["pass_layers"].values():
        assert layer["live"] == round(0.1 * layer["entries"]) or layer["live"] >= layer["shape"][0]
        assert layer["fan_in_min"] >= 1


def test_transform_profile_param_changes_fan_in_spread():
    write("net.py", TINY_CNN)
    cvs = {}
    for sigma in ("0.5", "1.5"):
        r = invoke("transform", "net.py:build", "--method", "psn", "--profile", "lognormal", "--density", "0.3",
                   "--profile-param", f"sigma={sigma}", "--model-args", '{"width": 16}', "--out", f"s{sigma}")
        assert_ok(r)
        recipe = json.loads(Path(f"s{sigma}/recipe.json").read_text())
        assert recipe["params"]["profile_params"] == {"sigma": float(sigma)}
        assert recipe["model_args"] == {"width": 16}
        layers = json.loads(Path(f"s{sigma}/summary.json").read_text())["pass_layers"]
        cvs[sigma] = layers["conv2"]["fan_in_cv"]
    assert cvs["1.5"] > cvs["0.5"], cvs


def test_transform_json_output_parses():
    r = invoke("transform", "zoo:mlp", "--method", "sparse-random", "--density", "0.2", "--out", "J", "--json")
    assert_ok(r)
    data = json.loads(r.stdout)
    assert data["run_dir"] == "J" and data["method"] == "sparse-random"
    assert data["params"]["density"] == 0.2
    assert {"layers", "totals", "ratios"} <= set(data)
    assert data == {"run_dir": "J", **json.loads(Path("J/summary.json").read_text())}


def test_transform_force_replaces_existing_dir():
    out = Path("F")
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = invoke("transform", "zoo:mlp", "--density", "0.1", "--out", "F")
    line = assert_clean_error(r, None, "--force")
    assert (out / "keep.txt").read_text() == "user data" and not (out / "recipe.json").exists()
    assert not list(Path(".").glob(".*.tmp"))
    # a failing --force run leaves the old content in place
    r = invoke("transform", "zoo:mlp", "--density", "0", "--out", "F", "--force")
    assert_clean_error(r, None)
    assert (out / "keep.txt").is_file()
    # --force replaces run directories only: F holds the user's files, no recipe.json
    assert_clean_error(invoke("transform", "zoo:mlp", "--density", "0.1", "--out", "F", "--force"), None,
                       "not a run directory")
    assert (out / "keep.txt").read_text() == "user data"
    assert_ok(invoke("transform", "zoo:mlp", "--density", "0.2", "--out", "G"))
    (Path("G") / "notes.txt").write_text("a file of the old run")
    assert_ok(invoke("transform", "zoo:mlp", "--density", "0.1", "--out", "G", "--force"))
    assert not (Path("G") / "notes.txt").exists()
    assert all((Path("G") / name).is_file() for name in RUN_FILES)
    assert not list(Path(".").glob(".F.*")) and not list(Path(".").glob(".G.*")), line


def test_transform_into_existing_empty_dir_is_allowed():
    Path("E").mkdir()
    assert_ok(invoke("transform", "zoo:mlp", "--density", "0.1", "--out", "E"))
    assert (Path("E") / "recipe.json").is_file()


# ---------------------------------------------------------------- transform: bad input


@pytest.mark.parametrize("density", ["0", "-0.1", "1.5", "nan"])
def test_bad_density(density):
    r = invoke("transform", "zoo:lenet5", "--method", "sparse-random", "--density", density, "--out", "bad")
    assert_clean_error(r, Path("bad"), "--density")


def test_missing_density():
    r = invoke("transform", "zoo:lenet5", "--method", "sparse-random", "--out", "bad")
    assert_clean_error(r, Path("bad"), "--density")


@pytest.mark.parametrize("alpha", ["0", "2"])
def test_bad_alpha(alpha):
    r = invoke("transform", "zoo:lenet5", "--method", "depth-multiplier", "--alpha", alpha, "--out", "bad")
    assert_clean_error(r, Path("bad"), "--alpha")


def test_bad_alpha_default_out_leaves_no_runs_dir():
    r = invoke("transform", "zoo:lenet5", "--method", "depth-multiplier", "--alpha", "0")
    assert_clean_error(r, None, "--alpha")


def test_unknown_method():
    r = invoke("transform", "zoo:lenet5", "--method", "prune-all", "--density", "0.1", "--out", "bad")
    assert_clean_error(r, Path("bad"), "prune-all", "sparse-random")


def test_unknown_profile():
    r = invoke("transform", "zoo:mlp", "--method", "psn", "--profile", "zipf", "--density", "0.1", "--out", "bad")
    assert_clean_error(r, Path("bad"), "zipf", "lognormal")


@pytest.mark.parametrize("param, needle", [("sigma", "NAME=NUMBER"), ("sigma=abc", "NAME=NUMBER"),
                                           ("=1", "NAME=NUMBER"), ("tau=1", "tau")])
def test_bad_profile_param(param, needle):
    r = invoke("transform", "zoo:mlp", "--method", "psn", "--profile", "lognormal", "--density", "0.1",
               "--profile-param", param, "--out", "bad")
    assert_clean_error(r, Path("bad"), needle)


def test_profile_param_value_outside_family_domain():
    r = invoke("transform", "zoo:mlp", "--method", "psn", "--profile", "power-law", "--density", "0.1",
               "--profile-param", "exponent=0", "--out", "bad")
    assert_clean_error(r, Path("bad"), "power-law")


def test_missing_file():
    r = invoke("transform", "nothere.py", "--density", "0.1", "--out", "bad")
    assert_clean_error(r, Path("bad"), "nothere.py", "not found")


def test_no_factory():
    write("nofac.py", NO_FACTORY)
    r = invoke("transform", "nofac.py", "--density", "0.1", "--out", "bad")
    assert_clean_error(r, Path("bad"), "build_model")


def test_ambiguous_factory():
    write("amb.py", AMBIGUOUS)
    r = invoke("transform", "amb.py", "--density", "0.1", "--input-shape", "1,4", "--out", "bad")
    assert_clean_error(r, Path("bad"), "ambiguous", "First", "Second")


def test_factory_that_raises():
    write("raises.py", RAISES)
    r = invoke("transform", "raises.py", "--density", "0.1", "--input-shape", "1,4", "--out", "bad")
    assert_clean_error(r, Path("bad"), "raises.py:5", "cannot build today")


def test_missing_input_shape():
    write("small.py", NO_SHAPE)
    r = invoke("transform", "small.py", "--density", "0.5", "--out", "bad")
    assert_clean_error(r, Path("bad"), "--input-shape")


def test_wrong_input_shape():
    r = invoke("transform", "zoo:mlp", "--density", "0.1", "--input-shape", "1,3,32,32", "--out", "bad")
    assert_clean_error(r, Path("bad"), "--input-shape", "(1, 3, 32, 32)")


def test_wrong_input_shape_exit_code_and_no_output():
    # The part of the wrong-shape contract that holds today: exit 2, an error line, nothing written.
    r = invoke("transform", "zoo:mlp", "--density", "0.1", "--input-shape", "1,3,32,32", "--out", "bad")
    assert r.exit_code == 2
    assert any(line.startswith("error:") and "--input-shape" in line for line in r.output.splitlines())
    assert not Path("bad").exists() and not list(Path(".").glob(".*.tmp"))


def test_untraceable_model_names_line_and_says_a_leaf_cannot_help():
    # the data-dependent branch is in the model's own forward: no --leaf TYPE can make it traceable
    write("branchy.py", UNTRACEABLE)
    r = invoke("transform", "branchy.py", "--density", "0.5", "--out", "bad")
    assert_clean_error(r, Path("bad"), "--leaf cannot help", "branchy.py:10")


@pytest.mark.parametrize("args", ["{bad", "[1, 2]"])
def test_bad_model_args(args):
    r = invoke("transform", "zoo:mlp", "--density", "0.1", "--model-args", args, "--out", "bad")
    assert_clean_error(r, Path("bad"), "--model-args")


def test_model_args_the_model_rejects():
    r = invoke("transform", "zoo:mlp", "--density", "0.1", "--model-args", '{"depth": 3}', "--out", "bad")
    assert_clean_error(r, Path("bad"), "zoo:mlp")


@pytest.mark.parametrize("shape", ["abc", "1,0,28,28", "1,-1,28,28", ""])
def test_bad_input_shape(shape):
    r = invoke("transform", "zoo:mlp", "--density", "0.1", "--input-shape", shape, "--out", "bad")
    assert_clean_error(r, Path("bad"), "--input-shape")


def test_unknown_zoo_model():
    r = invoke("transform", "zoo:lenet", "--density", "0.1", "--out", "bad")
    assert_clean_error(r, Path("bad"), "lenet5")


@pytest.mark.parametrize("method, extra, needle", [("sparse-random", ["--density", "0.1", "--block", "0"], "whole number >= 1"),
                                                   ("depth-multiplier", ["--alpha", "0.5", "--block", "4"],
                                                    "sparse-random and psn")])
def test_bad_block(method, extra, needle):
    r = invoke("transform", "zoo:lenet5", "--method", method, *extra, "--out", "bad")
    assert_clean_error(r, Path("bad"), "--block", needle)


def test_block_recorded_in_the_recipe():
    assert_ok(invoke("transform", "zoo:resnet20", "--density", "0.25", "--block", "4", "--out", "B"))
    recipe = json.loads((Path("B") / "recipe.json").read_text())
    assert recipe["params"]["block"] == 4


def test_alpha_with_sparse_method_is_refused():
    r = invoke("transform", "zoo:mlp", "--density", "0.1", "--alpha", "0.5", "--out", "bad")
    assert_clean_error(r, Path("bad"), "--alpha")


# ---------------------------------------------------------------- inspect and zoo


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "lenet-sr"
    r = CliRunner().invoke(app, ["transform", "zoo:lenet5", "--density", "0.1", "--seed", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_inspect_run_dir(lenet_run):
    r = invoke("inspect", str(lenet_run))
    assert_ok(r)
    for needle in ("zoo:lenet5", "sparse-random", "params", "MACs", "x of dense", "sparse layers 3/5"):
        assert needle in r.stdout, needle


def test_inspect_run_json_matches_saved_summary(lenet_run):
    r = invoke("inspect", str(lenet_run), "--json")
    assert_ok(r)
    data = json.loads(r.stdout)
    saved = json.loads((lenet_run / "summary.json").read_text())
    assert data["totals"] == saved["totals"]
    assert data["ratios"] == saved["ratios"]
    assert [l["name"] for l in data["layers"]] == [l["name"] for l in saved["layers"]]
    assert data["method"] == "sparse-random" and data["seed"] == 1


def test_inspect_zoo_model():
    r = invoke("inspect", "zoo:lenet5")
    assert_ok(r)
    assert "zoo:lenet5" in r.stdout and "dense" in r.stdout and "sparse layers 0/5" in r.stdout


WEIGHT_STANDARDISED = """
import torch.nn as nn
import torch.nn.functional as F


class WSConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = WSConv(3, 16, 3, padding=1), WSConv(16, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


INPUT_SHAPE = (1, 3, 16, 16)
"""


def test_inspect_lists_the_convs_a_forward_runs_as_functions():
    # a model whose convs all trace into F.conv2d (weight standardisation) listed only its Linear,
    # while the totals counted the convs' MACs
    write("ws.py", WEIGHT_STANDARDISED)
    r = invoke("inspect", "ws.py")
    assert_ok(r)
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.split()}
    assert rows["a()"][1:3] == ["conv2d", "3→16"] and rows["b()"][1:3] == ["conv2d", "16→32"]
    assert rows["b()"][4] == "1.18M" and "runs as a function" in r.stdout
    data = json.loads(invoke("inspect", "ws.py", "--json").stdout)
    assert [(f["weight"], f["shape"]) for f in data["functional"]] == [("a.weight", [16, 3, 3, 3]),
                                                                        ("b.weight", [32, 16, 3, 3])]


def test_inspect_zoo_json_is_dense():
    r = invoke("inspect", "zoo:lenet5", "--json")
    assert_ok(r)
    data = json.loads(r.stdout)
    assert data["model"] == "zoo:lenet5"
    assert [l["density"] for l in data["layers"]] == [1.0] * 5
    assert data["totals"]["params"] == sum(l["params"] for l in data["layers"])


def test_inspect_model_file_with_input_shape():
    write("small.py", NO_SHAPE)
    r = invoke("inspect", "small.py", "--input-shape", "1,2,6,6", "--json")
    assert_ok(r)
    data = json.loads(r.stdout)
    conv = data["layers"][0]
    assert conv["in"] == 2 and conv["out"] == 6
    assert conv["macs"] == 6 * 2 * 9 * 4 * 4  # 4x4 output positions
    r = invoke("inspect", "small.py", "--input-shape", "1,2,6,6")
    assert_ok(r)
    assert "conv" in r.stdout


def test_inspect_model_file_without_shape_is_clean_error():
    write("small.py", NO_SHAPE)
    assert_clean_error(invoke("inspect", "small.py"), None, "--input-shape")


def test_inspect_not_a_run_dir():
    Path("plain").mkdir()
    assert_clean_error(invoke("inspect", "plain"), None, "plain")


def test_inspect_missing_file():
    assert_clean_error(invoke("inspect", "absent.py"), None, "absent.py")


LEAF_RULES = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class SameConv(nn.Conv2d):
    \"\"\"TF-style dynamic "same" padding: its own forward, so a leaf that needs --rule SameConv=conv.\"\"\"

    def forward(self, x):
        ph = max(self.kernel_size[0] - 1, 0)
        return F.conv2d(F.pad(x, [ph // 2, ph - ph // 2] * 2), self.weight, self.bias)


class Head(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = SameConv(3, 16, 3), SameConv(16, 16, 3)
        self.head = Head(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


INPUT_SHAPE = (1, 3, 8, 8)
"""


def _layers(r) -> dict[str, float]:
    assert_ok(r)
    return {l["name"]: l["density"] for l in json.loads(r.stdout)["layers"]}


def test_inspect_run_uses_the_leaves_and_rules_it_was_transformed_with():
    write("leafy.py", LEAF_RULES)
    assert_ok(invoke("transform", "leafy.py", "--density", "0.3", "--leaf", "SameConv", "--leaf", "Head",
                     "--rule", "SameConv=conv", "--out", "R"))
    summary = {l["name"]: l["density"] for l in json.loads(Path("R/summary.json").read_text())["layers"]}
    layers = _layers(invoke("inspect", "R", "--json"))
    assert layers == summary and set(layers) == {"a", "b"} and layers["a"] < 0.4  # b, the last, is the classifier
    r = invoke("inspect", "R")
    assert_ok(r)
    assert "sparse layers 1/2" in r.stdout and "channel groups: 2 (1 resizable)" in r.stdout
    # on the command line: a rule adds to the run's (Head was a leaf without one) or overrides it
    assert _layers(invoke("inspect", "R", "--rule", "Head=linear", "--json")) == {**summary, "head": 1.0}
    assert _layers(invoke("inspect", "R", "--rule", "SameConv=frozen", "--json")) == {}
    assert _layers(invoke("inspect", "R", "--leaf", "SameConv", "--json")) == summary
    assert_clean_error(invoke("inspect", "R", "--leaf", "Net"), None, "--leaf Net",
                       "transformed with --leaf SameConv --leaf Head")


def test_zoo_lists_every_model():
    from sparsify import zoo

    r = invoke("zoo")
    assert_ok(r)
    names = zoo.names()
    assert {"lenet5", "lenet300-100", "cifarnet", "vgg16n", "resnet20", "mobilenetv2", "inception-mini",
            "mlp"} <= set(names)
    for name in names:
        assert f"zoo:{name}" in r.stdout, name
