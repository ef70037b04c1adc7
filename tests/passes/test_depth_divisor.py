"""Depth multiplier with a channel divisor: MobileNet's rounding rule, the pass, the API and the CLI flag."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from sparsify import api
from sparsify.cli import app
from sparsify.errors import UsageError
from sparsify.passes.depth_multiplier import make_divisible, scaled_size
from sparsify.rundir import load_run
from sparsify.pipeline import depth_equivalent, live_params


@given(st.floats(0.5, 5000.0), st.sampled_from([2, 4, 8, 16]))
def test_make_divisible_is_a_multiple_near_the_width(width: float, d: int) -> None:
    out = make_divisible(width, d)
    assert out % d == 0 and out >= d
    assert out >= 0.9 * width
    nearest = max(d, d * math.floor(width / d + 0.5))
    assert out in (nearest, nearest + d)            # nearest multiple, one step up only to stay above 90%
    assert out == nearest or nearest < 0.9 * width


def test_make_divisible_reproduces_mobilenetv2_widths() -> None:
    # torchvision's MobileNetV2 at width 0.35 / 0.5 / 0.75 / 1.4: first conv and last stage width
    assert [make_divisible(32 * w) for w in (0.35, 0.5, 0.75, 1.4)] == [16, 16, 24, 48]
    assert [make_divisible(320 * w) for w in (0.35, 0.5, 0.75, 1.4)] == [112, 160, 240, 448]


@given(st.integers(1, 2048), st.floats(0.01, 1.0))
def test_scaled_size_divisor_one_is_ceil_and_never_widens(n: int, alpha: float) -> None:
    assert scaled_size(n, alpha) == math.ceil(alpha * n)
    assert scaled_size(n, alpha, 8) <= n
    assert scaled_size(n, alpha, 8) % 8 == 0 or scaled_size(n, alpha, 8) == n


def _conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_pass_rounds_every_free_group_to_the_divisor() -> None:
    plain = api.transform("zoo:resnet20", "depth-multiplier", alpha=0.3)
    rounded = api.transform("zoo:resnet20", "depth-multiplier", alpha=0.3, divisor=8)
    # 16/32/64 channels: ceil gives 5/10/20; divisor 8 gives 8/16/24 (9.6 -> 8 is below 90%, so 16)
    assert sorted(set(_conv_widths(plain.model))) == [5, 10, 20]
    assert sorted(set(_conv_widths(rounded.model))) == [8, 16, 24]
    assert rounded.recipe.params == {"alpha": 0.3, "divisor": 8}
    assert plain.recipe.params == {"alpha": 0.3}                      # default: the recipe is unchanged


def test_divisor_replays_from_the_run_directory(tmp_path) -> None:
    path, result = api.transform_to_dir("zoo:resnet20", "depth-multiplier", out=tmp_path / "run", alpha=0.3,
                                        divisor=8)
    assert _conv_widths(load_run(path).model) == _conv_widths(result.model)


@pytest.mark.parametrize("kwargs, needle", [
    ({"method": "sparse-random", "density": 0.5, "divisor": 8}, "depth-multiplier only"),
    ({"method": "depth-multiplier", "alpha": 0.5, "divisor": 0}, "positive integer"),
    ({"method": "depth-multiplier", "alpha": 0.5, "divisor": 2.5}, "must be a whole number, got 2.5"),
])
def test_bad_divisor_is_a_usage_error(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        api.transform("zoo:lenet5", **kwargs)


def test_cli_divisor_flag(tmp_path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["transform", "zoo:resnet20", "--method", "depth-multiplier", "--alpha", "0.3",
                             "--divisor", "8", "--out", str(tmp_path / "r"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert load_run(tmp_path / "r").recipe.params == {"alpha": 0.3, "divisor": 8}
    bad = runner.invoke(app, ["transform", "zoo:resnet20", "--density", "0.5", "--divisor", "8",
                              "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2 and "--divisor applies to --method depth-multiplier only" in bad.output
    assert not (tmp_path / "s").exists()


def test_equal_parameter_search_accepts_the_divisor() -> None:
    sparse = api.transform("zoo:resnet20", "sparse-random", density=0.25)
    target = live_params(sparse.model)
    model, alpha, n = depth_equivalent(sparse.recipe, target, divisor=8)
    assert 0 < alpha < 1
    assert all(w % 8 == 0 for w in _conv_widths(model))
    assert n == live_params(model) and abs(n - target) < 0.25 * target   # counts move in steps of 8 channels


def test_matched_alpha_is_a_short_decimal_even_at_the_edge_of_its_step() -> None:
    # widths ceil(9 * alpha): 5 channels for alpha in (4/9, 5/9]; bisection ends just above 4/9, and
    # rounding that to fewer digits left the step, so the recipe read alpha=0.4444444444444445
    from sparsify.passes.depth_multiplier import match_alpha

    def count_at(a: float) -> tuple[int, int]:
        return math.ceil(9 * a), math.ceil(9 * a)

    alpha, n = match_alpha(count_at, 5)
    assert n == 5 and math.ceil(9 * alpha) == 5 and len(repr(alpha)) <= 4   # e.g. 0.5


def test_a_divisor_that_takes_the_model_far_from_alpha_says_so() -> None:
    """--alpha 0.5 --divisor 64 kept 0.86x of lenet5's MACs without a word (a huge divisor: the full model)."""
    def divisor_notes(**kwargs) -> list[str]:
        return [n for n in api.transform("zoo:lenet5", "depth-multiplier", **kwargs).summary["notes"] if "--divisor" in n]

    far = divisor_notes(alpha=0.5, divisor=64)
    assert len(far) == 1 and "rounds the resized channel groups to 288 channels where alpha 0.5 alone gives 240" in far[0]
    assert divisor_notes(alpha=0.5, divisor=8) == [] and divisor_notes(alpha=0.5) == []
