"""Run directories: ``recipe.json`` + ``weights.safetensors`` + ``summary.json``.

A run directory is replayable: the recipe holds everything needed to rebuild the graph (model
spec, input shape, pass and parameters, seed, versions); the tensors are loaded on top with
safetensors. No pickled code is ever read.

Layout::

    RUN/recipe.json          how to rebuild the graph (see ``Recipe``)
    RUN/weights.safetensors  the state dict (weights, biases, BN statistics, masks)
    RUN/weights.init.safetensors  the same as made by ``transform``: ``train --force`` restarts here
    RUN/summary.json         the per-layer report written by the stage that last saved
    RUN/model_source.py      a copy of a user's model file (absent for zoo models)
    RUN/model_imports/       copies of the local modules that file imports, at their paths relative to it
    RUN/metrics.jsonl        the completed training's record, written by ``sparsify train`` with the
                             weights and summary when it completes
    RUN/checkpoints/         last.pt, the last epoch's state (``--resume``), and while a training is in
                             progress its metrics.jsonl
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import atomic_dir, atomic_path, dir_lock, write_json
from .errors import RunDirError

RECIPE = "recipe.json"
WEIGHTS = "weights.safetensors"
WEIGHTS_INIT = "weights.init.safetensors"  # the run's initial state, kept when training rewrites WEIGHTS
SUMMARY = "summary.json"
MODEL_SOURCE = "model_source.py"
MODEL_IMPORTS = "model_imports"
# The trained values (from --weights) of the model's tensors its graph does not hold, which tracing
# read as values (`if self.use_extra:`): a rebuild loads them before it traces (replay.trace_recipe).
TRACED_STATE = "traced_state.safetensors"
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
    source_imports: dict[str, str] = field(default_factory=dict)  # local modules the file imports: {relative path: sha256}
    input_shapes: list[list[int]] | None = None   # one shape per input, for models with several inputs
    rules: dict[str, str] = field(default_factory=dict)  # user rules: module type -> rule name
    weights: dict[str, Any] | None = None   # trained weights transform started from: source path, sha256, tensors
    versions: dict[str, str] = field(default_factory=versions)
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for optional in ("input_shapes", "rules", "source_imports"):  # absent when unused: older readers see the same recipe
            if not data[optional]:
                del data[optional]
        return data

    @property
    def shapes(self) -> list[list[int]]:
        """One shape per model input."""
        return [list(s) for s in self.input_shapes] if self.input_shapes else [list(self.input_shape)]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipe":
        """A recipe from its JSON; ValueError naming the first field of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name, (ok, expected) in _RECIPE_TYPES.items():
            if name in values and not ok(values[name]):
                raise ValueError(f"{name} must be {expected}, not {json.dumps(values[name])[:60]}")
        for name in ("model", "input_shape", "method"):
            if name not in values:
                raise ValueError(f"it has no {name!r}")
        return cls(**values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_RECIPE_TYPES: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a model spec such as \"zoo:lenet5\""),
    "input_shape": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(d) and d > 0 for d in v),
                    "a list of positive integers"),
    "method": (lambda v: isinstance(v, str), "a method name"),
    "params": (lambda v: isinstance(v, dict), "an object"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "model_args": (lambda v: isinstance(v, dict), "an object"),
    "leaf_modules": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    "num_classes": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
    "source_sha256": (lambda v: v is None or isinstance(v, str), "a hex string or null"),
    "source_imports": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(h, str) and ".." not in k.split("/")
                                                              and not k.startswith("/") for k, h in v.items()),
                       "an object of relative paths and hex strings"),
    "weights": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "versions": (lambda v: isinstance(v, dict), "an object"),
    "format": (lambda v: _is_int(v), "an integer"),
}


@dataclass
class Run:
    """A loaded run directory."""

    path: Path
    recipe: Recipe
    model: nn.Module                # a torch.fx.GraphModule
    summary: dict[str, Any]


def default_run_dir(model: str, method: str, value: float | None = None, *, next_free: bool = False,
                    root: str | Path = "runs") -> Path:
    """The default run directory: ``runs/<model>-<method>[-<density or alpha>]``, e.g. runs/lenet5-sparse-random-0.1.

    ``model`` is the model spec (``zoo:NAME``, ``torchvision:NAME`` or ``path/file.py[:NAME]``: its
    stem). ``next_free`` appends ``-2``, ``-3``... while the name is taken (``sparsify run``: a new
    pipeline never lands on an earlier one); otherwise an existing directory is the caller's to refuse
    or replace (``transform``: refused unless ``--force``).
    """
    spec = str(model)
    name = spec.partition(":")[2] if spec.startswith(("zoo:", "torchvision:")) else Path(spec.rpartition(":")[0] or spec).stem
    parts = [name or "model", method] + ([f"{value:g}"] if value is not None else [])
    base = Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))
    path, k = base, 1
    while next_free and path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


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
        recipe = Recipe.from_json(json.loads((p / RECIPE).read_text()))
    except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RunDirError(f"{p / RECIPE} is corrupt ({e}); re-create the run with `sparsify transform`") from None
    if recipe.format > FORMAT_VERSION:  # a newer sparsify's run: its fields may mean what this one cannot know
        made_by = f"sparsify {recipe.versions['sparsify']}" if recipe.versions.get("sparsify") else "a newer sparsify"
        raise RunDirError(f"{p} was made by {made_by} (run format {recipe.format}; this sparsify reads up to "
                          f"{FORMAT_VERSION}); upgrade sparsify or re-create the run with `sparsify transform`")
    return recipe


