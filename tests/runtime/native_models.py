"""Hand-built ONNX models with one ai.sparsify::SparseConv node, and their dense Conv reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sparsify.runtime.onnx_sparse import (DOMAIN, DOMAIN_VERSION, PIECES_IR_VERSION, PRE_OPS, SUM_OPS, sparse_conv_functions,
                                          sparse_conv_node)


@dataclass
class ConvCase:
    """One SparseConv layer: channel mask, dense weight, attributes."""

    weight: np.ndarray  # dense [Cout, Cin/group, kH, kW], already masked
    mask: np.ndarray  # bool [Cout, Cin/group]
    bias: np.ndarray  # [Cout]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1

    @property
    def cin(self) -> int:
        return self.weight.shape[1] * self.group

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(W [nnz, kH, kW], row_ptr [Cout+1], col_idx [nnz]) in output-then-input order."""
        rows, cols = np.nonzero(self.mask)
        w = self.weight[rows, cols].astype(np.float32).reshape(-1, *self.weight.shape[2:])
        row_ptr = np.concatenate([[0], np.cumsum(self.mask.sum(axis=1))]).astype(np.int64)
        return w, row_ptr, cols.astype(np.int64)


def random_case(rng: np.random.Generator, cin: int, cout: int, k: int | tuple[int, int], density: float,
                group: int = 1, block: int = 1, **attrs: object) -> ConvCase:
    """A case with a random channel mask of about `density` (first row empty, last row full);
    block > 1: runs of `block` output channels (from channel 0, across group boundaries) share one
    row of the mask."""
    kh, kw = (k, k) if isinstance(k, int) else k
    cin_g = cin // group
    mask = np.repeat(rng.random((-(-cout // block), cin_g)) < density, block, axis=0)[:cout]
    if cout >= 2:
        mask[0] = False
        mask[-1] = True
    weight = rng.standard_normal((cout, cin_g, kh, kw)).astype(np.float32) * mask[:, :, None, None]
    bias = rng.standard_normal(cout).astype(np.float32)
    return ConvCase(weight=weight, mask=mask, bias=bias, group=group, **attrs)  # type: ignore[arg-type]


def _attrs(case: ConvCase) -> dict[str, object]:
    return dict(strides=list(case.strides), pads=list(case.pads), dilations=list(case.dilations), group=case.group)


def sparse_model(case: ConvCase, *, packed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 bias: np.ndarray | None = None, weights_as_inputs: bool = False,
                 op_type: str = "SparseConv", pre: tuple[np.ndarray, np.ndarray] | None = None,
                 pieces: tuple[int, ...] = (), function_body: bool = False, **attr_override: object) -> bytes:
    """A model X -> SparseConv -> Y with the packed weights as initializers (and no function body
    unless ``function_body``).

    weights_as_inputs: W, row_ptr and col_idx are graph inputs fed at run time instead (not
    constant to the kernel), see packed_feeds. The sum ops (SparseConvAdd, SparseConvAddRelu) get a
    graph input Z of the output's shape as their sixth input; the pre ops (SparseConvPre,
    SparseConvPreRelu) take ``pre`` = (S, T), per-input-channel scale and shift, as initializers.
    pieces (pre ops): the input's channel counts when it comes in pieces, graph inputs X, X_2, ...
    (see split_input). function_body: the model carries the op's standard-ONNX body.
    """
    w, row_ptr, col_idx = packed if packed is not None else case.packed()
    b = case.bias if bias is None else bias
    attrs = _attrs(case)
    attrs.update(attr_override)
    sum_op = op_type in SUM_OPS
    extra = ["Z"] if sum_op else (["S", "T"] if op_type in PRE_OPS else [])
    more = [f"X_{i}" for i in range(2, len(pieces) + 1)]
    assert not pieces or sum(pieces) == case.cin
    node = sparse_conv_node(["X", "W", "row_ptr", "col_idx", "B"] + extra + more, ["Y"], op=op_type,
                            in_channels=case.cin, **attrs)
    packed_inits = [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), "W"),
                    numpy_helper.from_array(np.asarray(row_ptr, np.int64), "row_ptr"),
                    numpy_helper.from_array(np.asarray(col_idx, np.int64), "col_idx")]
    # pieces' channel counts symbolic: tests feed wrong ones to the kernel's own checks
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", f"C{i}" if more else c, "H", "W"])
              for i, (x, c) in enumerate(zip(["X"] + more, pieces or (case.cin,)))]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info("W", TensorProto.FLOAT, ["nnz", *w.shape[1:]]),
                   helper.make_tensor_value_info("row_ptr", TensorProto.INT64, [len(row_ptr)]),
                   helper.make_tensor_value_info("col_idx", TensorProto.INT64, ["nnz"])]
        packed_inits = []
    if sum_op:
        inputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", case.weight.shape[0], "Ho", "Wo"]))
    if op_type in PRE_OPS:
        assert pre is not None, "the pre ops need pre=(S, T)"
        packed_inits += [numpy_helper.from_array(np.asarray(pre[0], np.float32), "S"),
                         numpy_helper.from_array(np.asarray(pre[1], np.float32), "T")]
    graph = helper.make_graph(
        [node], "sparseconv", inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=packed_inits + [numpy_helper.from_array(np.asarray(b, np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=sparse_conv_functions(17, [node]) if function_body else [])
    model.ir_version = PIECES_IR_VERSION if node.overload else 8  # overloads (pieces, a fused pool) need IR 10
    return model.SerializeToString()


def split_input(x: np.ndarray, pieces: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Feeds X, X_2, ... of a sparse_model(..., pieces=pieces): x split along the channel axis."""
    parts = np.split(x, np.cumsum(pieces)[:-1], axis=1)
    return {("X" if i == 0 else f"X_{i + 1}"): np.ascontiguousarray(p) for i, p in enumerate(parts)}


def packed_feeds(case: ConvCase) -> dict[str, np.ndarray]:
    """Run-time inputs W, row_ptr, col_idx of a sparse_model(..., weights_as_inputs=True)."""
    w, row_ptr, col_idx = case.packed()
    return {"W": np.ascontiguousarray(w, np.float32), "row_ptr": row_ptr, "col_idx": col_idx}


def dense_model(case: ConvCase, weight: np.ndarray | None = None) -> bytes:
    """The reference: ONNX Conv with the masked dense weight."""
    w = case.weight if weight is None else weight
    node = helper.make_node("Conv", ["X", "Wd", "B"], ["Y"], kernel_shape=list(w.shape[2:]), **_attrs(case))
    graph = helper.make_graph(
        [node], "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", case.cin, "H", "W"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w, np.float32), "Wd"),
                     numpy_helper.from_array(case.bias.astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
