"""The Python API of the transform stage, mirroring ``sparsify transform`` and ``sparsify inspect``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._io import check_output_dir
from .errors import RunDirError, UsageError, not_applicable
from .methods import METHODS, make_config, method_class
from .passes.base import seed_problem
from .passes.depth_multiplier import COUNTS, match_depth
from .passes.rules import Registry, Rule
from .passes.rules.base import type_names
from .passes.trace import (defaults_note, dropped_train_overrides, grad_mode_note, mode_differences, onnx_export_note,
                           size_branches_note, state_written_note, traced_constants, training_draws_note)
from .replay import apply_method, decides_graph, load_checked, recipe_registry, rule_registry, trace_loaded
from .passes.outside import functional_note
from .report import layer_report, param_counts, with_ratios
from .rundir import RECIPE, SUMMARY, Recipe, Run, default_run_dir, is_run_dir, load_run, read_recipe, save_run

__all__ = ["METHODS", "TransformResult", "transform", "transform_to_dir", "default_out", "load", "inspect",
           "channel_groups", "match_depth", "run_param_counts"]


@dataclass
class TransformResult:
    """The rewritten graph, the recipe that replays it, and the report of what changed."""

    model: fx.GraphModule
    recipe: Recipe
    summary: dict[str, Any]
    source_file: Path | None = None
    # the user's trained values of the tensors the graph does not hold (read as values while tracing:
    # `if self.use_extra:`, `x * float(self.gain)`), which a rebuild from the file must trace with
    traced_state: dict[str, Any] | None = None


def transform(model: str | nn.Module, method: str = "sparse-random", *, density: float | None = None,
              alpha: float | None = None, profile: str | None = None,
              profile_params: dict[str, float] | None = None, allocation: str = "uniform",
              block: int | None = None,
              include_linear: bool | None = None, include_classifier: bool = False, seed: int = 0,
              input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
              model_args: dict[str, Any] | None = None, leaf_modules: Sequence[str] = (),
              rescale_init: bool | None = None, divisor: int | None = None,
              rules: Mapping[Any, str | Rule] | None = None,
              weights: str | Path | None = None, match: str | Path | None = None,
              count: str | None = None) -> TransformResult:
    """Load ``model``, trace it, apply ``method``, and report what changed.

    ``model`` is ``"zoo:NAME"``, ``"torchvision:NAME"``, ``"file.py"``, ``"file.py:NAME"`` or an
    nn.Module (not replayable from a run directory). ``input_shape`` is one shape, or one per input
    of a model with several inputs (forward's first arguments; those after keep their defaults). ``divisor`` (depth-multiplier only) rounds every scaled channel
    count to a multiple of it. ``match`` (a run directory) with ``count`` ("conv" or "total",
    depth-multiplier only) chooses the alpha whose live conv / total parameter count is nearest that
    run's (see ``match_depth``); the recipe records it under ``params["match"]``. ``block``
    (sparse-random and psn) makes runs of that many output channels of each conv share one fan-in
    (block sparsity, Elsen et al. 2020), which the native kernel runs faster. ``rules`` maps the
    user's (leaf) module types or type names to a rule name (``"conv"``, ``"linear"``,
    ``"elementwise"``, ``"frozen"``) or a ``sparsify.passes.rules.Rule``. A model that runs
    differently in training (dropout flags, ``if self.training``, auxiliary outputs) keeps one graph
    per mode, and a note says so. ``weights`` is a trained state dict (``.pt``/``.pth``/
    ``.safetensors``, see ``sparsify.weights``) loaded into the model before the pass, so the masks
    apply to it; ``rescale_init`` scales each unit's initial weights to its live fan-in, for training
    from scratch (default: on for a model built here from a spec without ``weights``; off with
    ``weights`` and for an nn.Module, whose weights may be trained: pass True for a fresh one).
    Raises a SparsifyError with a one-line message on bad input.
    """
    _check_seed(seed)
    if isinstance(model, os.PathLike):  # transform(Path("net.py")): an AttributeError ('startswith')
        model = os.fspath(model)
    if not isinstance(model, (str, nn.Module)):
        raise UsageError(f"model {model!r} is neither a spec (\"zoo:NAME\", \"file.py[:NAME]\") nor an nn.Module")
    if isinstance(leaf_modules, str):  # read letter by letter: "--leaf C: ... has no module of that type"
        raise UsageError(f"leaf_modules is a list of module type names, e.g. [{leaf_modules!r}], not a string")
    if isinstance(model, str) and model.startswith("zoo:"):  # a misspelt model is the first mistake to name
        from . import zoo

        zoo.get(model[len("zoo:"):])
    if weights is not None and method == "depth-multiplier":
        raise UsageError("--weights applies to sparse-random, psn and none: depth-multiplier builds new layers with "
                         "fresh weights (a thinner architecture trained from scratch); --method none keeps the model "
                         "as it is")
    if rescale_init and weights is not None:  # the trained values came out scaled by up to 1.8x, silently
        raise UsageError("--rescale-init scales initial weights to each unit's live fan-in; with --weights it would "
                         "scale the trained ones: drop --rescale-init (the default with --weights is off)")
    if rescale_init is None:  # a module given as it is may hold trained weights: scaling them changed its function
        rescale_init = weights is None and not isinstance(model, nn.Module)
    target = _match_target(method, alpha, match, count)
    config = make_config(method, density=density, alpha=0.5 if target is not None else alpha, profile=profile,
                         profile_params=profile_params, allocation=allocation, block=block,
                         include_linear=include_linear,
                         include_classifier=include_classifier, rescale_init=rescale_init, divisor=divisor)
    registry, rule_record = rule_registry(rules)
    loaded = load_checked(model, model_args, seed, leaf_modules, list(rules or ()))
    prepare, source, missing = None, None, []
    if weights is not None:
        from .weights import apply_state_dict, check_missing

        state, source = _read_user_weights(weights)

        def prepare(module: nn.Module) -> None:
            # applied once lazy layers have their shapes: a state dict cannot be loaded into them before
            missing.extend(apply_state_dict(module, state, str(weights), loaded.spec, allow_missing=True))
    traced = trace_loaded(loaded, input_shape, seed, leaf_modules, registry, prepare)
    # a run's weights lack the layers its forward skips (an optional head): fine, as long as it never reads them
    unread = check_missing(missing, traced.gm.state_dict(), str(weights), loaded.spec,
                           lambda keys: decides_graph(traced, keys, leaf_modules)) if weights is not None else None
    shapes = traced.shapes
    original = layer_report(traced.gm, shapes, registry)
    config = config.resolve(traced.gm, registry)
    if target is not None:
        config.alpha, predicted = match_depth(traced.gm, traced.example, target, count, config.divisor, registry)
    params = config.to_params()
    result = apply_method(traced, config, seed)
    report = with_ratios(layer_report(result.model, shapes, registry), original)
    if target is not None:
        achieved = param_counts(report)[count]
        if achieved != predicted:  # the counter and the pass disagree: the alpha may not be the nearest
            result.notes.append(f"--match: the count read off the channel groups ({predicted:,}) differs from the "
                                f"model's ({achieved:,}); alpha {params['alpha']:g} may not be the nearest")
        params["match"] = {"run": str(match), "count": count, "target": target, "achieved": achieved}
        if abs(achieved - target) > 0.1 * target:
            result.notes.append(f"--match: no alpha reaches the target {count} count {target:,}; the nearest gives "
                                f"{achieved:,} at alpha {params['alpha']:g} (channel groups the model keeps whole, "
                                f"e.g. at its outputs, do not shrink): not an equal-size model")
    differs = mode_differences(result.model)
    grad = grad_mode_note(traced.gm)
    draws = training_draws_note(traced.gm)
    written = state_written_note(traced.gm)
    branches = size_branches_note(traced.gm)
    onnx_branch = onnx_export_note(traced.gm)
    lost_train = dropped_train_overrides(loaded.module, traced.gm)
    constants = traced_constants(traced.gm)
    defaults = defaults_note(loaded.module, len(shapes))
    unused = _unused_rules(traced.gm, rules)
    notes = [n for n in (loaded.dtype_note, unread, differs, grad, draws, written, branches, onnx_branch, lost_train,
                         constants, defaults, unused) if n] + list(result.notes) + _density_notes(params, result.layers)
    functional = functional_note(report) if method_class(method).masked else None
    if functional:
        notes.append(functional)
    if source is not None:
        notes.append(f"started from the trained weights in {source['source']}: fine-tune with a smaller learning "
                     f"rate than training from scratch, e.g. train --lr 0.01")
        if method_class(method).masked:
            notes += _zero_weights_notes(loaded.module, weights)
    report.update(method=method, params=params, seed=seed, notes=notes, pass_layers=result.layers)
    recipe = Recipe(model=loaded.spec, input_shape=list(shapes[0]), method=method, params=params, seed=seed,
                    model_args=dict(model_args or {}), leaf_modules=list(leaf_modules),
                    num_classes=loaded.num_classes, source_sha256=loaded.source_sha256,
                    source_imports=dict(loaded.source_imports or {}),
                    input_shapes=[list(s) for s in shapes] if len(shapes) > 1 else None, rules=rule_record,
                    weights=source)
    traced_state = None
    if weights is not None:
        # what a rebuild must trace with: the trained tensors the new model does not hold, and every
        # buffer (small), for a buffer the forward reads both as a tensor and in Python (`if
        # self.scale > 1.5`) decided the traced graph by its trained value: the rebuilt run took the
        # other branch, with the trained value loaded after
        held = set(result.model.state_dict())
        buffers = {name for name, _ in loaded.module.named_buffers()}
        traced_state = {k: v for k, v in loaded.module.state_dict().items() if k not in held or k in buffers} or None
    return TransformResult(result.model, recipe, report, loaded.source_file, traced_state)


def _check_seed(seed: int) -> None:
    problem = seed_problem(seed)
    if problem:
        raise UsageError(problem)


def _density_notes(params: dict[str, Any], layers: dict[str, Any]) -> list[str]:
    """A note when the sparse layers end up far denser than asked (every unit keeps an input)."""
    asked = params.get("density")
    live = sum(int(r.get("live", 0)) for r in layers.values())
    entries = sum(int(r.get("entries", 0)) for r in layers.values())
    if not asked or not entries or live / entries <= 1.5 * asked:
        return []
    return [f"--density {asked:g} is below what keeps every channel connected: the sparse layers reach "
            f"{live / entries:.3g} ({live:,} of {entries:,} connections); many filters have one input and "
            f"single-input convs lose most filters; use a density of at least {live / entries:.2g}"]


def _zero_weights_notes(module: nn.Module, weights: str | Path) -> list[str]:
    """A note when the loaded ``weights`` hold weight tensors that are mostly zero (a sparse model's
    weights transformed again: its zeros stay, and the new masks are drawn regardless of them)."""
    zero = {k: float((v == 0).float().mean()) for k, v in module.state_dict().items()
            if v.dim() >= 2 and v.is_floating_point() and v.numel()}
    mostly = sorted((k for k, f in zero.items() if f >= 0.5), key=lambda k: -zero[k])
    if not mostly:
        return []
    return [f"{len(mostly)} weight tensor{'s' if len(mostly) > 1 else ''} in {weights} "
            f"{'are' if len(mostly) > 1 else 'is'} mostly zero ({mostly[0]} {zero[mostly[0]]:.0%}; a sparse model's?): "
            "the new masks are drawn regardless of them, so fewer weights are live than the density says"]


def _read_user_weights(weights: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trained state dict, and what the recipe records about it."""
    from ._io import file_sha256
    from .weights import read_state_dict

    path = Path(weights).expanduser()
    state = read_state_dict(path)
    return state, {"source": str(path.resolve()), "sha256": file_sha256(path), "tensors": len(state)}


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


