"""``sparsify inspect FILE.onnx``: per-node channels, kernels, SparseConv densities, bytes and MACs.

MACs are counted at the model's input shape with batch 1: a Conv counts every weight (that is what
a dense kernel executes), a SparseConv counts its live kernels only, Gemm/MatMul count M*N*K.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import onnx_sparse


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 if i == 0 else 0
            for i, d in enumerate(vi.type.tensor_type.shape.dim)]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Known value shapes with the batch (first) dimension set to 1."""
    shapes: dict[str, list[int]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        d = _dims(vi)
        if d is not None and all(x > 0 for x in d):
            shapes[vi.name] = d
    return shapes


def _conv_out(x: list[int], k: tuple[int, int], strides, pads, dils) -> tuple[int, int]:
    return tuple((x[2 + i] + pads[i] + pads[i + 2] - dils[i] * (k[i] - 1) - 1) // strides[i] + 1
                 for i in range(2))  # type: ignore[return-value]


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """The node table of an ONNX file: op, channels, kernel, SparseConv density, param bytes, MACs; totals."""
    model = onnx_sparse.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    shapes = _shapes(model)
    init_names = set(inits)
    inputs = [i for i in model.graph.input if i.name not in init_names]
    rows: list[dict[str, Any]] = []
    for idx, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        row: dict[str, Any] = {"name": node.name or f"{node.op_type}_{idx}", "op": node.op_type,
                               "domain": node.domain or "ai.onnx", "in_channels": None, "out_channels": None,
                               "kernel": None, "stride": None, "group": None, "density": None,
                               "param_bytes": 0, "macs": 0}
        for name in node.input:
            if name in inits:
                t = inits[name]
                row["param_bytes"] += int(np.prod(t.dims, dtype=np.int64)) * np.dtype(
                    helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        x = shapes.get(node.input[0]) if node.input else None
        is_sparse = node.domain == onnx_sparse.DOMAIN and node.op_type in onnx_sparse.SPARSE_OPS
        if (node.op_type == "Conv" and node.domain in ("", "ai.onnx") or is_sparse) and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            group = int(attrs.get("group", 1))
            strides = list(attrs.get("strides", [1, 1]))
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            dils = list(attrs.get("dilations", [1, 1]))
            if is_sparse:
                row_ptr = numpy_helper.to_array(inits[node.input[2]]) if node.input[2] in inits else None
                cout = len(row_ptr) - 1 if row_ptr is not None else 0
                cin = int(attrs.get("in_channels", x[1] if x else 0))
                kernel = tuple(w.shape[1:])
                live = w.shape[0]
                total = cout * (cin // group) if cin else 0
            else:
                cout, cin, kernel = w.shape[0], w.shape[1] * group, tuple(w.shape[2:])
                live = int(onnx_sparse.block_mask(w).sum())
                total = w.shape[0] * w.shape[1]
            row.update(in_channels=cin, out_channels=cout, kernel="x".join(map(str, kernel)),
                       stride="x".join(map(str, strides)), group=group,
                       density=round(live / total, 4) if total else None)
            if x and len(x) == 4:
                ho, wo = _conv_out(x, kernel, strides, pads, dils)
                per_pixel = live if is_sparse else total
                row["macs"] = int(per_pixel * kernel[0] * kernel[1] * ho * wo)
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            w = inits[node.input[1]]
            trans_b = node.op_type == "Gemm" and int(attrs.get("transB", 0)) == 1
            k, n = (w.dims[1], w.dims[0]) if trans_b else (w.dims[0], w.dims[-1])
            rows_m = int(np.prod(x[:-1])) if x else 1
            row.update(in_channels=int(k), out_channels=int(n), macs=int(rows_m * k * n))
        rows.append(row)
    totals = {
        "nodes": len(rows),
        "sparse_conv_nodes": sum(r["op"] in onnx_sparse.SPARSE_OPS for r in rows),
        "conv_nodes": sum(r["op"] == "Conv" for r in rows),
        "param_bytes": sum(r["param_bytes"] for r in rows),
        "macs": sum(r["macs"] for r in rows),
    }
    return {
        "file": str(path), "file_bytes": Path(path).stat().st_size,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "inputs": [{"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
                   for i in inputs],
        "has_function_body": any(f.domain == onnx_sparse.DOMAIN for f in model.functions),
        "nodes": rows, "totals": totals,
    }


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}T{unit}"


def render_onnx_report(report: dict[str, Any]):
    """A rich Table of ``inspect_onnx``'s report (weight-carrying nodes; other ops summarised)."""
    from rich.table import Table

    t = report["totals"]
    shape = ", ".join(f"{i['name']}[{'x'.join(map(str, i['shape']))}]" for i in report["inputs"])
    table = Table(title=f"{report['file']} · {shape} · {_human(report['file_bytes'], 'B')}",
                  caption=f"{t['nodes']} nodes, {t['sparse_conv_nodes']} SparseConv, {t['conv_nodes']} Conv · "
                          f"params {_human(t['param_bytes'], 'B')} · {_human(t['macs'])} MACs at batch 1")
    for col, justify in (("node", "left"), ("op", "left"), ("in→out", "right"), ("kernel", "right"),
                         ("stride", "right"), ("group", "right"), ("density", "right"), ("params", "right"),
                         ("MACs", "right")):
        table.add_column(col, justify=justify)
    others: dict[str, int] = {}
    for r in report["nodes"]:
        if r["in_channels"] is None and not r["param_bytes"]:
            others[r["op"]] = others.get(r["op"], 0) + 1
            continue
        dens = "" if r["density"] is None else f"{r['density']:.3f}"
        op = f"[bold cyan]{r['op']}[/]" if r["op"] in onnx_sparse.SPARSE_OPS else r["op"]
        chans = "" if r["in_channels"] is None else f"{r['in_channels']}→{r['out_channels']}"
        table.add_row(r["name"], op, chans, r["kernel"] or "", r["stride"] or "", str(r["group"] or ""), dens,
                      _human(r["param_bytes"], "B"), _human(r["macs"]))
    if others:
        table.add_row("(other)", ", ".join(f"{k}×{v}" for k, v in sorted(others.items())), "", "", "", "", "", "", "")
    return table
