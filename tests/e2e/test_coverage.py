"""End-to-end coverage (issue 9, "done means"): small models of every reported kind through
transform (three methods), export by default, ONNX Runtime (function body and native kernel)
against ``sparsify.load(RUN).model`` in eval mode, deterministic eval outputs, and a density-1
sparse-random transform equal to the original. The grey variant (one input filter) gives
compaction real work through the sqrt(D) rule.

The default run covers a few models; the whole matrix is marked slow (CI runs it separately).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsify
from sparsify.api import transform
from sparsify.models import load_model
from sparsify.report import input_shapes
from sparsify.runtime.export import native_available, open_session

from .coverage_models import MODELS, model_file

METHODS = {"sparse-random": {"density": 0.1}, "psn": {"density": 0.1}, "depth-multiplier": {"alpha": 0.5}}
FAST = {("dropout", "sparse-random"), ("sppf", "psn"), ("resnext", "depth-multiplier"), ("tokens", "sparse-random"),
        ("dict_out", "depth-multiplier"), ("signal_1d", "sparse-random"), ("item_assign", "psn"), ("view_write", "sparse-random"),
        ("channel_pool", "depth-multiplier"), ("spatial_linear", "depth-multiplier"),
        ("zero_pad_shortcut", "depth-multiplier")}
GREY = [n for n, (_, s) in MODELS.items() if not isinstance(s[0], (tuple, list)) and s[1] == 3]


def _leaves(y):
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


def _inputs(shapes, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s[1:], generator=g) * 2.0 for s in shapes]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) / max(float(np.abs(a).max()), 1e-6)


def _check_run(path, tmp_path, shapes):
    run = sparsify.load(path)
    model = run.model.eval()
    xs = _inputs(shapes, 3, 7)
    with torch.no_grad():
        first, second = _leaves(model(*xs)), _leaves(model(*xs))
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "eval outputs must be deterministic"
    rep = sparsify.export(path, tmp_path / "m.onnx")
    assert rep.errors["function-body"] >= 0
    for native in [False] + ([True] if native_available() else []):
        sess = open_session(tmp_path / "m.onnx", native=native)
        names = [i.name for i in sess.get_inputs()]
        assert len(names) == len(shapes)
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})
        assert len(got) == len(first)
        for ref, out in zip(first, got):
            assert _rel(ref.numpy(), out) <= 1e-4, (native, _rel(ref.numpy(), out))
    return rep


# psn writes the same layers, masks and SparseConv ops as sparse-random (only the fan-in per unit
# differs), so CI's 15 minutes run it on these models beside FAST's; every model runs it under -m heavy
PSN_IN_CI = {"resnext", "dict_out", "shuffle"}
# depth-multiplier resizes whole channel groups: CI runs it (beside FAST's) on the models whose groups
# couple the most ways (concats, repeated parts, shuffles, writes, a U-Net's skips); the rest under
# -m heavy (benchmarks/verify_coverage.py runs the same checks on the cases folder and the zoo)
DM_IN_CI = {"shuffle", "unet", "dense_block", "item_assign", "self_cat"}


def _matrix():
    for name in MODELS:
        for method in METHODS:
            if (name, method) in FAST:
                marks = []
            elif (method == "psn" and name not in PSN_IN_CI) or (method == "depth-multiplier" and name not in DM_IN_CI):
                marks = [pytest.mark.slow, pytest.mark.heavy]
            else:
                marks = [pytest.mark.slow]
            yield pytest.param(name, method, marks=marks, id=f"{name}-{method}")


@pytest.mark.parametrize("name,method", list(_matrix()))
def test_model_transforms_exports_and_matches(name, method, tmp_path):
    src = tmp_path / f"{name}.py"
    src.write_text(model_file(name))
    shapes = input_shapes(MODELS[name][1])
    path, res = sparsify.transform_to_dir(str(src), method, out=tmp_path / "run", seed=0, **METHODS[method])
    rep = _check_run(path, tmp_path, shapes)
    if method != "depth-multiplier":
        assert res.summary["totals"]["sparse_layers"] >= 1


# CI's 15 minutes run the grey variant of three models where removed stem filters reach the most
# kinds of coupling (concats, shuffles, writes); every one under -m heavy
GREY_IN_CI = {"dense_block", "shuffle", "item_assign"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in GREY_IN_CI else [pytest.mark.heavy]) for n in GREY])
def test_grey_variant_compacts_what_the_sqrt_rule_removed(name, tmp_path):
    src = tmp_path / f"{name}.py"
    src.write_text(model_file(name, in_ch=1))
    shapes = input_shapes(MODELS[name][1])
    shapes = [(1, 1) + tuple(shapes[0][2:])] + shapes[1:]
    path, _ = sparsify.transform_to_dir(str(src), "sparse-random", out=tmp_path / "run", density=0.1, seed=0)
    _check_run(path, tmp_path, shapes)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in ("dropout", "unpool", "view_write") else [pytest.mark.slow])
                                  for n in MODELS])
def test_density_1_equals_the_original(name, tmp_path):
    src = tmp_path / f"{name}.py"
    src.write_text(model_file(name))
    shapes = input_shapes(MODELS[name][1])
    # the user's module itself (built as transform builds it: same seed), not a traced copy of it,
    # which would share a tracing fault (an in-place write into a view lost in both)
    original = load_model(str(src), seed=0).module.eval()
    full = transform(str(src), "sparse-random", density=1.0, include_linear=True, seed=0).model.eval()
    xs = _inputs(shapes, 2, 3)
    with torch.no_grad():
        expected = _leaves(original(*xs))
        for a, b in zip(expected, _leaves(full(*xs))):
            scale = float(a.abs().max())  # tiny_outputs' output is ~1e-18 by design: compared at its scale
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * min(1.0, scale))
            if name != "tiny_outputs" and a.numel() > 1:
                assert float(a.float().std()) > 1e-4 * scale, "a constant output checks nothing"


# The groups that Torch-Pruning 1.6 (DepGraph) resizes and that the depth multiplier must resize
# too (issue 9, "against the best-known peer"), and the ones where it breaks and sparsify must stay
# right by keeping the literal sizes: (model, module, attribute, original size, resized?).
PEER = [
    ("convnext", "norm", "normalized_shape", 16, True),          # permute + LayerNorm
    ("convnext", "", "gamma", 16, True),                        # layer scale parameter
    ("group_norm", "n1", "num_channels", 16, True),             # GroupNorm
    ("group_norm", "act", "num_parameters", 32, True),          # PReLU
    ("per_channel", "act1", "num_parameters", 16, True),        # PReLU, interpolate to a skip
    ("per_channel", "", "scale", 16, True),                     # per-channel parameter [C, 1, 1]
    ("unet", "e2.0", "out_channels", 32, True),                 # interpolate
    ("unpool", "mid.0", "out_channels", 16, True),              # MaxUnpool2d, expand_as
    ("stochastic_depth", "stem.0", "out_channels", 16, True),   # stochastic depth
    ("regnet", "b.0", "out_channels", 32, True),                # grouped conv, fixed group width
    ("resnext", "b.0", "out_channels", 32, True),               # grouped conv
    ("signal_1d", "c1", "out_channels", 16, True),              # Conv1d
    ("decoder", "t1", "out_channels", 16, True),                # ConvTranspose2d
    ("unequal_split", "stem.0", "out_channels", 24, False),     # split [8, 16]: literal sizes
    ("unequal_split", "mix.0", "out_channels", 16, True),
    ("shuffle", "stem.0", "out_channels", 16, False),           # channel shuffle
    ("slicing", "stem.0", "out_channels", 16, False),           # x[:, :8]
    ("slicing", "part.0", "out_channels", 8, True),
    ("literal_view", "a.0", "out_channels", 16, False),         # view(n, 4, 4, h, w)
    ("literal_view", "fc1", "in_features", 256, False),         # view(-1, 16 * 4 * 4)
    ("attention", "qkv", "out_features", 48, False),            # chunked qkv
    ("channel_pool", "a.0", "out_channels", 32, True),          # channel pairs pooled after unsqueeze(1)
    ("channel_pool", "b.0", "in_channels", 16, True),           # ... sized as the pool computes: a's // 2
    ("channel_pool", "b.0", "out_channels", 24, True),          # pooled to 12, interpolated to 16
    ("channel_pool", "c.0", "in_channels", 16, False),          # interpolated to 16 channels
    ("spatial_linear", "lw", "in_features", 8, False),          # Linear over W: a spatial axis
    ("spatial_linear", "stem.0", "out_channels", 16, True),
    ("spatial_linear", "tok", "in_features", 16, False),        # Linear over H*W
    ("zero_pad_shortcut", "stem.0", "out_channels", 16, False),  # padded to 32 - c
    ("zero_pad_shortcut", "a.0.0", "out_channels", 24, True),
    ("zero_pad_shortcut", "a.1.0", "out_channels", 32, False),  # the padded shortcut's width
]


def _size(model, module, attr):
    v = getattr(model.get_submodule(module) if module else model, attr)
    return int(v[0]) if isinstance(v, tuple) else int(v.shape[0]) if isinstance(v, torch.Tensor) else int(v)


@pytest.mark.parametrize("name", sorted({p[0] for p in PEER}))
def test_depth_multiplier_resizes_what_the_peer_resizes_and_keeps_literal_sizes(name, tmp_path):
    src = tmp_path / f"{name}.py"
    src.write_text(model_file(name))
    model = transform(str(src), "depth-multiplier", alpha=0.5, seed=0).model
    for _, module, attr, size, resized in (p for p in PEER if p[0] == name):
        got = _size(model, module, attr)
        assert (0 < got < size) if resized else got == size, (module, attr, got, size)
