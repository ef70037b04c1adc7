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

from . import onnx_sparse, per_image


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


def _conv_out(x: list[int], k: tuple[int, ...], strides, pads, dils) -> tuple[int, ...]:
    """A Conv's output spatial sizes for input ``x`` ``[N, C, *spatial]`` (1-D, 2-D or 3-D; ONNX pads
    are all begins, then all ends)."""
    n = len(k)
    return tuple((x[2 + i] + pads[i] + pads[i + n] - dils[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(n))


def validate_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Refuse an ONNX file that has no graph, or whose SparseConv index arrays are malformed.

    For every ``ai.sparsify`` node whose inputs are initializers: W is ``[nnz, kh, kw]``, row_ptr is
    int64 ``[Cout+1]`` starting at 0, never decreasing and ending at nnz, col_idx is int64 ``[nnz]``
    with every entry in ``[0, in_channels/group)``, ``group`` divides ``in_channels`` and Cout, and B
    has Cout entries. The native kernel refuses such a node, but the standard-ONNX function body
    scatters whatever it is given and computes a wrong result silently, so every path that loads
    a file checks here first. Raises RuntimeBackendError naming the node and the first violation.
    """
    from ..errors import RuntimeBackendError

    if not model.graph.node or not model.graph.output:
        size = Path(path).stat().st_size if isinstance(path, (str, os.PathLike)) and Path(path).is_file() else None
        what = "is empty" if size == 0 else "holds no ONNX graph"
        raise RuntimeBackendError(f"{path} {what}; it is not a model (a truncated copy?); export it again")
    model = per_image.unsplit(model)   # the nodes of a per-image front live in a Scan body
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> np.ndarray | None:
        t = inits.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None  # computed at run time or stored outside: nothing to check statically
        return numpy_helper.to_array(t)

    for idx, node in enumerate(model.graph.node):
        if node.domain != onnx_sparse.DOMAIN or node.op_type not in onnx_sparse.SPARSE_OPS:
            continue
        name = node.name or f"{node.op_type}_{idx}"

        def bad(why: str) -> RuntimeBackendError:
            return RuntimeBackendError(f"{path}: node {name} ({node.op_type}) is malformed: {why}; the file is "
                                       f"damaged or was not written by `sparsify export`, so export it again")

        if len(node.input) < 4:
            raise bad(f"it has {len(node.input)} inputs, not X, W, row_ptr, col_idx[, B]")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        group, cin = int(attrs.get("group", 1)), int(attrs.get("in_channels", 0))
        if cin <= 0 or group <= 0 or cin % group:
            raise bad(f"in_channels={cin} must be positive and divisible by group={group}")
        w, row_ptr, col_idx = array(node.input[1]), array(node.input[2]), array(node.input[3])
        b = array(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if row_ptr is not None:
            if row_ptr.dtype != np.int64 or row_ptr.ndim != 1 or row_ptr.size < 1:
                raise bad(f"row_ptr must be a 1-d int64 array of Cout+1 entries, got {row_ptr.dtype} {list(row_ptr.shape)}")
            cout = row_ptr.size - 1
            if row_ptr[0] != 0:
                raise bad(f"row_ptr starts at {int(row_ptr[0])}, not 0")
            drops = np.nonzero(np.diff(row_ptr) < 0)[0]
            if drops.size:
                k = int(drops[0])
                raise bad(f"row_ptr decreases at output channel {k} ({int(row_ptr[k])} -> {int(row_ptr[k + 1])})")
            if cout % group:
                raise bad(f"group={group} does not divide Cout={cout} (len(row_ptr) - 1)")
            if b is not None and b.shape != (cout,):
                raise bad(f"B has shape {list(b.shape)}, expected [{cout}] (Cout)")
        if w is not None and (w.ndim != 3 or min(w.shape[1:], default=0) < 1):
            raise bad(f"W must be [nnz, kh, kw], got shape {list(w.shape)}")
        if col_idx is not None:
            if col_idx.dtype != np.int64 or col_idx.ndim != 1:
                raise bad(f"col_idx must be a 1-d int64 array, got {col_idx.dtype} {list(col_idx.shape)}")
            if w is not None and col_idx.size != w.shape[0]:
                raise bad(f"col_idx has {col_idx.size} entries but W has nnz={w.shape[0]} kernels")
            if row_ptr is not None and int(row_ptr[-1]) != col_idx.size:
                raise bad(f"row_ptr ends at {int(row_ptr[-1])} but there are {col_idx.size} connections")
            out_of_range = np.nonzero((col_idx < 0) | (col_idx >= cin // group))[0]
            if out_of_range.size:
                k = int(out_of_range[0])
                raise bad(f"col_idx[{k}] = {int(col_idx[k])} is outside [0, {cin // group}) (input channels per group)")


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """The node table of an ONNX file: op, channels, kernel, SparseConv density, param bytes, MACs; totals.

    Raises RuntimeBackendError for a file ``validate_model`` refuses.
    """
    split = onnx_sparse.load(path)
    validate_model(split, path)
    model = per_image.unsplit(split)
    inits = {t.name: t for t in model.graph.initializer}
    shapes = _shapes(model)
    init_names = set(inits)
    inputs = [i for i in model.graph.input if i.name not in init_names]
    rows: list[dict[str, Any]] = []
    for idx, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1] if len(node.input) > 1 and node.input[1] in inits else ""
        layer = weight.removesuffix(".packed").removesuffix(".weight") if weight else ""
        row: dict[str, Any] = {"name": node.name or f"{node.op_type}_{idx}", "layer": layer or None, "op": node.op_type,
                               "domain": node.domain or "ai.onnx", "in_channels": None, "out_channels": None,
                               "kernel": None, "stride": None, "group": None, "density": None,
                               "param_bytes": 0, "macs": 0, "pieces": 1}
        row["param_bytes"] = sum(_nbytes(inits[name]) for name in node.input if name in inits)
        x = shapes.get(node.input[0]) if node.input else None
        is_sparse = node.domain == onnx_sparse.DOMAIN and node.op_type in onnx_sparse.SPARSE_OPS
        if is_sparse:
            row["pieces"] = onnx_sparse.pieces(node)  # > 1: its input is a removed Concat's inputs
        if (node.op_type == "Conv" and node.domain in ("", "ai.onnx") or is_sparse) and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            group = int(attrs.get("group", 1))
            dims = w.ndim - 1 if is_sparse else w.ndim - 2  # spatial axes: 1 for Conv1d
            strides = list(attrs.get("strides", [1] * dims))
            pads = list(attrs.get("pads", [0] * 2 * dims))
            dils = list(attrs.get("dilations", [1] * dims))
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
            if x and len(x) == 2 + len(kernel):
                per_pixel = live if is_sparse else total
                row["macs"] = int(per_pixel * np.prod(kernel) * np.prod(_conv_out(x, kernel, strides, pads, dils)))
        elif node.op_type == "ConvTranspose" and node.domain in ("", "ai.onnx") and node.input[1] in inits:
            # weight [Cin, Cout / group, k...]: every input pixel meets Cout / group * prod(k) weights
            w = inits[node.input[1]]
            group = int(attrs.get("group", 1))
            kernel = tuple(w.dims[2:])
            strides = attrs.get("strides", [1] * len(kernel))
            row.update(in_channels=int(w.dims[0]), out_channels=int(w.dims[1]) * group, group=group,
                       kernel="x".join(map(str, kernel)), stride="x".join(map(str, strides)))
            if x and len(x) == 2 + len(kernel):
                row["macs"] = int(np.prod(w.dims, dtype=np.int64) * np.prod(x[2:], dtype=np.int64))
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
        "reading_pieces": sum(r["pieces"] > 1 for r in rows),
        "conv_nodes": sum(r["op"] == "Conv" for r in rows),
        # each initializer once: a module called twice reads one weight from two nodes
        "param_bytes": sum(_nbytes(inits[name]) for name in {i for nd in model.graph.node for i in nd.input}
                           if name in inits),
        "macs": sum(r["macs"] for r in rows),
    }
    return {
        "file": str(path), "file_bytes": Path(path).stat().st_size,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "inputs": [{"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
                   for i in inputs],
        "outputs": [{"name": o.name, "shape": [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]}
                    for o in model.graph.output],
        "has_function_body": any(f.domain == onnx_sparse.DOMAIN for f in model.functions),
        "nodes": rows, "totals": totals, "per_image_nodes": per_image.front_nodes(split),
    }


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}T{unit}"


def _io(value: dict[str, Any]) -> str:
    """A graph input or output as name[shape]."""
    return f"{value['name']}[{'x'.join(map(str, value['shape']))}]"


def render_onnx_report(report: dict[str, Any], width: int | None = None):
    """A rich Table of ``inspect_onnx``'s report (weight-carrying nodes; other ops summarised).

    Rows are named by their weight (the PyTorch layer) where there is one, else by the node; names
    fold onto a second line rather than pushing the table past ``width`` (default 80).
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = report["totals"]
    shape = ", ".join(_io(i) for i in report["inputs"])
    rows, others = [], {}
    for r in report["nodes"]:
        if r["in_channels"] is None and not r["param_bytes"]:
            others[r["op"]] = others.get(r["op"], 0) + 1
            continue
        kernel = r["kernel"] or ""
        if kernel and r["stride"] and r["stride"] != "1x1":
            kernel += f"/{r['stride'].split('x')[0]}" if len(set(r["stride"].split("x"))) == 1 else f" s{r['stride']}"
        if r["group"] and r["group"] > 1:
            kernel += f" g{r['group']}"
        chans = "" if r["in_channels"] is None else f"{r['in_channels']}→{r['out_channels']}"
        rows.append([(r.get("layer") if r["in_channels"] is not None else None) or r["name"], r["op"], chans, kernel,
                     "" if r["density"] is None else f"{r['density']:.3f}", _human(r["param_bytes"], "B"),
                     _human(r["macs"])])
    headers = ("op", "in→out", "kernel", "density", "params", "MACs")
    others_w = sum(max([len(h)] + [len(row[i + 1]) for row in rows]) + 1 for i, h in enumerate(headers))
    longest = max([len("layer")] + [len(row[0]) for row in rows])
    table = Table(title=f"{report['file']} · {shape} · {_human(report['file_bytes'], 'B')}", title_justify="left",
                  caption=f"{t['nodes']} nodes, {t['sparse_conv_nodes']} SparseConv, {t['conv_nodes']} Conv · "
                          f"params {_human(t['param_bytes'], 'B')} · {_human(t['macs'])} MACs at batch 1"
                          + (f"\nthe first {report['per_image_nodes']} nodes run image by image (a Scan over the "
                             "batch)" if report.get("per_image_nodes") else "")
                          + (f"\n{t['reading_pieces']} SparseConv nodes read their input in pieces (the Concat "
                             "before them removed)" if t.get("reading_pieces") else "")
                          + (f"\noutputs: {', '.join(_io(o) for o in report['outputs'])}" if report.get("outputs") else "")
                          + (f"\nother ops: {', '.join(f'{k}×{v}' for k, v in sorted(others.items()))}" if others else "")
                          + ("\nMACs: what the file computes; a Conv computes its zeros too (density < 1:"
                             "\nmasked weights the export kept dense), so its MACs are the dense count"
                             if any(r["op"] == "Conv" and (r["density"] or 1) < 1 for r in report["nodes"]) else ""),
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0), pad_edge=False,
                  collapse_padding=True)
    table.add_column("layer", overflow="fold", max_width=min(longest, max(8, (width or 80) - others_w - 1)))
    for col in headers:
        table.add_column(col, justify="left" if col == "op" else "right", no_wrap=True)
    for row in rows:
        op = row[1]
        row[1] = Text(op, style="bold cyan") if op in onnx_sparse.SPARSE_OPS else op
        table.add_row(*row)
    return table
