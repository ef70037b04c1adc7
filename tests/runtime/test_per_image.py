"""Per-image fronts: the export runs a large-activation front image by image in a Scan over the batch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper
from typer.testing import CliRunner

from sparsify.errors import ExportError, RuntimeBackendError
from sparsify.nn import SparseConv2d, SparseLinear
from sparsify.runtime import per_image
from sparsify.runtime.bench import _inspect as file_info
from sparsify.runtime.export import export_model, export_onnx_file, native_available, open_session
from sparsify.runtime.onnx_inspect import inspect_onnx, validate_model
from sparsify.runtime.onnx_sparse import DOMAIN

SHAPE = (1, 3, 64, 64)   # the first conv's output: 32 x 64 x 64 floats = 512 KiB per image, the threshold


class BatchMix(nn.Module):
    """Subtracts the batch mean: an output that depends on the other images of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class Twice(nn.Module):
    """torch.cat([x, x], 1): a Concat with twice its input's bytes (1 MiB per image after the first conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], 1)


def _net(seed: int = 0, mix: bool = False, width: int = 32, concat: bool = False) -> nn.Module:
    torch.manual_seed(seed)

    def sc(cin: int, cout: int, **kw) -> SparseConv2d:
        c = SparseConv2d(cin, cout, 3, padding=1, **kw)
        c.mask.copy_((torch.rand_like(c.mask) < 0.3).float())
        c.mask[:, 0] = 1.0                   # every filter reads something
        c.apply_mask_()
        return c

    layers = ([BatchMix()] if mix else []) + [sc(3, width), nn.BatchNorm2d(width), nn.ReLU()] + (
        [Twice()] if concat else []) + [
        sc(width * (2 if concat else 1), 32, stride=2), nn.BatchNorm2d(32), nn.ReLU(), sc(32, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), SparseLinear(32, 10)]
    m = nn.Sequential(*layers)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2)
    return m.eval()


def _x(batch: int, seed: int = 1) -> np.ndarray:
    """Noise plus a per-image, per-channel offset (pooled noise alone would give every image the same output)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, *SHAPE[1:])) + rng.uniform(-2, 2, (batch, SHAPE[1], 1, 1))).astype(np.float32)


def _paths() -> list[bool]:
    return [False] + ([True] if native_available() else [])


