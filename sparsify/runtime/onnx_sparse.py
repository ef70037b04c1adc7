"""ONNX-level rewrite: channel-sparse Conv nodes -> ``ai.sparsify::SparseConv`` with a portable body.

Why an ONNX-level pass rather than a custom translation inside ``torch.onnx``: torch's dynamo
exporter inlines an onnxscript function's body, so a custom node does not survive export. Exporting
densely and rewriting the ONNX graph afterwards keeps the exporter's output standard and makes the
pass work for any ONNX file with channel-sparse Conv weights, whichever tool wrote it.

The rewrite packs a Conv weight ``[Cout, Cin/g, kh, kw]`` into CSR over output channels (one entry
per live kh x kw block) and adds a model-local FunctionProto that rebuilds the dense weight with
ScatterElements and calls Conv. Runtimes without the native kernel run that body; ONNX Runtime
constant-folds the rebuilt weight, so the body runs at dense-Conv speed, never slower.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from ..errors import ExportError

DOMAIN = "ai.sparsify"
OP = "SparseConv"
DOMAIN_VERSION = 1
MIN_OPSET = 17  # ScatterElements(reduction="add") needs 16; 17 is the export floor


@dataclass
class ConvChoice:
    """The decision taken for one Conv node: kept dense or rewritten as SparseConv, and why."""

    node: str
    weight_shape: tuple[int, ...]
    group: int
    density: float
    live_connections: int
    sparse: bool
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None
    weight: str = ""  # the weight initializer's name (torch.onnx names it after the state-dict key)

    @property
    def layer(self) -> str:
        """A readable layer name: the weight's state-dict key without ``.weight``, else the node name."""
        return self.weight[: -len(".weight")] if self.weight.endswith(".weight") else self.node


@dataclass
class ConvertReport:
    """What ``convert_model`` did to each Conv of the model."""

    choices: list[ConvChoice] = field(default_factory=list)

    @property
    def sparse_nodes(self) -> int:
        """Number of Conv nodes rewritten as SparseConv."""
        return sum(c.sparse for c in self.choices)

    def to_json(self) -> list[dict]:
        return [dict(vars(c), weight_shape=list(c.weight_shape)) for c in self.choices]


# --------------------------------------------------------------------------------------------
# Packing


def block_mask(weight: np.ndarray) -> np.ndarray:
    """Boolean ``[Cout, Cin/g]``: True where the kh x kw block of a 4-D conv weight has a nonzero."""
    return np.any(weight.reshape(weight.shape[0], weight.shape[1], -1) != 0, axis=2)


