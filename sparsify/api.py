"""The Python API of the transform stage, mirroring ``sparsify transform`` and ``sparsify inspect``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import ModelLoadError, RunDirError, UsageError
from .models import LoadedModel, load_model
from .passes.base import PassResult
from .passes.depth_multiplier import COUNTS, DepthCounter, DepthMultiplierPass, check_divisor, match_alpha
from .passes.sparsity import PSNPass, SparseRandomPass, eligible_layers
from .passes.trace import propagate_shapes, trace
from .report import layer_report, param_counts, with_ratios
from .rundir import MODEL_SOURCE, SUMMARY, Recipe, Run, is_run_dir, load_run, read_recipe, save_run

METHODS = ("sparse-random", "psn", "depth-multiplier", "none")


@dataclass
class TransformResult:
    """The rewritten graph, the recipe that replays it, and the report of what changed."""

    model: fx.GraphModule
    recipe: Recipe
    summary: dict[str, Any]
    source_file: Path | None = None


def _params_for(method: str, density: float | None, alpha: float | None, profile: str | None,
                profile_params: dict[str, float] | None, allocation: str, include_linear: bool | None,
                include_classifier: bool, rescale_init: bool = True, divisor: int | None = None) -> dict[str, Any]:
    """The method's parameters as stored in the recipe (only those that apply)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if divisor is not None and method != "depth-multiplier":
        raise UsageError(f"--divisor applies to --method depth-multiplier only, not {method}")
    if method == "depth-multiplier":
        if density is not None or profile is not None:
            raise UsageError("depth-multiplier takes --alpha, not --density/--profile")
        divisor = check_divisor(divisor)
        return {"alpha": alpha, **({"divisor": divisor} if divisor > 1 else {})}
    if method == "none":
        return {}
    if alpha is not None:
        raise UsageError(f"{method} takes --density, not --alpha")
    params: dict[str, Any] = {"density": density, "allocation": allocation,
                              "include_classifier": include_classifier, "rescale_init": rescale_init}
    if method == "psn":
        params.update(profile=profile or "lognormal", profile_params=dict(profile_params or {}),
                      include_linear=True if include_linear is None else include_linear)
    else:
        if profile is not None:
            raise UsageError("--profile applies to --method psn only")
        params["include_linear"] = include_linear  # None: decided per model in _resolve_auto
    return params


def _resolve_auto(gm: fx.GraphModule, params: dict[str, Any]) -> dict[str, Any]:
    """sparse-random keeps linears dense as in the paper, unless the model has no conv to sparsify."""
    if params.get("include_linear", False) is None:
        convs, _ = eligible_layers(gm, include_linear=False, include_classifier=params["include_classifier"])
        params = {**params, "include_linear": not convs}
    return params


def _make_pass(method: str, params: dict[str, Any], seed: int):
    if method == "sparse-random":
        return SparseRandomPass(params["density"], seed=seed, allocation=params["allocation"],
                                include_linear=params["include_linear"],
                                include_classifier=params["include_classifier"],
                                rescale_init=params.get("rescale_init", True))
    if method == "psn":
        return PSNPass(params["density"], profile=params["profile"], profile_params=params["profile_params"],
                       seed=seed, allocation=params["allocation"], include_linear=params["include_linear"],
                       include_classifier=params["include_classifier"],
                       rescale_init=params.get("rescale_init", True))
    if method == "depth-multiplier":
        return DepthMultiplierPass(params["alpha"], seed=seed, divisor=params.get("divisor", 1))
    return None


def _input_shape(loaded: LoadedModel, given: Sequence[int] | None) -> tuple[int, ...]:
    shape = tuple(given) if given else loaded.input_shape
    if not shape:
        raise UsageError(
            f"no input shape for {loaded.spec}: pass --input-shape N,C,H,W, or define INPUT_SHAPE "
            "or example_input() in the model file"
        )
    return tuple(int(d) for d in shape)


def _apply(gm: fx.GraphModule, method: str, params: dict[str, Any], seed: int,
           example: torch.Tensor) -> PassResult:
    p = _make_pass(method, params, seed)
    if p is None:
        propagate_shapes(gm, example)
        return PassResult(gm)
    return p(gm, example)


