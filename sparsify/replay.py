"""Replay: load a model, trace it, apply a method; and rebuild the graph a recipe describes.

The steps ``sparsify.api.transform`` takes to make a graph, without its reports, so that
``rundir.load_run`` can rebuild a run's graph below the API (the weights are loaded on top by the
caller). Nothing here imports ``sparsify.api``, ``sparsify.rundir`` or the CLI; a recipe is read
by attribute (``sparsify.rundir.Recipe``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.parameter import is_lazy

from ._io import file_sha256
from .errors import ModelLoadError, RunDirError, SparsifyError, UsageError
from .methods import MethodConfig, config_from_params
from .models import LoadedModel, load_model, model_file, module_name
from .passes.base import PassResult
from .passes.rules import Registry, Rule, with_user_rules
from .passes.rules.base import type_names
from .passes.trace import check_input_count, materialize_lazy, propagate_shapes, trace
from .report import input_shapes


@dataclass
class Traced:
    """A loaded model's dense graph, traced with shapes recorded on ``example``."""

    loaded: LoadedModel
    shapes: list[tuple[int, ...]]     # one per model input
    example: Any                      # a tensor, or a tuple of tensors for several inputs
    gm: fx.GraphModule
    rules: Registry | None


def rule_registry(rules: Mapping[Any, str | Rule] | None) -> tuple[Registry | None, dict[str, str]]:
    """The registry for the user's ``rules`` and what a recipe records of them (names; "custom:" for objects)."""
    if not rules:
        return None, {}
    record = {}
    for key, value in rules.items():
        name = key if isinstance(key, str) else key.__name__
        kind = type(value)
        record[name] = value if isinstance(value, str) else f"custom:{kind.__module__}.{kind.__qualname__}"
    return with_user_rules(rules), record


def load_checked(model: Any, model_args: dict[str, Any] | None, seed: int, leaf_modules: Sequence[str],
                 rule_types: Sequence[Any] = (), **where: Any) -> LoadedModel:
    """``models.load_model`` (initial weights from ``seed``; ``where``: its ``imports_dir`` and
    ``fresh``), refusing an empty layer and unknown ``--leaf`` / ``--rule`` types (``rule_types``:
    the keys of the user's rules; type objects are not checked); a model with float16 / bfloat16 /
    float64 tensors is made float32 (``loaded.dtype_note`` says so)."""
    loaded = load_model(model, model_args, seed, **where)
    check_loaded(loaded, leaf_modules, [t for t in rule_types if isinstance(t, str)])
    tensors = itertools.chain(loaded.module.parameters(), loaded.module.buffers())
    other = sorted({str(t.dtype).removeprefix("torch.") for t in tensors
                    if not is_lazy(t) and t.is_floating_point() and t.dtype != torch.float32})
    if other:
        # Masks, training and the exported kernel work in float32; in float16 an SGD step smaller
        # than the weight's rounding step is lost (a user's weights came back from training unchanged).
        loaded.module.float()
        loaded.dtype_note = (f"the model's {' and '.join(other)} parameters and buffers are float32 in the run "
                             f"(training and export run in float32); cast the trained model back if you deploy it so")
    return loaded


def check_loaded(loaded: LoadedModel, leaf_modules: Sequence[str], rule_types: Sequence[str] = ()) -> None:
    """Refuse a model with an empty layer (e.g. num_classes 0) and --leaf / --rule type names of no
    module in it."""
    types: set[str] = set()
    for name, m in loaded.module.named_modules():
        types.update(type_names(type(m)))
        for pname, p in m.named_parameters(recurse=False):
            if not is_lazy(p) and p.numel() == 0:  # a lazy layer gets its shape in trace_loaded
                raise ModelLoadError(f"{loaded.spec} has an empty layer: {name}.{pname} has shape {list(p.shape)}; "
                                     f"a width or class count of 0 in --model-args?")
    unknown = [("--leaf", t) for t in leaf_modules if t not in types] + [("--rule", t) for t in rule_types
                                                                         if t not in types]
    if unknown:
        flag, name = unknown[0]
        present = sorted({type(m).__name__ for m in loaded.module.modules()})
        raise UsageError(f"{flag} {name}: {loaded.spec} has no module of that type; its types are "
                         f"{', '.join(present[:8])}{', ...' if len(present) > 8 else ''}")


def model_input_shapes(loaded: LoadedModel, given: Any) -> list[tuple[int, ...]]:
    """One shape per model input: ``given`` (a shape, or a list of shapes) or the model's own."""
    source = given if given else loaded.input_shape
    if not source:
        raise UsageError(
            f"no input shape for {loaded.spec}: pass --input-shape N,C,H,W (\"S1;S2\" for several inputs), "
            "or define INPUT_SHAPE, INPUT_SHAPES or example_input() in the model file"
        )
    return input_shapes(source)


