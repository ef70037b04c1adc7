"""Run directories: ``recipe.json`` + ``weights.safetensors`` + ``summary.json``.

A run directory is replayable: the recipe holds everything needed to rebuild the graph (model
spec, input shape, pass and parameters, seed, versions); the tensors are loaded on top with
safetensors. No pickled code is ever read.

Layout::

    RUN/recipe.json          how to rebuild the graph (see ``Recipe``)
    RUN/weights.safetensors  the state dict (weights, biases, BN statistics, masks)
    RUN/summary.json         the per-layer report written by the stage that last saved
    RUN/model_source.py      a copy of a user's model file (absent for zoo models)
    RUN/metrics.jsonl, RUN/checkpoints/   written by ``sparsify train``
"""
from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import atomic_dir, atomic_path, write_json
from .errors import RunDirError

RECIPE = "recipe.json"
WEIGHTS = "weights.safetensors"
SUMMARY = "summary.json"
MODEL_SOURCE = "model_source.py"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the packages that determine a run's numbers."""
    import numpy

    from . import __version__

    return {
        "sparsify": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Recipe:
    """Everything needed to rebuild a run's graph, bit for bit."""

    model: str                      # "zoo:NAME" or "/abs/path/file.py[:NAME]"
    input_shape: list[int]          # the (first) input's shape
    method: str                     # "none" | "depth-multiplier" | "sparse-random" | "psn"
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    model_args: dict[str, Any] = field(default_factory=dict)
    leaf_modules: list[str] = field(default_factory=list)
    num_classes: int | None = None
    source_sha256: str | None = None
    input_shapes: list[list[int]] | None = None   # one shape per input, for models with several inputs
    rules: dict[str, str] = field(default_factory=dict)  # user rules: module type -> rule name
    versions: dict[str, str] = field(default_factory=versions)
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for optional in ("input_shapes", "rules"):  # absent when unused: older readers see the same recipe
            if not data[optional]:
                del data[optional]
        return data

    @property
    def shapes(self) -> list[list[int]]:
        """One shape per model input."""
        return [list(s) for s in self.input_shapes] if self.input_shapes else [list(self.input_shape)]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Run:
    """A loaded run directory."""

    path: Path
    recipe: Recipe
    model: nn.Module                # a torch.fx.GraphModule
    summary: dict[str, Any]


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` holds a recipe and weights."""
    p = Path(path)
    return (p / RECIPE).is_file() and (p / WEIGHTS).is_file()


def read_recipe(path: str | Path) -> Recipe:
    """The recipe of run directory ``path``; RunDirError when it is not one."""
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"run directory {p} does not exist; create one with `sparsify transform`")
    if not is_run_dir(p):
        raise RunDirError(
            f"{p} is not a run directory (no {RECIPE} and {WEIGHTS}); create one with `sparsify transform`"
        )
    try:
        return Recipe.from_json(json.loads((p / RECIPE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise RunDirError(f"{p / RECIPE} is corrupt ({e}); re-create the run with `sparsify transform`") from None


def save_run(path: str | Path, recipe: Recipe, model: nn.Module, summary: dict[str, Any],
             force: bool = False, source_file: str | Path | None = None) -> Path:
    """Write a new run directory atomically; refuse a non-empty ``path`` unless ``force``."""
    path = Path(path)
    with atomic_dir(path, force=force) as tmp:
        write_json(tmp / RECIPE, recipe.to_json())
        save_weights(tmp, model)
        write_json(tmp / SUMMARY, summary)
        if source_file is not None:
            shutil.copyfile(source_file, tmp / MODEL_SOURCE)
    return path


def save_weights(run_dir: str | Path, model: nn.Module, name: str = WEIGHTS) -> Path:
    """Atomically (re)write the model's state dict into ``run_dir/name`` with safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    target = Path(run_dir) / name
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={"format": str(FORMAT_VERSION)})
    return target


def load_weights(model: nn.Module, file: str | Path) -> None:
    """Load a safetensors state dict into ``model`` strictly (every key must match)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types
        raise RunDirError(f"{file} cannot be read ({e}); the run directory is damaged") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunDirError(
            f"{file} does not match the graph rebuilt from the recipe "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); the run directory is damaged"
        )


def load_run(path: str | Path, rules: Any = None) -> Run:
    """Rebuild a run's graph from its recipe and load its tensors (``rules``: the custom rule objects
    the run was transformed with, if any)."""
    from .api import build_from_recipe

    p = Path(path)
    recipe = read_recipe(p)
    model = build_from_recipe(recipe, run_dir=p, rules=rules)
    load_weights(model, p / WEIGHTS)
    summary = json.loads((p / SUMMARY).read_text()) if (p / SUMMARY).is_file() else {}
    return Run(path=p, recipe=recipe, model=model, summary=summary)