def transform(model: str | nn.Module, method: str = "sparse-random", *, density: float | None = None,
              alpha: float | None = None, profile: str | None = None,
              profile_params: dict[str, float] | None = None, allocation: str = "uniform",
              include_linear: bool | None = None, include_classifier: bool = False, seed: int = 0,
              input_shape: Sequence[int] | None = None, model_args: dict[str, Any] | None = None,
              leaf_modules: Sequence[str] = (), rescale_init: bool = True,
              divisor: int | None = None, match: str | Path | None = None,
              count: str | None = None) -> TransformResult:
    """Load ``model``, trace it, apply ``method``, and report what changed.

    ``model`` is ``"zoo:NAME"``, ``"torchvision:NAME"``, ``"file.py"``, ``"file.py:NAME"`` or an
    nn.Module (not replayable from a run directory). ``divisor`` (depth-multiplier only) rounds every
    scaled channel count to a multiple of it. ``match`` (a run directory) with ``count`` ("conv" or
    "total", depth-multiplier only) chooses the alpha whose live conv / total parameter count is
    nearest that run's (see ``match_depth``); the recipe records it under ``params["match"]``.
    Raises a SparsifyError with a one-line message on bad input.
    """
    target = _match_target(method, alpha, match, count)
    params = _params_for(method, density, 0.5 if target is not None else alpha, profile, profile_params,
                         allocation, include_linear, include_classifier, rescale_init, divisor)
    loaded = load_model(model, model_args, seed)
    shape = _input_shape(loaded, input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    dense = trace(loaded.module, leaf_modules)
    propagate_shapes(dense, example)
    original = layer_report(dense, shape)
    params = _resolve_auto(dense, params)
    if target is not None:
        params["alpha"], predicted = match_depth(dense, example, target, count, params.get("divisor", 1))
    result = _apply(dense, method, params, seed, example)
    report = with_ratios(layer_report(result.model, shape), original)
    if target is not None:
        achieved = param_counts(report)[count]
        if achieved != predicted:  # the count read off the channel groups disagrees with the pass: search for real
            params["alpha"], achieved = _match_by_transform(model, params, target, count, seed, shape,
                                                            model_args, leaf_modules)
            result = _apply(trace(load_model(model, model_args, seed).module, leaf_modules), method, params,
                            seed, example)
            report = with_ratios(layer_report(result.model, shape), original)
        params["match"] = {"run": str(match), "count": count, "target": target, "achieved": achieved}
    report.update(method=method, params=params, seed=seed, notes=result.notes, pass_layers=result.layers)
    recipe = Recipe(model=loaded.spec, input_shape=list(shape), method=method, params=params, seed=seed,
                    model_args=dict(model_args or {}), leaf_modules=list(leaf_modules),
                    num_classes=loaded.num_classes, source_sha256=loaded.source_sha256)
    return TransformResult(result.model, recipe, report, loaded.source_file)


def _match_target(method: str, alpha: float | None, match: str | Path | None, count: str | None) -> int | None:
    """The live parameter count that ``match`` asks for (None without ``match``); UsageError on bad use."""
    if match is None and count is None:
        return None
    if method != "depth-multiplier":
        raise UsageError(f"--match/--count apply to --method depth-multiplier only, not {method}")
    if match is None or count not in COUNTS:
        raise UsageError("--match RUN needs --count conv or --count total (which live parameters to equalise)")
    if alpha is not None:
        raise UsageError("give --alpha or --match, not both (--match finds alpha)")
    return run_param_counts(match)[count]


def run_param_counts(run_dir: str | Path) -> dict[str, int]:
    """Live parameter counts of a run directory (``report.param_counts`` of its summary; no model is built)."""
    import json

    read_recipe(run_dir)  # RunDirError when it is not a run directory
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
        return param_counts(summary)
    except (OSError, ValueError, KeyError, TypeError):
        raise RunDirError(f"{Path(run_dir) / SUMMARY} is missing or has no layer report; "
                          f"re-create the run with `sparsify transform`") from None


def match_depth(gm: fx.GraphModule, example: torch.Tensor, target: int, count: str,
                divisor: int = 1) -> tuple[float, int]:
    """Depth multiplier alpha whose ``count`` ("conv" or "total") of live parameters is nearest ``target``.

    Counted from the channel groups of the traced dense graph ``gm`` (``DepthCounter``), without
    transforming: the result is within one step of the count (one channel of the widest group) of
    ``target``, the nearest achievable. Returns (alpha, predicted count).
    """
    counter = DepthCounter(gm, example, divisor)

    def count_at(a: float) -> tuple[int, tuple[int, ...]]:
        return counter.counts(a)[count], tuple(sorted(counter.sizes(a).items()))

    return match_alpha(count_at, target)


def _match_by_transform(model: Any, params: dict[str, Any], target: int, count: str, seed: int,
                        shape: tuple[int, ...], model_args: dict[str, Any] | None,
                        leaf_modules: Sequence[str]) -> tuple[float, int]:
    """``match_depth`` by transforming at every alpha tried (slow; used only if the two ever disagree)."""
    def count_at(a: float) -> tuple[int, int]:
        res = transform(model, "depth-multiplier", alpha=a, seed=seed, input_shape=shape, model_args=model_args,
                        leaf_modules=leaf_modules, divisor=params.get("divisor"))
        n = param_counts(res.summary)[count]
        return n, n

    return match_alpha(count_at, target)


def default_out(recipe: Recipe) -> Path:
    """``runs/<model>-<method>-<param>``, e.g. runs/lenet5-sparse-random-0.1."""
    spec = recipe.model
    name = spec.partition(":")[2] if spec.startswith(("zoo:", "torchvision:")) else Path(spec.rpartition(":")[0] or spec).stem
    value = recipe.params.get("density", recipe.params.get("alpha"))
    parts = [name, recipe.method] + ([f"{value:g}"] if value is not None else [])
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def transform_to_dir(model: str, method: str = "sparse-random", *, out: str | Path | None = None,
                     force: bool = False, **kwargs: Any) -> tuple[Path, TransformResult]:
    """``transform`` and save the result as a run directory (atomically); returns its path."""
    if isinstance(model, nn.Module):
        raise UsageError("a run directory needs a replayable model: pass zoo:NAME or a file path, not a module")
    result = transform(model, method, **kwargs)
    path = Path(out) if out is not None else default_out(result.recipe)
    save_run(path, result.recipe, result.model, result.summary, force=force, source_file=result.source_file)
    return path, result


def build_from_recipe(recipe: Recipe, run_dir: str | Path | None = None) -> fx.GraphModule:
    """Rebuild the graph a recipe describes (weights as initialised; load tensors on top)."""
    spec = recipe.model
    if not spec.startswith("zoo:") and run_dir is not None:
        file, _, name = spec.rpartition(":")
        original = Path(file)
        copy_ = Path(run_dir) / MODEL_SOURCE
        if copy_.is_file() and (not original.is_file() or _sha(original) != recipe.source_sha256):
            spec = f"{copy_}:{name}"  # the file moved or changed since: use the run's own copy
    try:
        result = transform(spec, recipe.method, seed=recipe.seed, input_shape=recipe.input_shape,
                           model_args=recipe.model_args, leaf_modules=recipe.leaf_modules,
                           **_kwargs_of(recipe))
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot rebuild the run's model: {e}") from None
    return result.model


def _kwargs_of(recipe: Recipe) -> dict[str, Any]:
    p = dict(recipe.params)
    keys = ("density", "alpha", "profile", "profile_params", "allocation", "include_linear", "include_classifier",
            "rescale_init", "divisor")
    return {k: p[k] for k in keys if k in p}


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(path: str | Path) -> Run:
    """Load a run directory: rebuild its graph from the recipe and load its tensors."""
    return load_run(path)


def inspect(target: str | Path | nn.Module, *, input_shape: Sequence[int] | None = None,
            model_args: dict[str, Any] | None = None, leaf_modules: Sequence[str] = ()) -> dict[str, Any]:
    """The per-layer report of a run directory, a model (file/zoo/module), or an .onnx file."""
    if isinstance(target, (str, Path)) and str(target).endswith(".onnx"):
        from .runtime.onnx_inspect import inspect_onnx

        return inspect_onnx(target)
    if isinstance(target, (str, Path)) and is_run_dir(target):
        run = load_run(target)
        report = layer_report(run.model, input_shape or run.recipe.input_shape)
        original = run.summary.get("original_totals")
        if original:
            report = with_ratios(report, {"totals": original})
        report.update(method=run.recipe.method, params=run.recipe.params, model=run.recipe.model,
                      seed=run.recipe.seed)
        return report
    if isinstance(target, Path) or (isinstance(target, str) and Path(target).is_dir()):
        raise UsageError(f"{target} is not a run directory, a model file, zoo:NAME or an .onnx file")
    result = transform(target, "none", input_shape=input_shape, model_args=model_args, leaf_modules=leaf_modules)
    report = result.summary
    report["model"] = result.recipe.model
    return report