def summary_note(path: str | Path) -> str | None:
    """A one-line note when run ``path`` has a ``summary.json`` that cannot be read as one (what it
    records, such as how training normalised the inputs, is then unknown); None otherwise."""
    file = Path(path) / SUMMARY
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raw = None
    # no section dropped as damaged, and the per-layer report every stage writes is there ({} said
    # nothing: the note on how training normalised the inputs went without a word)
    if isinstance(raw, dict) and set(_usable_sections(dict(raw))) == set(raw) and "layers" in raw:
        return None
    return (f"{file} is damaged, so what it records is unknown here (the ratios to the original model, how "
            f"training normalised the inputs): feed the model inputs prepared as in its training")


def read_summary(path: str | Path) -> dict[str, Any]:
    """The run's ``summary.json`` as a dict, or {} when it is missing or damaged.

    The summary is a report derived from the weights (every stage that saves rewrites it), so a
    damaged one must not stop a command: sections of the wrong type are dropped.
    """
    file = Path(path) / SUMMARY
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return _usable_sections(data) if isinstance(data, dict) else {}


def _usable_sections(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a parsed summary) without its sections of the wrong type."""
    totals = data.get("original_totals")
    if totals is not None and not (isinstance(totals, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in totals.values())):
        data.pop("original_totals")
    train = data.get("train")
    if train is not None and not (isinstance(train, dict) and isinstance(train.get("config", {}), dict)):
        data.pop("train")
    return data


def run_lock(path: str | Path) -> contextlib.AbstractContextManager[None]:
    """The lock a command holds on the existing run directory ``path`` while it writes it
    (``train``, ``transform --force`` over it): a second one is refused with RunDirError at once
    instead of mixing two writers' files (``_io.dir_lock``)."""
    return dir_lock(path, f"{path} is being trained or replaced by another sparsify process; wait until it ends (or "
                          "stop it), then try again")


def save_run(path: str | Path, recipe: Recipe, model: nn.Module, summary: dict[str, Any],
             force: bool = False, source_file: str | Path | None = None,
             traced_state: dict[str, Any] | None = None) -> Path:
    """Write a new run directory atomically; refuse a non-empty ``path`` unless ``force``.
    ``traced_state``: tensors of the original model a rebuild traces with (``TRACED_STATE``)."""
    path = Path(path)
    with contextlib.ExitStack() as stack:
        if force and path.is_dir():
            stack.enter_context(run_lock(path))
        _write_run(path, recipe, model, summary, force, source_file, traced_state)
    return path


def _write_run(path: Path, recipe: Recipe, model: nn.Module, summary: dict[str, Any], force: bool,
               source_file: str | Path | None, traced_state: dict[str, Any] | None) -> None:
    with atomic_dir(path, force=force, replaces=RECIPE) as tmp:
        write_json(tmp / RECIPE, recipe.to_json())
        save_weights(tmp, model)
        if traced_state:
            save_state(tmp / TRACED_STATE, traced_state)
        shutil.copyfile(tmp / WEIGHTS, tmp / WEIGHTS_INIT)
        write_json(tmp / SUMMARY, summary)
        if source_file is not None:
            shutil.copyfile(source_file, tmp / MODEL_SOURCE)
            for relative in recipe.source_imports:  # what the file imports from beside it
                (tmp / MODEL_IMPORTS / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(source_file).parent / relative, tmp / MODEL_IMPORTS / relative)


def save_weights(run_dir: str | Path, model: nn.Module, name: str = WEIGHTS) -> Path:
    """Atomically (re)write the model's state dict into ``run_dir/name`` with safetensors."""
    return save_state(Path(run_dir) / name, model.state_dict())


def save_state(target: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write tensors by name into the safetensors file ``target``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    target = Path(target)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION)})
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
    from .replay import build_from_recipe

    p = Path(path)
    recipe = read_recipe(p)
    model = build_from_recipe(recipe, source_copy=p / MODEL_SOURCE, rules=rules, where=str(p / RECIPE),
                              imports_copy=p / MODEL_IMPORTS, traced_state=p / TRACED_STATE)
    load_weights(model, p / WEIGHTS)
    return Run(path=p, recipe=recipe, model=model, summary=read_summary(p))
