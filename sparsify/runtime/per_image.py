"""Per-image execution of a network's front, where one image's activations are large: an ONNX Scan.

ONNX Runtime runs a graph node by node over the whole batch. A conv at density 0.1 does a tenth
of a dense conv's arithmetic per byte of activation it reads, so where one image's activations are
large (the first stages of a 224x224 network, 0.5-3 MB per image per tensor) a batch of 8 no longer
fits in the caches and the sparse layers wait on memory: ResNet-50 with ``--block 4`` at density 0.1
and batch 8 ran 1.36x slower batched than split, and split as fast as its equal-parameter thinner
dense model (README). Running the front of the network image by image keeps one image's
activations in cache from layer to layer; the rest (small planes, where batching helps: fewer node
dispatches, fuller vectors) stays batched.

The split: ``nodes[:k]`` in the graph's (topological) order form the body of one ``Scan`` over axis
0 of every runtime input the front reads, where ``k`` is one past the last SparseConv node with an
output of at least ``PER_IMAGE_BYTES`` per image (``front_length``). Inside the body an ``Unsqueeze`` gives
each image its batch axis of 1 back, so the front's nodes are unchanged; each value the front
hands on (to the rest or to the graph outputs) leaves the body through a ``Squeeze`` and is
stacked back along axis 0 by the Scan. Body values are renamed ``NAME@front`` (the outer graph
keeps the original names, ONNX wants each name defined once); the initializers the front reads
move into the body (copied when the rest reads them too), and so do the front's value shapes
(value_info: the per-image shapes come from them, as ONNX shape inference stops at a SparseConv's
function body). ``unsplit`` is the exact inverse, for every reader of a file that wants the plain
graph (inspect, validation, conversion).

Only what one image computes may differ per image: a model whose outputs mix the images of a
batch (a batch mean at inference) is not equivalent split, which the export's verification at
batch 3 finds (it then keeps the batched graph). Measured (``benchmarks/bench_imagenet.py``, the
``batched/per-image`` column; README): at density 0.1, batch 8, one thread the split ran 1.13-1.45x
faster than the batched graph (MobileNetV2 1.45x, DenseNet-121 1.25x, ResNet-50 1.23x), on two
threads 1.04-1.32x; at batch 1 the extra subgraph run costs 1-9%. CIFAR-size models have no
SparseConv output of 512 KiB per image and are never split.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_sparse import DOMAIN, subgraph_inputs

PER_IMAGE_BYTES = 512 * 1024   # a SparseConv output per image at or above which the front runs per image
SCAN_NAME = "sparsify_per_image"   # the Scan node of a split graph (``is_split`` looks for it)
FRONT = "@front"                   # suffix of value names made inside the body
IMAGE = "@image"                   # suffix of the body's per-image inputs and outputs
_AXES = "sparsify_per_image_axes"  # the constant [0] the adapters squeeze and unsqueeze


def _batch_dims(model: onnx.ModelProto) -> set[str]:
    """The symbolic batch dimension names of the model's runtime inputs (empty if any is static)."""
    inits = {t.name for t in model.graph.initializer}
    names = set()
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            return set()
        names.add(dims[0].dim_param)
    return names


def per_image_shapes(model: onnx.ModelProto) -> dict[str, tuple[list[int], int]]:
    """``{value: (shape without the batch axis, element type)}`` for every value of the main graph
    whose first dimension is the inputs' symbolic batch dimension and whose other dimensions are
    known (ONNX shape inference). Empty when the inputs have no symbolic batch dimension."""
    batch = _batch_dims(model)
    if not batch:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    found: dict[str, tuple[list[int], int]] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        dims = tt.shape.dim
        if dims and dims[0].dim_param in batch and all(d.HasField("dim_value") for d in dims[1:]):
            found[vi.name] = ([int(d.dim_value) for d in dims[1:]], tt.elem_type)
    return found


def _nbytes(shape: list[int], elem_type: int) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _crossing(model: onnx.ModelProto, k: int) -> list[str]:
    """Values made by ``nodes[:k]`` and read by ``nodes[k:]`` or by the graph outputs, in order."""
    g = model.graph
    later = {i for n in g.node[k:] for i in n.input} | {o.name for o in g.output}
    later |= subgraph_inputs(g.node[k:])
    return [o for n in g.node[:k] for o in n.output if o and o in later]


def front_length(model: onnx.ModelProto, threshold: int = PER_IMAGE_BYTES, any_node: bool = False
                 ) -> tuple[int, str]:
    """How many leading nodes to run image by image, and why (or why none).

    ``k`` is one past the last ``ai.sparsify`` node with an output of at least ``threshold`` bytes
    per image, provided the model's runtime inputs have a symbolic batch dimension and every value
    the front hands on has a known per-image shape; ``(0, reason)`` otherwise. Only SparseConvs
    count: they are what waits on memory (dense convs are compute-bound), while other large nodes
    gain nothing per image and cost a dispatch per image on a multi-thread pool (DenseNet-121 at
    batch 8, 2 threads: a front to its last large Concat ran 0.89x of the batched graph, to its
    last large SparseConv 1.17x). ``any_node``: count every node instead (how
    ``benchmarks/bench_per_image_baselines.py`` gives dense graphs a front).
    """
    g = model.graph
    shapes = per_image_shapes(model)
    if not shapes:
        return 0, "the inputs have no symbolic batch dimension, or their shapes are unknown"
    if any(n.op_type in ("Scan", "Loop", "If") for n in g.node):
        return 0, "the graph already has control flow"
    k = 0
    for idx, n in enumerate(g.node):
        if (any_node or n.domain == DOMAIN) and any(o in shapes and _nbytes(*shapes[o]) >= threshold
                                                   for o in n.output):
            k = idx + 1
    if k == 0:
        return 0, f"no {'' if any_node else 'SparseConv '}output reaches {threshold // 1024} KiB per image"
    missing = [c for c in _crossing(model, k) if c not in shapes]
    if missing:
        return 0, f"value {missing[0]} leaves the front without a per-image shape"
    return k, (f"the first {k} of {len(g.node)} nodes run image by image (to the last "
               f"{'node' if any_node else 'SparseConv'} with an output of {threshold // 1024} KiB or more per "
               "image), the rest batched")


