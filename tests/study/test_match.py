"""Depth multiplier matched to another run's live conv / total parameters (issue 12 item 3)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsify import api
from sparsify.cli import app
from sparsify.models import load_model
from sparsify.passes.depth_multiplier import DepthCounter
from sparsify.passes.trace import propagate_shapes, trace
from sparsify.report import param_counts

runner = CliRunner()


def _counter(name: str, divisor: int = 1) -> DepthCounter:
    lm = load_model(f"zoo:{name}", {}, 0)
    example = torch.randn(*lm.input_shape)
    gm = trace(lm.module)
    propagate_shapes(gm, example)
    return DepthCounter(gm, example, divisor)


@pytest.mark.parametrize("name,divisor", [("lenet5", 1), ("cifarnet", 1), ("resnet20", 8), ("inception-mini", 1),
                                          ("lenet300-100", 1),
                                          pytest.param("mobilenetv2", 1, marks=pytest.mark.slow)])
def test_counts_read_off_the_channel_groups_equal_the_transformed_models(name, divisor):
    counter = _counter(name, divisor)
    for alpha in (0.07, 0.5, 0.81):
        res = api.transform(f"zoo:{name}", "depth-multiplier", alpha=alpha, divisor=divisor if divisor > 1 else None)
        actual = param_counts(res.summary)
        predicted = counter.counts(alpha)
        assert {k: predicted[k] for k in ("total", "no_classifier", "conv")} == \
               {k: actual[k] for k in ("total", "no_classifier", "conv")}, alpha


def _all_achievable(counter: DepthCounter, count: str) -> set[int]:
    """Every count the depth multiplier can reach: alpha just above each k/n and at k/n."""
    sizes = sorted({n for _, n in counter.free})
    alphas = {1.0} | {k / n * f for n in sizes for k in range(1, n + 1) for f in (1.0, 1 + 1e-9) if k / n * f <= 1}
    return {counter.counts(a)[count] for a in alphas}


@pytest.mark.parametrize("count", ["conv", "total"])
def test_match_reaches_the_nearest_achievable_count(tmp_path, count):
    target_run, _ = api.transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out=tmp_path / "sr")
    target = api.run_param_counts(target_run)[count]
    res = api.transform("zoo:lenet5", "depth-multiplier", match=target_run, count=count)
    achieved = param_counts(res.summary)[count]
    assert res.recipe.params["match"] == {"run": str(target_run), "count": count, "target": target,
                                          "achieved": achieved}
    nearest = min(abs(c - target) for c in _all_achievable(_counter("lenet5"), count))
    assert abs(achieved - target) <= max(1, nearest)
    # the recipe replays to the same model: the alpha alone determines it
    again = api.transform("zoo:lenet5", "depth-multiplier", alpha=res.recipe.params["alpha"])
    assert param_counts(again.summary)[count] == achieved


def test_an_achievable_target_is_met_exactly(tmp_path):
    path, made = api.transform_to_dir("zoo:resnet20", "depth-multiplier", alpha=0.6, out=tmp_path / "dm")
    for count in ("conv", "total"):
        res = api.transform("zoo:resnet20", "depth-multiplier", match=path, count=count)
        assert param_counts(res.summary)[count] == param_counts(made.summary)[count]


def test_cli_match_and_its_errors(tmp_path):
    sr = tmp_path / "sr"
    assert runner.invoke(app, ["transform", "zoo:lenet5", "--density", "0.1", "--out", str(sr)]).exit_code == 0
    res = runner.invoke(app, ["transform", "zoo:lenet5", "-m", "depth-multiplier", "--match", str(sr), "--count",
                              "conv", "--out", str(tmp_path / "dm"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["params"]["match"]["count"] == "conv" and 0 < summary["params"]["alpha"] < 1
    for args, message in ((["--count", "conv"], "--match RUN needs --count"),
                          (["--match", str(sr)], "--match RUN needs --count"),
                          (["--match", str(sr), "--count", "all"], "--match RUN needs --count"),
                          (["--match", str(sr), "--count", "conv", "--alpha", "0.5"], "not both"),
                          (["--match", str(tmp_path / "none"), "--count", "conv"], "does not exist")):
        res = runner.invoke(app, ["transform", "zoo:lenet5", "-m", "depth-multiplier", *args,
                                  "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and message in res.output and res.output.strip().count("\n") == 0, res.output
    res = runner.invoke(app, ["transform", "zoo:lenet5", "--density", "0.1", "--match", str(sr), "--count", "conv",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "depth-multiplier only" in res.output
    assert not (tmp_path / "bad").exists()
