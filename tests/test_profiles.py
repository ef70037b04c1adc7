"""PSN fan-in profiles hit the budget exactly within bounds; density allocation across layers."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.errors import UsageError
from sparsify.profiles import (LayerShape, allocate, cv, erk_weight, fan_in_counts, profile_names, profile_weights,
                               resolve_params, scale_to_budget)

FAMILIES = {"uniform", "linear", "exponential", "power", "logistic", "gaussian", "cosine", "step",
            "lognormal", "power-law"}


def test_profile_families_are_registered():
    assert FAMILIES <= set(profile_names())
    assert len(set(profile_names()) - {"lognormal", "power-law"}) >= 8


@st.composite
def layer_budgets(draw):
    n_units = draw(st.integers(1, 300))
    fan_in_max = draw(st.integers(1, 500))
    budget = draw(st.integers(n_units, n_units * fan_in_max))
    return n_units, fan_in_max, budget


@pytest.mark.parametrize("profile", sorted(FAMILIES))
@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=layer_budgets())
def test_profile_hits_budget_exactly_within_bounds(profile, case):
    n_units, fan_in_max, budget = case
    counts = fan_in_counts(profile, n_units, fan_in_max, budget)
    assert counts.shape == (n_units,)
    assert np.issubdtype(counts.dtype, np.integer)
    assert int(counts.sum()) == budget
    assert counts.min() >= 1 and counts.max() <= fan_in_max


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=layer_budgets(), weights_seed=st.integers(0, 2**31 - 1))
def test_scale_to_budget_arbitrary_weights(case, weights_seed):
    n_units, fan_in_max, budget = case
    w = np.random.default_rng(weights_seed).lognormal(0.0, 2.0, n_units)
    counts = scale_to_budget(w, budget, 1, fan_in_max)
    assert int(counts.sum()) == budget
    assert counts.min() >= 1 and counts.max() <= fan_in_max


def test_budget_outside_feasible_range_is_usage_error():
    with pytest.raises(UsageError):
        fan_in_counts("uniform", 10, 5, 9)   # below one per unit
    with pytest.raises(UsageError):
        fan_in_counts("uniform", 10, 5, 51)  # above fan_in_max per unit


def test_counts_follow_the_profile_shape():
    # linear profile grows with x: the fan-ins are non-decreasing (up to rounding by one)
    counts = fan_in_counts("linear", 100, 1000, 100 * 40)
    assert np.all(np.diff(counts) >= -1)
    assert counts[-1] > 3 * counts[0]


def test_lognormal_cv_grows_with_sigma():
    cvs = [cv(fan_in_counts("lognormal", 400, 10_000, 400 * 50, {"sigma": s})) for s in (0.25, 0.5, 1.0, 1.5)]
    assert all(a < b for a, b in zip(cvs, cvs[1:])), cvs
    assert cvs[0] > 0.1


def test_power_law_smaller_exponent_heavier_tail():
    heavy = cv(fan_in_counts("power-law", 400, 10_000, 400 * 20, {"exponent": 1.5}))
    light = cv(fan_in_counts("power-law", 400, 10_000, 400 * 20, {"exponent": 4.0}))
    assert heavy > light


@pytest.mark.parametrize("n_units, budget", [(100, 1000), (100, 1037), (7, 50), (300, 301)])
def test_uniform_cv_is_about_zero(n_units, budget):
    counts = fan_in_counts("uniform", n_units, 10_000, budget)
    assert counts.max() - counts.min() <= 1
    assert cv(counts) <= 0.5 / counts.mean() + 1e-12  # spread of at most one fan-in
    if budget % n_units == 0:
        assert cv(counts) == 0.0
    elif budget / n_units >= 10:
        assert cv(counts) < 0.05


def test_unknown_profile_is_usage_error():
    with pytest.raises(UsageError, match="unknown profile 'zipf'"):
        fan_in_counts("zipf", 10, 10, 20)
    with pytest.raises(UsageError, match="unknown profile"):
        resolve_params("zipf", {})


def test_unknown_profile_param_is_usage_error():
    with pytest.raises(UsageError, match="'tau'"):
        resolve_params("lognormal", {"tau": 1.0})
    with pytest.raises(UsageError):
        fan_in_counts("uniform", 10, 10, 20, {"sigma": 1.0})


def test_power_law_zero_exponent_is_usage_error():
    with pytest.raises(UsageError):
        fan_in_counts("power-law", 10, 10, 20, {"exponent": 0.0})


def test_params_override_defaults():
    assert resolve_params("lognormal", {"sigma": 2})["sigma"] == 2.0
    assert resolve_params("lognormal", None) == {"sigma": 1.0}


def test_non_positive_profile_is_usage_error():
    # cosine with amplitude > 1 goes negative somewhere on [0, 1]
    with pytest.raises(UsageError, match="not positive"):
        profile_weights("cosine", 50, {"amplitude": 3.0})


def test_cv():
    assert cv([]) == 0.0
    assert cv([0, 0]) == 0.0
    assert cv([2, 2, 2]) == 0.0
    assert cv([1, 3]) == pytest.approx(0.5)


# ---------------------------------------------------------------- allocate


@st.composite
def layer_lists(draw):
    n = draw(st.integers(1, 6))
    layers = []
    for i in range(n):
        kernel = draw(st.sampled_from([1, 9, 25]))
        layers.append(LayerShape(f"l{i}", draw(st.integers(1, 128)), draw(st.integers(1, 128)), kernel))
    return layers


def _check_allocation(layers, density, counts):
    assert set(counts) == {l.name for l in layers}
    for l in layers:
        assert l.min_live <= counts[l.name] <= l.entries, (l, counts[l.name])
    total = sum(l.entries * l.kernel for l in layers)
    live = sum(counts[l.name] * l.kernel for l in layers)
    # each layer rounds to the nearest entry (half a kernel of weights), and may be lifted to min_live
    tol = sum(0.5 * l.kernel for l in layers) + sum(l.min_live * l.kernel for l in layers
                                                    if counts[l.name] == l.min_live)
    assert abs(live - density * total) <= tol + 1e-9, (live, density * total, tol)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(layers=layer_lists(), density=st.floats(0.01, 1.0))
def test_allocate_uniform_hits_density(layers, density):
    counts = allocate(layers, density, "uniform")
    _check_allocation(layers, density, counts)
    for l in layers:
        assert counts[l.name] == min(l.entries, max(l.min_live, round(density * l.entries)))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(layers=layer_lists(), density=st.floats(0.01, 1.0))
def test_allocate_erk_hits_density(layers, density):
    _check_allocation(layers, density, allocate(layers, density, "erk"))


def test_erk_gives_small_layers_higher_density():
    layers = [LayerShape("first", 32, 3, 9), LayerShape("big", 256, 256, 9), LayerShape("mid", 64, 32, 9)]
    counts = allocate(layers, 0.1, "erk")
    dens = {l.name: counts[l.name] / l.entries for l in layers}
    assert dens["first"] > dens["mid"] > dens["big"]
    _check_allocation(layers, 0.1, counts)


def test_erk_at_full_density_is_dense():
    layers = [LayerShape("a", 8, 3, 9), LayerShape("b", 64, 64, 9)]
    assert allocate(layers, 1.0, "erk") == {"a": 24, "b": 4096}


def test_allocate_respects_min_live():
    layers = [LayerShape("tiny", 4, 4, 1, min_live=4), LayerShape("big", 100, 100, 1)]
    counts = allocate(layers, 0.01, "uniform")
    assert counts["tiny"] == 4 and counts["big"] == 100


def test_unknown_allocation_is_usage_error():
    with pytest.raises(UsageError, match="allocation"):
        allocate([LayerShape("a", 2, 2)], 0.5, "magic")


# A small conv+linear model: a 3x3 conv 3->16, a 1x1 conv 16->32, a 3x3 conv 32->32 and a linear
# 512->10. Evci et al. 2020 (RigL), sect. 3: ERK scales a conv's density with
# (n_in + n_out + k_h + k_w) / (n_in * n_out * k_h * k_w) and a fully connected layer's as
# Erdős–Rényi, (n_in + n_out) / (n_in * n_out) -- no kernel terms for a linear layer.
_ERK_MODEL = [LayerShape("conv1", 16, 3, 9, kernel_size=(3, 3)),
              LayerShape("pw", 32, 16, 1, kernel_size=(1, 1)),
              LayerShape("conv2", 32, 32, 9, kernel_size=(3, 3)),
              LayerShape("fc", 10, 512, 1, kernel_size=())]


def test_erk_is_the_papers_formula_for_convs_and_linears():
    from fractions import Fraction as F
    factor = {"conv1": F(3 + 16 + 3 + 3, 3 * 16 * 3 * 3), "pw": F(16 + 32 + 1 + 1, 16 * 32 * 1 * 1),
              "conv2": F(32 + 32 + 3 + 3, 32 * 32 * 3 * 3), "fc": F(512 + 10, 512 * 10)}
    weights = {"conv1": 3 * 16 * 9, "pw": 16 * 32, "conv2": 32 * 32 * 9, "fc": 512 * 10}
    # density 0.05: eps * factor stays below 1 everywhere
    eps = F(5, 100) * sum(weights.values()) / sum(factor[n] * weights[n] for n in weights)
    assert max(eps * f for f in factor.values()) < 1
    expected = {n: round(eps * factor[n] * (weights[n] // (9 if n.startswith("conv") else 1))) for n in weights}
    assert allocate(_ERK_MODEL, 0.05, "erk") == expected
    # density 0.45: the linear layer (factor 0.102) and the 1x1 conv (0.098) would exceed 1, so
    # they are made dense and eps is solved again so that the two 3x3 convs carry the rest
    target = F(45, 100) * sum(weights.values())
    eps = target / sum(factor[n] * weights[n] for n in weights)
    assert eps * factor["fc"] > 1 and eps * factor["pw"] > 1 and eps * factor["conv1"] < 1
    eps = (target - weights["fc"] - weights["pw"]) / sum(factor[n] * weights[n] for n in ("conv1", "conv2"))
    assert eps * factor["conv1"] < 1
    expected = {"conv1": round(eps * factor["conv1"] * 48), "pw": 512,
                "conv2": round(eps * factor["conv2"] * 1024), "fc": 5120}
    assert allocate(_ERK_MODEL, 0.45, "erk") == expected


def test_erk_of_a_linear_layer_has_no_kernel_terms():
    # the same 64x64 layer as a linear and as a 1x1 conv: the conv's factor carries k_h + k_w = 2
    assert erk_weight(LayerShape("fc", 64, 64)) == pytest.approx(128 / 4096)
    assert erk_weight(LayerShape("pw", 64, 64, 1, kernel_size=(1, 1))) == pytest.approx(130 / 4096)
    assert erk_weight(LayerShape("c", 8, 4, 3, kernel_size=(1, 3))) == pytest.approx((8 + 4 + 1 + 3) / (8 * 4 * 3))


def test_training_schedules_use_the_same_erk():
    import torch
    from sparsify.nn import SparseConv2d, SparseLinear
    from sparsify.train.schedules._allocation import layer_budgets
    torch.manual_seed(0)
    mods = {"conv1": SparseConv2d(3, 16, 3), "pw": SparseConv2d(16, 32, 1), "conv2": SparseConv2d(32, 32, 3),
            "fc": SparseLinear(512, 10)}
    for m in mods.values():  # 40% of the weights live, spread unevenly, as a trained run may be
        m.mask.copy_((torch.rand_like(m.mask) < 0.4).float())
    live = sum(int(m.mask.sum()) * (9 if isinstance(m, SparseConv2d) and m.kernel_size == (3, 3) else 1)
               for m in mods.values())
    total = sum(m.weight.numel() for m in mods.values())
    assert layer_budgets(mods, "erk") == allocate(_ERK_MODEL, live / total, "erk")


def test_empty_channels_counts_grouped_inputs_per_group():
    from sparsify.profiles import empty_channels
    mask = np.array([[1, 0], [0, 0], [0, 0], [1, 1]])  # 4 outputs, 2 groups of 2, 2 inputs per group
    assert empty_channels(mask) == (2, 0)  # ungrouped: rows 1, 2 empty; every column read somewhere
    # grouped: group 0 (rows 0-1) reads input 0 only, group 1 (rows 2-3) reads both -> input 1 of group 0 empty
    assert empty_channels(mask, groups=2) == (2, 1)
