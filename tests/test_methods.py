"""sparsify.methods: the method registry, the one place a method name becomes a config and a pass."""
from __future__ import annotations

import dataclasses

from typer.core import TyperOption
import pytest
import typer

from sparsify import methods
from sparsify.errors import UsageError
from sparsify.passes.base import GraphPass


def test_every_method_has_a_config_that_round_trips_through_recipe_params():
    examples = {"sparse-random": dict(density=0.2, include_linear=True), "psn": dict(density=0.2, profile="uniform"),
                "depth-multiplier": dict(alpha=0.5, divisor=8), "none": {}}
    assert set(methods.METHODS) == set(examples)
    for name, options in examples.items():
        config = methods.make_config(name, **options)
        params = config.to_params()
        again = methods.config_from_params(name, params)
        assert again == config and again.to_params() == params
        p = config.make_pass(seed=3)
        assert (p is None) == (name == "none") and (p is None or isinstance(p, GraphPass))


def test_recipe_params_keep_their_keys_and_order():
    """Recipe.params is a dict in recipe.json; its keys (and their order) are the format older runs have."""
    assert list(methods.make_config("sparse-random", density=0.1).to_params()) == [
        "density", "allocation", "include_classifier", "rescale_init", "include_linear"]
    assert list(methods.make_config("psn", density=0.1).to_params()) == [
        "density", "allocation", "include_classifier", "rescale_init", "profile", "profile_params", "include_linear"]
    assert methods.make_config("depth-multiplier", alpha=0.5).to_params() == {"alpha": 0.5}
    assert methods.make_config("none").to_params() == {}


@pytest.mark.parametrize("method,options,words", [
    ("turbo", {}, "unknown method 'turbo'; choose one of sparse-random, psn, depth-multiplier, none"),
    ("sparse-random", {"density": 0.1, "divisor": 8}, "--divisor applies to --method depth-multiplier only"),
    # none ignored --density and --alpha silently: the user got the dense model they did not ask for
    ("none", {"density": 0.5}, "--method none keeps the model as it is and takes no --density"),
    ("none", {"alpha": 0.5}, "takes no --alpha; choose depth-multiplier"),
    ("sparse-random", {"density": 0.1, "alpha": 0.5}, "sparse-random takes --density, not --alpha"),
    ("sparse-random", {"density": 0.1, "profile": "uniform"}, "--profile applies to --method psn only"),
    ("psn", {"density": 0.1, "alpha": 0.5}, "psn takes --density, not --alpha"),
    ("depth-multiplier", {"alpha": 0.5, "density": 0.1}, "depth-multiplier takes --alpha, not --density/--profile"),
    ("depth-multiplier", {}, "--alpha is required"),
    ("depth-multiplier", {"alpha": 0.5, "divisor": 0}, "--divisor"),
    ("psn", {"density": 2.0}, "--density 2.0 is outside"),
    ("psn", {"density": 0.1, "profile": "zigzag"}, "unknown profile 'zigzag'"),
    ("sparse-random", {"density": 0.1, "allocation": "greedy"}, "unknown --allocation 'greedy'"),
])
def test_configs_refuse_bad_parameters_in_one_line(method, options, words):
    with pytest.raises(UsageError) as e:
        methods.make_config(method, **options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sparse_random_decides_linear_layers_per_model():
    from sparsify.passes.trace import propagate_shapes, trace
    import torch
    import torch.nn as nn

    config = methods.make_config("sparse-random", density=0.1)
    assert config.include_linear is None
    x = torch.randn(1, 8)
    mlp = trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    propagate_shapes(mlp, x)
    assert config.resolve(mlp).include_linear is True            # nothing else to sparsify
    cnn = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
    propagate_shapes(cnn, torch.randn(1, 3, 5, 5))
    assert config.resolve(cnn).include_linear is False           # the paper keeps linears dense


def _options(command: str) -> dict[str, TyperOption]:
    from sparsify.cli import app

    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params if isinstance(p, TyperOption)}


def test_run_takes_every_transform_option_that_transform_does():
    transform, run = _options("transform"), _options("run")
    own = {"out_dir", "force", "as_json", "density", "seed"}     # each command's own (its defaults differ)
    for name, option in transform.items():
        if name in own:
            continue
        assert name in run, f"sparsify run lacks transform's {option.opts}"
        assert run[name].opts == option.opts and run[name].help == option.help
    assert methods.method_help() in transform["method"].help


def test_a_config_is_a_dataclass_of_its_parameters():
    fields = {f.name for f in dataclasses.fields(methods.PSNConfig)}
    assert {"density", "profile", "profile_params", "allocation", "include_linear"} <= fields
    assert {f.name for f in dataclasses.fields(methods.DepthMultiplierConfig)} == {"alpha", "divisor"}


def test_convs_traced_through_as_functional_calls_are_named_when_nothing_can_be_masked():
    """Conv2d subclasses with a forward of their own (weight standardisation) trace into F.conv2d on
    a weight computed in forward: "the model has no layer to make sparse" gave no reason."""
    import torch.nn as nn
    import torch.nn.functional as F

    from sparsify.api import transform
    from sparsify.errors import PassError

    class WSConv2d(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    net = nn.Sequential(WSConv2d(3, 8, 3, padding=1), nn.ReLU(), WSConv2d(8, 8, 3, padding=1))
    with pytest.raises(PassError, match=r"its 2 convs run as functional conv calls .*plain nn.Conv2d") as e:
        transform(net, "sparse-random", density=0.3, input_shape=(1, 3, 8, 8))
    assert "\n" not in str(e.value)
