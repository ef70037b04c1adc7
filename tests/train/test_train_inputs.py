"""`sparsify train` on models and data it cannot or could not train: outputs that are not class scores
(a dict, a tuple, a tuple in training mode only, one logit), labels beyond a file model's outputs,
rank-3 (Conv1d) inputs; one error line, exit 2, and the run directory as it was.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

from sparsify.api import transform_to_dir
from sparsify.train import train_run
from sparsify.train.data import load_dataset

_spec = importlib.util.spec_from_file_location("cli_checks", Path(__file__).parent.parent / "cli" / "cli_checks.py")
cli_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_checks)
invoke, assert_ok, assert_one_error_line = cli_checks.invoke, cli_checks.assert_ok, cli_checks.assert_one_error_line

IMAGE_NET = '''
import torch, torch.nn as nn
INPUT_SHAPE = (1, 3, 16, 16)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
    def forward(self, x):
        f = torch.relu(self.c(x)).mean((2, 3))
        return RETURN
def build_model():
    return Net()
'''
RETURNS = {"dict": '{"logits": self.fc(f), "feat": f}', "tuple": "self.fc(f), f", "tensor": "self.fc(f)",
           "text": "self.fc(f), 'label'",
           # GoogLeNet / Inception: an auxiliary head's output beside the logits, in training only
           "aux-in-training": "(self.fc(f), f) if self.training else self.fc(f)",
           # one logit (a yes/no task scored with BCE): the synthetic set had one class, loss 0, accuracy 1
           "one-logit": "self.fc(f)[:, :1]",
           # fails in training beyond batch 1 only: the first step names it (not a traceback from the check)
           "fails-in-training": "self.fc(f) if not self.training else self.fc(f.reshape(1, -1))"}

CONV1D_NET = '''
import torch, torch.nn as nn
INPUT_SHAPE = (1, 4, 100)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 16, 5, padding=2)
        self.fc = nn.Linear(16, 10)
    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean(2))
def build_model():
    return Net()
'''
QUICK = ["--epochs", "1", "--batch-size", "50", "--quiet"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _model_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


def _run(tmp_path: Path, name: str, text: str) -> Path:
    path, _ = transform_to_dir(str(_model_file(tmp_path, name, text)), method="sparse-random", density=0.25,
                               out=tmp_path / "runs" / name)
    return Path(path)


def _state(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _npz(path: Path, x_shape: tuple[int, ...], labels: int) -> Path:
    r = np.random.default_rng(0)
    np.savez(path, x=r.standard_normal(x_shape).astype("float32"), y=r.integers(0, labels, x_shape[0]))
    return path


@pytest.mark.parametrize("kind, needles", [
    ("dict", ("returns a dict (keys: logits, feat)", "one tensor of class scores", "wrap the model")),
    ("tuple", ("returns a tuple of 2", "one tensor of class scores", "export works", "wrap the model")),
    # a string beside the scores: export refuses it, so train must not say "export works"
    ("text", ("returns a tuple of 2", "one tensor of class scores", "wrap the model")),
    ("aux-in-training", ("returns a tuple of 2 in training mode", "drop the auxiliary outputs")),
    ("one-logit", ("one score per example", "two or more", "own loop")),
    ("fails-in-training", ("fails in training at epoch 1 step 1", "RuntimeError"))])
def test_a_model_not_returning_class_scores_is_refused_before_anything_is_written(tmp_path, kind, needles):
    run = _run(tmp_path, f"{kind}net", IMAGE_NET.replace("RETURN", RETURNS[kind]))
    before = _state(run)
    r = invoke("train", run, "--data", "synthetic", *QUICK)
    named = () if kind == "fails-in-training" else (f"{kind}net.py",)  # a refusal names the model file
    line = assert_one_error_line(r, *needles, *named, nothing_at=(run / "metrics.jsonl", run / "checkpoints"))
    assert "TypeError" not in line and "cross_entropy" not in line
    assert ("export works" in line) == (kind in ("dict", "tuple", "aux-in-training"))
    assert _state(run) == before


def test_run_pipeline_refuses_a_dict_model_and_leaves_no_directory(tmp_path):
    model = _model_file(tmp_path, "dictnet", IMAGE_NET.replace("RETURN", RETURNS["dict"]))
    out = tmp_path / "piped"
    r = invoke("run", model, "--density", "0.2", "--epochs", "1", "--data", "synthetic", "--out", out)
    assert_one_error_line(r, "returns a dict (keys: logits, feat)", nothing_at=(out,))


VIDEO_NET = '''
import torch, torch.nn as nn
INPUT_SHAPE = (1, 3, 4, 16, 16)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).mean((2, 3, 4)))
'''


def test_a_video_model_is_refused_by_train_saying_its_input_cannot_be_fed(tmp_path):
    """Its [N, C, D, H, W] input was read as an image (the last three axes): the model then failed on a
    4-D batch and the message blamed the model."""
    run = Path(transform_to_dir(str(_model_file(tmp_path, "video", VIDEO_NET)), method="none",
                                out=tmp_path / "runs" / "video")[0])
    before = _state(run)
    r = invoke("train", run, "--data", "synthetic", *QUICK)
    assert_one_error_line(r, "takes 5-D inputs [1, 3, 4, 16, 16]", "[N, C, H, W] examples", "own loop",
                          nothing_at=(run / "metrics.jsonl", run / "checkpoints"))
    assert _state(run) == before


def test_labels_beyond_a_file_models_outputs_are_one_error(tmp_path):
    run = _run(tmp_path, "plain", IMAGE_NET.replace("RETURN", RETURNS["tensor"]))
    assert json.loads((run / "recipe.json").read_text())["num_classes"] is None  # only the output width knows
    before = _state(run)
    data = _npz(tmp_path / "ybad.npz", (300, 3, 16, 16), 50)
    r = invoke("train", run, "--data", data, *QUICK)
    assert_one_error_line(r, "50 classes", "outputs 10", "labels 0..9", nothing_at=(run / "metrics.jsonl",))
    assert "out of bounds" not in r.output
    assert _state(run) == before
    ok = invoke("train", run, "--data", _npz(tmp_path / "ygood.npz", (300, 3, 16, 16), 10), *QUICK)
    assert_ok(ok)


@pytest.fixture
def conv1d_run(tmp_path):
    return _run(tmp_path, "conv1d", CONV1D_NET)


def test_a_conv1d_model_trains_on_npz_signals_as_they_are(tmp_path, conv1d_run):
    data = _npz(tmp_path / "seq.npz", (300, 4, 100), 10)
    r = invoke("train", conv1d_run, "--data", data, *QUICK, "--json")
    assert_ok(r)
    assert 0 <= json.loads(r.stdout)["test_acc"] <= 1
    lines = [json.loads(s) for s in (conv1d_run / "metrics.jsonl").read_text().splitlines()]
    assert [lines[0]["event"], lines[-1]["event"]] == ["start", "test"]
    b = load_dataset(str(data), (1, 4, 100))
    assert b.train.x.shape[1:] == (4, 100) and not any("resiz" in n or "replicat" in n for n in b.notes)


def test_a_conv1d_model_trains_on_synthetic_data_of_its_shape(conv1d_run):
    assert load_dataset("synthetic", (1, 4, 100)).train.x.shape[1:] == (4, 100)
    assert_ok(invoke("train", conv1d_run, "--data", "synthetic", *QUICK))


@pytest.mark.parametrize("data, needles", [
    ("digits", ("'digits' holds images", "[N, 4, 100]", "--data synthetic")),
    ("wrong.npz", ("x has examples of shape [4, 50]", "[N, 4, 100]")),
    ("images.npz", ("x has examples of shape [3, 8, 8]", "[N, 4, 100]")),
    ("npyfolder", ("npyfolder is not an .npz file", "read from an .npz only")),  # it said "holds images"
])
def test_data_that_does_not_fit_a_conv1d_model_is_one_error(tmp_path, conv1d_run, data, needles):
    if data == "wrong.npz":
        _npz(tmp_path / data, (300, 4, 50), 10)
    elif data == "images.npz":
        _npz(tmp_path / data, (300, 3, 8, 8), 10)
    elif data == "npyfolder":
        (tmp_path / data).mkdir()
        np.save(tmp_path / data / "a.npy", np.zeros((4, 100), np.float32))
    before = _state(conv1d_run)
    r = invoke("train", conv1d_run, "--data", data, *QUICK)
    assert_one_error_line(r, *needles, nothing_at=(conv1d_run / "metrics.jsonl",))
    assert _state(conv1d_run) == before


def test_augment_of_signals_is_refused(tmp_path, conv1d_run):
    data = _npz(tmp_path / "seq.npz", (300, 4, 100), 10)
    r = invoke("train", conv1d_run, "--data", data, *QUICK, "--augment")
    assert_one_error_line(r, "--augment", "drop --augment", nothing_at=(conv1d_run / "metrics.jsonl",))


RGBD_NET = IMAGE_NET.replace("(1, 3, 16, 16)", "(1, 4, 16, 16)").replace("nn.Conv2d(3,", "nn.Conv2d(4,") \
    .replace("RETURN", RETURNS["tensor"])


def test_a_four_channel_model_trains_on_channels_last_four_channel_npz(tmp_path):
    """RGB + depth stored channels last, [N, H, W, 4]: all four channels reach the model (the 4th was
    once dropped as alpha, and the error then blamed the data for having 3 channels)."""
    run = _run(tmp_path, "rgbd", RGBD_NET)
    r = invoke("train", run, "--data", _npz(tmp_path / "rgbd.npz", (300, 16, 16, 4), 10), *QUICK, "--json")
    assert_ok(r)
    assert 0 <= json.loads(r.stdout)["test_acc"] <= 1


def test_image_npz_still_gets_a_channel_axis_for_an_image_model(tmp_path):
    b = load_dataset(str(_npz(tmp_path / "grey.npz", (50, 8, 8), 3)), (1, 3, 8, 8))
    assert b.train.x.shape[1:] == (3, 8, 8)


def test_training_stopped_in_its_first_epoch_leaves_no_metrics_file(tmp_path):
    run = _run(tmp_path, "plain", IMAGE_NET.replace("RETURN", RETURNS["tensor"]))
    before = _state(run)

    def interrupt(event):
        if event["kind"] == "step":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(run, data="synthetic", epochs=1, batch_size=50, progress=interrupt)
    assert not (run / "metrics.jsonl").exists()
    assert _state(run) == before
    torch.manual_seed(0)


def test_fewer_classes_than_outputs_is_noted(tmp_path):
    data = str(_npz(tmp_path / "three.npz", (60, 3, 8, 8), 3))
    notes = load_dataset(data, (1, 3, 8, 8), num_classes=10).notes
    assert any("3 classes for a model with 10 outputs" in n for n in notes), notes
    assert not any("outputs" in n and "never a target" in n for n in load_dataset(data, (1, 3, 8, 8), num_classes=3).notes)


def test_non_finite_data_is_one_error_before_training(tmp_path, conv1d_run):
    """NaN / inf in x is a data error naming the examples, not a 'training diverged' advice."""
    data = _npz(tmp_path / "nan.npz", (300, 4, 100), 10)
    arrays = dict(np.load(data))
    arrays["x"][[7, 40]] = np.nan
    np.savez(data, **arrays)
    before = _state(conv1d_run)
    r = invoke("train", conv1d_run, "--data", data, *QUICK)
    assert_one_error_line(r, "NaN or infinite values in 2 of its 300 examples", "example 7",
                          nothing_at=(conv1d_run / "metrics.jsonl",))
    assert _state(conv1d_run) == before


def test_a_forced_retrain_that_fails_in_its_first_epoch_leaves_the_earlier_training(tmp_path):
    """--force on a trained run, then an interrupt before an epoch completes: the run directory is
    the earlier training's, whole (weights, summary, checkpoint and metrics.jsonl belong together).
    A divergence before an epoch completes leaves it whole too (its record used to replace
    metrics.jsonl beside the earlier weights), and --resume continues the earlier training."""
    run = _run(tmp_path, "plain", IMAGE_NET.replace("RETURN", RETURNS["tensor"]))
    train_run(run, data="synthetic", epochs=1, batch_size=50)
    trained = _state(run)

    def interrupt(event):
        if event["kind"] == "step":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(run, data="synthetic", epochs=1, batch_size=50, force=True, progress=interrupt)
    assert _state(run) == trained
    r = invoke("train", run, "--data", "synthetic", "--epochs", "1", "--batch-size", "50", "--lr", "1e6", "--force", "-q")
    assert r.exit_code == 2 and "diverged" in r.output and "earlier training's, unchanged" in r.output
    assert _state(run) == trained
    assert_ok(invoke("train", run, "--resume", "-q"))
    events = [json.loads(s).get("event") for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert "diverged" not in events and events[-1] == "test"
    torch.manual_seed(0)


HELD_BN_NET = '''
import torch, torch.nn as nn
INPUT_SHAPE = (1, 3, 16, 16)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
    def train(self, mode=True):  # fine-tuning: the pretrained BatchNorm keeps its statistics
        super().train(mode)
        self.bn.eval()
        return self
    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c(x))))).mean((2, 3)))
def build_model():
    return Net()
'''


def test_batchnorm_the_models_train_holds_in_eval_keeps_its_statistics_through_train(tmp_path):
    # The model's own train() was not run by the traced model: `sparsify train` overwrote the
    # statistics of a BatchNorm the user holds in eval mode.
    run = _run(tmp_path, "heldbn", HELD_BN_NET)
    before = load_file(str(run / "weights.safetensors"))
    assert_ok(invoke("train", run, "--data", "synthetic", *QUICK))
    after = load_file(str(run / "weights.safetensors"))
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["c2.weight"], before["c2.weight"])  # the rest trained


LAYER_DROP = '''
import torch, torch.nn as nn
INPUT_SHAPE = (1, 3, 16, 16)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)
    def forward(self, x):
        x = torch.relu(self.a(x))
        skip = torch.rand([])  # LayerDrop as HF writes it: one Python draw per step
        if not (self.training and skip < 0.3):
            x = x + torch.relu(self.b(x))
        return self.fc(x.mean((2, 3)))
'''


def test_training_a_model_with_python_random_draws_warns(tmp_path):
    # tracing fixed one draw: every step takes the same branch; the transform's note is easy to miss
    run = _run(tmp_path, "layerdrop", LAYER_DROP)
    notes: list[str] = []
    train_run(run, data="synthetic", epochs=1, batch_size=50, train_limit=100, log=notes.append)
    assert sum("warning: the forward draws random numbers in training" in n for n in notes) == 1, notes
    plain: list[str] = []
    train_run(_run(tmp_path, "plain", IMAGE_NET.replace("RETURN", RETURNS["tensor"])), data="synthetic", epochs=1,
              batch_size=50, train_limit=100, log=plain.append)
    assert not any("draws random numbers" in n for n in plain), plain


def test_labels_that_skip_classes_are_named(tmp_path):
    """Labels {0, 5} got "6 classes for a model with 10 outputs; outputs 6..9 are never a target",
    nothing of classes 1..4, which never appear either."""
    r = np.random.default_rng(0)
    y = np.where(r.random(40) < 0.5, 0, 5)
    np.savez(tmp_path / "d.npz", x=r.standard_normal((40, 1, 8, 8)).astype("float32"), y=y)
    notes = load_dataset(str(tmp_path / "d.npz"), (1, 1, 8, 8), num_classes=10).notes
    assert any("labels 1..4 below the largest (5) never appear" in n for n in notes), notes
    np.savez(tmp_path / "e.npz", x=r.standard_normal((40, 1, 8, 8)).astype("float32"), y=np.arange(40) % 4)
    assert not any("never appear" in n for n in load_dataset(str(tmp_path / "e.npz"), (1, 1, 8, 8),
                                                              num_classes=4).notes)
