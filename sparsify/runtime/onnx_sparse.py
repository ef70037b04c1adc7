"""ONNX-level rewrite: channel-sparse Conv nodes -> ``ai.sparsify::SparseConv`` with a portable body.

Why an ONNX-level pass rather than a custom translation inside ``torch.onnx``: torch's dynamo
exporter inlines an onnxscript function's body, so a custom node does not survive export. Exporting
densely and rewriting the ONNX graph afterwards keeps the exporter's output standard and makes the
pass work for any ONNX file with channel-sparse Conv weights, whichever tool wrote it.

The rewrite packs a Conv weight ``[Cout, Cin/g, kh, kw]`` into CSR over output channels (one entry
per live kh x kw block) and adds a model-local FunctionProto that rebuilds the dense weight with
ScatterElements and calls Conv. Runtimes without the native kernel run that body; ONNX Runtime
constant-folds the rebuilt weight, so the body runs at dense-Conv speed, never slower. Fused
variants (activation, residual sum input, pre-activation) have bodies of the same standard ops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from ..errors import ExportError

DOMAIN = "ai.sparsify"
OP = "SparseConv"
OP_RELU = "SparseConvRelu"  # SparseConv then Relu, fused: same inputs and attributes
OP_CLIP = "SparseConvClip"  # SparseConv then Clip(min, max) with constant bounds: float attributes min, max
OP_ADD = "SparseConvAdd"  # SparseConv then Add of a sixth input Z of the output's shape (the residual)
OP_ADD_RELU = "SparseConvAddRelu"  # SparseConv, Add Z, Relu
OP_PRE = "SparseConvPre"  # Relu(X * S + T) per input channel (inputs S, T: [Cin]), then SparseConv
OP_PRE_RELU = "SparseConvPreRelu"  # the same, then Relu
# The pre ops take further inputs after T: X is then the channel Concat of X and those pieces. A node
# with n pieces names the function body of its piece count in its ``overload`` field (ONNX IR 10).
PIECES_OVERLOAD = "concat{}"
PIECES_IR_VERSION = 10
# Any op but the pre ops may end in a MaxPool (attributes pool_kernel_shape, pool_strides, pool_pads;
# ceil_mode 0, dilations 1): its output is then the pooled conv output, and the node names the
# function body that ends in the MaxPool in its ``overload`` field (also IR 10).
POOL_OVERLOAD = "maxpool"
POOL_ATTRS = ("pool_kernel_shape", "pool_strides", "pool_pads")
SPARSE_OPS = (OP, OP_RELU, OP_CLIP, OP_ADD, OP_ADD_RELU, OP_PRE, OP_PRE_RELU)
SUM_OPS = (OP_ADD, OP_ADD_RELU)  # a sixth input Z
PRE_OPS = (OP_PRE, OP_PRE_RELU)  # sixth and seventh inputs S, T
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
    # what was fused into the layer: "Relu", "Clip", "Add" (residual), "AddRelu", "Pre" (input BN + Relu),
    # then "MaxPool" where the pool after it went in too
    activation: str = ""
    shared_fan_in: float = 0.0  # share of output channels in blocks with one fan-in (shared_fan_in_share)
    pieces: int = 1  # inputs its input comes in (a pre op reading a Concat's inputs, _fuse_concats)

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
    """Boolean ``[Cout, Cin/g]``: True where the kernel window of a conv weight (``[Cout, Cin/g, k...]``,
    any number of spatial axes) has a nonzero."""
    return np.any(weight.reshape(weight.shape[0], weight.shape[1], -1) != 0, axis=2)


# Output channels per unit of the native kernel's shared-fan-in paths, 1x1 and 3x3/s2 (kFanInBlock
# in csrc/sparseconv_common.h): four channels that list the same input channels are computed
# together, each loaded input vector feeding four FMAs.
FAN_IN_BLOCK = 4


def shared_fan_in_share(live: np.ndarray, group: int = 1, regroup: bool = False) -> float:
    """Share of a conv's output channels that the native kernel's 1x1 and strided 3x3 / 7x7 paths run
    in blocks of FAN_IN_BLOCK: runs of consecutive channels (within a group) with the same non-empty
    row of ``live`` (bool ``[Cout, Cin/group]``), taken FAN_IN_BLOCK at a time from channel 0, as the
    kernel walks them. The transform's ``block`` option (block sparsity, Elsen et al. 2020) draws such
    masks. ``regroup`` (``regroups``: the kernel makes channels with one fan-in neighbours first):
    FAN_IN_BLOCK at a time of the channels of a group with the same non-empty row, wherever they are
    (a stem's channels that each read one of three input channels)."""
    cout = live.shape[0]
    if cout < FAN_IN_BLOCK:
        return 0.0
    per_group = max(1, cout // max(1, group))
    if regroup:
        covered = 0
        for g0 in range(0, cout, per_group):
            rows = live[g0:g0 + per_group]
            _, counts = np.unique(rows[rows.any(axis=1)], axis=0, return_counts=True)
            covered += int((counts // FAN_IN_BLOCK).sum()) * FAN_IN_BLOCK
        return covered / cout  # never below the runs in the node's order: every such run is one row's
    o = np.arange(cout - 1)
    joins = (np.all(live[:-1] == live[1:], axis=1) & live[:-1].any(axis=1) & ((o + 1) % per_group != 0))
    covered = o_at = 0
    while o_at + FAN_IN_BLOCK <= cout:
        if joins[o_at:o_at + FAN_IN_BLOCK - 1].all():
            covered += FAN_IN_BLOCK
            o_at += FAN_IN_BLOCK
        else:
            o_at += 1
    return covered / cout


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


def sparse_conv_node(inputs: Sequence[str], outputs: Sequence[str], *, in_channels: int, group: int = 1,
                     strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
                     dilations: Sequence[int] = (1, 1), op: str = OP, name: str | None = None,
                     **attrs: object) -> onnx.NodeProto:
    """The one way to write an ``ai.sparsify::SparseConv`` node (or a fused variant ``op``).

    ``inputs``: X ``[N, in_channels, H, W]``, W (packed kernels ``[nnz, kh, kw]``), row_ptr
    ``[Cout + 1]``, col_idx ``[nnz]`` (input channel within the group), B ``[Cout]``; then Z (the
    residual, output-shaped) for the sum ops, or S, T (``[in_channels]``) for the pre ops, which
    may be followed by further pieces X_2 .. X_n of the input (``[N, C_i, H, W]``; X is then their
    channel Concat with X first, in_channels the sum): the node then names the function body for
    n pieces in its ``overload`` field (see ``pieces``).
    ``in_channels`` (all groups) is what the standard-ONNX function body reads Cin/g from.
    ``attrs``: the fused ops' own (``min`` / ``max`` for SparseConvClip). ValueError for a wrong
    input count or an unknown op.
    """
    if op not in SPARSE_OPS:
        raise ValueError(f"unknown sparse op {op!r}; one of {', '.join(SPARSE_OPS)}")
    want = 5 + (1 if op in SUM_OPS else 2 if op in PRE_OPS else 0)
    if len(inputs) != want and not (op in PRE_OPS and len(inputs) > want):
        raise ValueError(f"{op} takes {want} inputs{' or more' if op in PRE_OPS else ''}, got {len(inputs)}")
    kwargs = {"name": name} if name else {}
    node = helper.make_node(op, list(inputs), list(outputs), domain=DOMAIN, **kwargs,
                            strides=list(strides), pads=list(pads), dilations=list(dilations),
                            group=int(group), in_channels=int(in_channels), **attrs)
    _set_overload(node)
    return node


def pieces(node: onnx.NodeProto) -> int:
    """How many pieces a sparse node's input X comes in: 1, or 1 + the pre ops' inputs after T."""
    return 1 + max(0, len(node.input) - 7) if node.op_type in PRE_OPS else 1


def pooled(node: onnx.NodeProto) -> bool:
    """Whether a sparse node ends in a fused MaxPool (its ``pool_kernel_shape`` attribute)."""
    return any(a.name == POOL_ATTRS[0] for a in node.attribute)


def _set_overload(node: onnx.NodeProto) -> None:
    """Point a sparse node at the function body of its piece count or fused pool (none: no overload)."""
    n = pieces(node)
    node.overload = PIECES_OVERLOAD.format(n) if n > 1 else POOL_OVERLOAD if pooled(node) else ""


def fuse_max_pool(node: onnx.NodeProto, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int]) -> None:
    """Make sparse ``node`` end in a 2-D MaxPool (ceil_mode 0, dilations 1) of ``kernel`` (kh, kw),
    ``strides`` and ``pads`` (top, left, bottom, right); its output becomes the pooled one.
    ValueError for a pre op (whose overload names its pieces) or a node already pooled."""
    if node.op_type in PRE_OPS or pooled(node):
        raise ValueError(f"{node.op_type} node {node.name!r} cannot take a fused MaxPool")
    node.attribute.extend([helper.make_attribute(POOL_ATTRS[0], [int(v) for v in kernel]),
                           helper.make_attribute(POOL_ATTRS[1], [int(v) for v in strides]),
                           helper.make_attribute(POOL_ATTRS[2], [int(v) for v in pads])])
    _set_overload(node)


# --------------------------------------------------------------------------------------------
# The function body


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    )


def sparse_conv_function(opset: int, op: str = OP, n_pieces: int = 1, pool: bool = False) -> onnx.FunctionProto:
    """The standard-ONNX body of ``ai.sparsify::SparseConv``: scatter packed kernels, then Conv
    (then Relu for ``SparseConvRelu``, Clip between the ``min`` / ``max`` attributes for
    ``SparseConvClip``, Add of the sixth input Z for ``SparseConvAdd``, Add then Relu for
    ``SparseConvAddRelu``). ``n_pieces`` > 1 (pre ops only): the body for nodes whose input comes
    in that many pieces (inputs X_2 .. X_n after T, Concat on the channel axis first), registered
    under the overload ``concat<n>``; ValueError for other ops. ``pool`` (not for the pre ops): the
    body ends in MaxPool(kernel_shape, strides, pads from the pool_* attributes), registered under
    the overload ``maxpool``.

    The row of packed entry k is the number of row_ptr[1:Cout] entries <= k: a scatter-add of ones
    at those positions followed by CumSum, O(nnz + Cout). The flat index row*(Cin/g)+col places
    each kh x kw block into a zero [Cout*Cin/g, kh, kw] tensor with ScatterElements; a Reshape makes
    it the Conv weight. Everything but X is an initializer in practice, so ORT folds the weight.
    ``SparseConvPre(Relu)`` first computes ``Relu(X * S + T)`` with S, T of shape [Cin] broadcast
    over the channel axis (an inference BatchNormalization and Relu before the conv).
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
        # CumSum's axis is a 0-D tensor by the spec (ORT also takes [1]; onnx's reference runtime does not)
        helper.make_node("Constant", [], ["axis0"], value=helper.make_tensor("axis0", TensorProto.INT64, [], [0])),
        n("CumSum", ["marks", "axis0"], ["rows_all"]),
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
        n("Conv", ["X", "dense_w", "B"], ["Y" if op == OP else "conv_out"]),
    ]
    conv = nodes[-1]
    attributes = ["strides", "pads", "dilations", "group", "in_channels"]
    inputs = ["X", "W", "row_ptr", "col_idx", "B"]
    if n_pieces > 1 and op not in PRE_OPS:
        raise ValueError(f"only {' and '.join(PRE_OPS)} take their input in pieces, not {op}")
    if op in (OP_PRE, OP_PRE_RELU):
        conv.input[0] = "x_pre"
        more = [f"X_{i}" for i in range(2, n_pieces + 1)]
        x = "x_cat" if more else "X"
        nodes[:0] = ([n("Concat", ["X", *more], ["x_cat"], axis=1)] if more else []) + [
            _const("nchw_axes", [0, 2, 3]), n("Unsqueeze", ["S", "nchw_axes"], ["s4"]),
            n("Unsqueeze", ["T", "nchw_axes"], ["t4"]), n("Mul", [x, "s4"], ["x_scaled"]),
            n("Add", ["x_scaled", "t4"], ["x_shifted"]), n("Relu", ["x_shifted"], ["x_pre"])]
        inputs += ["S", "T", *more]
        conv.output[0] = "Y" if op == OP_PRE else "conv_out"
        if op == OP_PRE_RELU:
            nodes.append(n("Relu", ["conv_out"], ["Y"]))
    if op == OP_RELU:
        nodes.append(n("Relu", ["conv_out"], ["Y"]))
    elif op == OP_ADD:
        nodes.append(n("Add", ["conv_out", "Z"], ["Y"]))
        inputs.append("Z")
    elif op == OP_ADD_RELU:
        nodes += [n("Add", ["conv_out", "Z"], ["sum_out"]), n("Relu", ["sum_out"], ["Y"])]
        inputs.append("Z")
    elif op == OP_CLIP:
        for bound in ("min", "max"):
            const = n("Constant", [], [f"clip_{bound}"])
            const.attribute.append(_ref("value_float", bound, AttributeProto.FLOAT))
            nodes.append(const)
        nodes.append(n("Clip", ["conv_out", "clip_min", "clip_max"], ["Y"]))
        attributes += ["min", "max"]
    for name in ("strides", "pads", "dilations"):
        conv.attribute.append(_ref(name, name, AttributeProto.INTS))
    conv.attribute.append(_ref("group", "group", AttributeProto.INT))
    if pool:
        if op in PRE_OPS:
            raise ValueError(f"{op} takes no fused MaxPool")
        last = next(nd for nd in nodes if "Y" in nd.output)
        last.output[list(last.output).index("Y")] = "unpooled"
        mp = n("MaxPool", ["unpooled"], ["Y"])
        for attr, ref in zip(("kernel_shape", "strides", "pads"), POOL_ATTRS):
            mp.attribute.append(_ref(attr, ref, AttributeProto.INTS))
        nodes.append(mp)
        attributes += list(POOL_ATTRS)
    fn = helper.make_function(
        DOMAIN, op, inputs, ["Y"], nodes,
        [helper.make_opsetid("", opset)],
        attributes=attributes,
        doc_string="Channel-sparse convolution: W holds the live kh x kw kernels in CSR order over output "
        "channels (row_ptr [Cout+1], col_idx [nnz] = input channel within the group); B is the bias."
        + {OP: "", OP_RELU: " Followed by Relu.", OP_CLIP: " Followed by Clip(min, max).",
           OP_ADD: " Plus Z (same shape as the output).", OP_ADD_RELU: " Plus Z (same shape as the output), then Relu.",
           OP_PRE: " Of Relu(X * S + T) per input channel.", OP_PRE_RELU: " Of Relu(X * S + T) per input channel, then Relu."}[op]
        + (f" X is the channel Concat of X and X_2 .. X_{n_pieces}." if n_pieces > 1 else "")
        + (" Then MaxPool(pool_kernel_shape, pool_strides, pool_pads)." if pool else ""),
    )
    if n_pieces > 1:
        fn.overload = PIECES_OVERLOAD.format(n_pieces)
    elif pool:
        fn.overload = POOL_OVERLOAD
    return fn


def sparse_conv_functions(opset: int, nodes: Iterable[onnx.NodeProto]) -> list[onnx.FunctionProto]:
    """The function bodies the sparse nodes among ``nodes`` call: one per op, piece count and fused
    pool, in SPARSE_OPS order."""
    used = {(nd.op_type, pieces(nd), pooled(nd)) for nd in nodes if nd.domain == DOMAIN and nd.op_type in SPARSE_OPS}
    return [sparse_conv_function(opset, op, n, pool) for op in SPARSE_OPS
            for n, pool in sorted((k, p) for o, k, p in used if o == op)]


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


# Densities below which the native SparseConv kernel beats ONNX Runtime's own Conv on the masked
# weights, from measured crossovers (where the speed-up falls to 1; thresholds sit 0.05-0.15 below
# so that a layer written sparse is never slower). Measured with `benchmarks/bench_kernel.py`
# (density sweeps, batch 1, 1 thread, ORT 1.31-1.32, AVX-512 (AMD Zen 4), thread CPU time; 224x224
# shapes re-measured after the pointwise-tile, strip and narrow-plane changes) on the CPU where the
# kernel's fastest paths run: use --autotune elsewhere.
# 3x3 stride 1 by output plane: >= 16x16: 0.76-0.86 (64@56, 128@28, 128->32@56/28; 64@32x32 and
#   128@16x16 > 0.9); 8x8 .. 15x15: 256@8 0.78, 256@14 0.76, 128->32@14 0.70; 5x5 .. 7x7 (two rows
#   per vector): 512@7 0.63-0.66, 128->32@7 0.46; 4x4 (the by-input-channel path): 0.84-1.0;
#   2x2 (one FMA per connection): 0.52-0.58; 3x3: 256@3x3 0.16 (one vector, most lanes idle);
#   1x1 planes lose even at 0.1 (nine taps computed for the one that reads the input).
# 1x1 stride 1, by plane and input channels: >= 14x14 with >= 64 input channels 0.36-0.56
#   (ResNet 64..1024 channels on 56x56 .. 14x14, MobileNet 64..672 on 28x28 .. 14x14); 32-48
#   channels 0.48-0.62; 16-24 channels 0.66-0.68 (ORT's Conv is inefficient on few channels; 8
#   channels above 0.9); 7x7 and 8x8 planes 0.30-0.40 (160..2048 channels) and 0.25-0.3; on 4x4
#   even 0.1 gains only 1.0-1.6x and on 2x2 it is slower (one vector per plane), so those stay dense.
# 5x5 stride 1: 64@16x16 0.58, 32@32x32 0.67; 7x7: 32@16x16 0.8.
# Strided, >= 64 input channels (16-32 channels lost even at 0.1): 3x3/s2 to 28x28 / 14x14
#   0.47-0.55, to 7x7 0.34-0.39; 1x1/s2 (a subsampled input) to 28x28 / 14x14 0.39-0.55, to 7x7
#   0.29-0.37; outputs below 7x7 lose (3x3/s2 128->256 from 8x8: 1.05x at 0.1, 256->512 from 4x4:
#   0.64x); other kernels (5x5/s2, 7x7/s2) 0.22-0.33 at 16x16 .. 32x32. Stems (3 input
#   channels: densities 1/3 or 2/3 only): 7x7/s2 3->64 on 224x224 1.65x at 1/3, 0.92x at 2/3;
#   3x3/s2 3->32 1.51x / 0.95x; 5x5/s2 3->64 on 64x64 1.54x / 0.98x (one channel at a time; the
#   3x3 and 7x7 ones with their channels regrouped by fan-in: THRESHOLD_STEM_SHARED).
THRESHOLD_3x3_S1 = ((256, 0.75), (64, 0.65), (17, 0.4), (16, 0.7), (5, 0.12), (0, 0.0))  # (min output pixels, threshold)
THRESHOLD_3x3_2x2 = 0.45  # 2x2 output planes (the 4-pixel row of the table above would say 0)
THRESHOLD_3x3_UNKNOWN = 0.12  # output plane unknown at export: assume no 1x1 plane
THRESHOLD_1x1 = ((64, 0.3), (32, 0.4), (16, 0.6), (0, 0.8))  # (min input channels per group, threshold), >= 196 pixels
THRESHOLD_1x1_SMALL = 0.2   # 1x1 on planes of 49-195 pixels (7x7 .. 13x13); below 49 pixels 1x1 stays dense
MIN_1x1_PIXELS, MIN_1x1_FULL_PIXELS = 49, 196
THRESHOLD_KXK = 0.5      # 5x5, 7x7 (direct path), stride 1
# Strided convs, only with >= MIN_STRIDED_CIN input channels per group and >= MIN_STRIDED_PIXELS
# output pixels: (kernel, threshold on outputs of >= 196 pixels, threshold on smaller outputs).
THRESHOLD_STRIDED = {3: (0.4, 0.25), 1: (0.3, 0.2)}
THRESHOLD_STRIDED_OTHER = 0.15
# 1x1 convs (stride 1, or strided over the subsampled input) whose output channels share their
# fan-in in blocks of FAN_IN_BLOCK (the transform's --block 4) run 4 FMAs per loaded input vector
# (`bench_kernel.py --blocks 4`, same setup): crossovers above 0.9 on planes of >= 14x14 (8 .. 2048
# input channels; 1.1-2.1x still at 0.9, 1.8-2.6x at 0.5) and, since the pixels left over 16-float
# vectors ride across the block (TAIL_PIXELS), above 0.9 on 7x7 outputs too (1.07-1.14x at 0.9,
# 1.9-2.1x at 0.5; 0.61-0.75 before). A layer with a share s of its channels in such blocks gets
# (1 - s) * its plain threshold + s * these.
THRESHOLD_1x1_SHARED = (0.85, 0.5)  # outputs of >= MIN_1x1_FULL_PIXELS pixels or tail planes, other smaller ones
# 3x3/s2 convs sharing fan-ins the same way (the direct path's block unit, >= 64 input channels):
# crossovers 0.72-0.83 to 28x28 .. 56x56 outputs (64..256 channels; 1.5-1.65x at 0.5), 0.58 to
# smaller ones.
THRESHOLD_3x3_S2_SHARED = (0.65, 0.45)  # outputs of >= MIN_1x1_FULL_PIXELS pixels, of MIN_STRIDED_PIXELS .. that
# 3x3 convs sharing fan-ins to im2col planes (7x7: the 1x1 unit over the input's shifted copies):
# crossovers 0.89 (512@7) and 0.90 (3x3/s2 512 from 14x14); 1.7-1.9x at 0.5.
THRESHOLD_IM2COL_SHARED = 0.75
# The kernel's vector on the CPU these were measured on (16 floats, AVX-512): output planes of 1-4
# whole vectors and 1-TAIL_PIXELS pixels more (7x7 = 3 x 16 + 1) run kxk convs with shared fan-ins
# as the 1x1 unit over the input's shifted copies, their left-over pixels across each block.
VECTOR_PIXELS, TAIL_PIXELS, IM2COL_VECTORS = 16, 4, 4
THRESHOLD_STEM = 0.5  # strided 3x3 / 5x5 / 7x7 convs with at most STEM_CIN input channels per group
# Stems whose output channels repeat fan-ins (every stem past a few channels: 3 input channels allow
# 7 fan-ins) run 4 channels per loaded input vector once the kernel regroups them (``regroups``):
# 7x7/s2 3->64 on 224x224 1.33x at 2/3 (batch 1 and 8), 2.4-2.5x at 1/3; 3x3/s2 3->32 1.28x / 1.60x
# at 2/3 (batch 1 / 8), 2.2-2.4x at 1/3 (`bench_kernel.py`'s layer, Intel Xeon, 2026-12-01).
THRESHOLD_STEM_SHARED = 0.75
STEM_CIN = 4
MIN_STRIDED_CIN = 64
MIN_STRIDED_PIXELS = 49


def sparse_threshold(kernel: tuple[int, int], strides: Sequence[int], dilations: Sequence[int],
                     cin_per_group: int, out_hw: tuple[int, int] | None,
                     shared_fan_in: float = 0.0) -> tuple[float, str]:
    """Density below which SparseConv is faster than dense Conv for this layer, and the rule's name.

    A per-layer rule from measured crossovers (see the table above): the kernel's fast paths are
    3x3 stride 1, so those layers go sparse up to high densities; 1x1 and strided ones up to 0.2-0.4,
    1x1 and 3x3/s2 ones whose channels share fan-ins in blocks (``shared_fan_in``: the share of
    output channels in such blocks, ``shared_fan_in_share``) up to 0.85 and 0.65, and 3x3 ones to
    7x7 outputs (``im2col_plane``) with shared fan-ins, strided or not, up to 0.75. ``out_hw``
    (output plane) is None when shapes are unknown: then a low threshold that holds on every plane
    measured except 1x1 (export with static shapes, or --autotune, to do better).
    """
    thr, rule = _plain_threshold(kernel, strides, dilations, cin_per_group, out_hw)
    pixels = out_hw[0] * out_hw[1] if out_hw is not None else 0
    if shared_fan_in <= 0 or any(int(d) != 1 for d in dilations):
        return thr, rule
    stride = [int(st) for st in strides]
    im2col = im2col_plane(pixels)
    shared = None
    if tuple(kernel) == (1, 1) and pixels >= MIN_1x1_PIXELS:
        tail = 0 < pixels % VECTOR_PIXELS <= TAIL_PIXELS
        shared = THRESHOLD_1x1_SHARED[0 if pixels >= MIN_1x1_FULL_PIXELS or tail else 1]
    elif (tuple(kernel) == (3, 3) and stride == [2, 2] and cin_per_group >= MIN_STRIDED_CIN
          and pixels >= MIN_STRIDED_PIXELS):
        shared = THRESHOLD_IM2COL_SHARED if im2col else THRESHOLD_3x3_S2_SHARED[0 if pixels >= MIN_1x1_FULL_PIXELS else 1]
    elif tuple(kernel) == (3, 3) and stride == [1, 1] and im2col:
        shared = THRESHOLD_IM2COL_SHARED
    elif regroups(kernel, stride) and cin_per_group <= STEM_CIN and pixels >= MIN_STRIDED_PIXELS:
        shared = THRESHOLD_STEM_SHARED
    if shared is not None:
        thr = (1.0 - shared_fan_in) * thr + shared_fan_in * shared
        rule = f"{rule}; {100 * shared_fan_in:.0f}% of output channels share fan-ins in blocks of {FAN_IN_BLOCK}"
    return thr, rule


def regroups(kernel: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the native kernel regroups a conv's output channels by fan-in (its strided 3x3 / 7x7
    block unit; ``shared_fan_in_share(regroup=True)``)."""
    return tuple(int(k) for k in kernel) in ((3, 3), (7, 7)) and [int(st) for st in strides] == [2, 2]


def im2col_plane(pixels: int) -> bool:
    """Whether the native kernel runs kxk convs with shared fan-ins to an output plane of this
    many pixels as the 1x1 unit over the input's shifted copies (1-IM2COL_VECTORS whole vectors of
    VECTOR_PIXELS and 1-TAIL_PIXELS more: 7x7, 6x6), as it does on AVX-512."""
    whole, left = divmod(pixels, VECTOR_PIXELS)
    return 1 <= whole <= IM2COL_VECTORS and 1 <= left <= TAIL_PIXELS


def _plain_threshold(kernel: tuple[int, int], strides: Sequence[int], dilations: Sequence[int],
                     cin_per_group: int, out_hw: tuple[int, int] | None) -> tuple[float, str]:
    """sparse_threshold without shared fan-ins."""
    kh, kw = kernel
    pixels = out_hw[0] * out_hw[1] if out_hw is not None else 0
    where = f"{out_hw[0]}x{out_hw[1]}" if out_hw is not None else "an unknown"
    if any(int(d) != 1 for d in dilations):
        return 0.0, "dilated conv (no fast sparse path)"
    if any(int(st) != 1 for st in strides):
        if cin_per_group <= STEM_CIN and kh == kw and kh in (3, 5, 7) and pixels >= MIN_STRIDED_PIXELS:
            # measured on stems (3 input channels); a depthwise conv (1 per group) gets the same rule
            channels = f"{cin_per_group} input channel{'s' if cin_per_group != 1 else ''} per group"
            return THRESHOLD_STEM, f"{kh}x{kw} strided conv on {channels} (as a stem) to {where} output"
        if cin_per_group < MIN_STRIDED_CIN:
            return 0.0, f"strided conv with {cin_per_group} < {MIN_STRIDED_CIN} input channels per group"
        if pixels < MIN_STRIDED_PIXELS:
            return 0.0, f"strided conv to {where} output (the kernel loses below 7x7)"
        if kh == kw and kh in THRESHOLD_STRIDED:
            big, small = THRESHOLD_STRIDED[kh]
            return (big if pixels >= MIN_1x1_FULL_PIXELS else small), f"{kh}x{kw} strided conv to {where} output"
        return THRESHOLD_STRIDED_OTHER, "strided conv"
    if (kh, kw) == (3, 3):
        if out_hw is None:
            return THRESHOLD_3x3_UNKNOWN, "3x3/s1 on an unknown plane (assumed 3x3 or larger)"
        if tuple(out_hw) == (2, 2):
            return THRESHOLD_3x3_2x2, "3x3/s1 on 2x2 output"
        for min_pixels, thr in THRESHOLD_3x3_S1:
            if pixels >= min_pixels:
                return thr, f"3x3/s1 on {where} output"
    if (kh, kw) == (1, 1):
        if pixels < MIN_1x1_PIXELS:
            return 0.0, f"1x1/s1 on {where} plane (the kernel loses below 7x7)"
        if pixels < MIN_1x1_FULL_PIXELS:
            return THRESHOLD_1x1_SMALL, f"1x1/s1 on {where} output"
        for min_cin, thr in THRESHOLD_1x1:
            if cin_per_group >= min_cin:
                return thr, f"1x1/s1 with {cin_per_group} input channels"
    if kh == kw and kh in (5, 7):
        return THRESHOLD_KXK, f"{kh}x{kw}/s1"
    return 0.0, f"{kh}x{kw} kernel (no fast sparse path)"


# Depthwise convs run by the native kernel need output planes at least this wide and high: on
# 7x7 outputs (8-float vectors, a few FMAs per channel) ORT's Conv with its reorders was faster
# (`benchmarks/bench_kernel.py --set depthwise`: native 0.67-0.90x of it).
MIN_DEPTHWISE_HW = 14


def depthwise_native(kernel: tuple[int, int], strides: Sequence[int], dilations: Sequence[int],
                     pads: Sequence[int], cin_per_group: int, out_hw: tuple[int, int] | None) -> bool:
    """Whether the native kernel's depthwise path runs this conv at least as fast as ONNX Runtime's
    blocked-layout (NCHWc) depthwise Conv: one input channel per output, 3x3 or 5x5, stride 1 or 2,
    no dilation, pads below the kernel size, output planes of at least MIN_DEPTHWISE_HW x
    MIN_DEPTHWISE_HW (``benchmarks/bench_kernel.py --set depthwise``, ORT 1.32, AVX-512: ORT's Conv
    with the reorders into and out of its NCHWc layout took 1.2-1.6x the native time on 3x3, 1.03-1.13x
    on 5x5 at batch 1, 1.3-5x at batch 8). Next to SparseConv layers such a conv is written as a
    SparseConv too, so the tensors between them stay NCHW (see ``_layout_pass``)."""
    kh, kw = kernel
    return (cin_per_group == 1 and kh == kw and kh in (3, 5) and len(set(int(x) for x in strides)) == 1
            and int(strides[0]) in (1, 2) and all(int(d) == 1 for d in dilations) and all(int(p) < kh for p in pads)
            and out_hw is not None and min(out_hw) >= MIN_DEPTHWISE_HW)


def value_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of the graph's values from ONNX shape inference ({} when it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    return shapes


def _out_hw(node: onnx.NodeProto, w_shape: Sequence[int], x_shape: list[int] | None) -> tuple[int, int] | None:
    """The Conv's output plane from its input shape and attributes (None when the input plane is unknown)."""
    if not x_shape or len(x_shape) != 4 or not x_shape[2] or not x_shape[3]:
        return None
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    strides = list(_attr(node, "strides", [1, 1]))
    dil = list(_attr(node, "dilations", [1, 1]))
    kh, kw = int(w_shape[2]), int(w_shape[3])
    ho = (x_shape[2] + pads[0] + pads[2] - (kh - 1) * dil[0] - 1) // strides[0] + 1
    wo = (x_shape[3] + pads[1] + pads[3] - (kw - 1) * dil[1] - 1) // strides[1] + 1
    return (int(ho), int(wo)) if ho > 0 and wo > 0 else None


def _distinct_digits(a: float, b: float, least: int = 2, most: int = 6) -> tuple[str, str]:
    """``a`` and ``b`` with ``least`` decimals, or as many more (up to ``most``) as tell them apart.

    A reason "density 0.20 < 0.20" hid which side of the threshold a layer's density (0.1995) fell.
    """
    for digits in range(least, most + 1):
        fa, fb = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if fa != fb:
            break
    return fa, fb


def convert_model(model: onnx.ModelProto, dense_threshold: float | None = None,
                  decide: Decide | None = None) -> tuple[onnx.ModelProto, ConvertReport]:
    """Rewrite channel-sparse Conv nodes of ``model`` (not modified) into SparseConv; return the new model.

    A Conv is rewritten when its weight is a constant 4-D float tensor, it has no ``auto_pad``,
    and its live-connection density is below the layer's threshold: ``sparse_threshold`` (measured
    per kernel, stride and plane size) by default, or ``dense_threshold`` for every layer when
    given; ``decide`` (autotune) may then still keep it dense. With the default rule a layer also
    stays dense where the NCHWc reorders around it would cost more than it saves (``_layout_pass``).
    Then what ORT would fuse into its own Conv is fused into the SparseConv: a BatchNormalization +
    Relu before it (SparseConvPre), the residual Add after it (SparseConvAdd), a Relu / constant Clip
    (SparseConvRelu, SparseConvClip, SparseConvAddRelu, SparseConvPreRelu). Other nodes are left alone.
    """
    if dense_threshold is not None and not 0.0 <= dense_threshold <= 1.0:
        raise ExportError(f"dense threshold {dense_threshold} is outside [0, 1]; pass e.g. 0.6")
    model = load(model)
    if any(f.domain == DOMAIN and f.name in SPARSE_OPS for f in model.functions):
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
    shapes = value_shapes(model) if dense_threshold is None else {}
    report = ConvertReport()
    new_nodes: list[onnx.NodeProto] = []
    originals: dict[int, tuple[onnx.NodeProto, ConvChoice]] = {}  # id(SparseConv node) -> (its Conv, choice)
    layout_only: set[int] = set()  # ids of depthwise SparseConvs written for the layout, not for sparsity
    new_inits: list[onnx.TensorProto] = []
    taken = {t.name for t in model.graph.initializer} | {o for nd in model.graph.node for o in nd.output}

    # (weight, bias) -> the packed initializers' names: a module called twice (one weight, two Conv
    # nodes) keeps one copy of its packed weight in the file (it held two, the second named *_1)
    packed_names: dict[tuple[str, str], list[str]] = {}

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
        if wproto is None or wproto.data_type != TensorProto.FLOAT:
            report.choices.append(ConvChoice(name, tuple(wproto.dims) if wproto else (), _attr(node, "group", 1),
                                             1.0, 0, False, "weight is not a constant float tensor"))
            new_nodes.append(node)
            continue
        if len(wproto.dims) != 4:  # Conv1d / Conv3d: its density as it is, under its layer's name
            live = block_mask(numpy_helper.to_array(wproto))
            report.choices.append(ConvChoice(name, tuple(wproto.dims), _attr(node, "group", 1), float(live.mean()),
                                             int(live.sum()), False, f"{len(wproto.dims) - 2}-D conv (SparseConv is "
                                             "2-D): a Conv with its masked weights", weight=wname))
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(wproto)
        group = int(_attr(node, "group", 1))
        live = block_mask(w)
        choice = ConvChoice(name, tuple(w.shape), group, float(live.mean()), int(live.sum()), False, "", weight=wname,
                            shared_fan_in=shared_fan_in_share(
                                live, group, regroup=regroups(w.shape[2:], _attr(node, "strides", [1, 1]))))
        report.choices.append(choice)
        auto_pad = _attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if dense_threshold is None:
            threshold, rule = sparse_threshold(
                (w.shape[2], w.shape[3]), _attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1]),
                w.shape[1], _out_hw(node, w.shape, shapes.get(node.input[0])), choice.shared_fan_in)
            rule = f" ({rule})"
        else:
            threshold, rule = dense_threshold, ""
        layout_candidate = False
        if auto_pad != "NOTSET":
            choice.reason = f"auto_pad={auto_pad} (only explicit pads are rewritten)"
        elif choice.density >= threshold:
            d, t = _distinct_digits(choice.density, threshold)
            # a rule that keeps every density dense reads as itself ("density 0.25 >= 0.00 (strided ...)")
            choice.reason = rule[2:-1] if threshold <= 0 and rule else f"density {d} >= {t}{rule}"
            layout_candidate = (dense_threshold is None and decide is None and depthwise_native(
                (w.shape[2], w.shape[3]), _attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1]),
                _attr(node, "pads", [0, 0, 0, 0]), w.shape[1], _out_hw(node, w.shape, shapes.get(node.input[0]))))
        else:
            d, t = _distinct_digits(choice.density, threshold)
            choice.sparse, choice.reason = True, f"density {d} < {t}{rule}"
            if decide is not None:
                choice.sparse, choice.reason = decide(model, node, w, choice)
        if not choice.sparse and not layout_candidate:
            new_nodes.append(node)
            continue
        packed, row_ptr, col_idx = pack(w)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bproto = inits.get(node.input[2], consts.get(node.input[2]))
            if bproto is None:
                if choice.sparse:
                    choice.sparse, choice.reason = False, "bias is not a constant"
                new_nodes.append(node)
                continue
            bias = numpy_helper.to_array(bproto).astype(np.float32)
        if bias is None:
            bias = np.zeros(w.shape[0], dtype=np.float32)
        key = (wname, node.input[2] if len(node.input) > 2 else "")
        names = packed_names.get(key) if wname else None
        if names is None:
            base = wname.replace("/", "_").replace(":", "_") or name
            names = [fresh(f"{base}.packed"), fresh(f"{base}.row_ptr"), fresh(f"{base}.col_idx"), fresh(f"{base}.bias")]
            for arr, nm in zip((packed, row_ptr, col_idx, bias), names):
                new_inits.append(numpy_helper.from_array(arr, nm))
            packed_names[key] = names
        dil = list(_attr(node, "dilations", [1, 1]))
        new_nodes.append(sparse_conv_node(
            [node.input[0]] + names, list(node.output), name=name,
            strides=_attr(node, "strides", [1, 1]), pads=_attr(node, "pads", [0, 0, 0, 0]),
            dilations=dil, group=group, in_channels=int(w.shape[1]) * group,
        ))
        originals[id(new_nodes[-1])] = (node, choice)
        if layout_candidate:
            layout_only.add(id(new_nodes[-1]))

    if dense_threshold is None and shapes:
        new_nodes = _layout_pass(new_nodes, originals, shapes, {**inits, **consts}, layout_only)
    new_nodes = _fuse_pre_activations(model.graph, new_nodes, report, {**inits, **consts}, new_inits, fresh)
    new_nodes = _fuse_residual_adds(model, new_nodes, report)
    new_nodes = _fuse_activations(model.graph, new_nodes, report, {**inits, **consts})
    new_nodes = _fuse_max_pools(model.graph, new_nodes, report)
    new_nodes = _fuse_concats(model.graph, new_nodes, report)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    if report.sparse_nodes:
        if not any(op.domain == DOMAIN for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        model.functions.extend(sparse_conv_functions(opset, new_nodes))
        if any(nd.domain == DOMAIN and nd.overload for nd in new_nodes):
            model.ir_version = max(model.ir_version, PIECES_IR_VERSION)
    return model, report


def _scalar(consts: dict[str, onnx.TensorProto], name: str) -> float | None:
    """The value of a constant one-element float tensor ``name`` (None when it is not one)."""
    t = consts.get(name)
    if t is None or t.data_type != TensorProto.FLOAT:
        return None
    a = numpy_helper.to_array(t)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


# The layout cost model of _layout_pass. ONNX Runtime runs a dense Conv in its blocked NCHWc
# layout (blocks of NCHWC_BLOCK channels on AVX-512) and reorders tensors at every edge between such
# a Conv and an NCHW op such as SparseConv. ORT 1.32 blocks every group-1 Conv, padding channel
# counts that are not whole blocks (MobileNetV2's 24-channel projections and expansions); grouped
# ones only when each group's channels are whole blocks, depthwise ones when the channels are;
# a group-1 Conv of fewer than NCHWC_BLOCK input channels reads its NCHW input directly. Reorders measured
# in ORT profiles of MobileNetV2 / EfficientNet-B0 at 224x224 (1 thread): about 30 GB/s up to
# 2 MB (cache-resident), 11 GB/s above (96 channels at 112x112, 4.8 MB: 0.44 ms). ORT's dense
# Conv runs at about 43 GMAC/s on the measured CPU; a 1x1 SparseConv takes about 2.0 * density +
# 0.07 of the dense time (fit to the bench_kernel sweeps: 3.7x at 0.1, 2.1x at 0.2, 1.5x at 0.3),
# 0.95 * density + 0.06 where its channels share fan-ins in blocks (6.3x at 0.1, 1.9x at 0.5).
NCHWC_BLOCK = 16
REORDER_BYTES_PER_S = (30e9, 11e9)
REORDER_CACHED_BYTES = 2 << 20
DENSE_MACS_PER_S = 43e9


def _sparse_time_ratio(density: float, shared_fan_in: float = 0.0) -> float:
    plain, shared = 2.0 * density + 0.07, 0.95 * density + 0.06
    return min(1.0, (1.0 - shared_fan_in) * plain + shared_fan_in * shared)


def _reorder_s(nbytes: float) -> float:
    return nbytes / REORDER_BYTES_PER_S[0 if nbytes <= REORDER_CACHED_BYTES else 1]


def _layout_pass(nodes: list[onnx.NodeProto], originals: dict[int, tuple[onnx.NodeProto, ConvChoice]],
                 shapes: dict[str, list[int]], consts: dict[str, onnx.TensorProto],
                 layout_only: frozenset[int] | set[int] = frozenset()) -> list[onnx.NodeProto]:
    """Keep a SparseConv dense where ORT would reorder its input or output to and from the NCHWc
    layout of neighbouring dense Convs (through Relu / Clip) for longer than the sparse kernel saves:
    the per-layer rule measures layers alone, without those reorders. In MobileNetV2 / EfficientNet-B0
    the 1x1 16->96 expansion on 112x112 feeds a depthwise Conv: sparse it saved 0.3 ms and cost a
    0.44 ms reorder (the whole model ran 1.53x faster than dense with it sparse, 1.72x with it dense).
    Decisions go in node order, each seeing the earlier ones.

    Then the depthwise convs of ``layout_only`` (written as SparseConv at density 1 because the
    native kernel runs them as fast as ORT's own): each stays a SparseConv when that leaves fewer
    bytes to reorder than ORT's NCHWc Conv would (its neighbours are SparseConvs, in NCHW), else it
    is a Conv again. MobileNetV2 at density 0.1: 1.68x of dense at batch 8 with them, 1.29x without
    (the reorders around every depthwise conv were a fifth of the sparse model's time)."""
    producer = {o: nd for nd in nodes for o in nd.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for nd in nodes:
        for i in nd.input:
            consumers.setdefault(i, []).append(nd)
    current = {id(nd): nd for nd in nodes}

    def nbytes(name: str) -> float | None:
        dims = shapes.get(name)
        if not dims or len(dims) != 4 or not all(dims[1:]):
            return None
        return 4.0 * max(1, dims[0]) * dims[1] * dims[2] * dims[3]

    def silu(nd: onnx.NodeProto) -> str | None:
        """The input t of a Mul(t, Sigmoid(t)) (SiLU), else None."""
        if nd.op_type != "Mul" or nd.domain not in ("", "ai.onnx") or len(nd.input) != 2:
            return None
        for a, b in (nd.input, nd.input[::-1]):
            sig = producer.get(b)
            if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == a:
                return a
        return None

    def act(nd: onnx.NodeProto) -> bool:
        """An activation ORT fuses into (or runs in the layout of) its NCHWc Conv: Relu, Clip, SiLU."""
        return (nd.op_type in ("Relu", "Clip", "Sigmoid") and nd.domain in ("", "ai.onnx")) or silu(nd) is not None

    def nchwc(nd: onnx.NodeProto | None) -> bool:
        if nd is None or nd.op_type != "Conv" or nd.domain not in ("", "ai.onnx"):
            return False
        w = consts.get(nd.input[1])
        if w is None or len(w.dims) != 4:
            return False
        group = int(_attr(nd, "group", 1))
        cout, cin_per_group = int(w.dims[0]), int(w.dims[1])
        if group == 1:
            return True  # ORT pads other channel counts to whole blocks (MobileNetV2's 24, EfficientNet's 40)
        if cout % NCHWC_BLOCK:
            return False
        if cin_per_group == 1 and cout == group:
            return True  # depthwise
        return cin_per_group % NCHWC_BLOCK == 0 and (cout // group) % NCHWC_BLOCK == 0

    def up(name: str) -> onnx.NodeProto | None:
        nd = producer.get(name)
        while nd is not None and act(nd):
            nd = producer.get(silu(nd) or nd.input[0])
        return current.get(id(nd)) if nd is not None else None

    def down(name: str) -> list[onnx.NodeProto]:
        found = []
        for nd in consumers.get(name, []):
            found += down(nd.output[0]) if act(nd) else [current.get(id(nd), nd)]
        return list({id(nd): nd for nd in found}.values())

    def reorders(nd: onnx.NodeProto, blocked: bool, reads_nchw: bool = False) -> float | None:
        """Seconds of NCHWc reorders around conv node nd (None: shapes unknown) when it runs in ORT's
        blocked layout (blocked) or in NCHW (a SparseConv), given its neighbours as they now are.
        reads_nchw: ORT's NCHWc Conv reads its NCHW input directly (fewer channels than a block)."""
        bx, by = nbytes(nd.input[0]), nbytes(nd.output[0])
        if bx is None or by is None:
            return None
        src, dst = up(nd.input[0]), down(nd.output[0])
        if blocked:
            return ((0.0 if nchwc(src) or reads_nchw else _reorder_s(bx))
                    + (_reorder_s(by) if any(not nchwc(c) for c in dst) else 0.0))
        return (_reorder_s(bx) if nchwc(src) else 0.0) + (_reorder_s(by) if any(nchwc(c) for c in dst) else 0.0)

    out = list(nodes)

    def revert(i: int, nd: onnx.NodeProto, conv: onnx.NodeProto) -> None:
        out[i] = conv
        current[id(nd)] = conv
        current[id(conv)] = conv
        producer.update({o: conv for o in conv.output})

    def saving(nd: onnx.NodeProto) -> float:
        """Seconds SparseConv nd saves over its Conv by the layout cost model (reorders aside)."""
        conv, choice = originals[id(nd)]
        w = consts[conv.input[1]]
        t_dense = float(np.prod(w.dims)) * (nbytes(nd.output[0]) or 0.0) / 4.0 / max(1, int(w.dims[0])) / DENSE_MACS_PER_S
        return t_dense * (1.0 - _sparse_time_ratio(choice.density, choice.shared_fan_in))

    def gains(nd: onnx.NodeProto | None) -> bool:
        """nd is a SparseConv the per-layer rule wrote (not a layout-only one), still is, and saves time."""
        return (nd is not None and id(nd) in originals and id(nd) not in layout_only and current.get(id(nd)) is nd
                and saving(nd) > 0.0)

    def sparse_pass() -> bool:
        changed = False
        for i, nd in enumerate(out):
            if id(nd) not in originals or id(nd) in layout_only:
                continue
            conv, choice = originals[id(nd)]
            sparse_cost = reorders(nd, blocked=False)
            if not sparse_cost or not nchwc(conv):
                continue
            w = consts[conv.input[1]]
            # ORT's NCHWc Conv reads an NCHW input of fewer than a block of channels directly (a stem): no reorder in
            dense_cost = reorders(nd, blocked=True, reads_nchw=int(w.dims[1]) * int(_attr(conv, "group", 1)) < NCHWC_BLOCK)
            saved = saving(nd)
            if dense_cost + saved < sparse_cost:
                revert(i, nd, conv)
                changed = True
                choice.sparse = False
                choice.reason = (f"density {choice.density:.2f}, kept dense: reordering its tensors to and from the "
                                 f"NCHWc layout of the dense convs next to it would cost {1e3 * sparse_cost:.2f} ms, "
                                 f"more than it saves ({1e3 * saved:.2f} ms)")
        return changed

    def depthwise_pass(first: bool) -> bool:
        changed = False
        for i, nd in enumerate(out):
            if id(nd) not in layout_only:
                continue
            conv, choice = originals[id(nd)]
            src, dst = up(nd.input[0]), down(nd.output[0])
            as_sparse, as_conv = reorders(nd, blocked=False), reorders(nd, blocked=True)
            keep = as_sparse is not None and bool(dst)
            if keep and first:
                # Before the sparse layers' own decisions (which take it for an NCHW neighbour): only
                # next to a layer the rule wrote sparse that saves time by the cost model (at density
                # 0.5 a 1x1 expansion kept sparse only for the layout made MobileNetV2 0.98x of dense).
                keep = any(gains(x) for x in (src, *dst))
            if keep:
                keep = as_sparse < as_conv
                if keep:
                    choice.sparse = True
                    choice.reason = (f"depthwise, written as SparseConv: next to SparseConvs it saves "
                                     f"{1e3 * (as_conv - as_sparse):.2f} ms of NCHWc reorders")
            if not keep:
                revert(i, nd, conv)
                choice.sparse = False
                changed = True
        return changed

    # Decisions only ever go back to Conv, so this settles: each pass sees the others' results.
    depthwise_pass(first=True)
    while sparse_pass() | depthwise_pass(first=False):
        pass
    return out


def _fuse_pre_activations(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], report: ConvertReport,
                          consts: dict[str, onnx.TensorProto], new_inits: list[onnx.TensorProto],
                          fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
    """BatchNormalization (inference, constant parameters) -> Relu -> SparseConv becomes SparseConvPre
    with S = scale / sqrt(var + eps) and T = B - mean * S, where each node is the only reader of the
    one before and no output in between is a graph output (DenseNet's pre-activation: BN and Relu on
    the concatenated features; ORT runs them in NCHWc next to its own convs, but as NCHW nodes
    before SparseConvs they took 15% of a sparse DenseNet-121 at batch 1)."""
    readers = _reader_counts(graph, nodes)
    outputs = {o.name for o in graph.output}
    producer = {o: nd for nd in nodes for o in nd.output}
    by_node = {c.node: c for c in report.choices}
    gone: set[int] = set()
    for conv in nodes:
        if conv.domain != DOMAIN or conv.op_type != OP or len(conv.input) != 5:
            continue
        relu = producer.get(conv.input[0])
        if relu is None or relu.op_type != "Relu" or relu.domain not in ("", "ai.onnx"):
            continue
        bn = producer.get(relu.input[0])
        if (bn is None or bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx")
                or len(bn.output) != 1 or len(bn.input) != 5 or _attr(bn, "training_mode", 0)):
            continue
        if any(readers.get(t, 0) != 1 or t in outputs for t in (relu.output[0], bn.output[0])):
            continue
        params = [consts.get(i) for i in bn.input[1:]]
        if any(p is None or p.data_type != TensorProto.FLOAT for p in params):
            continue
        scale, bias, mean, var = (numpy_helper.to_array(p).astype(np.float64).reshape(-1) for p in params)
        eps = float(_attr(bn, "epsilon", 1e-5))
        s_ = scale / np.sqrt(var + eps)
        t_ = bias - mean * s_
        base = conv.input[1].rsplit(".packed", 1)[0]
        names = [fresh(f"{base}.pre_scale"), fresh(f"{base}.pre_shift")]
        for arr, nm in zip((s_, t_), names):
            new_inits.append(numpy_helper.from_array(arr.astype(np.float32), nm))
        conv.op_type = OP_PRE
        conv.input[0] = bn.input[0]
        conv.input.extend(names)
        gone |= {id(relu), id(bn)}
        if conv.name in by_node:
            by_node[conv.name].activation = "Pre"
    return [nd for nd in nodes if id(nd) not in gone]


def _fuse_concats(graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
                  report: ConvertReport) -> list[onnx.NodeProto]:
    """A channel Concat (axis 1; -3 as X is 4-D) read only by pre ops (SparseConvPre /
    SparseConvPreRelu) goes: each reader takes the Concat's inputs as its pieces (X first, the
    others after T) and reads them where they are. DenseNet concatenates all earlier features before every layer; those Concats
    took 11% of a sparse DenseNet-121 on one thread and 39% on two at batch 1 (ORT's Concat runs
    slower on two threads than on one)."""
    readers = _reader_counts(graph, nodes)
    outputs = {o.name for o in graph.output}
    by_node = {c.node: c for c in report.choices}
    pre_reads: dict[str, list[onnx.NodeProto]] = {}
    for nd in nodes:
        if nd.domain == DOMAIN and nd.op_type in PRE_OPS and pieces(nd) == 1:
            pre_reads.setdefault(nd.input[0], []).append(nd)
    gone: set[int] = set()
    for cat in nodes:
        if (cat.op_type != "Concat" or cat.domain not in ("", "ai.onnx") or len(cat.output) != 1
                or _attr(cat, "axis", None) not in (1, -3) or not cat.input or "" in cat.input):
            continue
        out = cat.output[0]
        convs = pre_reads.get(out, [])
        # every reader a pre op reading it as X (and only there), the Concat no graph output
        if (not convs or out in outputs or readers.get(out, 0) != len(convs)
                or any(list(c.input).count(out) != 1 for c in convs)):
            continue
        for conv in convs:
            conv.input[0] = cat.input[0]
            conv.input.extend(cat.input[1:])
            _set_overload(conv)
            if conv.name in by_node:
                by_node[conv.name].pieces = pieces(conv)
        gone.add(id(cat))
    return [nd for nd in nodes if id(nd) not in gone]


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Shapes of the graph's values from ONNX shape inference, dims as ints, symbolic names or None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if not vi.type.tensor_type.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in vi.type.tensor_type.shape.dim)
    return shapes


def _same_shape(a: tuple | None, b: tuple | None) -> bool:
    """Both shapes fully known (ints or the same symbolic names) and equal: an Add between them does not broadcast."""
    return a is not None and b is not None and len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


def _fuse_residual_adds(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                        report: ConvertReport) -> list[onnx.NodeProto]:
    """SparseConv -> Add(., Z) becomes SparseConvAdd(..., Z) where the Add is the conv output's only
    reader and Z has the output's exact shape (no broadcasting), as ORT fuses its own Conv with a
    following Add (FusedConv's Z input). When both Add inputs are SparseConvs (a ResNet block with a
    downsampling shortcut) the later one absorbs the Add. The fused node takes the Add's place in
    the node order, where Z is computed. Separate Add and Relu nodes took 6% of a sparse ResNet-50's
    time at batch 1."""
    graph = model.graph
    readers = _reader_counts(graph, nodes)
    outputs = {o.name for o in graph.output}
    position = {id(nd): i for i, nd in enumerate(nodes)}
    producer = {nd.output[0]: nd for nd in nodes if nd.domain == DOMAIN and nd.op_type == OP and len(nd.input) == 5}
    shapes: dict | None = None
    by_node = {c.node: c for c in report.choices}
    moved: dict[int, onnx.NodeProto] = {}  # id(Add) -> the fused conv that replaces it
    gone: set[int] = set()
    dropped: set[str] = set()
    for nd in nodes:
        if nd.op_type != "Add" or nd.domain not in ("", "ai.onnx") or len(nd.input) != 2 or nd.input[0] == nd.input[1]:
            continue
        cands = [(position[id(producer[x])], i) for i, x in enumerate(nd.input)
                 if x in producer and id(producer[x]) not in gone and readers.get(x, 0) == 1 and x not in outputs]
        if not cands:
            continue
        _, i = max(cands)
        conv, z = producer[nd.input[i]], nd.input[1 - i]
        if shapes is None:
            shapes = _symbolic_shapes(model)
        if not _same_shape(shapes.get(conv.output[0]), shapes.get(z)):
            continue
        conv.op_type = OP_ADD
        conv.input.append(z)
        dropped.add(conv.output[0])
        conv.output[0] = nd.output[0]
        gone.add(id(conv))
        moved[id(nd)] = conv
        if conv.name in by_node:
            by_node[conv.name].activation = "Add"
    if dropped:
        keep = [vi for vi in graph.value_info if vi.name not in dropped]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return [moved.get(id(nd), nd) for nd in nodes if id(nd) not in gone]


def _fuse_into_producers(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], report: ConvertReport,
                         op_types: tuple[str, ...], producer_ops: tuple[str, ...],
                         fold: Callable[[onnx.NodeProto, onnx.NodeProto], bool]) -> list[onnx.NodeProto]:
    """Folds each standard node of ``op_types`` that is the only reader of a sparse node's output
    (of ``producer_ops``; not a graph output) into that node: ``fold(node, producer)`` rewrites the
    producer (False: it did not, the node stays); the producer then writes the node's output and
    its ConvChoice.activation names what it took in."""
    readers = _reader_counts(graph, nodes)
    outputs = {o.name for o in graph.output}
    producer = {nd.output[0]: nd for nd in nodes if nd.domain == DOMAIN and nd.op_type in producer_ops}
    by_node = {c.node: c for c in report.choices}
    fused: set[int] = set()
    dropped: set[str] = set()
    for nd in nodes:
        if nd.op_type not in op_types or nd.domain not in ("", "ai.onnx") or not nd.input:
            continue
        src = producer.get(nd.input[0])
        if src is None or readers.get(nd.input[0], 0) != 1 or nd.input[0] in outputs or not fold(nd, src):
            continue
        dropped.add(src.output[0])
        src.output[0] = nd.output[0]
        fused.add(id(nd))
        if src.name in by_node:
            by_node[src.name].activation += nd.op_type
    if dropped:
        keep = [vi for vi in graph.value_info if vi.name not in dropped]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return [nd for nd in nodes if id(nd) not in fused]


def _fuse_activations(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], report: ConvertReport,
                      consts: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """SparseConv -> Relu becomes SparseConvRelu, and SparseConv -> Clip with constant bounds
    (ReLU6) SparseConvClip, where the activation is the only reader of the SparseConv's output
    (and that output is not a graph output). ORT fuses its own Conv with either; a separate Relu
    node cost a sparse VGG 7-13% of its time at batch 1, the Clips 6% of a sparse MobileNetV2."""
    def fold(nd: onnx.NodeProto, src: onnx.NodeProto) -> bool:
        if nd.op_type == "Relu":
            src.op_type = {OP_ADD: OP_ADD_RELU, OP_PRE: OP_PRE_RELU}.get(src.op_type, OP_RELU)
            return True
        if src.op_type != OP:
            return False  # no fused Clip after the residual Add or a pre-activation
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            named = len(nd.input) > i and nd.input[i]
            bounds.append(_scalar(consts, nd.input[i]) if named else default)
        if any(b is None for b in bounds) or not bounds[0] <= bounds[1]:
            return False  # bounds computed at run time, or empty: leave the Clip alone
        src.op_type = OP_CLIP
        src.attribute.extend([helper.make_attribute("min", float(bounds[0])),
                              helper.make_attribute("max", float(bounds[1]))])
        return True

    return _fuse_into_producers(graph, nodes, report, ("Relu", "Clip"), (OP, OP_ADD, OP_PRE), fold)


def _fuse_max_pools(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], report: ConvertReport) -> list[onnx.NodeProto]:
    """A 2-D MaxPool (ceil_mode 0, dilations 1, no Indices output, explicit or no pads) that is the
    only reader of a sparse node's output (not a pre op's) goes into that node (``fuse_max_pool``).
    ORT runs a MaxPool in its blocked layout (NCHWc) behind a reorder of the whole unpooled output:
    after a sparse ResNet-18 stem, reorder and pool took 1 ms at batch 1."""
    def fold(nd: onnx.NodeProto, src: onnx.NodeProto) -> bool:
        kernel = list(_attr(nd, "kernel_shape", []))
        pads = list(_attr(nd, "pads", [0] * 2 * len(kernel)))
        if (pooled(src) or (len(nd.output) > 1 and nd.output[1]) or len(kernel) != 2
                or _attr(nd, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or _attr(nd, "ceil_mode", 0) != 0
                or list(_attr(nd, "dilations", [1, 1])) != [1, 1] or _attr(nd, "storage_order", 0) != 0
                or len(pads) != 4 or any(p >= kernel[i % 2] for i, p in enumerate(pads))):
            return False  # the Indices output, or a pool the op does not compute
        fuse_max_pool(src, kernel, list(_attr(nd, "strides", [1, 1])), pads)
        return True

    return _fuse_into_producers(graph, nodes, report, ("MaxPool",), tuple(o for o in SPARSE_OPS if o not in PRE_OPS),
                                fold)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for nd in model.graph.node for i in nd.input} | {o.name for o in model.graph.output}
    used |= subgraph_inputs(model.graph.node)
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) == len(model.graph.initializer):
        return
    dropped = {t.name for t in model.graph.initializer} - {t.name for t in keep}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    graph_inputs = [i for i in model.graph.input if i.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)


def _reader_counts(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> dict[str, int]:
    """How many readers each tensor name has among ``nodes`` and the graph's subgraphs (a fusion
    may only swallow a tensor its one reader consumes)."""
    readers: dict[str, int] = {}
    for nd in nodes:
        for i in nd.input:
            readers[i] = readers.get(i, 0) + 1
    for name in subgraph_inputs(graph.node):
        readers[name] = readers.get(name, 0) + 1
    return readers


def subgraph_inputs(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Names read inside the subgraphs (If/Loop/Scan bodies) of ``nodes``, at any depth: a body may
    capture the outer graph's values and initializers."""
    found: set[str] = set()
    for nd in nodes:
        for a in nd.attribute:
            for g in ([a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)):
                found |= {i for n2 in g.node for i in n2.input} | subgraph_inputs(g.node)
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
                 dense_threshold: float | None = None, decide: Decide | None = None) -> ConvertReport:
    """Convert any ONNX file's channel-sparse Conv nodes to SparseConv and write ``out`` atomically."""
    from .._io import atomic_path

    model, report = convert_model(load(src), dense_threshold, decide)
    check(model)
    with atomic_path(out) as tmp:
        save(model, tmp)
    return report