def default_out(recipe: Recipe) -> Path:
    """``runs/<model>-<method>-<param>``, e.g. runs/lenet5-sparse-random-0.1 (``rundir.default_run_dir``)."""
    return default_run_dir(recipe.model, recipe.method, recipe.params.get("density", recipe.params.get("alpha")))


def transform_to_dir(model: str, method: str = "sparse-random", *, out: str | Path | None = None,
                     force: bool = False, **kwargs: Any) -> tuple[Path, TransformResult]:
    """``transform`` and save the result as a run directory (atomically); returns (its path, the TransformResult)."""
    if isinstance(model, nn.Module):
        raise UsageError("a run directory needs a replayable model: pass zoo:NAME or a file path, not a module")
    if out is not None:
        check_output_dir(out, force, replaces=RECIPE)  # before the work: a directory that cannot be written, or is taken
    result = transform(model, method, **kwargs)
    path = Path(out) if out is not None else default_out(result.recipe)
    save_run(path, result.recipe, result.model, result.summary, force=force, source_file=result.source_file,
             traced_state=result.traced_state)
    return path, result


def _unused_rules(gm: fx.GraphModule, rules: Mapping[Any, str | Rule] | None) -> str | None:
    """A note naming the ``rules`` keys no layer of the traced model is called as: a rule applies to
    a type kept whole (``--leaf``); without it the type is traced through and its rule is silently
    unused."""
    if not rules:
        return None
    mods = dict(gm.named_modules())
    called = {type(mods[n.target]) for n in gm.graph.nodes if n.op == "call_module" and n.target in mods}
    names = {n for t in called for n in type_names(t)}
    unused = [k.__name__ if isinstance(k, type) else str(k) for k in rules
              if (k not in called if isinstance(k, type) else k not in names)]
    if not unused:
        return None
    one = len(unused) == 1
    return (f"--rule {', '.join(unused)}: no layer of {'that type' if one else 'those types'} is kept whole, so the "
            f"rule is not used; add --leaf {' --leaf '.join(unused)} to keep {'it' if one else 'them'} whole and "
            f"apply it")


