"""``torchvision:NAME`` model specs: a lazy import, one clear line when torchvision cannot be imported.

torchvision is not installed here (its PyPI wheel is a CUDA build), so a stand-in module plays
``torchvision.models.get_model``; what is tested is sparsify's side of the contract.
"""
from __future__ import annotations

import sys
import types

import pytest

from sparsify import api, zoo
from sparsify.errors import ModelLoadError
from sparsify.models import load_model


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    calls: list[tuple[str, dict]] = []

    def get_model(name: str, **kwargs: object):
        calls.append((name, dict(kwargs)))
        if name != "resnet18":
            raise ValueError(f"Unknown model {name}")
        kwargs.pop("weights")
        return zoo.get("resnet18").build(**kwargs)

    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.get_model = get_model  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def test_without_torchvision_the_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)          # import fails as when it is not installed
    with pytest.raises(ModelLoadError) as info:
        load_model("torchvision:resnet18")
    msg = str(info.value)
    assert "\n" not in msg and "torchvision:resnet18 needs torchvision" in msg and "zoo:NAME" in msg


def test_torchvision_spec_builds_without_weights(fake_torchvision: list) -> None:
    loaded = load_model("torchvision:resnet18", {"num_classes": 10})
    assert fake_torchvision == [("resnet18", {"weights": None, "num_classes": 10})]
    assert loaded.spec == "torchvision:resnet18" and loaded.input_shape == (1, 3, 224, 224)
    assert loaded.num_classes == 10 and loaded.module.fc.out_features == 10


def test_torchvision_spec_transforms_and_names_the_run(fake_torchvision: list) -> None:
    result = api.transform("torchvision:resnet18", "sparse-random", density=0.5)
    assert result.recipe.model == "torchvision:resnet18" and result.recipe.input_shape == [1, 3, 224, 224]
    assert api.default_out(result.recipe).name == "resnet18-sparse-random-0.5"


def test_unknown_torchvision_model_is_one_line(fake_torchvision: list) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("torchvision:resnet19")
    assert "\n" not in str(info.value) and "Unknown model resnet19" in str(info.value)