def pack(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR-pack a conv weight: (packed ``[nnz, kh, kw]``, row_ptr ``[Cout+1]``, col_idx ``[nnz]``)."""
    live = block_mask(weight)
    rows, cols = np.nonzero(live)  # row-major: ordered by output channel, then input index
    counts = live.sum(axis=1).astype(np.int64)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    packed = np.ascontiguousarray(weight[rows, cols], dtype=np.float32)
    return packed, row_ptr, cols.astype(np.int64)


def unpack(packed: np.ndarray, row_ptr: np.ndarray, col_idx: np.ndarray, cin_g: int) -> np.ndarray:
    """Inverse of ``pack``: the dense ``[Cout, cin_g, kh, kw]`` weight."""
    cout = len(row_ptr) - 1
    dense = np.zeros((cout, cin_g) + packed.shape[1:], dtype=np.float32)
    rows = np.repeat(np.arange(cout), np.diff(row_ptr))
    dense[rows, col_idx] = packed
    return dense


# --------------------------------------------------------------------------------------------
# The function body


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    )


def sparse_conv_function(opset: int) -> onnx.FunctionProto:
    """The standard-ONNX body of ``ai.sparsify::SparseConv``: scatter packed kernels, then Conv.

    The row of packed entry k is the number of row_ptr[1:Cout] entries <= k: a scatter-add of ones
    at those positions followed by CumSum, O(nnz + Cout). The flat index row*(Cin/g)+col places
    each kh x kw block into a zero [Cout*Cin/g, kh, kw] tensor with ScatterElements; a Reshape makes
    it the Conv weight. Everything but X is an initializer in practice, so ORT folds the weight.
    Cin/g comes from the ``in_channels`` attribute, not from Shape(X): ORT does not fold the Shape
    of an input with a dynamic batch dimension, and a non-constant weight loses ORT's prepacked
    (NCHWc) Conv path.
    """
    n = helper.make_node
    nodes = [
        _const("one", [1]),
        _const("zero", [0]),
        _const("minus_one", [-1]),
        _const("three", [3]),
        _const("col_shape", [-1, 1, 1]),
        n("Shape", ["row_ptr"], ["rp_len"]),
        n("Sub", ["rp_len", "one"], ["cout"]),
        _ref_const("in_channels_scalar", "in_channels"),
        _ref_const("group_scalar", "group"),
        n("Div", ["in_channels_scalar", "group_scalar"], ["cin_g_scalar"]),
        n("Reshape", ["cin_g_scalar", "one"], ["cin_g"]),
        n("Shape", ["col_idx"], ["nnz"]),
        n("Add", ["nnz", "one"], ["nnz_plus_one"]),
        n("ConstantOfShape", ["nnz_plus_one"], ["marks0"],
          value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
        n("Slice", ["row_ptr", "one", "minus_one"], ["inner_ptr"]),
        n("Shape", ["inner_ptr"], ["inner_len"]),
        n("ConstantOfShape", ["inner_len"], ["inner_ones"],
          value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        n("ScatterElements", ["marks0", "inner_ptr", "inner_ones"], ["marks"], axis=0, reduction="add"),
        n("CumSum", ["marks", "zero"], ["rows_all"]),
        n("Slice", ["rows_all", "zero", "nnz"], ["rows"]),
        n("Mul", ["rows", "cin_g"], ["row_base"]),
        n("Add", ["row_base", "col_idx"], ["flat"]),
        n("Reshape", ["flat", "col_shape"], ["flat3"]),
        n("Shape", ["W"], ["w_shape"]),
        n("Expand", ["flat3", "w_shape"], ["scatter_idx"]),
        n("Slice", ["w_shape", "one", "three"], ["khw"]),
        n("Mul", ["cout", "cin_g"], ["blocks"]),
        n("Concat", ["blocks", "khw"], ["flat_shape"], axis=0),
        n("ConstantOfShape", ["flat_shape"], ["zeros"],
          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        n("ScatterElements", ["zeros", "scatter_idx", "W"], ["dense_flat"], axis=0),
        n("Concat", ["cout", "cin_g", "khw"], ["dense_shape"], axis=0),
        n("Reshape", ["dense_flat", "dense_shape"], ["dense_w"]),
        n("Conv", ["X", "dense_w", "B"], ["Y"]),
    ]
    conv = nodes[-1]
    for name in ("strides", "pads", "dilations"):
        conv.attribute.append(_ref(name, name, AttributeProto.INTS))
    conv.attribute.append(_ref("group", "group", AttributeProto.INT))
    return helper.make_function(
        DOMAIN, OP, ["X", "W", "row_ptr", "col_idx", "B"], ["Y"], nodes,
        [helper.make_opsetid("", opset)],
        attributes=["strides", "pads", "dilations", "group", "in_channels"],
        doc_string="Channel-sparse convolution: W holds the live kh x kw kernels in CSR order over output "
        "channels (row_ptr [Cout+1], col_idx [nnz] = input channel within the group); B is the bias.",
    )


def _ref_const(output: str, attribute: str) -> onnx.NodeProto:
    """A Constant whose int value is the calling node's attribute ``attribute``."""
    node = helper.make_node("Constant", [], [output])
    node.attribute.append(_ref("value_int", attribute, AttributeProto.INT))
    return node


def _ref(name: str, ref: str, attr_type: int) -> AttributeProto:
    a = AttributeProto()
    a.name = name
    a.ref_attr_name = ref
    a.type = attr_type
    return a


# --------------------------------------------------------------------------------------------
# The rewrite

Decide = Callable[[onnx.ModelProto, onnx.NodeProto, np.ndarray, ConvChoice], tuple[bool, str]]


def load(src: str | os.PathLike | onnx.ModelProto | bytes) -> onnx.ModelProto:
    """An ONNX model from a path, bytes or a ModelProto (copied); ExportError when unreadable."""
    if isinstance(src, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(src)
        return m
    try:
        if isinstance(src, bytes):
            return onnx.load_from_string(src)
        path = Path(src)
        if not path.is_file():
            raise ExportError(f"{path} does not exist or is not a file; pass an existing .onnx file")
        return onnx.load(str(path))
    except ExportError:
        raise
    except Exception as e:  # protobuf decode errors have many types
        raise ExportError(f"{src} is not a readable ONNX model ({type(e).__name__}: {e}); re-export it") from None


def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _constant_nodes(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {}
    for nd in model.graph.node:
        if nd.op_type == "Constant" and nd.domain in ("", "ai.onnx"):
            for a in nd.attribute:
                if a.name == "value":
                    found[nd.output[0]] = a.t
    return found


def convert_model(model: onnx.ModelProto, dense_threshold: float = 0.6,
                  decide: Decide | None = None) -> tuple[onnx.ModelProto, ConvertReport]:
    """Rewrite channel-sparse Conv nodes of ``model`` (not modified) into SparseConv; return the new model.

    A Conv is rewritten when its weight is a constant 4-D float tensor, it has no ``auto_pad``,
    and its live-connection density is below ``dense_threshold``; ``decide`` (autotune) may then
    still keep it dense. Every other node is left alone.
    """
    if not 0.0 <= dense_threshold <= 1.0:
        raise ExportError(f"dense threshold {dense_threshold} is outside [0, 1]; pass e.g. 0.6")
    model = load(model)
    if any(f.domain == DOMAIN and f.name == OP for f in model.functions):
        raise ExportError("the model already contains ai.sparsify::SparseConv nodes; convert the dense original instead")
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise ExportError(
                f"the model uses opset {opset} and cannot be upgraded to {MIN_OPSET} ({e}); re-export it at opset >= 17"
            ) from None
        opset = MIN_OPSET
    inits = _initializers(model)
    consts = _constant_nodes(model)
    report = ConvertReport()
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    taken = {t.name for t in model.graph.initializer} | {o for nd in model.graph.node for o in nd.output}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        name = node.name or f"Conv_{idx}"
        wname = node.input[1]
        wproto = inits.get(wname, consts.get(wname))
        if wproto is None or wproto.data_type != TensorProto.FLOAT or len(wproto.dims) != 4:
            report.choices.append(ConvChoice(name, tuple(wproto.dims) if wproto else (), _attr(node, "group", 1),
                                             1.0, 0, False, "weight is not a constant 4-D float tensor"))
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(wproto)
        group = int(_attr(node, "group", 1))
        live = block_mask(w)
        choice = ConvChoice(name, tuple(w.shape), group, float(live.mean()), int(live.sum()), False, "", weight=wname)
        report.choices.append(choice)
        auto_pad = _attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad != "NOTSET":
            choice.reason = f"auto_pad={auto_pad} (only explicit pads are rewritten)"
        elif choice.density >= dense_threshold:
            choice.reason = f"density {choice.density:.2f} >= {dense_threshold:.2f}"
        else:
            choice.sparse, choice.reason = True, f"density {choice.density:.2f} < {dense_threshold:.2f}"
            if decide is not None:
                choice.sparse, choice.reason = decide(model, node, w, choice)
        if not choice.sparse:
            new_nodes.append(node)
            continue
        packed, row_ptr, col_idx = pack(w)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bproto = inits.get(node.input[2], consts.get(node.input[2]))
            if bproto is None:
                choice.sparse, choice.reason = False, "bias is not a constant"
                new_nodes.append(node)
                continue
            bias = numpy_helper.to_array(bproto).astype(np.float32)
        if bias is None:
            bias = np.zeros(w.shape[0], dtype=np.float32)
        base = wname.replace("/", "_").replace(":", "_") or name
        names = [fresh(f"{base}.packed"), fresh(f"{base}.row_ptr"), fresh(f"{base}.col_idx"), fresh(f"{base}.bias")]
        for arr, nm in zip((packed, row_ptr, col_idx, bias), names):
            new_inits.append(numpy_helper.from_array(arr, nm))
        dil = list(_attr(node, "dilations", [1, 1]))
        new_nodes.append(helper.make_node(
            OP, [node.input[0]] + names, list(node.output), name=name, domain=DOMAIN,
            strides=list(_attr(node, "strides", [1, 1])),
            pads=list(_attr(node, "pads", [0, 0, 0, 0])),
            dilations=dil, group=group, in_channels=int(w.shape[1]) * group,
        ))

    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    if report.sparse_nodes:
        if not any(op.domain == DOMAIN for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        model.functions.append(sparse_conv_function(opset))
    return model, report


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for nd in model.graph.node for i in nd.input} | {o.name for o in model.graph.output}
    used |= _subgraph_inputs(model.graph)
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) == len(model.graph.initializer):
        return
    dropped = {t.name for t in model.graph.initializer} - {t.name for t in keep}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    graph_inputs = [i for i in model.graph.input if i.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names read inside subgraphs (If/Loop bodies) of ``graph``, which may capture outer initializers."""
    found: set[str] = set()
    for nd in graph.node:
        for a in nd.attribute:
            for g in ([a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)):
                found |= {i for n2 in g.node for i in n2.input} | _subgraph_inputs(g)
    return found


def check(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full check (shape inference included); ExportError on failure."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported model fails onnx.checker ({str(e).splitlines()[0]}); please report it") from None


def save(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (a fresh file; callers wrap this in ``atomic_path``)."""
    onnx.save_model(model, str(path))


def convert_onnx(src: str | os.PathLike | onnx.ModelProto, out: str | os.PathLike,
                 dense_threshold: float = 0.6, decide: Decide | None = None) -> ConvertReport:
    """Convert any ONNX file's channel-sparse Conv nodes to SparseConv and write ``out`` atomically."""
    from .._io import atomic_path

    model, report = convert_model(load(src), dense_threshold, decide)
    check(model)
    with atomic_path(out) as tmp:
        save(model, tmp)
    return report
