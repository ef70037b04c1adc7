"""Default training learns, on the zoo and on models as users write them; divergence stops with what to do.

"Default" means every trainer setting left alone (SGD with Nesterov momentum, lr 0.1, cosine,
one epoch of linear warm-up, global gradient norm clipped to 2). Chance on digits is 10%; the
thresholds are far above it and below what the defaults reached in
benchmarks/train_defaults.py (which also shows the same models at chance or diverging without
warm-up and clipping).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from sparsify.api import transform, transform_to_dir
from sparsify.errors import DivergenceError
from sparsify.train import TrainConfig, fit, train_run
from sparsify.train.data import batches, load_dataset
from sparsify.train.trainer import at_chance, lr_at, warmup_steps

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "small_cnn.py")
# Three convs with biases and no BatchNorm: diverged at lr 0.1 without clipping.
PLAIN_CNN = str(Path(__file__).resolve().parents[2] / "examples" / "plain_cnn.py")


def _train_defaults(model, method: str, epochs: int, input_shape=None, **kw) -> dict:
    result = transform(model, method, input_shape=input_shape, **({"density": 0.1} if method != "none" else {}), **kw)
    shape = tuple(result.recipe.input_shape)
    data = load_dataset("digits", shape, num_classes=10)
    return fit(result.model, data, TrainConfig(epochs=epochs), model_input=shape)


# the dense ("none") variants of these three are heavy, for CI's 15 minutes: the sparse ones are what
# users train, and the same defaults train both
@pytest.mark.parametrize("method", [pytest.param("none", marks=pytest.mark.heavy), "sparse-random"])
def test_user_style_residual_cnn_learns_with_defaults(method):
    # examples/small_cnn.py: conv-bn-relu blocks, one residual add, flatten -> linear. Sparse at 0.1
    # it stayed at chance (8.9%) with the old defaults (no warm-up, no clipping).
    out = _train_defaults(EXAMPLE, method, epochs=4, model_args={"width": 16})
    assert out["test_acc"] > 0.8, out["test_acc"]
    assert out["warnings"] == []


@pytest.mark.parametrize("method", [pytest.param("none", marks=pytest.mark.heavy), "sparse-random"])
def test_plain_cnn_without_batchnorm_learns_with_defaults(method):
    out = _train_defaults(PLAIN_CNN, method, epochs=4)
    assert out["test_acc"] > 0.8, out["test_acc"]


@pytest.mark.parametrize("method", [pytest.param("none", marks=pytest.mark.heavy), "sparse-random"])
def test_lenet5_learns_with_defaults(method):
    assert _train_defaults("zoo:lenet5", method, epochs=4)["test_acc"] > 0.8


# heavy (outside CI's 15 minutes, 55 s): the residual CNN a user writes trains with the defaults in the
# default run (test_user_style_residual_cnn_learns_with_defaults)
@pytest.mark.heavy
@pytest.mark.parametrize("method", ["none", "sparse-random"])
def test_resnet20_learns_with_defaults(method):
    # digits resized to 32x32 and replicated to 3 channels; five epochs of 13 steps. The dense run
    # (50 s) is heavy: CI's budget keeps the sparse one, which is what users train
    assert _train_defaults("zoo:resnet20", method, epochs=5)["test_acc"] > 0.6


@pytest.mark.heavy
@pytest.mark.parametrize("model", ["mobilenetv2", "vgg16n"])
@pytest.mark.parametrize("method", ["none", "sparse-random"])
def test_cifar_size_zoo_models_learn_with_defaults(model, method):
    # three to five minutes each on the 2-core machine: `pytest -m heavy`, outside CI's budget
    assert _train_defaults(f"zoo:{model}", method, epochs=5)["test_acc"] > 0.6


def test_warmup_is_linear_over_the_first_epoch_and_capped():
    cfg = TrainConfig(lr_schedule="constant", lr=0.1)
    assert warmup_steps(cfg, 13) == 13 and warmup_steps(cfg, 540) == 500
    assert warmup_steps(TrainConfig(warmup_steps=0), 13) == 0
    lrs = [lr_at(cfg, s, 100, warmup=10) for s in range(12)]
    assert lrs[0] == pytest.approx(0.01) and lrs[4] == pytest.approx(0.05)
    assert lrs[9:] == [pytest.approx(0.1)] * 3


def test_at_chance_uses_the_binomial_noise_of_the_split():
    assert at_chance(0.12, 10, 144) and not at_chance(0.3, 10, 144)
    assert not at_chance(0.12, 10, 100_000)  # with many examples 12% is above chance
    assert not at_chance(float("nan"), 10, 144)
    # 5 of 6 right among 3 classes is not significantly above chance, and neither would 6 of 6 be:
    # too few examples to tell, which the warning says instead of "did not learn"
    from sparsify.train.trainer import too_few_to_tell

    assert at_chance(5 / 6, 3, 6) and too_few_to_tell(3, 6) and not too_few_to_tell(10, 144)


@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diverge") / "lenet"
    transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out=out)
    return out


def _blow_up_at_epoch(epoch: int, how: str):
    """A progress hook that wrecks the classifier at the first step of ``epoch`` (stands in for a bad lr)."""
    state = {"model": None}

    def hook(event):
        if event["kind"] == "step" and event["epoch"] == epoch and state["model"] is not None and not state.get("done"):
            with torch.no_grad():
                w = state["model"].classifier.weight
                w.mul_(1e4) if how == "large" else w.fill_(float("nan"))
            state["done"] = True

    return hook, state


@pytest.mark.parametrize("how, needle", [("nan", "loss became nan"), ("large", "the loss training started from")])
def test_divergence_keeps_completed_epochs_and_says_what_to_do(made_run, tmp_path, monkeypatch, how, needle):
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    hook, state = _blow_up_at_epoch(2, how)
    import sparsify.train.run as run_mod

    real_fit = run_mod.fit

    def fit_with_handle(model, *args, **kwargs):
        state["model"] = model
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(run_mod, "fit", fit_with_handle)
    with pytest.raises(DivergenceError) as e:
        train_run(run, data="digits", epochs=3, train_limit=300, progress=hook)
    message = str(e.value)
    assert needle in message and "\n" not in message
    assert "weights.safetensors and metrics.jsonl hold epoch 1" in message
    assert f"sparsify train {run} --force --epochs 3 --lr 0.01 --train-limit 300" in message  # its own options
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if m["event"] == "epoch"] == [1]
    assert metrics[0]["event"] == "start" and metrics[-1]["event"] == "diverged" and metrics[-1]["epoch"] == 2
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    weights = load_file(str(run / "weights.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in ckpt["model"].items())  # the last good epoch's weights
    assert torch.isfinite(weights["classifier.weight"]).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["epochs_completed"] == 1 and needle.split()[-1] in summary["train"]["diverged"]
    # the kept weights expect normalised inputs: the record export reads to say so (it was missing)
    norm = summary["train"]["input_normalization"]
    assert norm and norm["text"] and len(norm["mean"]) == 1
    init = load_file(str(run / "weights.init.safetensors"))
    assert any(not torch.equal(init[k], weights[k]) for k in init)  # the initial weights are still there


def test_divergence_in_the_first_epoch_leaves_the_weights_alone(made_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    before = (run / "weights.safetensors").read_bytes()
    with pytest.raises(DivergenceError, match="the run's weights are unchanged"):
        train_run(run, data="digits", epochs=2, train_limit=300, lr=1e6, momentum=0.0, clip_grad_norm=0)
    assert (run / "weights.safetensors").read_bytes() == before


def test_recalibrate_bn_replaces_stale_running_statistics_by_the_data_average():
    """Running statistics that trail the weights (here: set far off) are re-estimated from one pass
    over the training split: eval-mode BN then normalises that data to mean 0 and variance 1."""
    from sparsify.train.trainer import recalibrate_bn

    data = load_dataset("digits", (1, 1, 8, 8), num_classes=10)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(256, 10))
    bn = model[1]
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(1e-3)
    assert recalibrate_bn(model, data.train, 64, (1, 1, 8, 8)).estimated == ["1"]
    assert bn.momentum == 0.1 and model.training  # restored after the pass
    model.eval()
    x = torch.cat([x for x, _ in batches(data.train, 512, shuffle=False)]).reshape(-1, 1, 8, 8)
    with torch.no_grad():
        z = model[1](model[0](x))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.05 and (z.var(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    nothing = recalibrate_bn(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), data.train, 64, (1, 1, 8, 8))
    assert (nothing.estimated, nothing.kept, nothing.notes()) == ([], {}, [])


def test_recalibrate_bn_estimates_the_layers_after_a_frozen_one_on_what_they_see_at_inference():
    """A BatchNorm frozen with momentum 0 keeps its statistics and normalises with them during the
    pass, as at inference: the BatchNorm after it then normalises that data to mean 0, variance 1
    in eval mode (estimated behind batch statistics instead, it would not: the frozen ones are far off)."""
    from sparsify.train.trainer import recalibrate_bn

    data = load_dataset("digits", (1, 1, 8, 8), num_classes=10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.0),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(256, 10))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(4.0)
    done = recalibrate_bn(model, data.train, 64, (1, 1, 8, 8))
    assert done.estimated == ["3"] and done.kept == {"1": "momentum 0"}
    assert float(model[1].running_mean[0]) == 0.5 and float(model[1].running_var[0]) == 4.0
    assert model[1].training and model.training
    model.eval()
    x = torch.cat([x for x, _ in batches(data.train, 512, shuffle=False)]).reshape(-1, 1, 8, 8)
    with torch.no_grad():
        z = model[:4](x)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.05 and (z.var(dim=(0, 2, 3)) - 1).abs().max() < 0.05


def test_test_accuracy_at_or_below_chance_names_the_test_split_when_the_model_learned(tmp_path):
    # "at chance: the model did not learn; retry with --lr ..." for a model at 100% on validation whose
    # test split was on another scale, and for 0% on shifted test labels (far below chance)
    from sparsify.train import train_run
    from sparsify.train.trainer import below_chance

    assert below_chance(0.0, 4, 40) and not below_chance(0.25, 4, 40) and not below_chance(0.0, 4, 2)
    rng = np.random.default_rng(0)

    def images(n):
        y = rng.integers(0, 4, n)
        return (y[:, None, None, None] * 60 + 20 + rng.normal(0, 3, (n, 1, 28, 28))).clip(0, 255).astype(np.uint8), y

    x, y = images(400)
    xt, yt = images(80)
    run = tmp_path / "run"
    transform_to_dir("zoo:mlp", "none", model_args={"hidden": [16]}, out=run)
    cases = {"shifted": dict(x_test=xt, y_test=(yt + 1) % 4), "rescaled": dict(x_test=xt / 255.0, y_test=yt)}
    for name, test in cases.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y, **test)
        result = train_run(run, force=True, data=str(tmp_path / f"{name}.npz"), epochs=12, batch_size=32)
        assert result["val_acc"] > 0.9, result
        (warning,) = [w for w in result["warnings"] if "test accuracy" in w]
        want = "far below chance" if name == "shifted" else "the test split differs from the training data"
        assert want in warning and "--lr" not in warning, warning
