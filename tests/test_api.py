"""The top-level Python API mirrors the CLI, stage by stage."""
from __future__ import annotations

import torch

import sparsify


def test_api_pipeline_transform_load_train_export_inspect(tmp_path):
    path, res = sparsify.transform_to_dir("zoo:lenet5", "sparse-random", density=0.2, out=tmp_path / "run")
    assert sparsify.load(path).recipe.method == "sparse-random"
    metrics = sparsify.train(path, data="synthetic", epochs=1)
    assert "test_acc" in metrics
    report = sparsify.export(path, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file() and report.sparse_layers >= 1
    onnx_report = sparsify.inspect(tmp_path / "m.onnx")
    assert onnx_report["totals"]
    run_report = sparsify.inspect(path)
    assert run_report["totals"]["sparse_layers"] == 3
    assert isinstance(sparsify.transform("zoo:mlp", "psn", density=0.1).model, torch.nn.Module)

