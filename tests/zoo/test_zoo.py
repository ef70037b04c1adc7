"""The built-in zoo: every model builds, traces with torch.fx, runs at its input shape, and has the expected shape."""
from __future__ import annotations

import dataclasses
import operator

import pytest
import torch
from torch import fx, nn

from sparsify import zoo
from sparsify.errors import ModelLoadError

EXPECTED = ["cifarnet", "inception-mini", "lenet300-100", "lenet5", "mlp", "mobilenetv2", "resnet20", "resnet50", "vgg16n"]


def _build(name: str, seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.get(name).build(**kwargs).eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _call_targets(model: nn.Module) -> list[object]:
    return [n.target for n in fx.symbolic_trace(model).graph.nodes if n.op == "call_function"]


def test_names_are_sorted_and_complete() -> None:
    assert zoo.names() == EXPECTED
    for name in EXPECTED:
        entry = zoo.get(name)
        assert entry.name == name and entry.input_shape[0] == 1 and entry.description
        assert entry.dataset in {"mnist", "cifar10", "imagenet"}


@pytest.mark.parametrize("name", EXPECTED)
def test_entry_traces_and_matches_eager(name: str) -> None:
    entry = zoo.get(name)
    model = _build(name)
    traced = fx.symbolic_trace(model)
    torch.manual_seed(1)
    x = torch.randn(entry.input_shape)
    with torch.no_grad():
        eager, graph = model(x), traced(x)
    assert eager.shape == (1, entry.num_classes)
    assert torch.isfinite(eager).all() and eager.abs().sum() > 0
    assert torch.equal(eager, graph)


@pytest.mark.parametrize("name", EXPECTED)
def test_classifier_is_last_linear_and_follows_num_classes(name: str) -> None:
    model = _build(name, num_classes=7)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 7
    if name != "resnet50":  # one 224x224 forward (above) is enough for it
        with torch.no_grad():
            assert model(torch.randn(zoo.get(name).input_shape)).shape == (1, 7)


@pytest.mark.parametrize("name", EXPECTED)
def test_same_seed_gives_identical_parameters(name: str) -> None:
    a, b, c = _build(name, 0).state_dict(), _build(name, 0).state_dict(), _build(name, 1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_parameter_counts() -> None:
    assert _params(_build("lenet300-100")) == 266_610
    assert _params(_build("mlp")) == 266_610
    assert _params(_build("mlp", hidden=(500, 150))) == 784 * 500 + 500 + 500 * 150 + 150 + 150 * 10 + 10
    assert 0.26e6 < _params(_build("resnet20")) < 0.28e6
    assert 25.4e6 < _params(_build("resnet50")) < 25.7e6
    assert 1.7e6 < _params(_build("cifarnet")) < 1.8e6
    assert 2.1e6 < _params(_build("mobilenetv2")) < 2.4e6
    # VGG-16 convs (14.7M) + the 3x3x512x1024 head conv (4.7M) + BN + classifier.
    assert 19.3e6 < _params(_build("vgg16n")) < 19.6e6


def test_lenet5_has_three_convs_and_vgg16n_the_1024_head() -> None:
    convs = [m for m in _build("lenet5").modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64), (64, 128)]
    vgg_convs = [m for m in _build("vgg16n").modules() if isinstance(m, nn.Conv2d)]
    assert len(vgg_convs) == 14 and vgg_convs[-1].out_channels == 1024 and vgg_convs[-1].kernel_size == (3, 3)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in _build("vgg16n").modules()) == 14


def test_mobilenetv2_has_depthwise_convs_and_residual_adds() -> None:
    model = _build("mobilenetv2")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert _call_targets(model).count(operator.add) == 10


def test_inception_mini_concatenates_branches() -> None:
    assert _call_targets(_build("inception-mini")).count(torch.cat) == 3


def test_resnet20_has_residual_adds_and_projection_shortcuts() -> None:
    model = _build("resnet20")
    assert _call_targets(model).count(operator.add) == 9
    projections = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]


def test_unknown_name_raises_with_suggestion_and_names() -> None:
    with pytest.raises(ModelLoadError) as info:
        zoo.get("resnet21")
    message = str(info.value)
    assert "\n" not in message and "did you mean 'resnet20'" in message
    assert all(name in message for name in EXPECTED)


def test_entry_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        zoo.get("lenet5").num_classes = 3  # type: ignore[misc]
