"""sparsify.pipeline: the variants of a run directory (``sparsify bench RUN``) and the one-command pipeline."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparsify import pipeline
from sparsify.cli import app
from sparsify.errors import UsageError

FAST = ["--min-time", "0.01", "--repeats", "3", "--warmup", "1", "-q", "--no-memory"]


def test_parse_variants():
    assert pipeline.parse_variants(None) == list(pipeline.VARIANTS)
    assert pipeline.parse_variants("sparse, dense,sparse") == ["sparse", "dense"]
    with pytest.raises(UsageError):
        pipeline.parse_variants(" , ")


def test_bench_run_dir_builds_dense_sparse_and_depth_variants(tmp_path):
    from sparsify.api import transform_to_dir

    run, _ = transform_to_dir("zoo:lenet5", "sparse-random", density=0.1, out=tmp_path / "run")
    js = tmp_path / "b.json"
    keep = tmp_path / "variants"
    r = CliRunner().invoke(app, ["bench", str(run), "--variants", "dense,sparse,depth", "--json-file", str(js),
                                 "--keep", str(keep), *FAST])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert [f["label"] for f in data["files"]] == ["dense", "sparse", "depth"]
    files = {f["label"]: f for f in data["files"]}
    assert files["dense"]["sparse_nodes"] == 0 and files["sparse"]["sparse_nodes"] >= 1
    assert files["depth"]["sparse_nodes"] == 0
    row = next(x for x in data["rows"] if x["label"] == "sparse")
    assert row["max_rel_diff"] < 1e-4                    # same function as the dense export
    depth = data["notes"]["depth"]
    assert 0 < depth["alpha"] < 1
    assert abs(depth["live_params"] - depth["target_live_params"]) <= 0.02 * depth["target_live_params"]
    assert sorted(p.name for p in keep.iterdir()) == ["dense.onnx", "depth.onnx", "sparse.onnx"]
    assert files["sparse"]["path"] == str(keep / "sparse.onnx")
    assert sorted(p.name for p in run.iterdir()) == ["recipe.json", "summary.json", "weights.init.safetensors",
                                                     "weights.safetensors"]
