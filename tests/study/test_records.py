"""metrics.jsonl records (issue 12 item 4) and per-layer profile parameters for RigL (item 5)."""
from __future__ import annotations

import json

import pytest
import torch

from sparsify import api
from sparsify.errors import TrainingError
from sparsify.nn import sparse_modules
from sparsify.train import train_run
from sparsify.train.distributed import Reducer
from sparsify.train.schedules import Plan, schedule_class
from sparsify.train.trainer import TrainConfig

QUICK = dict(data="digits", epochs=1, batch_size=64, train_limit=256)


def _lines(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def test_dense_run_reports_its_real_live_counts(tmp_path):
    run, made = api.transform_to_dir("zoo:mlp", "none", model_args={"hidden": [32]}, out=tmp_path / "dense")
    result = train_run(run, **QUICK)
    weights = 784 * 32 + 32 * 10  # every connection of both linear layers
    assert result["live"] == weights and result["density"] == 1.0
    assert result["live_params"] == made.summary["totals"]["params"] == weights + 32 + 10
    start, epoch = _lines(run)[:2]
    assert start["event"] == "start" and start["live"] == weights and epoch["live"] == weights
    assert start["layers"]["features.0"] == {"density": 1.0, "live": 784 * 32, "fan_in_cv": 0.0, "empty_out": 0,
                                             "empty_in": 0, "dense": True}


def test_start_record_holds_the_initial_topology_init_threads_and_versions(tmp_path):
    run, _ = api.transform_to_dir("zoo:mlp", "sparse-random", density=0.2, model_args={"hidden": [32]},
                                  out=tmp_path / "sr")
    train_run(run, schedule="rigl", init="erk", init_profile="lognormal", init_profile_params={"sigma": 1.0}, **QUICK)
    start = _lines(run)[0]
    assert start["event"] == "start"
    assert (start["schedule"], start["init"], start["init_profile"]) == ("rigl", "erk", "lognormal")
    assert start["init_profile_params"] == {"sigma": 1.0}
    assert start["threads"] == torch.get_num_threads() and start["versions"]["torch"] == torch.__version__
    layer = start["layers"]["features.0"]
    # the topology the schedule started from: ERK redrew it with a lognormal profile (CV well above random's)
    assert layer["fan_in_cv"] > 0.5 and 0 < layer["density"] < 1 and layer["live"] == start["live"]


def test_diverged_run_keeps_its_partial_metrics(tmp_path):
    run, _ = api.transform_to_dir("zoo:mlp", "sparse-random", density=0.5, model_args={"hidden": [32]},
                                  out=tmp_path / "sr")
    weights = (run / "weights.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="loss became"):
        train_run(run, data="digits", epochs=2, batch_size=64, lr=1e30)
    lines = _lines(run)
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "diverged"
    assert lines[-1]["epoch"] == 1 and lines[-1]["step"] >= 1
    assert (run / "weights.safetensors").read_bytes() == weights


def test_rigl_profile_params_per_layer(tmp_path):
    run, _ = api.transform_to_dir("zoo:mlp", "sparse-random", density=0.2, include_classifier=True,
                                  out=tmp_path / "sr")
    model = api.load(run).model
    layers = sparse_modules(model)
    cfg = TrainConfig(schedule="rigl", epochs=1, init="erk", init_profile="lognormal",
                      init_profile_params={"sigma": 0.1, "sigma@features.2": 1.5})
    schedule_class("rigl")(layers, Plan(1, 10), cfg, Reducer()).start()

    def cv(name: str) -> float:
        f = layers[name].fan_in().double()
        return float(f.std(unbiased=False) / f.mean())

    assert cv("features.2") > 0.5 and cv("features.0") < 0.2  # each layer took its own sigma
    bad = TrainConfig(schedule="rigl", epochs=1, init_profile="lognormal", init_profile_params={"sigma@nope": 1.0})
    with pytest.raises(TrainingError, match="sigma@nope names no masked layer"):
        schedule_class("rigl")(sparse_modules(api.load(run).model), Plan(1, 10), bad, Reducer()).start()