def _check_against_torch(path, model: nn.Module, batch: int = 4) -> None:
    x = _x(batch)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert ref.std(axis=0).mean() > 1e-3 * np.abs(ref).max()   # the images' outputs differ
    for native in _paths():
        got = open_session(path, native=native).run(None, {"input": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_large_front_runs_per_image_and_matches_torch(tmp_path) -> None:
    m = _net()
    rep = export_model(m, SHAPE, tmp_path / "s.onnx", dense_threshold=0.6, channel_align=1)
    model = onnx.load(str(tmp_path / "s.onnx"))
    assert per_image.is_split(model) and model.graph.node[0].op_type == "Scan"
    # the front ends at the last SparseConv with 512 KiB per image: the first conv (with its Relu fused)
    assert rep.per_image_nodes == per_image.front_nodes(model) == 1
    assert "image by image" in rep.per_image and rep.to_json()["per_image_nodes"] == 1
    onnx.checker.check_model(model, full_check=True)
    _check_against_torch(tmp_path / "s.onnx", m)
    # One pixel less per row and nothing reaches the threshold: the graph stays batched.
    small = export_model(m, (1, 3, 64, 63), tmp_path / "b.onnx", dense_threshold=0.6, channel_align=1)
    assert small.per_image_nodes == 0 and "no SparseConv output reaches 512 KiB" in small.per_image
    assert not per_image.is_split(onnx.load(str(tmp_path / "b.onnx")))
    # A larger Concat after it stays batched: only SparseConvs wait on memory.
    cat = _net(concat=True)
    rep = export_model(cat, SHAPE, tmp_path / "c.onnx", dense_threshold=0.6, channel_align=1)
    plain = per_image.unsplit(onnx.load(str(tmp_path / "c.onnx")))
    assert [n.op_type for n in plain.graph.node][1] == "Concat" and rep.per_image_nodes == 1
    _check_against_torch(tmp_path / "c.onnx", cat)


def test_dense_exports_and_opt_outs_stay_batched(tmp_path) -> None:
    m = _net()
    dense = export_model(m, SHAPE, tmp_path / "d.onnx", dense=True, compact=False)
    assert dense.per_image_nodes == 0 and "no SparseConv" in dense.per_image
    # counting every node (how bench_per_image_baselines splits dense baselines), its first conv counts
    plain = onnx.load(str(tmp_path / "d.onnx"))
    assert per_image.front_length(plain)[0] == 0 and per_image.front_length(plain, any_node=True)[0] >= 1
    off = export_model(m, SHAPE, tmp_path / "o.onnx", dense_threshold=0.6, per_image=False)
    assert off.per_image_nodes == 0 and not per_image.is_split(onnx.load(str(tmp_path / "o.onnx")))
    whole = export_model(m, SHAPE, tmp_path / "w.onnx", dense_threshold=0.6, per_image=True)
    model = onnx.load(str(tmp_path / "w.onnx"))
    assert [n.op_type for n in model.graph.node] == ["Scan"] and whole.per_image_nodes == len(
        per_image.unsplit(model).graph.node)
    _check_against_torch(tmp_path / "w.onnx", m)


def test_split_and_unsplit_are_inverse(tmp_path) -> None:
    export_model(_net(2), SHAPE, tmp_path / "s.onnx", dense_threshold=0.6, per_image=False)
    plain = onnx.load(str(tmp_path / "s.onnx"))
    n = len(plain.graph.node)
    for k in (1, n // 2, n):
        split = per_image.split(plain, k)
        assert per_image.front_nodes(split) == k
        back = per_image.unsplit(split)
        assert list(back.graph.node) == list(plain.graph.node)
        assert {t.name: t for t in back.graph.initializer} == {t.name: t for t in plain.graph.initializer}
        assert {v.name: v for v in back.graph.value_info} == {v.name: v for v in plain.graph.value_info}
        onnx.checker.check_model(split, full_check=True)
        x = _x(3, seed=k)
        for native in _paths():
            want = open_session(plain.SerializeToString(), native=native).run(None, {"input": x})[0]
            got = open_session(split.SerializeToString(), native=native).run(None, {"input": x})[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert per_image.unsplit(plain) is plain
    with pytest.raises(ValueError, match="outside"):
        per_image.split(plain, 0)


def test_a_model_that_mixes_images_keeps_its_batched_graph(tmp_path) -> None:
    m = _net(3, mix=True)
    for verify in (True, False):
        rep = export_model(m, SHAPE, tmp_path / f"m{verify}.onnx", dense_threshold=0.6, verify=verify)
        assert rep.per_image_nodes == 0 and "failed verification" in rep.per_image
        assert any("kept the batched graph" in n and "differs" in n and "report it" not in n for n in rep.notes)
        assert not per_image.is_split(onnx.load(str(tmp_path / f"m{verify}.onnx")))
        _check_against_torch(tmp_path / f"m{verify}.onnx", m)
    with pytest.raises(ExportError, match="verification failed") as e:  # said "the export is wrong, please report it"
        export_model(m, SHAPE, tmp_path / "forced.onnx", dense_threshold=0.6, per_image=True)
    assert "mix the images of a batch" in str(e.value) and "report" not in str(e.value)
    assert not (tmp_path / "forced.onnx").exists()


def test_readers_see_the_nodes_inside_the_front(tmp_path) -> None:
    export_model(_net(), SHAPE, tmp_path / "s.onnx", dense_threshold=0.6, channel_align=1)
    report = inspect_onnx(tmp_path / "s.onnx")
    plain_sparse = sum(n.domain == DOMAIN for n in per_image.unsplit(onnx.load(str(tmp_path / "s.onnx"))).graph.node)
    assert report["per_image_nodes"] == 1 and report["totals"]["sparse_conv_nodes"] == plain_sparse >= 3
    assert report["nodes"][0]["op"].startswith("SparseConv") and report["nodes"][0]["macs"] > 0
    assert file_info(tmp_path / "s.onnx", "s").sparse_nodes == plain_sparse
    # A damaged index array inside the Scan body is refused like one in the main graph.
    model = onnx.load(str(tmp_path / "s.onnx"))
    body = model.graph.node[0].attribute[0].g
    sparse = next(n for n in body.node if n.domain == DOMAIN)
    col = next(t for t in body.initializer if t.name == sparse.input[3])
    bad = numpy_helper.to_array(col).copy()
    bad[0] = 999
    col.CopyFrom(numpy_helper.from_array(bad, col.name))
    with pytest.raises(RuntimeBackendError, match="col_idx"):
        validate_model(model, "damaged.onnx")


def test_converting_a_split_file_and_the_cli(tmp_path) -> None:
    from sparsify.cli import app

    m = _net(4)
    export_model(m, SHAPE, tmp_path / "d.onnx", dense=True, compact=False)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "d.onnx"), "--out", str(tmp_path / "s.onnx"),
                              "--dense-threshold", "0.6"])
    assert res.exit_code == 0, res.output
    assert "per image: the first 1 of" in res.output
    assert per_image.is_split(onnx.load(str(tmp_path / "s.onnx")))
    res = runner.invoke(app, ["export", str(tmp_path / "d.onnx"), "--out", str(tmp_path / "n.onnx"),
                              "--dense-threshold", "0.6", "--no-per-image"])
    assert res.exit_code == 0 and "per image: off" in res.output
    assert not per_image.is_split(onnx.load(str(tmp_path / "n.onnx")))
    # a split file converts as its batched graph and is split again by the rule
    export_model(m, SHAPE, tmp_path / "dw.onnx", dense=True, compact=False, per_image=True)
    rep = export_onnx_file(tmp_path / "dw.onnx", tmp_path / "again.onnx", dense_threshold=0.6)
    assert rep.per_image_nodes == 1 and rep.errors["function-body"] < 1e-4
    _check_against_torch(tmp_path / "again.onnx", m)
    with pytest.raises(ExportError, match="already contains ai.sparsify"):   # its SparseConvs are seen
        export_onnx_file(tmp_path / "s.onnx", tmp_path / "twice.onnx")
    # A file with a fixed batch size has no batch axis to scan: stays batched, or one clear line if forced.
    fixed = onnx.load(str(tmp_path / "d.onnx"))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    rep = export_onnx_file(tmp_path / "fixed.onnx", tmp_path / "f.onnx", dense_threshold=0.6)
    assert rep.per_image_nodes == 0 and "no symbolic batch" in rep.per_image
    res = runner.invoke(app, ["export", str(tmp_path / "fixed.onnx"), "--out", str(tmp_path / "f2.onnx"),
                              "--dense-threshold", "0.6", "--per-image"])
    assert res.exit_code == 2 and "--per-image cannot split this model" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "f2.onnx").exists()