def load(path: str | Path, rules: Mapping[Any, str | Rule] | None = None) -> Run:
    """Load a run directory: rebuild its graph from the recipe and load its tensors.

    ``rules``: only for a run transformed with custom Rule objects (pass the same ones)."""
    return load_run(path, rules)


def inspect(target: str | Path | nn.Module, *, input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
            model_args: dict[str, Any] | None = None, leaf_modules: Sequence[str] = (),
            rules: Mapping[Any, str | Rule] | None = None) -> dict[str, Any]:
    """The per-layer report of a run directory, a model (file/zoo/module), or an .onnx file.

    For a model or run, ``channel_groups`` lists the channel groups layers write, with their size
    and, for those a pass may not freely change, why (``frozen``: never resized or removed;
    ``whole``: resized but never compacted; ``multiple``: sizes stay multiples of it).

    A run is read with the leaf types and rules it was transformed with (its recipe); ``rules``
    add to them or override them for this report. ``leaf_modules`` must be among the run's (its
    graph is rebuilt as it was traced): UsageError otherwise.
    """
    if isinstance(target, (str, Path)) and str(target).endswith(".onnx"):
        from .runtime.onnx_inspect import inspect_onnx

        given = [f for f, v in (("--input-shape", input_shape), ("--model-args", model_args),
                                ("--leaf", leaf_modules), ("--rule", rules)) if v]
        if given:  # they were taken and ignored
            raise not_applicable(given, "models and runs", "an .onnx file is inspected as it is")
        return inspect_onnx(target)
    if isinstance(target, (str, Path)) and is_run_dir(target):
        if model_args:  # taken and ignored: the run is rebuilt with its recipe's
            raise UsageError(f"--model-args: {target} is inspected as it was transformed, with its recipe's "
                             "--model-args; transform again to change them")
        recorded = read_recipe(target).leaf_modules
        extra = [leaf for leaf in leaf_modules if leaf not in recorded]
        if extra:
            raise UsageError(f"--leaf {extra[0]}: {target} was transformed with "
                             f"{' '.join(f'--leaf {t}' for t in recorded) or 'no --leaf'}, and a run is inspected "
                             "as it was traced; transform again to change its leaves")
        run = load_run(target, rules)
        registry = recipe_registry(run.recipe, rules)
        report = layer_report(run.model, input_shape or run.recipe.shapes, registry)
        original = run.summary.get("original_totals")
        if original:
            report = with_ratios(report, {"totals": original})
        report.update(method=run.recipe.method, params=run.recipe.params, model=run.recipe.model,
                      seed=run.recipe.seed, channel_groups=channel_groups(run.model, registry))
        return report
    if isinstance(target, Path) or (isinstance(target, str) and Path(target).is_dir()):
        raise UsageError(f"{target} is not a run directory, a model file, zoo:NAME or an .onnx file")
    result = transform(target, "none", input_shape=input_shape, model_args=model_args, leaf_modules=leaf_modules,
                       rules=rules)
    report = result.summary
    report["model"] = result.recipe.model
    report["channel_groups"] = channel_groups(result.model, rule_registry(rules)[0])
    return report


def channel_groups(gm: fx.GraphModule, rules: Registry | None = None) -> list[dict[str, Any]]:
    """The channel groups that layers write (shapes must be recorded on ``gm``), for reports."""
    from .passes.channel_graph import ChannelGraph

    cg = ChannelGraph.build(gm, rules=rules)
    out = []
    for g in cg.channel_groups():
        out.append({"id": g.id, "size": g.size, "layers": sorted({m.target for m in g.producers}),
                    "frozen": sorted(set(g.reasons)), "whole": sorted(set(g.whole)), "multiple": g.multiple})
    return out
