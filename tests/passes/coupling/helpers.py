"""Shared checks for the coupling tests: one model per pattern goes through every pass."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparsify.errors import PassError
from sparsify.nn import SPARSE_LAYERS
from sparsify.passes.channel_graph import ChannelGraph
from sparsify.passes.compact import compact
from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.sparsity import SparseRandomPass
from sparsify.passes.trace import as_inputs, trace


def build(model: nn.Module, shape=(1, 3, 8, 8), rules=None) -> ChannelGraph:
    gm = trace(model)
    return ChannelGraph.build(gm, _example(shape), rules)


def _example(shape):
    if shape and isinstance(shape[0], (tuple, list)):
        return tuple(torch.randn(*s) for s in shape)
    return torch.randn(*shape)


def group(cg: ChannelGraph, node_name: str, axis: int | None = None):
    g = cg.group_of(node_name, axis)
    assert g is not None, node_name
    return g


def calibrate(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """Set BatchNorm statistics from a few random batches so that activations are not trivial."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*as_inputs(_example([(8,) + tuple(s)[1:] for s in _shapes(shape)])))
    return model.eval()


def _shapes(shape):
    return list(shape) if shape and isinstance(shape[0], (tuple, list)) else [shape]


def outputs(y):
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


def assert_same(a: nn.Module, b: nn.Module, shape, rtol: float = 1e-5) -> None:
    """``a`` and ``b`` compute the same eval-mode function on a few scaled random inputs."""
    a, b = a.eval(), b.eval()
    with torch.no_grad():
        for scale in (1.0, 3.0):
            xs = as_inputs(_example([(2,) + tuple(s)[1:] for s in _shapes(shape)]))
            xs = tuple(x * scale for x in xs)
            for ya, yb in zip(outputs(a(*xs)), outputs(b(*xs))):
                err = float((ya - yb).abs().max())
                assert err <= rtol * max(float(ya.abs().max()), 1e-6), err


def through_every_pass(model: nn.Module, shape, alpha: float = 0.5, kill: float = 0.5, seed: int = 0,
                       resizable: bool = True, maskable: bool = True):
    """The pattern's promises, checked on the result of each pass:

    - sparse-random at density 1 computes the original function;
    - depth-multiplier runs and keeps the output shapes (its own ``ensures``), or, for a model
      with nothing ``resizable``, refuses with a PassError; at alpha 1 it computes the original
      function (no layer rebuilt);
    - compaction of a sparse version with dead filters is exact (its certificate) and removes
      only what it may (of the model itself when nothing is ``maskable``).
    Returns (depth-multiplied result or None, compacted model, compaction report).
    """
    torch.manual_seed(seed)
    model = calibrate(model, shape)
    example = _example(_shapes(shape) if len(_shapes(shape)) > 1 else shape)
    gm = trace(model)
    if resizable:
        dm = DepthMultiplierPass(alpha)(gm, example)
        assert_same(model, DepthMultiplierPass(1.0)(gm, example).model, shape)
    else:
        with pytest.raises(PassError, match="no channel group can be resized"):
            DepthMultiplierPass(alpha)(gm, example)
        dm = None
    if not maskable:
        compacted, report = compact(gm, example, align=1)
        assert_same(model, compacted, shape)
        return dm, compacted, report
    full = SparseRandomPass(1.0, include_linear=True, rescale_init=False)(gm, example)
    assert_same(model, full.model, shape)
    sparse = SparseRandomPass(0.5, include_linear=True, seed=seed)(gm, example).model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in sparse.modules():
            if isinstance(m, SPARSE_LAYERS) and m.mask.shape[0] > 1:
                dead = torch.rand(m.mask.shape[0], generator=g) < kill
                m.mask[dead] = 0
                m.apply_mask_()
    sparse = calibrate(sparse, shape)
    compacted, report = compact(sparse, example, align=1)
    assert_same(sparse, compacted, shape)
    return dm, compacted, report


def copy_model(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)
