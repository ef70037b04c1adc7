"""Trace an nn.Module into a torch.fx GraphModule with shapes recorded on every node.

Sparse layers and the user's ``--leaf`` module types stay opaque (leaf modules). A model that
cannot be traced raises TraceError naming the source line and how to proceed.
"""
from __future__ import annotations

import contextlib
import logging
import re
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..errors import TraceError
from ..nn import SPARSE_LAYERS


class SparsifyTracer(fx.Tracer):
    """torch.fx tracer that keeps sparse layers and the given module types as leaves."""

    def __init__(self, leaf_types: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_types = set(leaf_types)
        self.record_stack_traces = True  # lets errors name the model's source line

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        t = type(m)
        if isinstance(m, SPARSE_LAYERS) or t.__name__ in self.leaf_types or f"{t.__module__}.{t.__qualname__}" in self.leaf_types:
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(e: BaseException) -> str:
    """``file.py:LINE`` of the deepest frame outside torch and sparsify, if any."""
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and "/sparsify/passes/" not in f and "/typer/" not in f and "/click/" not in f:
            where = f"{Path(f).name}:{frame.lineno}"
    return where


def trace(model: nn.Module, leaf_types: Sequence[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` (a GraphModule is returned as is)."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = SparsifyTracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = _user_frame(e)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}"
            + (f" at {where}" if where else "")
            + f" ({type(e).__name__}: {msg}); keep the offending submodule opaque with --leaf MODULE_TYPE"
        ) from None
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode without gradients, restoring every submodule's mode afterwards.

    Analysis forwards must not touch BatchNorm running statistics: a pass never edits its input.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes.items():
            m.training = training


class _NodeFailure(Exception):
    """A node raised while shapes were propagated."""

    def __init__(self, node: fx.Node, error: BaseException) -> None:
        super().__init__(str(error))
        self.node, self.error = node, error


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records ``tensor_meta`` on each node (torch's ShapeProp prints tracebacks)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - wrapped with the node that failed
            raise _NodeFailure(n, e) from e
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        m = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = m
        return result


def _source_line(node: fx.Node) -> str:
    """``file.py:LINE`` of the model code that created ``node``, when fx recorded it."""
    trace_text = node.meta.get("stack_trace") or ""
    found = [(f, line) for f, line in re.findall(r'File "([^"]+)", line (\d+)', trace_text)
             if "/torch/" not in f.replace("\\", "/")]
    return f"{Path(found[-1][0]).name}:{found[-1][1]}" if found else ""


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> Any:
    """Record ``tensor_meta`` (shape, dtype) on every node for an input like ``example``.

    Runs under FakeTensorMode, which computes shapes without doing the arithmetic (a ResNet-50
    takes ~0.3 s instead of a real forward); falls back to a real forward for ops that have no
    fake implementation. A failing node becomes a TraceError that names it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with eval_mode(gm), _quiet("torch._subclasses.fake_tensor"):
        try:
            try:
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                with mode:
                    return _ShapeRecorder(gm).run(mode.from_tensor(example))
            except _NodeFailure as f:
                if not _fake_unsupported(f.error):
                    raise
                return _ShapeRecorder(gm).run(example)
        except _NodeFailure as f:
            where = _source_line(f.node)
            msg = str(f.error).splitlines()[0] if str(f.error) else type(f.error).__name__
            raise TraceError(
                f"the model fails on an input of shape {tuple(example.shape)} at {f.node.name}"
                + (f" ({where})" if where else "")
                + f": {type(f.error).__name__}: {msg}; give the right shape with --input-shape N,C,H,W"
            ) from None


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a torch logger that prints tracebacks for errors we report ourselves."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _fake_unsupported(error: BaseException) -> bool:
    """True for errors that mean "fake tensors cannot run this op", not "the model is wrong"."""
    from torch._subclasses import fake_tensor as ft

    kinds = tuple(getattr(ft, k) for k in ("UnsupportedOperatorException", "DynamicOutputShapeException",
                                             "DataDependentOutputException", "UnsupportedFakeTensorException")
                  if hasattr(ft, k))
    return isinstance(error, kinds) or "data-dependent" in str(error).lower()


def has_shapes(gm: fx.GraphModule) -> bool:
    """True when every computing node already carries a recorded shape (from ``propagate_shapes``)."""
    return all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("output",))


def ensure_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Propagate shapes only when some node has none: a forward of a large model is the costly step."""
    if not has_shapes(gm):
        propagate_shapes(gm, example)


def output_shapes(gm: fx.GraphModule) -> object:
    """The recorded shapes of the graph's outputs (a tuple, or nested tuples for several outputs)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return fx.node.map_arg(out.args[0], lambda a: node_shape(a))


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` when it is a single tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
