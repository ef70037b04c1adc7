"""The ONNX-level SparseConv rewrite: packing, the portable function body, and whole-model conversion."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sparsify.errors import ExportError
from sparsify.runtime.onnx_sparse import (DOMAIN, OP, check, convert_model, convert_onnx, pack, shared_fan_in_share,
                                         unpack)
from sparsify.runtime import native


def _session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = optimized
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _conv_model(w: np.ndarray, b: np.ndarray | None, stride: int, pad: int, dil: int, group: int,
                hw: int) -> onnx.ModelProto:
    cin = w.shape[1] * group
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if b is not None:
        inits.append(numpy_helper.from_array(b, "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", strides=[stride, stride],
                            pads=[pad, pad, pad, pad], dilations=[dil, dil], group=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _masked_weight(rng: np.random.Generator, cout: int, cin_g: int, k: int, density: float) -> np.ndarray:
    w = rng.standard_normal((cout, cin_g, k, k)).astype(np.float32)
    live = rng.random((cout, cin_g)) < density
    return w * live[:, :, None, None]


@settings(max_examples=30, deadline=None)
@given(cout=st.integers(1, 9), cin_g=st.integers(1, 7), k=st.sampled_from([1, 2, 3]),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(cout: int, cin_g: int, k: int, density: float, seed: int) -> None:
    w = _masked_weight(np.random.default_rng(seed), cout, cin_g, k, density)
    packed, row_ptr, col_idx = pack(w)
    assert row_ptr[0] == 0 and row_ptr[-1] == len(col_idx) == len(packed)
    assert np.all(np.diff(row_ptr) >= 0) and np.all((col_idx >= 0) & (col_idx < cin_g))
    np.testing.assert_array_equal(unpack(packed, row_ptr, col_idx, cin_g), w)


@settings(max_examples=25, deadline=None)
@given(cout_per_group=st.integers(1, 6), cin_g=st.integers(1, 5), group=st.sampled_from([1, 2, 3]),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), pad=st.integers(0, 2),
       dil=st.sampled_from([1, 2]), density=st.sampled_from([0.0, 0.1, 0.3, 0.5]), bias=st.booleans(),
       batch=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_function_body_equals_conv(cout_per_group: int, cin_g: int, group: int, k: int, stride: int, pad: int,
                                   dil: int, density: float, bias: bool, batch: int, seed: int) -> None:
    """The body (run by plain ORT) equals ORT's own Conv on the dense weight, empty rows included."""
    rng = np.random.default_rng(seed)
    w = _masked_weight(rng, cout_per_group * group, cin_g, k, density)
    b = rng.standard_normal(w.shape[0]).astype(np.float32) if bias else None
    hw = (k - 1) * dil + 4
    src = _conv_model(w, b, stride, pad, dil, group, hw)
    new, report = convert_model(src, dense_threshold=0.6)
    assert report.choices[0].sparse == (report.choices[0].density < 0.6)
    check(new)
    x = rng.standard_normal((batch, cin_g * group, hw, hw)).astype(np.float32)
    ref = _session(src).run(None, {"x": x})[0]
    got = _session(new).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_body_folds_to_plain_conv(tmp_path) -> None:
    """ORT constant-folds the scattered weight: the optimized graph has no Scatter/Shape left."""
    w = _masked_weight(np.random.default_rng(0), 16, 8, 3, 0.2)
    new, report = convert_model(_conv_model(w, None, 1, 1, 1, 1, 8))
    assert report.sparse_nodes == 1
    opt = tmp_path / "opt.onnx"
    _session(new, str(opt))
    ops = {n.op_type for n in onnx.load(str(opt)).graph.node}
    assert ops == {"Conv"}, ops


def test_node_layout_and_threshold() -> None:
    w = _masked_weight(np.random.default_rng(1), 8, 4, 3, 0.25)
    w[0] = 0.0  # an empty row
    new, _ = convert_model(_conv_model(w, None, 2, 1, 1, 1, 8), dense_threshold=0.6)
    (node,) = new.graph.node
    assert (node.domain, node.op_type) == (DOMAIN, OP)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1] and attrs["group"] == 1
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    packed, row_ptr, col_idx, bias = (inits[n] for n in node.input[1:])
    assert packed.shape[1:] == (3, 3) and row_ptr.dtype == np.int64 and col_idx.dtype == np.int64
    assert row_ptr[1] == 0 and not bias.any()
    assert "w" not in inits  # the dense weight is gone
    assert any(op.domain == DOMAIN for op in new.opset_import)
    # Above the threshold the node stays a Conv.
    dense, report = convert_model(_conv_model(w, None, 2, 1, 1, 1, 8), dense_threshold=0.1)
    assert dense.graph.node[0].op_type == "Conv" and not report.sparse_nodes and not dense.functions


def test_reason_tells_density_and_threshold_apart() -> None:
    """A density just under or over the threshold reads as such, not "0.20 < 0.20"."""
    w = _masked_weight(np.random.default_rng(1), 8, 4, 3, 0.25)
    density = float((w != 0).mean())
    for threshold, sparse in ((density + 0.001, True), (density - 0.001, False)):
        _, report = convert_model(_conv_model(w, None, 2, 1, 1, 1, 8), dense_threshold=threshold)
        (choice,) = report.choices
        d, t = choice.reason.split()[1], choice.reason.split()[3]
        assert choice.sparse is sparse and d != t and (float(d) < float(t)) is sparse, choice.reason


def test_a_rule_that_keeps_every_density_dense_reads_as_itself() -> None:
    # "density 0.25 >= 0.00 (strided conv with 32 < 64 input channels per group)"
    w = _masked_weight(np.random.default_rng(2), 16, 8, 3, 0.25)
    _, report = convert_model(_conv_model(w, None, 2, 1, 1, 1, 32))
    (choice,) = report.choices
    assert not choice.sparse and choice.reason == "strided conv with 8 < 64 input channels per group"
    dilated = convert_model(_conv_model(w, None, 1, 2, 2, 1, 32))[1].choices[0]
    assert not dilated.sparse and dilated.reason == "dilated conv (no fast sparse path)"


