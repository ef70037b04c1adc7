"""The pass contract: check what is needed, rewrite a copy, check what is promised.

In the style of ``torch/fx/passes/infra/pass_base.py``: a pass is a small class with
``requires`` (raise PassError when the input does not fit), ``call`` (rewrite a deep copy: the
given module is never edited) and ``ensures`` (shapes still propagate, the pass's own promise).
Every model rewrite of the project has this one shape, ``pass(module, example) -> PassResult``
(the module it made and its report): the transform methods (``sparsity``, ``depth_multiplier``),
compaction and BatchNorm folding (``compact``), tracing and densifying (``lowering``); export's
preparation is a list of them (``runtime/export.preparation``).
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassError, UsageError
from .trace import ensure_shapes, graphs, output_shapes, propagate_shapes


@dataclass
class PassResult:
    """A rewritten module (a GraphModule for graph passes) plus what the pass reports about it."""

    model: nn.Module
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per rewritten layer
    notes: list[str] = field(default_factory=list)
    report: Any = None  # the pass's own report, e.g. compaction's CompactionReport


class GraphPass:
    """Base class: ``__call__`` runs requires -> call (on a copy) -> ensures."""

    name = "pass"

    def requires(self, gm: fx.GraphModule, example: Any) -> None:
        """Raise PassError when ``gm`` cannot be rewritten by this pass."""

    def call(self, gm: fx.GraphModule, example: Any) -> PassResult:
        raise NotImplementedError

    def ensures(self, original: fx.GraphModule, result: PassResult, example: Any) -> None:
        """By default: the rewritten graph runs on the example and keeps the output shapes, in both
        modes of a model whose training graph differs."""
        ensure_shapes(original, example)
        before = [output_shapes(original, g) for g in graphs(original)]
        try:
            propagate_shapes(result.model, example, rewritten=True)
        except Exception as e:  # noqa: BLE001 - re-raised as the pass's broken promise
            raise PassError(f"{self.name} produced a graph that does not run ({e}); please report this") from None
        after = [output_shapes(result.model, g) for g in graphs(result.model)]
        if before != after:
            raise PassError(f"{self.name} changed the output shape from {before[0]} to {after[0]}")

    def __call__(self, gm: fx.GraphModule, example: Any) -> PassResult:
        self.requires(gm, example)
        result = self.call(copy.deepcopy(gm), example)
        if isinstance(result.model, fx.GraphModule):
            result.model.recompile()
        self.ensures(gm, result, example)
        return result


def run_passes(passes: "list[GraphPass]", model: nn.Module, example: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Run ``passes`` in order, each on the previous one's module; the last module and every
    pass's ``report`` by pass name. ``model`` is not modified (each pass rewrites a copy); each
    module between passes is freed once the next pass has its own (a ResNet-50's export held one
    100 MB copy per pass)."""
    reports: dict[str, Any] = {}
    for p in passes:
        result = p(model, example)
        model, reports[p.name] = result.model, result.report
    return model, reports


def check_fraction(value: float | None, flag: str, example: str) -> float:
    """A required parameter in (0, 1] (density, alpha); UsageError naming the flag otherwise."""
    if value is None:
        raise UsageError(f"{flag} is required for this method; give a value in (0, 1], e.g. {flag} {example}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # the API's density="0.3"
        raise UsageError(f"{flag} must be a number in (0, 1], got {value!r}; give e.g. {flag} {example}")
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise UsageError(f"{flag} {value} is outside (0, 1]; give e.g. {flag} {example}")
    return float(value)


# Seeds are 32-bit, as numpy's legacy seeding and most frameworks take them: training derives
# per-epoch and per-batch seeds from one (seed * 1_000_003 + ...), which torch's generators refused
# (an overflow traceback) from about 9.2e12 on.
MAX_SEED = 2**32 - 1


def seed_problem(seed: object) -> str | None:
    """Why ``seed`` cannot seed a transform or a training (a one-line message naming --seed), or None."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        return f"--seed must be an integer in [0, {MAX_SEED}] (32 bits), not {seed!r}"
    return None


def owner_of(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """The module holding the attribute at ``qualname`` and the attribute's name:
    ``a.b.c`` -> ``(root.a.b, "c")``, ``c`` -> ``(root, "c")``."""
    parent_name, _, leaf = qualname.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), leaf


def set_submodule(gm: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule at ``qualname`` (``a.b.c``) with ``new``."""
    parent, leaf = owner_of(gm, qualname)
    setattr(parent, leaf, new)