def example_inputs(shapes: list[tuple[int, ...]], seed: int) -> Any:
    """Random example inputs (one tensor, or a tuple for several inputs) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    xs = tuple(torch.randn(*s, generator=gen) for s in shapes)
    return xs[0] if len(xs) == 1 else xs


def trace_loaded(loaded: LoadedModel, input_shape: Any, seed: int, leaf_modules: Sequence[str],
                 rules: Registry | None, prepare: Callable[[nn.Module], None] | None = None) -> Traced:
    """Trace ``loaded`` (``leaf_modules`` kept opaque) and record shapes on an example from ``seed``: one
    input per shape, forward's other arguments at their defaults (UsageError when the count does
    not fit its signature). ``prepare`` is called on the module once its lazy layers have their
    shapes, before tracing (loading a trained state dict)."""
    shapes = model_input_shapes(loaded, input_shape)
    check_input_count(loaded.module, len(shapes))
    example = example_inputs(shapes, seed)
    materialize_lazy(loaded.module, example, seed)
    if prepare is not None:
        prepare(loaded.module)
    gm = trace(loaded.module, leaf_modules, rules, n_inputs=len(shapes), example=example)
    propagate_shapes(gm, example)
    return Traced(loaded, shapes, example, gm, rules)


def decides_graph(traced: Traced, names: Sequence[str], leaf_modules: Sequence[str]) -> bool:
    """Whether the forward of ``traced``'s model reads any of its tensors ``names`` as Python values
    (``if self.flag:``, ``float(self.temp)``), which tracing turns into branches and constants: a
    copy of the model with them changed (booleans negated, numbers moved) traces to another graph,
    or fails to trace. ``traced`` (from ``trace_loaded``) and its model are left as they are."""
    import copy

    module = copy.deepcopy(traced.loaded.module)
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in names:
            t = state.get(name)
            if t is None:
                continue
            if t.dtype == torch.bool:
                t.logical_not_()
            elif t.is_floating_point():
                t.mul_(-3.0).add_(1.7)
            else:
                t.add_(7)
    try:
        gm = trace(module, leaf_modules, traced.rules, n_inputs=len(traced.shapes), example=traced.example)
    except Exception:  # the changed values broke the forward: it reads them
        return True

    def constants(g: fx.GraphModule) -> list[torch.Tensor]:
        names = sorted({str(n.target) for n in g.graph.nodes if n.op == "get_attr"
                        and str(n.target).startswith("_tensor_constant")})
        return [getattr(g, n) for n in names]

    mine, theirs = constants(gm), constants(traced.gm)
    return gm.code != traced.gm.code or len(mine) != len(theirs) or any(
        a.shape != b.shape or not torch.equal(a, b) for a, b in zip(mine, theirs))


def apply_method(traced: Traced, config: MethodConfig, seed: int) -> PassResult:
    """Run the method's pass on the traced graph (the pass works on a copy); ``config`` must be resolved."""
    p = config.make_pass(seed, traced.rules)
    if p is None:
        propagate_shapes(traced.gm, traced.example)
        return PassResult(traced.gm)
    return p(traced.gm, traced.example)


@dataclass
class ReplaySource:
    """Where a recipe's model is rebuilt from (``replay_source``)."""

    spec: str                          # the recipe's model spec, or the run's copy of the file
    imports_dir: Path | None = None    # searched first for the file's imports (the run's copies)
    fresh: tuple[str, ...] = ()        # module names to read anew (the file's local imports)
    changed: str | None = None         # why the run's copy is used


def replay_source(recipe: Any, source_copy: str | Path | None, imports_copy: str | Path | None = None) -> ReplaySource:
    """The model to rebuild from: the recipe's, or the run's copy of the user's file (``source_copy``,
    its local imports copied under ``imports_copy``) when the original moved, or it or a local
    module it imports (``recipe.source_imports``) no longer has its recorded checksum. The local
    modules are read anew either way (a process may hold an older import of them)."""
    spec = recipe.model
    if spec.startswith(("zoo:", "torchvision:")) or source_copy is None:
        return ReplaySource(spec)
    file, _, name = spec.rpartition(":")
    original, copy_ = Path(file), Path(source_copy)
    imports = dict(getattr(recipe, "source_imports", None) or {})
    fresh = tuple(module_name(relative) for relative in imports)
    changed = f"{original} was moved or deleted" if not original.is_file() else source_change(recipe)
    if changed is None or not copy_.is_file():
        return ReplaySource(spec, None, fresh)
    # a run made before its imports were copied searches the original folder for them
    imports_dir = Path(imports_copy) if imports_copy is not None and Path(imports_copy).is_dir() else original.parent
    return ReplaySource(f"{copy_}:{name}", imports_dir, fresh, changed)


def source_change(recipe: Any) -> str | None:
    """Why the user's model file a recipe was made from (or a local module it imports) no longer
    holds what the run was made from ("tiny.py changed"); None when it does, when the recipe names
    a zoo model, or when the file is gone (the run's copy stands in for it)."""
    original = model_file(recipe.model)
    if original is None or not original.is_file():
        return None
    if file_sha256(original) != recipe.source_sha256:
        return f"{original} changed"
    imports = dict(getattr(recipe, "source_imports", None) or {})
    return next((f"{original.parent / rel}, which {original.name} imports, changed" for rel, digest in imports.items()
                 if not (original.parent / rel).is_file() or file_sha256(original.parent / rel) != digest), None)