class _Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c1, c2 = 4 + seed % 5, 6 + seed % 3
        self.a = nn.Conv2d(3, c1, 3, padding=1)
        self.bn = nn.BatchNorm2d(c1)
        self.b = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(c2, c2, 3, padding=1, groups=c2)
        self.pw = nn.Conv2d(c2, c1, 1)
        self.fc = nn.Linear(c1, 5)
        with torch.no_grad():
            for m in (self.a, self.b, self.dw, self.pw):
                keep = (torch.rand(m.weight.shape[:2], generator=g) < 0.35).float()
                m.weight.mul_(keep[:, :, None, None])
            self.bn.running_mean.uniform_(-1, 1, generator=g)
            self.bn.running_var.uniform_(0.5, 2, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.a(x)))
        y = torch.relu(self.b(x))
        y = self.pw(torch.relu(self.dw(y))) + torch.nn.functional.avg_pool2d(x, 2)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_convert_torch_exported_net(seed: int, tmp_path) -> None:
    """A masked net exported by torch.onnx, converted: ORT output equals torch at batch 1 and 3."""
    net = _Net(seed).eval()
    src = tmp_path / "dense.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            prog = torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), dynamo=True, opset_version=18, verbose=False,
                                     input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        finally:
            logging.disable(logging.NOTSET)
    prog.save(str(src))
    out = tmp_path / "sparse.onnx"
    report = convert_onnx(src, out)
    assert report.sparse_nodes >= 2  # the 1x1 at density ~0.35 on 8x8 stays dense (rule: 0.2)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    sess = _session(model)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs(tmp_path) -> None:
    w = _masked_weight(np.random.default_rng(2), 4, 4, 3, 0.2)
    with pytest.raises(ExportError, match="does not exist"):
        convert_onnx(tmp_path / "missing.onnx", tmp_path / "o.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        convert_onnx(junk, tmp_path / "o.onnx")
    with pytest.raises(Exception, match="does not exist"):
        convert_onnx(_conv_model(w, None, 1, 1, 1, 1, 8), tmp_path / "nodir" / "o.onnx")
    assert not list(tmp_path.glob("**/*.tmp"))
    converted, _ = convert_model(_conv_model(w, None, 1, 1, 1, 1, 8))
    with pytest.raises(ExportError, match="already contains"):
        convert_model(converted)


@pytest.mark.parametrize("hw,density,sparse", [(1, 0.05, False), (2, 0.4, True), (2, 0.5, False),
                                               (3, 0.1, True), (3, 0.2, False), (4, 0.6, True), (7, 0.3, True),
                                               (7, 0.5, False), (8, 0.6, True), (14, 0.7, False), (16, 0.7, True)])
def test_per_layer_rule_by_plane(hw: int, density: float, sparse: bool) -> None:
    """The default rule writes SparseConv only where bench_kernel measured it faster: never on a
    1x1 plane (nine taps computed for one), up to 0.45 on 2x2, 0.12 on 3x3, 0.7 on 4x4, 0.4 on
    5x5..7x7 (crossovers 0.46-0.66), 0.65 on 8x8..15x15, 0.75 from 16x16 up."""
    rng = np.random.default_rng(hw)
    w = _masked_weight(rng, 64, 64, 3, density)
    new, report = convert_model(_conv_model(w, None, 1, 1, 1, 1, hw))
    assert any(n.op_type == "SparseConv" for n in new.graph.node) == sparse, report


def _assert_computes_the_same(src: onnx.ModelProto, new: onnx.ModelProto, x: np.ndarray) -> None:
    """``new`` (converted) gives ``src``'s outputs on input ``x`` through its function bodies and,
    where the kernel loads, natively on 2 threads."""
    ref = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    outs = [ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})]
    if native.info()["loadable"]:
        outs.append(native.session(new.SerializeToString(), 2).run(None, {"x": x}))
    for out in outs:
        for y, r in zip(out, ref):
            np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


