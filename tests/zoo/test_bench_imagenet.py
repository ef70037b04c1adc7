"""The pure parts of benchmarks/bench_imagenet.py: layer table, profile arithmetic, flags, target checks.

Nothing here is timed; the synthetic profiles have the shape of ORT's (``cat``/``name``/``ts``/``dur``/``args``).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("bench_imagenet")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _tiny_model() -> onnx.ModelProto:
    """x[N,4,6,6] -> Conv 8x4x3x3 (+bias, pad 1) -> Conv 8x8x1x1 stride 2 -> Flatten -> Gemm 72->10."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("a.weight", (8, 4, 3, 3)), ("a.bias", (8,)), ("b.weight", (8, 8, 1, 1)), ("fc.weight", (10, 72)),
              ("fc.bias", (10,))]]
    nodes = [helper.make_node("Conv", ["x", "a.weight", "a.bias"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["ya", "b.weight"], ["yb"], name="conv_b", strides=[2, 2]),
             helper.make_node("Flatten", ["yb"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_conv_layers_joins_the_exports_by_weight_name(bench) -> None:
    dense = [{"node": "conv_a", "weight": "a.weight"}, {"node": "conv_b", "weight": "b.weight"}]
    sparse = [{"node": "other_name", "weight": "a.weight", "sparse": True, "density": 0.25},
              {"node": "x", "weight": "b.weight", "sparse": False, "density": 0.3}]
    layers, gemm = bench.conv_layers(_tiny_model(), dense, sparse)
    a, b = layers
    assert (a.weight, a.key, a.macs, a.sparse, a.density) == ("a.weight", (6, 6, 6, 6, 3, 3, 1, 1), 8 * 36 * 4 * 9,
                                                              True, 0.25)
    assert (b.key, b.macs, b.sparse) == ((6, 6, 3, 3, 1, 1, 1, 1), 8 * 9 * 8, False)
    assert gemm == 720
    assert bench.sparse_mac_share(layers, gemm) == pytest.approx(a.macs / (a.macs + b.macs + 720))
    # a conv the sparse export does not list counts as dense
    layers, _ = bench.conv_layers(_tiny_model(), dense, [])
    assert not any(c.sparse for c in layers) and bench.sparse_mac_share(layers, gemm) == 0.0


def _run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(ts: int, dur: int, op: str, x: tuple[int, ...] = (), w: tuple[int, ...] = (), y: tuple[int, ...] = ()) -> dict:
    args = {"op_name": op}
    if x:
        args.update(input_type_shape=[{"float": list(x)}, {"float": list(w)}], output_type_shape=[{"float": list(y)}])
    return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": args}


def test_conv_key_ignores_orts_channel_padding_but_not_planes_or_kernels(bench) -> None:
    key = bench.conv_key((1, 96, 56, 56), (24, 96, 1, 1), (1, 24, 56, 56))
    assert key == bench.conv_key((1, 96, 56, 56), (32, 96, 1, 1), (1, 32, 56, 56))      # NCHWc pads 24 -> 32
    assert key != bench.conv_key((1, 96, 56, 56), (40, 96, 1, 1), (1, 40, 56, 56))
    assert key != bench.conv_key((1, 96, 56, 56), (24, 96, 1, 1), (1, 24, 28, 28))      # stride 2
    assert key != bench.conv_key((1, 96, 56, 56), (24, 96, 3, 3), (1, 24, 56, 56))


def test_last_runs_and_time_by_op_average_the_kept_runs(bench) -> None:
    events = [_run(0, 100), _node(10, 90, "Conv"),                       # warm-up run: dropped
              _run(200, 100), _node(210, 40, "Conv"), _node(260, 20, "Add"),
              _run(400, 100), _node(410, 60, "Conv"), _node(460, 20, "Add"),
              {"cat": "Node", "name": "n_fence_before", "ts": 415, "dur": 1, "args": {"op_name": "Conv"}}]
    kept = bench.last_runs(events, 2)
    assert sum(e["cat"] == "Session" for e in kept) == 2 and len(kept) == 6
    assert bench.time_by_op(kept) == pytest.approx({"Conv": 0.05, "Add": 0.02})      # ms per run
    assert list(bench.time_by_op(kept)) == ["Conv", "Add"]

    # A per-image front: ORT profiles the Scan and, inside its time, each node of its body.
    events = [_run(0, 100), _node(5, 80, "Scan"), _node(10, 30, "SparseConv"), _node(50, 30, "SparseConv"),
              _node(90, 10, "Gemm")]
    assert bench.time_by_op(bench.last_runs(events, 1)) == pytest.approx({"SparseConv": 0.06, "Gemm": 0.01})


X, W, Y = (1, 64, 8, 8), (64, 64, 3, 3), (1, 64, 8, 8)


def _layer(bench, x, w, y, sparse: bool, density: float = 1.0):
    return bench.ConvLayer("w", bench.conv_key(x, w, y), 1, sparse, density)


def test_amdahl_bound_from_the_dense_profile(bench) -> None:
    # 80% of the time in a conv that went sparse at density 0.1, 20% elsewhere: 1 / (0.2 + 0.08)
    events = [_run(0, 100), _node(1, 80, "Conv", X, W, Y), _node(90, 20, "Relu")]
    layers = [_layer(bench, X, W, Y, True, 0.1)]
    got = bench.amdahl(events, layers)
    assert got["bound"] == pytest.approx(1 / 0.28) and got["sparse_time_share"] == pytest.approx(0.8)
    assert got["unmatched_conv_share"] == 0.0


def test_amdahl_splits_a_shared_shape_and_reports_unmatched_convs(bench) -> None:
    # two identical layers (one sparse at 0.5) share 60 units; a conv of unknown shape takes 40
    x1, w1 = (1, 64, 8, 8), (64, 1, 1, 1)                   # ORT's BatchNorm as a depthwise 1x1 conv: no layer
    events = [_run(0, 100), _node(1, 30, "Conv", X, W, Y), _node(40, 30, "FusedConv", X, W, Y),
              _node(80, 40, "Conv", x1, w1, x1)]
    layers = [_layer(bench, X, W, Y, True, 0.5), _layer(bench, X, W, Y, False)]
    got = bench.amdahl(events, layers)
    assert got["sparse_time_share"] == pytest.approx(0.3)
    assert got["bound"] == pytest.approx(100 / (100 - 15))
    assert got["unmatched_conv_share"] == pytest.approx(0.4)


def test_quick_flags_and_bad_flags(bench) -> None:
    args = bench.parse_args(["--quick"])
    assert (args.models, args.densities, args.batches, args.threads, args.rounds) == (["resnet18"], [0.1], [1], [1], 1)
    assert args.no_compact
    full = bench.parse_args([])
    assert full.models == list(bench.MODELS) and full.densities == [0.1, 0.25, 0.5]
    assert (full.batches, full.threads, full.rounds, full.no_compact) == ([1, 8], [1, 2], 3, False)
    for bad in (["--models", "resnet19"], ["--densities", "0"], ["--batch-size", "1,x"], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(bad)
        assert info.value.code == 2


def test_target_checks_cover_the_issues_targets(bench) -> None:
    def row(b: int, t: int, speed: float, vs_depth: float, sparse_ms: float) -> dict:
        return {"batch": b, "threads": t, "dense_over_sparse": speed, "sparse_over_depth": vs_depth,
                "sparse_ms": sparse_ms}

    res = {"model": "resnet50", "label": "ResNet-50", "density": 0.1, "sparse_nodes": 40,
           "rows": [row(1, 1, 3.6, 1.1, 10), row(8, 1, 2.9, 1.3, 80), row(8, 2, 4.0, 1.0, 45)]}
    checks = {what: ok for what, ok, _ in bench.target_checks([res], [1, 2])}
    assert checks["ResNet-50 d=0.1 b1 1t: sparse >= 3.5x dense"]
    assert not checks["ResNet-50 d=0.1 b8 1t: sparse >= 3.0x dense"]
    assert not checks["ResNet-50 d=0.1 b8 1t: sparse <= 1.25x the depth-multiplied model"]
    assert checks["ResNet-50 d=0.1 sparse: 2 threads >= 1.6x 1 thread at batch 8"]          # 80 / 45 = 1.78
    assert sum("0.95x" in w for w in checks) == 3
    mobile = dict(res, model="mobilenetv2-imagenet", label="MobileNetV2", density=0.25, rows=[row(1, 1, 0.9, 1, 1)])
    checks = {what: ok for what, ok, _ in bench.target_checks([mobile], [1])}
    assert checks == {"MobileNetV2 d=0.25 b1 1t: sparse >= 0.95x dense": False}
    # No layer written sparse: the file is the dense graph, so a ratio below 0.95 is timing noise.
    dense_graph = dict(mobile, density=0.5, sparse_nodes=0)
    [(what, ok, value)] = bench.target_checks([dense_graph], [1])
    assert ok and "no layer sparse" in value
