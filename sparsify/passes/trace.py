"""Trace an nn.Module into a torch.fx GraphModule with shapes recorded on every node.

Sparse layers and the user's ``--leaf`` module types stay opaque (leaf modules). A model that
cannot be traced raises TraceError naming the source line and how to proceed.
"""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TraceError
from ..nn import SPARSE_LAYERS


class SparsifyTracer(fx.Tracer):
    """torch.fx tracer that keeps sparse layers and the given module types as leaves."""

    def __init__(self, leaf_types: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_types = set(leaf_types)

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


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> torch.Tensor:
    """Run ``example`` through ``gm`` recording ``tensor_meta`` on every node; returns the output."""
    try:
        with eval_mode(gm):
            return ShapeProp(gm).propagate(example)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraceError(
            f"the model fails on an input of shape {tuple(example.shape)} ({type(e).__name__}: {msg}); "
            "give the right shape with --input-shape N,C,H,W"
        ) from None


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` when it is a single tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