def _relu_chain_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> conv a -> Relu -> conv b -> Relu -> conv c -> Relu (c's output is also a graph output)
    and conv b's output also feeds an Add: only a's Relu can be fused."""
    n = helper.make_node
    ws = {k: _masked_weight(rng, 16, 16, 3, 0.3) for k in "abc"}
    nodes = [n("Conv", ["x", "wa"], ["ya"], pads=[1] * 4, name="a"), n("Relu", ["ya"], ["ra"]),
             n("Conv", ["ra", "wb"], ["yb"], pads=[1] * 4, name="b"), n("Relu", ["yb"], ["rb"]),
             n("Add", ["rb", "yb"], ["sb"]),
             n("Conv", ["sb", "wc"], ["yc"], pads=[1] * 4, name="c"), n("Relu", ["yc"], ["rc"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("rc", TensorProto.FLOAT, [None] * 4),
         helper.make_tensor_value_info("yc", TensorProto.FLOAT, [None] * 4)],
        [numpy_helper.from_array(w, f"w{k}") for k, w in ws.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_relu_fused_only_where_it_is_the_sole_reader() -> None:
    """SparseConv -> Relu becomes SparseConvRelu when nothing else reads the conv output; the
    result passes the full checker and computes the same through the function body and the
    native kernel as the original dense graph."""
    src = _relu_chain_model(np.random.default_rng(3))
    new, report = convert_model(src, dense_threshold=0.6)
    check(new)
    ops = {nd.name: nd.op_type for nd in new.graph.node if nd.domain == DOMAIN}
    assert ops == {"a": "SparseConvRelu", "b": "SparseConv", "c": "SparseConv"}
    assert [c.activation for c in report.choices] == ["Relu", "", ""]
    assert sum(nd.op_type == "Relu" for nd in new.graph.node) == 2
    assert sorted(f.name for f in new.functions) == ["SparseConv", "SparseConvRelu"]
    _assert_computes_the_same(src, new, np.random.default_rng(4).standard_normal((2, 16, 8, 8)).astype(np.float32))


@pytest.mark.parametrize("hw,density,sparse", [(2, 0.05, False), (4, 0.05, False), (6, 0.05, False), (7, 0.15, True),
                                               (7, 0.3, False), (8, 0.15, True), (8, 0.3, False), (16, 0.2, True),
                                               (16, 0.35, False), (56, 0.25, True)])
def test_pointwise_rule_by_plane(hw: int, density: float, sparse: bool) -> None:
    """1x1 convs go sparse only on planes of 7x7 and more, where bench measured the kernel faster
    (crossovers 0.30-0.40 on 7x7, 0.36-0.56 from 14x14 up with 64 input channels; on 2x2 planes it
    ran 3-5x slower than ORT's Conv even at density 0.1)."""
    rng = np.random.default_rng(hw)
    w = _masked_weight(rng, 96, 64, 1, density)
    new, report = convert_model(_conv_model(w, None, 1, 0, 1, 1, hw))
    assert any(n.op_type == "SparseConv" for n in new.graph.node) == sparse, report


def test_shared_fan_in_share_follows_the_kernels_walk() -> None:
    """Blocks of 4 consecutive channels with one non-empty row, taken from channel 0 (a run of 6
    gives one block and two single channels; runs stop at group boundaries and at empty rows)."""
    rows = np.eye(5, dtype=bool)
    live = rows[[0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3]]
    assert shared_fan_in_share(live) == 12 / 15  # blocks 0-3, 7-10, 11-14
    # groups of 5 (channels 0-4, 5-9, 10-14): 7-9 are cut from 10, 10 from 11-14
    assert shared_fan_in_share(live, group=3) == 8 / 15
    empty = np.zeros((8, 5), bool)
    assert shared_fan_in_share(empty) == 0.0
    assert shared_fan_in_share(rows[[0, 1, 0, 1, 0, 1, 0, 1]]) == 0.0
    # Regrouped (strided 3x3 / 7x7): every 4 channels of a group with one fan-in, wherever they are;
    # empty rows never count.
    assert shared_fan_in_share(rows[[0, 1, 0, 1, 0, 1, 0, 1]], regroup=True) == 1.0
    mixed = np.vstack([rows[[0, 1, 2, 0, 1, 0, 0, 1, 1, 2]], empty[:6]])
    assert shared_fan_in_share(mixed, regroup=True) == 8 / 16  # four of row 0, four of row 1
    assert shared_fan_in_share(mixed, group=2, regroup=True) == 4 / 16  # rows 0, 1, 2, 0, 1, 0, 0, 1 | 1, 2, empty
    assert shared_fan_in_share(live, regroup=True) == 12 / 15


@pytest.mark.parametrize("k,hw,stride,density,block,sparse", [
    (1, 56, 1, 0.5, 4, True), (1, 56, 1, 0.5, 1, False), (1, 14, 1, 0.8, 4, True), (1, 14, 1, 0.9, 4, False),
    (1, 7, 1, 0.8, 4, True), (1, 7, 1, 0.9, 4, False), (1, 7, 1, 0.3, 1, False), (1, 11, 1, 0.45, 4, True),
    (1, 11, 1, 0.6, 4, False), (1, 56, 2, 0.5, 4, True), (1, 28, 2, 0.45, 4, True),
    (1, 28, 2, 0.45, 1, False), (1, 4, 1, 0.1, 4, False),
    (3, 56, 2, 0.55, 4, True), (3, 56, 2, 0.55, 1, False), (3, 56, 2, 0.75, 4, False),
    (3, 14, 2, 0.7, 4, True), (3, 14, 2, 0.8, 4, False), (3, 14, 2, 0.35, 1, False),
    (3, 7, 1, 0.7, 4, True), (3, 7, 1, 0.8, 4, False), (3, 7, 1, 0.5, 1, False), (3, 14, 1, 0.7, 4, False)])
def test_rule_with_shared_fan_ins(k: int, hw: int, stride: int, density: float, block: int, sparse: bool) -> None:
    """Convs whose output channels share fan-ins in blocks of 4 (the transform's --block 4) go
    sparse further (bench_kernel --blocks 4): 1x1 up to 0.85 on outputs of 14x14 and more and on
    7x7 (crossovers above 0.9; 11x11, whose 9 left-over pixels take a masked vector, 0.5),
    3x3/s2 up to 0.65 (crossovers 0.72-0.83) and to 7x7 0.75 (0.90), 3x3/s1 on 7x7 0.75 (0.89;
    14x14 keeps the plain 0.65), where masks drawn per channel stay dense above 0.2-0.4."""
    rng = np.random.default_rng(hw + block + k)
    fan_ins = rng.random((-(-128 // block), 64)) < density
    live = np.repeat(fan_ins, block, axis=0)[:128]
    w = rng.standard_normal((128, 64, k, k)).astype(np.float32) * live[:, :, None, None]
    new, report = convert_model(_conv_model(w, None, stride, k // 2, 1, 1, hw))
    assert any(n.op_type == "SparseConv" for n in new.graph.node) == sparse, report
    if sparse:
        x = rng.standard_normal((2, 64, hw, hw)).astype(np.float32)
        ref = _session(_conv_model(w, None, stride, k // 2, 1, 1, hw)).run(None, {"x": x})[0]
        y = native.session(new.SerializeToString(), 2).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("k,hw,density,sparse", [(3, 4, 0.08, False), (3, 8, 0.08, False), (3, 12, 0.08, False),
                                                 (3, 14, 0.2, True), (3, 14, 0.3, False), (3, 28, 0.35, True),
                                                 (3, 28, 0.45, False), (1, 14, 0.15, True), (1, 14, 0.25, False),
                                                 (1, 56, 0.25, True), (1, 56, 0.35, False)])
def test_strided_rule_by_plane(k: int, hw: int, density: float, sparse: bool) -> None:
    """Strided convs go sparse only when their output plane is 7x7 or more: 3x3/s2 below 0.25 to
    7x7 (crossovers 0.34-0.39) and 0.4 to 14x14 and more (0.47-0.55); 1x1/s2 below 0.2 and 0.3
    (0.29-0.37, 0.39-0.55)."""
    rng = np.random.default_rng(hw)
    w = _masked_weight(rng, 128, 64, k, density)
    new, report = convert_model(_conv_model(w, None, 2, k // 2, 1, 1, hw))
    assert any(n.op_type == "SparseConv" for n in new.graph.node) == sparse, report


def test_clip_fused_when_its_bounds_are_constant() -> None:
    """Conv -> Clip(0, 6) (ReLU6, bounds as initializers) becomes SparseConvClip carrying the
    bounds; a Clip whose bound is computed at run time stays a node of its own. Both files pass
    the checker and compute what the dense graph does, through the function body and natively."""
    rng = np.random.default_rng(8)
    n = helper.make_node
    nodes = [n("Conv", ["x", "wa"], ["ya"], pads=[1] * 4, name="a"), n("Clip", ["ya", "lo", "hi"], ["ra"]),
             n("Conv", ["ra", "wb"], ["yb"], pads=[1] * 4, name="b"), n("ReduceMax", ["ra"], ["m"], keepdims=0),
             n("Clip", ["yb", "lo", "m"], ["rb"])]
    inits = [numpy_helper.from_array(_masked_weight(rng, 16, 16, 3, 0.3), "wa"),
             numpy_helper.from_array(_masked_weight(rng, 16, 16, 3, 0.3), "wb"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info("rb", TensorProto.FLOAT, [None] * 4)], inits)
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    new, report = convert_model(src, dense_threshold=0.6)
    check(new)
    ops = {nd.name: nd for nd in new.graph.node if nd.domain == DOMAIN}
    assert ops["a"].op_type == "SparseConvClip" and ops["b"].op_type == "SparseConv"
    bounds = {a.name: a.f for a in ops["a"].attribute if a.name in ("min", "max")}
    assert bounds == {"min": 0.0, "max": 6.0}
    assert [c.activation for c in report.choices] == ["Clip", ""]
    x = 3 * np.random.default_rng(9).standard_normal((2, 16, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (ref > 0).any()
    outs = [ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]]
    if native.info()["loadable"]:
        outs.append(native.session(new.SerializeToString(), 2).run(None, {"x": x})[0])
    for y in outs:
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _residual_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Two ResNet blocks and a MobileNetV2-style one on 8x8 planes:
    block 1: a -> Relu -> b, Add(b, x) -> Relu           (identity shortcut: b absorbs Add + Relu)
    block 2: c (stride 2), d (1x1/s2 shortcut), Add(d, c) -> Relu (both convs: the later one, d, absorbs it)
    block 3: e, Add(e, r2) without Relu -> SparseConvAdd
    then f, Add(f, bias [1, 16, 1, 1]) -> Relu: a broadcasting Add, left alone;
    and g whose output is also a graph output, Add(g, r3): left alone."""
    n = helper.make_node
    ws = {k: _masked_weight(rng, 16, 16, 3, 0.3) for k in "abcefg"}
    ws["d"] = _masked_weight(rng, 16, 16, 1, 0.3)
    p1 = dict(pads=[1] * 4)
    nodes = [n("Conv", ["x", "wa"], ["ya"], name="a", **p1), n("Relu", ["ya"], ["ra"]),
             n("Conv", ["ra", "wb"], ["yb"], name="b", **p1), n("Add", ["yb", "x"], ["sb"]), n("Relu", ["sb"], ["r1"]),
             n("Conv", ["r1", "wc"], ["yc"], name="c", strides=[2, 2], **p1),
             n("Conv", ["r1", "wd"], ["yd"], name="d", strides=[2, 2]),
             n("Add", ["yd", "yc"], ["s2"]), n("Relu", ["s2"], ["r2"]),
             n("Conv", ["r2", "we"], ["ye"], name="e", **p1), n("Add", ["r2", "ye"], ["r3"]),
             n("Conv", ["r3", "wf"], ["yf"], name="f", **p1), n("Add", ["yf", "bias"], ["sf"]), n("Relu", ["sf"], ["r4"]),
             n("Conv", ["r4", "wg"], ["yg"], name="g", **p1), n("Add", ["yg", "r3"], ["out"])]
    inits = [numpy_helper.from_array(w, f"w{k}") for k, w in ws.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((1, 16, 1, 1)).astype(np.float32), "bias"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4),
         helper.make_tensor_value_info("yg", TensorProto.FLOAT, [None] * 4)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_residual_add_fused_where_it_does_not_broadcast() -> None:
    """Conv -> Add(., Z) (-> Relu) becomes SparseConvAdd(Relu) where Z has the output's shape and
    the Add is the conv's only reader; the result passes the full checker and computes what the
    unfused dense graph does, through the function bodies (plain ORT) and natively (1 and 2
    threads, batch 1 and 5)."""
    src = _residual_model(np.random.default_rng(5))
    new, report = convert_model(src, dense_threshold=0.6)
    check(new)
    ops = {nd.name: nd.op_type for nd in new.graph.node if nd.domain == DOMAIN}
    assert ops == {"a": "SparseConvRelu", "b": "SparseConvAddRelu", "c": "SparseConv", "d": "SparseConvAddRelu",
                   "e": "SparseConvAdd", "f": "SparseConv", "g": "SparseConv"}
    assert {c.node: c.activation for c in report.choices}["b"] == "AddRelu"
    fused = {nd.name: nd for nd in new.graph.node if nd.domain == DOMAIN}
    assert list(fused["b"].input[5:]) == ["x"] and list(fused["d"].input[5:]) == ["yc"]
    assert sorted(nd.op_type for nd in new.graph.node if nd.domain != DOMAIN) == ["Add", "Add", "Relu"]
    assert {f.name for f in new.functions} == {"SparseConv", "SparseConvRelu", "SparseConvAdd", "SparseConvAddRelu"}
    dense = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"])
    body = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    sessions = [body]
    if native.info()["loadable"]:
        sessions += [native.session(new.SerializeToString(), t) for t in (1, 2)]
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 16, 8, 8)).astype(np.float32)
        ref = dense.run(None, {"x": x})
        for sess in sessions:
            for y, r in zip(sess.run(None, {"x": x}), ref):
                np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


def test_residual_add_needs_known_equal_shapes() -> None:
    """Without shape information (dynamic planes) the Add stays a node: a broadcast cannot be ruled out."""
    rng = np.random.default_rng(6)
    n = helper.make_node
    nodes = [n("Conv", ["x", "wa"], ["ya"], name="a", pads=[1] * 4), n("Add", ["ya", "z"], ["out"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, "H", "W"]),
                     helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 16, "H2", "W2"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4)],
        [numpy_helper.from_array(_masked_weight(rng, 16, 16, 3, 0.3), "wa")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    new, _ = convert_model(model, dense_threshold=0.6)
    assert [nd.op_type for nd in new.graph.node] == ["SparseConv", "Add"]


def _mobile_block(rng: np.random.Generator, cin: int, hidden: int, hw: int, silu: bool = False,
                  density: float = 0.1, dw_dilation: int = 1, project_density: float = 0.1,
                  dw_stride: int = 1) -> onnx.ModelProto:
    """x -> 1x1 expand (cin -> hidden) -> ReLU6 (or SiLU) -> depthwise 3x3 -> ReLU6 -> 1x1 project (hidden -> cin).
    dw_dilation=2: a depthwise conv the native kernel has no path for (ORT runs it, in NCHWc)."""
    n = helper.make_node
    act = ([n("Sigmoid", ["e"], ["es"]), n("Mul", ["e", "es"], ["ea"])] if silu
           else [n("Clip", ["e", "lo", "hi"], ["ea"])])
    nodes = [n("Conv", ["x", "we"], ["e"], name="expand"), *act,
             n("Conv", ["ea", "wd"], ["d"], name="dw", pads=[dw_dilation] * 4, dilations=[dw_dilation] * 2,
               strides=[dw_stride] * 2, group=hidden),
             n("Clip", ["d", "lo", "hi"], ["da"]),
             n("Conv", ["da", "wp"], ["y"], name="project")]
    inits = [numpy_helper.from_array(_masked_weight(rng, hidden, cin, 1, density), "we"),
             numpy_helper.from_array(rng.standard_normal((hidden, 1, 3, 3)).astype(np.float32), "wd"),
             numpy_helper.from_array(_masked_weight(rng, cin, hidden, 1, project_density), "wp"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("cin,hidden,hw,silu,expand_sparse", [(16, 96, 112, False, False), (16, 96, 112, True, False),
                                                              (24, 144, 56, False, True), (32, 192, 28, True, True)])
def test_layout_cost_keeps_layers_next_to_nchwc_convs_dense(cin: int, hidden: int, hw: int, silu: bool,
                                                           expand_sparse: bool) -> None:
    """A 1x1 expansion feeding a depthwise Conv that ORT runs in NCHWc (a dilated one: the native
    kernel has no depthwise path for it) stays dense where reordering its output would cost more
    than the sparse kernel saves (16->96 on 112x112: 0.44 ms of reorder for 0.33 ms saved;
    MobileNetV2 ran 1.53x faster than dense with it sparse, 1.72x dense), and goes sparse on
    smaller planes; the projection after the depthwise conv is sparse either way. Outputs equal
    the dense graph's."""
    rng = np.random.default_rng(hw)
    src = _mobile_block(rng, cin, hidden, hw, silu, dw_dilation=2)
    new, report = convert_model(src)
    check(new)
    choices = {c.node: c for c in report.choices}
    assert choices["expand"].sparse == expand_sparse, choices["expand"].reason
    assert choices["project"].sparse and not choices["dw"].sparse
    if not expand_sparse:
        assert "NCHWc" in choices["expand"].reason
    x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
    ref = _session(src).run(None, {"x": x})[0]
    sessions = [_session(new)] + ([native.session(new.SerializeToString(), 1)] if native.info()["loadable"] else [])
    for sess in sessions:
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_layout_cost_counts_channel_counts_that_are_not_whole_nchwc_blocks() -> None:
    """ORT pads a group-1 Conv's 24 channels to two blocks and runs it in NCHWc like any other, so a
    24 -> 144 expansion at density 0.5 (alone 1.3x faster sparse, under the 0.6 threshold for 24
    input channels) would cost a reorder before the depthwise conv for almost no saving: it stays
    dense (it went sparse when the cost model took 24-channel convs for NCHW ones, and MobileNetV2
    at density 0.5 ran at 0.89x of dense)."""
    rng = np.random.default_rng(24)
    src = _mobile_block(rng, 24, 144, 56, density=0.5, dw_dilation=2)
    new, report = convert_model(src)
    check(new)
    expand = {c.node: c for c in report.choices}["expand"]
    assert expand.density == pytest.approx(0.5, abs=0.05)
    assert not expand.sparse and "NCHWc" in expand.reason, expand.reason
    x = rng.standard_normal((1, 24, 56, 56)).astype(np.float32)
    np.testing.assert_allclose(_session(new).run(None, {"x": x})[0], _session(src).run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("silu", [False, True])
def test_depthwise_conv_between_sparse_layers_runs_as_sparseconv(silu: bool) -> None:
    """A depthwise 3x3 between two sparse 1x1 convs is written as SparseConv (density 1, one
    connection per channel; the native kernel's depthwise path): the block stays NCHW, so the
    16->96 expansion on 112x112 that a reorder kept dense next to ORT's NCHWc depthwise conv goes
    sparse too. Its ReLU6 is fused. Outputs equal the dense graph's, through the function body and
    natively."""
    rng = np.random.default_rng(96)
    src = _mobile_block(rng, 16, 96, 112, silu)
    new, report = convert_model(src)
    check(new)
    choices = {c.node: c for c in report.choices}
    assert all(choices[k].sparse for k in ("expand", "dw", "project")), [c.reason for c in report.choices]
    assert choices["dw"].density == 1.0 and "depthwise" in choices["dw"].reason
    ops = [nd.op_type for nd in new.graph.node if nd.domain == DOMAIN]
    assert len(ops) == 3 and "SparseConvClip" in ops
    x = rng.standard_normal((2, 16, 112, 112)).astype(np.float32)
    ref = _session(src).run(None, {"x": x})[0]
    sessions = [_session(new)] + ([native.session(new.SerializeToString(), 1)] if native.info()["loadable"] else [])
    for sess in sessions:
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_depthwise_conv_between_dense_layers_stays_conv() -> None:
    """Where both 1x1 neighbours stay dense (density 0.9), the depthwise conv stays ORT's Conv: as a
    SparseConv it would only add reorders out of and back into the NCHWc layout."""
    rng = np.random.default_rng(5)
    src = _mobile_block(rng, 32, 192, 28, density=0.9, project_density=0.9)
    new, report = convert_model(src)
    assert not any(c.sparse for c in report.choices), [c.reason for c in report.choices]
    assert [nd.op_type for nd in new.graph.node if nd.op_type == "Conv"] == ["Conv"] * 3


def test_depthwise_conv_stays_conv_next_to_a_layer_sparse_without_a_saving() -> None:
    """At density 0.5 the 16->96 expansion on 112x112 is under its rule's threshold (0.6) but saves
    nothing by the layout cost model, and the projection stays dense: the stride-2 depthwise conv
    between them stays ORT's Conv and the expansion dense (written for the layout, the pair made
    MobileNetV2 at density 0.5 0.98x of dense)."""
    rng = np.random.default_rng(50)
    src = _mobile_block(rng, 16, 96, 112, density=0.5, project_density=0.5, dw_stride=2)
    new, report = convert_model(src)
    choices = {c.node: c for c in report.choices}
    assert not any(c.sparse for c in report.choices), [c.reason for c in report.choices]
    assert "NCHWc" in choices["expand"].reason
    assert [nd.op_type for nd in new.graph.node if nd.op_type == "Conv"] == ["Conv"] * 3


@pytest.mark.parametrize("k,density,sparse", [(5, 0.46, False), (3, 0.4, True)])
def test_layout_cost_keeps_a_stem_dense_before_an_nchwc_depthwise_conv(k: int, density: float, sparse: bool) -> None:
    """A 3-channel stem (kxk/s2 to 112x112) feeding a depthwise Conv: ORT's NCHWc Conv reads the NCHW
    image directly, so dense it costs no reorder into the blocked layout while sparse its 32x112x112
    output must be reordered; at density 0.45 a 5x5 stem saves less than that reorder and stays
    dense (the cost model charged the dense stem a reorder of the image before), a 3x3 one, whose
    channels the kernel regroups by fan-in into blocks of four, saves more and goes sparse (measured
    0.37 -> 0.17-0.29 ms at 1/3-2/3, a 0.05 ms reorder). Outputs equal the dense graph's."""
    rng = np.random.default_rng(3)
    n = helper.make_node
    nodes = [n("Conv", ["x", "ws"], ["s"], name="stem", pads=[k // 2] * 4, strides=[2, 2]),
             n("Clip", ["s", "lo", "hi"], ["sa"]),
             n("Conv", ["sa", "wd"], ["y"], name="dw", pads=[1] * 4, group=32)]
    inits = [numpy_helper.from_array(_masked_weight(rng, 32, 3, k, density), "ws"),
             numpy_helper.from_array(rng.standard_normal((32, 1, 3, 3)).astype(np.float32), "wd"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    new, report = convert_model(src)
    check(new)
    stem = {c.node: c for c in report.choices}["stem"]
    assert stem.sparse == sparse and ("NCHWc" in stem.reason) != sparse, stem.reason
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(_session(new).run(None, {"x": x})[0], _session(src).run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def _dense_block(rng: np.random.Generator) -> onnx.ModelProto:
    """A DenseNet layer and transition on 8x8 planes: concat -> BN -> Relu -> 1x1 (b) -> Relu -> 3x3 (c),
    concat -> BN -> Relu -> 1x1 (t); and a BN -> Relu whose output is also read by a Mul (left alone)."""
    n = helper.make_node
    c0 = 16
    bn = lambda name, c: [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), f"{name}_g"),
                          numpy_helper.from_array(rng.uniform(-0.5, 0.5, c).astype(np.float32), f"{name}_b"),
                          numpy_helper.from_array(rng.uniform(-0.3, 0.3, c).astype(np.float32), f"{name}_m"),
                          numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), f"{name}_v")]
    nodes = [n("Conv", ["x", "wa"], ["a"], name="a", pads=[1] * 4), n("Concat", ["x", "a"], ["cat"], axis=1),
             n("BatchNormalization", ["cat", "n1_g", "n1_b", "n1_m", "n1_v"], ["bn1"], epsilon=1e-5),
             n("Relu", ["bn1"], ["r1"]), n("Conv", ["r1", "wb"], ["yb"], name="b"), n("Relu", ["yb"], ["rb"]),
             n("Conv", ["rb", "wc"], ["yc"], name="c", pads=[1] * 4), n("Concat", ["cat", "yc"], ["cat2"], axis=1),
             n("BatchNormalization", ["cat2", "n2_g", "n2_b", "n2_m", "n2_v"], ["bn2"], epsilon=1e-3),
             n("Relu", ["bn2"], ["r2"]), n("Conv", ["r2", "wt"], ["yt"], name="t"),
             n("BatchNormalization", ["yt", "n3_g", "n3_b", "n3_m", "n3_v"], ["bn3"]), n("Relu", ["bn3"], ["r3"]),
             n("Conv", ["r3", "wu"], ["yu"], name="u"), n("Mul", ["r3", "r3"], ["sq"]), n("Add", ["yu", "sq"], ["out"])]
    inits = [numpy_helper.from_array(_masked_weight(rng, c0, c0, 3, 0.3), "wa"),
             numpy_helper.from_array(_masked_weight(rng, 32, 2 * c0, 1, 0.2), "wb"),
             numpy_helper.from_array(_masked_weight(rng, c0, 32, 3, 0.3), "wc"),
             numpy_helper.from_array(_masked_weight(rng, 16, 3 * c0, 1, 0.2), "wt"),
             numpy_helper.from_array(_masked_weight(rng, 16, 16, 1, 0.2), "wu")]
    inits += bn("n1", 2 * c0) + bn("n2", 3 * c0) + bn("n3", 16)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c0, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_pre_activation_fused_into_the_conv_after_it() -> None:
    """BatchNormalization -> Relu -> SparseConv becomes SparseConvPre (SparseConvPreRelu with the Relu
    after it) where each node is the only reader of the one before; the file passes the checker and
    computes what the dense graph does, through the function bodies and natively (1 and 2 threads)."""
    src = _dense_block(np.random.default_rng(9))
    src.ir_version = 8  # an older exporter's file: the function overloads need IR 10, the rewrite raises it
    new, report = convert_model(src, dense_threshold=0.6)
    check(new)
    ops = {nd.name: nd.op_type for nd in new.graph.node if nd.domain == DOMAIN}
    assert ops == {"a": "SparseConv", "b": "SparseConvPreRelu", "c": "SparseConv", "t": "SparseConvPre", "u": "SparseConvAdd"}
    assert {c.node: c.activation for c in report.choices}["b"] == "PreRelu"
    assert sum(nd.op_type == "BatchNormalization" for nd in new.graph.node) == 1  # n3: its Relu has two readers
    # cat2 (read only by t's pre-activation) is gone: t reads its pieces; cat is also read by cat2's
    # pieces list, so it stays
    t = next(nd for nd in new.graph.node if nd.name == "t")
    assert (t.input[0], list(t.input[7:]), t.overload) == ("cat", ["yc"], "concat2")
    assert [nd.output[0] for nd in new.graph.node if nd.op_type == "Concat"] == ["cat"]
    assert {c.node: (c.activation, c.pieces) for c in report.choices}["t"] == ("Pre", 2)
    assert new.ir_version >= 10 and {(f.name, f.overload) for f in new.functions} >= {("SparseConvPre", "concat2")}
    dense = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"])
    sessions = [ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])]
    if native.info()["loadable"]:
        sessions += [native.session(new.SerializeToString(), t) for t in (1, 2)]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 16, 8, 8)).astype(np.float32)
        ref = dense.run(None, {"x": x})[0]
        for sess in sessions:
            np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("k,cin,density,sparse", [(7, 3, 1 / 3, True), (7, 3, 2 / 3, True), (3, 3, 1 / 3, True),
                                                 (3, 3, 2 / 3, True), (5, 3, 2 / 3, False), (3, 8, 1 / 4, False)])
def test_stem_rule(k: int, cin: int, density: float, sparse: bool) -> None:
    """A strided stem conv on 3 input channels goes sparse at density 1/3 (1.5-1.65x measured); at
    2/3 (0.92-0.98x one channel at a time) only where the kernel regroups its channels by fan-in
    into blocks of four (3x3 and 7x7: 1.28-1.6x), not 5x5; strided convs on 5-63 input channels
    stay dense."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((64, cin, k, k)).astype(np.float32)
    live = np.zeros((64, cin), bool)
    for o in range(64):
        live[o, rng.choice(cin, round(density * cin), replace=False)] = True
    new, report = convert_model(_conv_model(w * live[:, :, None, None], None, 2, k // 2, 1, 1, 64))
    assert any(n.op_type == "SparseConv" for n in new.graph.node) == sparse, report
    if cin <= 3:
        assert f"strided conv on {cin} input channels per group (as a stem)" in report.choices[0].reason


def test_depthwise_strided_conv_is_not_called_a_stem() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    _, report = convert_model(_conv_model(w, None, 2, 1, 1, 16, 32))
    assert "1 input channel per group" in report.choices[0].reason and "stem conv" not in report.choices[0].reason


def test_sparse_conv_node_is_built_one_way():
    from sparsify.runtime.onnx_sparse import sparse_conv_node

    node = sparse_conv_node(["x", "w", "rp", "ci", "b"], ["y"], in_channels=8, group=2, pads=[1, 1, 1, 1])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type) == (DOMAIN, "SparseConv")
    assert attrs == {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 2, "in_channels": 8}
    with pytest.raises(ValueError, match="SparseConvAdd takes 6 inputs"):
        sparse_conv_node(["x", "w", "rp", "ci", "b"], ["y"], in_channels=8, op="SparseConvAdd")
    pre = sparse_conv_node(["x", "w", "rp", "ci", "b", "s", "t", "x2", "x3"], ["y"], in_channels=8, op="SparseConvPre")
    assert pre.overload == "concat3"
    with pytest.raises(ValueError, match="SparseConvPreRelu takes 7 inputs or more"):
        sparse_conv_node(["x", "w", "rp", "ci", "b", "s"], ["y"], in_channels=8, op="SparseConvPreRelu")


@pytest.mark.parametrize("op", ["SparseConv", "SparseConvRelu", "SparseConvClip", "SparseConvAdd", "SparseConvAddRelu",
                                "SparseConvPre", "SparseConvPreRelu"])
def test_function_bodies_run_in_onnx_reference_runtime(op: str) -> None:
    """The bodies are standard ONNX by the spec, not only as ORT reads it: onnx's reference runtime
    runs every op's body (inlined; the pre ops with their input in pieces too, an overload) and
    computes what ORT's dense Conv does."""
    import onnx.inliner
    from onnx.reference import ReferenceEvaluator

    from native_models import dense_model, random_case, sparse_model, split_input

    rng = np.random.default_rng(len(op))
    case = random_case(rng, 12, 8, 3, 0.3, pads=(1, 1, 1, 1))
    x = rng.standard_normal((2, 12, 6, 6)).astype(np.float32)
    conv = _session(onnx.load_from_string(dense_model(case))).run(None, {"X": x})[0]
    z = rng.standard_normal(conv.shape).astype(np.float32)
    s, t = rng.uniform(-1.5, 1.5, 12).astype(np.float32), rng.uniform(-0.5, 0.5, 12).astype(np.float32)
    pre = (s, t) if op.startswith("SparseConvPre") else None
    xp = np.maximum(x * s[None, :, None, None] + t[None, :, None, None], 0).astype(np.float32) if pre else x
    ref = _session(onnx.load_from_string(dense_model(case))).run(None, {"X": xp})[0]
    ref = ref + z if "Add" in op else ref
    ref = np.maximum(ref, 0) if op.endswith("Relu") else np.clip(ref, -0.5, 2.0) if op.endswith("Clip") else ref
    attrs = dict(min=-0.5, max=2.0) if op.endswith("Clip") else {}
    for pieces in ([(), (5, 7)] if pre else [()]):
        model = onnx.load_from_string(sparse_model(case, op_type=op, pre=pre, pieces=pieces, function_body=True, **attrs))
        feeds = split_input(x, pieces) if pieces else {"X": x}
        if "Add" in op:
            feeds["Z"] = z
        y = ReferenceEvaluator(onnx.inliner.inline_local_functions(model)).run(None, feeds)[0]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _pool_chain_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> conv a -> Relu -> MaxPool 3x3/s2 -> conv b -> MaxPool 2x2/s2 (ceil_mode 1) -> conv c
    -> MaxPool 2x2/s2 (also returns Indices) -> conv d, whose output also feeds a MaxPool and the
    graph output: only a's pool can be fused."""
    n = helper.make_node
    ws = {k: _masked_weight(rng, 16, 16 if k != "a" else 3, 3, 0.3 if k != "a" else 0.67) for k in "abcd"}
    nodes = [n("Conv", ["x", "wa"], ["ya"], pads=[1] * 4, strides=[2, 2], name="a"), n("Relu", ["ya"], ["ra"]),
             n("MaxPool", ["ra"], ["pa"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             n("Conv", ["pa", "wb"], ["yb"], pads=[1] * 4, name="b"),
             n("MaxPool", ["yb"], ["pb"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             n("Conv", ["pb", "wc"], ["yc"], pads=[1] * 4, name="c"),
             n("MaxPool", ["yc"], ["pc", "ic"], kernel_shape=[2, 2], strides=[2, 2]),
             n("Conv", ["pc", "wd"], ["yd"], pads=[1] * 4, name="d"),
             n("MaxPool", ["yd"], ["pd"], kernel_shape=[2, 2], strides=[1, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 45, 45])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT if v != "ic" else TensorProto.INT64, [None] * 4)
         for v in ("pd", "yd", "ic")],
        [numpy_helper.from_array(w, f"w{k}") for k, w in ws.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_max_pool_fused_only_where_the_op_computes_it() -> None:
    """A 2-D MaxPool (ceil_mode 0, no Indices) that alone reads a sparse node's output goes into the
    node (its pool_* attributes, the ``maxpool`` function body); ceil_mode 1, an Indices output or
    a second reader keep the MaxPool node. The result passes the full checker and computes what
    the dense graph does through the function body and natively."""
    from sparsify.runtime.onnx_sparse import POOL_OVERLOAD, pooled

    src = _pool_chain_model(np.random.default_rng(7))
    new, report = convert_model(src, dense_threshold=0.7)
    check(new)
    sparse = {nd.name: nd for nd in new.graph.node if nd.domain == DOMAIN}
    assert set(sparse) == {"a", "b", "c", "d"}
    assert [n for n, nd in sparse.items() if pooled(nd)] == ["a"]
    assert sparse["a"].op_type == "SparseConvRelu" and sparse["a"].overload == POOL_OVERLOAD
    assert [c.activation for c in report.choices] == ["ReluMaxPool", "", "", ""]
    assert sum(nd.op_type == "MaxPool" for nd in new.graph.node) == 3
    assert sorted((f.name, f.overload) for f in new.functions) == [("SparseConv", ""), ("SparseConvRelu", POOL_OVERLOAD)]
    _assert_computes_the_same(src, new, (3 * np.random.default_rng(8).standard_normal((2, 3, 45, 45))).astype(np.float32))


@pytest.mark.parametrize("op", ["SparseConvRelu", "SparseConvAdd"])
def test_pooled_function_body_runs_in_onnx_reference_runtime(op: str) -> None:
    """The ``maxpool`` overload's body is standard ONNX too: onnx's reference runtime computes the
    dense conv's MaxPool with it."""
    import onnx.inliner
    from onnx.reference import ReferenceEvaluator

    from native_models import dense_model, random_case, sparse_model

    rng = np.random.default_rng(len(op) + 1)
    case = random_case(rng, 6, 8, 3, 0.4, pads=(1, 1, 1, 1))
    x = rng.standard_normal((2, 6, 9, 9)).astype(np.float32)
    conv = _session(onnx.load_from_string(dense_model(case))).run(None, {"X": x})[0]
    z = rng.standard_normal(conv.shape).astype(np.float32)
    pre = np.maximum(conv, 0) if op.endswith("Relu") else conv + z
    ref = np.lib.stride_tricks.sliding_window_view(
        np.pad(pre, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf), (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    ref = ref.max(axis=(-2, -1))
    model = onnx.load_from_string(sparse_model(case, op_type=op, function_body=True, pool_kernel_shape=[3, 3],
                                               pool_strides=[2, 2], pool_pads=[1, 1, 1, 1]))
    feeds = {"X": x, **({"Z": z} if "Add" in op else {})}
    y = ReferenceEvaluator(onnx.inliner.inline_local_functions(model)).run(None, feeds)[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