def replay_rules(recipe: Any, rules: Mapping[Any, str | Rule] | None = None) -> dict[Any, Any]:
    """The rules a recipe was transformed with: named ones from the recipe, custom objects from ``rules``."""
    given = dict(rules or {})
    replay: dict[Any, Any] = {}
    for key, value in (recipe.rules or {}).items():
        if not value.startswith("custom:"):
            replay[key] = value
            continue
        match = [v for k, v in given.items() if (k if isinstance(k, str) else k.__name__) == key]
        if not match:
            raise RunDirError(f"the run was transformed with a custom rule for {key} ({value[7:]}); "
                              f"pass the same rules to sparsify.load(run, rules={{...}})")
        replay[key] = match[0]
    return replay


def recipe_registry(recipe: Any, rules: Mapping[Any, str | Rule] | None = None) -> Registry | None:
    """The rule registry a run was traced with (its recipe's rules, custom objects from ``rules``, and
    ``rules`` on top), for everything that reads the run's graph again (reports after training, inspect)."""
    return rule_registry({**replay_rules(recipe, rules), **(rules or {})})[0]


def trace_recipe(recipe: Any, source_copy: str | Path | None = None,
                 rules: Mapping[Any, str | Rule] | None = None, where: str = "the recipe",
                 imports_copy: str | Path | None = None, traced_state: str | Path | None = None) -> Traced:
    """The dense traced graph of a recipe's model (initial weights from its seed), before its method
    (``source_copy``, ``imports_copy``: the run's copies of the user's file and its local imports;
    ``traced_state``: a safetensors file of tensors loaded into the model before it is traced, the
    trained values tracing read as values, ``rundir.TRACED_STATE``; ignored when missing)."""
    named = replay_rules(recipe, rules)
    source = replay_source(recipe, source_copy, imports_copy)
    with _replay_errors(where):
        registry, _ = rule_registry(named or None)
        try:
            loaded = load_checked(source.spec, recipe.model_args, recipe.seed, recipe.leaf_modules,
                                  imports_dir=source.imports_dir, fresh=source.fresh)
        except ModelLoadError as e:
            if source.changed is None:
                raise
            why = str(e).removesuffix("; fix the file and retry")
            raise ModelLoadError(f"{source.changed} since the transform, so the run's copy was used, and {why}; "
                                 f"restore the file as it was, or transform again") from None
        prepare = None
        if traced_state is not None and Path(traced_state).is_file():
            from safetensors.torch import load_file

            state = load_file(str(traced_state))
            prepare = lambda module: module.load_state_dict(state, strict=False)  # noqa: E731
        return trace_loaded(loaded, recipe.shapes, recipe.seed, recipe.leaf_modules, registry, prepare)


def build_from_recipe(recipe: Any, source_copy: str | Path | None = None,
                      rules: Mapping[Any, str | Rule] | None = None, where: str = "the recipe",
                      imports_copy: str | Path | None = None, traced_state: str | Path | None = None) -> fx.GraphModule:
    """Rebuild the graph a recipe describes (weights as initialised; load tensors on top).

    ``source_copy``, ``imports_copy``: the run's copies of a user's model file and of the local
    modules it imports (used when the original moved or changed; ``replay_source``);
    ``traced_state``: see ``trace_recipe``; ``rules``:
    the Rule objects of a run transformed with custom rules (named rules replay by
    themselves); ``where``: the recipe's file, for messages. Raises ModelLoadError when the model
    cannot be built, RunDirError when the recipe cannot be replayed.
    """
    with _replay_errors(where):
        config = config_from_params(recipe.method, recipe.params)
    traced = trace_recipe(recipe, source_copy, rules, where, imports_copy, traced_state)
    with _replay_errors(where):
        model = apply_method(traced, config.resolve(traced.gm, traced.rules), recipe.seed).model
        model.meta.update(traced.gm.meta)  # what tracing found (trace.grad_mode_note, trace.training_draws_note)
        return model


class _replay_errors:
    """Errors of a replay as one line: the model cannot be rebuilt, or the recipe was edited by hand."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: Any, tb: Any) -> bool:
        if e is None or isinstance(e, RunDirError):
            return False
        if isinstance(e, ModelLoadError):
            raise ModelLoadError(f"cannot rebuild the run's model: {e}") from None
        if isinstance(e, (SparsifyError, TypeError, ValueError)):  # a recipe edited by hand: values of the wrong kind
            raise RunDirError(f"{self.where} cannot be replayed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              f"re-create the run with `sparsify transform`") from None
        return False


__all__ = ["Traced", "rule_registry", "load_checked", "check_loaded", "model_input_shapes", "example_inputs", "trace_loaded",
           "apply_method", "ReplaySource", "replay_source", "replay_rules", "trace_recipe", "build_from_recipe"]
