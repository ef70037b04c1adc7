"""Passes that lower a model for export: to its eval-mode fx graph, masked layers to plain ones, and
operations torch.onnx cannot express to equivalent forms it can.

Both follow the pass contract of ``base.GraphPass`` (a copy is rewritten; the result is a
``PassResult``); ``runtime/export.preparation`` lists them with compaction and BatchNorm folding.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PassError
from ..nn import SPARSE_LAYERS
from .base import GraphPass, PassResult, set_submodule
from .rules.base import carry_hooks
from .trace import eval_graph_module, propagate_shapes, trace


class TracePass(GraphPass):
    """Any nn.Module -> its eval-mode GraphModule (a GraphModule is reduced to its eval graph).

    Raises TraceError (``passes.trace``) naming the model line fx cannot trace."""

    name = "trace"

    def call(self, gm: nn.Module, example: Any) -> PassResult:
        import torch.fx as fx

        if isinstance(gm, fx.GraphModule):
            return PassResult(eval_graph_module(gm))
        n_inputs = len(example) if isinstance(example, (tuple, list)) else 1
        return PassResult(eval_graph_module(trace(gm, n_inputs=n_inputs, example=example)))

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


def attention_as_4d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` computed through its 4-D form when query, key and value are
    3-D (``[N, L, E]`` -> ``[N, 1, L, E]``, one head; a 3-D ``attn_mask`` gains the same axis), which
    is the only rank torch.onnx's exporter expresses. Same result, same shapes; other ranks are passed
    through as given."""
    if query.dim() == key.dim() == value.dim() == 3:
        mask = kwargs.get("attn_mask", args[0] if args else None)
        if mask is not None and mask.dim() == 3:
            if args:
                args = (mask.unsqueeze(1),) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "attn_mask": mask.unsqueeze(1)}
        out = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), *args, **kwargs)
        return out.squeeze(1)
    return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)


class OnnxFormsPass(GraphPass):
    """Operations torch.onnx cannot express -> equivalent forms it can, on the eval graph (a module
    that is not a GraphModule is returned as it is): ``scaled_dot_product_attention`` on 3-D tensors
    (token models without heads) -> ``attention_as_4d``. ``report``: the nodes rewritten."""

    name = "onnx-forms"

    def call(self, gm: nn.Module, example: Any) -> PassResult:
        import torch.fx as fx

        rewritten = []
        if isinstance(gm, fx.GraphModule):
            for node in gm.graph.nodes:
                if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                    node.target = attention_as_4d
                    rewritten.append(node.name)
        return PassResult(gm, report=rewritten)

    def ensures(self, original: nn.Module, result: PassResult, example: Any) -> None:
        """A rewritten graph runs on the example and keeps the output shapes (both graphs' shapes
        recorded afresh: the input's may be from another example); nothing rewritten, nothing to check."""
        if result.report:
            propagate_shapes(original, example)
            super().ensures(original, result, example)
