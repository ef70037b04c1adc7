"""The built-in zoo: every model builds, traces with torch.fx, runs at its input shape, and has the expected shape."""
from __future__ import annotations

import dataclasses
import operator

import pytest
import torch
from torch import fx, nn

from sparsify import zoo
from sparsify.errors import ModelLoadError

EXPECTED = ["cifarnet", "densenet121", "efficientnet-b0", "inception-mini", "lenet300-100", "lenet5", "mlp",
            "mobilenetv2", "mobilenetv2-imagenet", "resnet18", "resnet20", "resnet50", "vgg16n"]
IMAGENET = ["resnet18", "resnet50", "mobilenetv2-imagenet", "efficientnet-b0", "densenet121"]
# torchvision's published parameter counts (the ``num_params`` of its weights' metadata)
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenetv2-imagenet": 3_504_872,
                      "efficientnet-b0": 5_288_548, "densenet121": 7_978_856}


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
    if zoo.get(name).dataset != "imagenet":  # one 224x224 forward (above) is enough for them
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


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_have_torchvisions_parameter_count(name: str) -> None:
    entry = zoo.get(name)
    assert entry.input_shape == (1, 3, 224, 224) and entry.num_classes == 1000 and entry.dataset == "imagenet"
    model = _build(name)
    assert _params(model) == TORCHVISION_PARAMS[name]
    # with 10 classes only the classifier shrinks: (1000 - 10) * (fan-in + 1) fewer parameters
    fan_in = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
    assert _params(_build(name, num_classes=10)) == TORCHVISION_PARAMS[name] - 990 * (fan_in + 1)


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _conv_output_sides(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(out channels, kernel, output side) of every conv in execution order, from forward hooks."""
    seen: list[tuple[int, int, int]] = []
    hooks = [c.register_forward_hook(lambda m, i, o: seen.append((m.out_channels, m.kernel_size[0], o.shape[-1])))
             for c in _convs(model)]
    with torch.no_grad():
        model(torch.randn(shape))
    for h in hooks:
        h.remove()
    return seen


def test_resnet18_and_resnet50_stage_shapes() -> None:
    r18 = _conv_output_sides(_build("resnet18"), (1, 3, 224, 224))
    assert r18[0] == (64, 7, 112) and len(r18) == 20                  # stem + 16 block convs + 3 projections
    assert {(c, s) for c, k, s in r18[1:] if k == 3} == {(64, 56), (128, 28), (256, 14), (512, 7)}
    r50 = _build("resnet50")
    assert len(_convs(r50)) == 53 and _call_targets(r50).count(operator.add) == 16
    # v1.5: the 3x3 conv of each stage's first bottleneck carries the stride, the 1x1 before it does not
    first = r50.layer2[0]
    assert first.conv1[0].stride == (1, 1) and first.conv2[0].stride == (2, 2)
    assert _call_targets(_build("resnet18")).count(operator.add) == 8


def test_mobilenetv2_imagenet_layout() -> None:
    model = _build("mobilenetv2-imagenet")
    sides = _conv_output_sides(model, (1, 3, 224, 224))
    assert sides[0] == (32, 3, 112) and sides[-1] == (1280, 1, 7)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and len(_convs(model)) == 52
    assert sorted({s for _, _, s in sides}) == [7, 14, 28, 56, 112]
    assert _call_targets(model).count(operator.add) == 10
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.2


def test_efficientnet_b0_blocks() -> None:
    model = _build("efficientnet-b0")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 16
    assert sorted(m.kernel_size[0] for m in depthwise) == [3] * 7 + [5] * 9
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    se = [m for m in model.modules() if type(m).__name__ == "SqueezeExcitation"]
    assert len(se) == 16 and (se[0].fc1.in_channels, se[0].fc1.out_channels) == (32, 8)   # squeeze: input / 4
    sides = _conv_output_sides(model, (1, 3, 224, 224))
    assert sides[0] == (32, 3, 112) and sides[-1] == (1280, 1, 7)
    # torchvision's linear schedule: block i of 16 drops with probability 0.2 * i / 16
    probs = [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    assert probs == pytest.approx([0.2 * i / 16 for i in range(16)])


def test_efficientnet_stochastic_depth_drops_whole_samples_in_training_only() -> None:
    model = _build("efficientnet-b0", stochastic_depth_prob=0.9)
    block = model.features[2][1]                                  # a residual block, p = 0.9 * 2 / 16
    assert block.use_residual and block.stochastic_depth.p > 0.1
    x = torch.randn(64, 24, 8, 8)
    with torch.no_grad():
        kept = block.block(x)
        assert torch.equal(block(x), kept + x)                     # eval: the identity
        block.stochastic_depth.train()                             # BN stays in eval: the branch is `kept`
        torch.manual_seed(0)
        branch = block(x) - x
    per_sample = [(b.abs().sum() == 0).item() or torch.allclose(b, kept[i] / (1 - block.stochastic_depth.p),
                                                                   rtol=1e-4, atol=1e-5)
                  for i, b in enumerate(branch)]
    assert all(per_sample)
    dropped = sum(int(b.abs().sum() == 0) for b in branch)
    assert 0 < dropped < 64
    assert _params(_build("efficientnet-b0", stochastic_depth_prob=0.0)) == TORCHVISION_PARAMS["efficientnet-b0"]


def test_densenet121_blocks_and_transitions() -> None:
    model = _build("densenet121")
    convs = _convs(model)
    assert len(convs) == 1 + 2 * (6 + 12 + 24 + 16) + 3
    sides = _conv_output_sides(model, (1, 3, 224, 224))
    growth = [(c, s) for c, k, s in sides if k == 3]
    assert {c for c, _ in growth} == {32} and sorted({s for _, s in growth}) == [7, 14, 28, 56]
    transitions = [m.conv for m in model.modules() if type(m).__name__ == "Transition"]
    assert [(t.in_channels, t.out_channels) for t in transitions] == [(256, 128), (512, 256), (1024, 512)]
    bottlenecks = [c for c in convs if c.kernel_size == (1, 1) and c not in transitions]
    assert {c.out_channels for c in bottlenecks} == {128} and max(c.in_channels for c in bottlenecks) == 992
    assert model.classifier.in_features == 1024
    assert _call_targets(model).count(torch.cat) == 6 + 12 + 24 + 16 + 4


def test_efficientnet_traces_in_training_mode_too() -> None:
    model = zoo.get("efficientnet-b0").build()                   # built in training mode, as transform sees it
    graph = fx.symbolic_trace(model)
    assert any(n.op == "call_method" and n.target == "bernoulli_" for n in graph.graph.nodes)
    model.eval()
    assert not any(n.op == "call_method" and n.target == "bernoulli_" for n in fx.symbolic_trace(model).graph.nodes)