def split(model: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """``model`` with ``nodes[:k]`` run image by image in a Scan (see the module docstring).

    ``k`` in ``[1, len(nodes)]``; raises ValueError when a value the front hands on has no known
    per-image shape, or the inputs no symbolic batch dimension. ``model`` is not modified.
    """
    g = model.graph
    if not 1 <= k <= len(g.node):
        raise ValueError(f"front length {k} is outside [1, {len(g.node)}]")
    shapes = per_image_shapes(model)
    front, rest = list(g.node[:k]), list(g.node[k:])
    inits = {t.name: t for t in g.initializer}
    read_front = {i for n in front for i in n.input} | subgraph_inputs(front)
    read_rest = {i for n in rest for i in n.input} | subgraph_inputs(rest) | {o.name for o in g.output}
    inputs = [i for i in g.input if i.name not in inits and i.name in read_front]
    crossing = _crossing(model, k)
    for name in [i.name for i in inputs] + crossing:
        if name not in shapes:
            raise ValueError(f"value {name} has no per-image shape (no symbolic batch axis)")
    made = {o for n in front for o in n.output if o}
    rename = {v: v + FRONT for v in made | {i.name for i in inputs}}

    def renamed(n: onnx.NodeProto) -> onnx.NodeProto:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        for j, v in enumerate(c.input):
            c.input[j] = rename.get(v, v)
        for j, v in enumerate(c.output):
            c.output[j] = rename.get(v, v)
        return c

    body_nodes = [helper.make_node("Unsqueeze", [i.name + IMAGE, _AXES], [rename[i.name]]) for i in inputs]
    body_nodes += [renamed(n) for n in front]
    body_nodes += [helper.make_node("Squeeze", [rename[c], _AXES], [c + IMAGE]) for c in crossing]
    body = helper.make_graph(
        body_nodes, "per_image_front",
        [helper.make_tensor_value_info(i.name + IMAGE, shapes[i.name][1], shapes[i.name][0]) for i in inputs],
        [helper.make_tensor_value_info(c + IMAGE, shapes[c][1], shapes[c][0]) for c in crossing],
        initializer=[helper.make_tensor(_AXES, TensorProto.INT64, [1], [0])]
        + [inits[v] for v in sorted(read_front) if v in inits],
        value_info=[_renamed_info(vi, rename[vi.name]) for vi in g.value_info if vi.name in made])
    scan = helper.make_node("Scan", [i.name for i in inputs], crossing, name=SCAN_NAME, body=body,
                            num_scan_inputs=len(inputs),
                            doc_string=f"sparsify: the first {k} nodes run image by image "
                                       "(sparsify.runtime.per_image)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend([scan] + rest)
    del out.graph.initializer[:]
    out.graph.initializer.extend(t for t in g.initializer if t.name in read_rest)
    del out.graph.value_info[:]
    out.graph.value_info.extend(vi for vi in g.value_info if vi.name not in made or vi.name in crossing)
    return out


def _renamed_info(vi: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    c = onnx.ValueInfoProto()
    c.CopyFrom(vi)
    c.name = name
    return c


def is_split(model: onnx.ModelProto) -> bool:
    """True when ``model``'s first node is the per-image Scan that ``split`` writes."""
    g = model.graph
    return bool(g.node) and g.node[0].op_type == "Scan" and g.node[0].name == SCAN_NAME


def front_nodes(model: onnx.ModelProto) -> int:
    """How many nodes of ``model`` run image by image (0 for a graph that is not split)."""
    if not is_split(model):
        return 0
    return sum(1 for n in _body(model).node if not _is_adapter(n))


def _body(model: onnx.ModelProto) -> onnx.GraphProto:
    """The body of a split model's per-image Scan."""
    return helper.get_attribute_value(next(a for a in model.graph.node[0].attribute if a.name == "body"))


def _is_adapter(n: onnx.NodeProto) -> bool:
    return n.op_type in ("Squeeze", "Unsqueeze") and len(n.input) == 2 and n.input[1] == _AXES


def unsplit(model: onnx.ModelProto) -> onnx.ModelProto:
    """The batched graph that ``split`` came from (``model`` itself when it is not split)."""
    if not is_split(model):
        return model
    g = model.graph
    body = _body(model)

    def original(v: str) -> str:
        return v[: -len(FRONT)] if v.endswith(FRONT) else v

    front = []
    for n in body.node:
        if _is_adapter(n):
            continue
        c = onnx.NodeProto()
        c.CopyFrom(n)
        for j, v in enumerate(c.input):
            c.input[j] = original(v)
        for j, v in enumerate(c.output):
            c.output[j] = original(v)
        front.append(c)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(front + list(g.node[1:]))
    have = {t.name for t in g.initializer}
    out.graph.initializer.extend(t for t in body.initializer if t.name != _AXES and t.name not in have)
    known = {vi.name for vi in g.value_info}
    out.graph.value_info.extend(_renamed_info(vi, original(vi.name)) for vi in body.value_info
                                if original(vi.name) not in known)
    return out


__all__ = ["PER_IMAGE_BYTES", "front_length", "split", "unsplit", "is_split", "front_nodes", "per_image_shapes"]
