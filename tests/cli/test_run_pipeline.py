"""`sparsify run`: the whole pipeline (transform -> train -> export -> bench) on the embedded default."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparsify.cli import app


def test_run_refuses_bad_options_before_any_work(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--variants", "dense,turbo", "--out", str(out), "-q"])
    assert r.exit_code == 2 and "unknown variant 'turbo'" in r.output
    r = CliRunner().invoke(app, ["run", "--batch-size", "1,x", "--out", str(out), "-q"])
    assert r.exit_code == 2 and "--batch-size" in r.output
    assert not out.exists()


def test_run_that_fails_midway_leaves_no_run_dir(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--data", "no-such-data", "--data-dir", str(tmp_path), "--out", str(out), "-q"])
    assert r.exit_code == 2 and "no-such-data" in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


# heavy (38 s, the longest of CI's slow tests): the README's first command, which every session
# runs from a fresh clone and venv before it stops; the pipeline's parts are tested in CI
# (tests/test_pipeline.py, and the run tests beside this one)
@pytest.mark.slow
@pytest.mark.heavy
def test_run_default_pipeline_leaves_run_dir_onnx_and_bench(tmp_path):
    out = tmp_path / "lenet"
    r = CliRunner().invoke(app, ["run", "--out", str(out), "--min-time", "0.05", "-q"])
    assert r.exit_code == 0, r.output
    for name in ("recipe.json", "weights.safetensors", "summary.json", "dense.onnx", "compact.onnx", "sparse.onnx",
                 "depth.onnx", "bench.json", "plot.png"):
        assert (out / name).is_file(), name
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == "zoo:lenet5" and recipe["method"] == "sparse-random"
    data = json.loads((out / "bench.json").read_text())
    assert data["baseline"] == "dense"
    assert [f["label"] for f in data["files"]] == ["dense", "compact", "sparse", "depth"]
    assert {(row["batch"], row["threads"]) for row in data["rows"]} == {(1, 1), (16, 1)}
    by = {(row["label"], row["batch"]): row for row in data["rows"]}
    # The dense, compacted and sparse exports compute the same function of the trained weights.
    for label in ("compact", "sparse"):
        for batch in (1, 16):
            assert by[(label, batch)]["max_rel_diff"] < 1e-4, (label, batch)
    # the depth variant is another model: no output difference is recorded for it
    assert by[("depth", 1)]["max_rel_diff"] is None and by[("depth", 16)]["max_rel_diff"] is None
    sparse_file = next(f for f in data["files"] if f["label"] == "sparse")
    assert sparse_file["sparse_nodes"] >= 1
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dense" in r.stdout and "sparse" in r.stdout and str(out) in r.stdout
