"""Passes that lower a model for export: to its eval-mode fx graph, and masked layers to plain ones.

Both follow the pass contract of ``base.GraphPass`` (a copy is rewritten; the result is a
``PassResult``); ``runtime/export.preparation`` lists them with compaction and BatchNorm folding.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import PassError
from ..nn import SPARSE_LAYERS
from .base import GraphPass, PassResult, set_submodule
from .rules.base import carry_hooks
from .trace import eval_graph_module, trace


class TracePass(GraphPass):
    """Any nn.Module -> its eval-mode GraphModule (a GraphModule is reduced to its eval graph).

    Raises TraceError (``passes.trace``) naming the model line fx cannot trace."""

    name = "trace"

    def call(self, gm: nn.Module, example: Any) -> PassResult:
        import torch.fx as fx

        return PassResult(eval_graph_module(gm if isinstance(gm, fx.GraphModule) else trace(gm)))

    def ensures(self, original: nn.Module, result: PassResult, example: Any) -> None:
        """Tracing checks itself (it fails on what it cannot follow)."""


class DensifyPass(GraphPass):
    """Every SparseConv / SparseLinear (``sparsify.nn``) -> the plain layer holding its masked
    weights (and its hooks), so the exporter sees standard modules; ``report``: the names replaced."""

    name = "densify"

    def call(self, gm: nn.Module, example: Any) -> PassResult:
        names = [name for name, mod in gm.named_modules() if isinstance(mod, SPARSE_LAYERS)]
        for name in names:
            sparse = gm.get_submodule(name)
            set_submodule(gm, name, carry_hooks(sparse, sparse.to_dense()))
        return PassResult(gm, report=names)

    def ensures(self, original: nn.Module, result: PassResult, example: Any) -> None:
        left = [n for n, m in result.model.named_modules() if isinstance(m, SPARSE_LAYERS)]
        if left:
            raise PassError(f"densify left masked layers {', '.join(left)}; please report this")
