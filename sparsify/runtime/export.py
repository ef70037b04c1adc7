"""Export: a (compacted) sparse model to ONNX with ``ai.sparsify::SparseConv`` nodes, verified in ORT.

Pipeline: compact (exact, certificate-checked) -> masked layers to plain layers carrying the masked
weights -> fold eval BatchNorm -> ``torch.onnx.export`` (dynamo, opset 18, dynamic batch) ->
``onnx_sparse.convert_model`` (channel-sparse Conv -> SparseConv + function body, per-layer choice)
-> ``onnx.checker`` full check -> verification against PyTorch in ONNX Runtime (function body, and
the native kernel when it is built) -> atomic write.

Why the dynamo exporter: it is torch's supported path (the TorchScript exporter is deprecated since
torch 2.9), its onnxscript optimizer emits clean standard ops (BN folded, no Identity/Constant
clutter), and its ConversionError names the aten op and graph node that failed, which we map back to
the user's fx node and source line. It costs ~0.6 s per export, which is fine here.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn

from .._io import atomic_path
from ..errors import ExportError, SparsifyError, UsageError
from ..passes.base import GraphPass, run_passes
from ..passes.compact import CHANNEL_ALIGN, CompactPass, FoldBatchNormPass
from ..passes.lowering import DensifyPass, OnnxFormsPass, TracePass
from ..passes.trace import user_source_line
from . import native as _native
from . import onnx_sparse
from . import per_image as _per_image
from .bench import time_bursts
from .onnx_sparse import ConvChoice, convert_onnx

OPSET = 18
TOLERANCE = 1e-4  # max abs error allowed, relative to the reference output's max magnitude
VERIFY_BATCHES = (1, 3)
VERIFY_SPATIAL = 64  # the size export_onnx_file checks a file at on its symbolic height / width axes


@dataclass
class ExportReport:
    """What an export did: compaction, per-layer sparse/dense choice, verification errors."""

    out: str
    source: str
    input_shape: list[int]          # the (first) input's shape
    dense: bool
    compaction: dict[str, Any] | None = None
    folded_bn: list[str] = field(default_factory=list)
    layers: list[ConvChoice] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)   # path ("function-body"/"native") -> max abs err
    native_available: bool = False
    file_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    input_shapes: list[list[int]] = field(default_factory=list)   # one per ONNX input
    output_names: list[str] = field(default_factory=list)
    per_image_nodes: int = 0        # leading nodes run image by image (``per_image``); 0: all batched
    per_image: str = ""             # why (or why not)

    @property
    def sparse_layers(self) -> int:
        """Number of Conv layers written as SparseConv."""
        return sum(c.sparse for c in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": self.out, "source": self.source, "input_shape": self.input_shape, "dense": self.dense,
            "compaction": self.compaction, "folded_bn": self.folded_bn,
            "layers": [dict(vars(c), layer=c.layer, weight_shape=list(c.weight_shape)) for c in self.layers],
            "errors": self.errors, "native_available": self.native_available,
            "file_bytes": self.file_bytes, "notes": self.notes, "input_shapes": self.input_shapes,
            "output_names": self.output_names, "per_image_nodes": self.per_image_nodes,
            "per_image": self.per_image,
        }


# --------------------------------------------------------------------------------------------
# Sessions: the native-session helper when present, plain onnxruntime otherwise


def native_available() -> bool:
    """True when the native SparseConv library is built and can be registered."""
    return _native.library_path() is not None


def open_session(model: str | os.PathLike | bytes, native: bool = False, threads: int | None = None):
    """An ORT session; ``native=True`` registers the SparseConv library when it is built."""
    return _native.session(model if isinstance(model, bytes) else str(model), intra_op_threads=threads,
                           native=native)


# --------------------------------------------------------------------------------------------
# Torch-side preparation


def check_output_path(out: str | os.PathLike) -> Path:
    """The output path, after checking its directory exists and is writable (ExportError otherwise;
    also for a path ending in a slash, which names a directory: Path() drops the slash, and
    "nodir/" wrote a file named nodir)."""
    if isinstance(out, str) and out.endswith(("/", os.sep)) and not Path(out).is_dir():
        if Path(out).exists():  # "a.onnx/" where a.onnx is a file: a.onnx/model.onnx cannot be written
            raise ExportError(f"--out {out} ends in a slash, so it names a directory, but {Path(out)} is a file; "
                              f"give the file name without the slash: --out {Path(out)}")
        raise ExportError(f"--out {out} ends in a slash, so it names a directory; give a file name such as "
                          f"{Path(out) / 'model.onnx'}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if not out.parent.is_dir():
        missing = next((p for p in reversed(out.parents) if not p.is_dir()), out.parent)
        if missing.exists():
            raise ExportError(f"cannot write {out}: {missing} is a file, not a directory; choose another --out")
        raise ExportError(f"cannot write {out}: directory {out.parent} does not exist; create it or choose another --out")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write {out}: directory {out.parent} is not writable; choose another --out")
    return out


# Export's preparation: the module handed to torch.onnx is the model after these passes, in this
# order (each on a copy; the trace, compact and fold-bn steps are left out when switched off).
PREPARATION = ("trace", "compact", "densify", "fold-bn", "onnx-forms")


def preparation(compact: bool = True, fold_bn: bool = True, channel_align: int = CHANNEL_ALIGN,
                rules: Any = None) -> list[GraphPass]:
    """The passes of ``PREPARATION`` that apply: tracing to the eval-mode graph (needed by
    compaction and folding), exact compaction (``compact``, channel groups kept a multiple of
    ``channel_align``), masked layers made plain, BatchNorm folded into convs (``fold_bn``), operations
    torch.onnx cannot express rewritten to equivalent forms (``lowering.OnnxFormsPass``)."""
    wanted = {"trace": compact or fold_bn, "compact": compact, "densify": True, "fold-bn": fold_bn,
              "onnx-forms": True}
    make = {"trace": TracePass, "compact": lambda: CompactPass(align=channel_align, rules=rules),
            "densify": DensifyPass, "fold-bn": FoldBatchNormPass, "onnx-forms": OnnxFormsPass}
    return [make[name]() for name in PREPARATION if wanted[name]]


def _prepare(model: nn.Module, example: tuple[torch.Tensor, ...], compact: bool, fold_bn: bool,
             report: ExportReport, channel_align: int, rules: Any = None) -> nn.Module:
    """The module to hand to torch.onnx: ``model`` (untouched) in eval mode and float, through
    ``preparation``; the compaction report and the folded BNs go into ``report``."""
    from ..passes.trace import eval_graph_module

    def eval_copy() -> nn.Module:  # held only by run_passes, which frees it after the first pass
        work: nn.Module = copy.deepcopy(model).eval().float()
        return eval_graph_module(work).eval() if isinstance(work, fx.GraphModule) else work

    work, reports = run_passes(preparation(compact, fold_bn, channel_align, rules), eval_copy(), example)
    if "compact" in reports:
        report.compaction = reports["compact"].to_json()
    if "fold-bn" in reports:
        report.folded_bn = reports["fold-bn"]
    return work


def _explain_failure(module: nn.Module, exc: BaseException) -> str:
    """One line naming the node torch.onnx could not express and, when known, its source line."""
    scripted = [name for name, m in module.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        return (f"torch.onnx cannot export {scripted[0]}: it is TorchScript (torch.jit.script), which the "
                f"exporter does not read; build the model without torch.jit.script and export again")
    text = str(exc)
    m = re.search(r"target=torch\.ops\.(\w+)\.(\w+)", text) or re.search(r"OpOverload\(op='(\w+)\.(\w+)'", text)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("<class")), "")
    first = re.sub(r"^<class '[\w.]+\.(\w+)'>:\s*", r"\1: ", first) or (text.splitlines() or [type(exc).__name__])[0]
    if not m:
        return f"torch.onnx cannot export the model ({first[:300]}); simplify the model or report it"
    op = m.group(2)
    node = None
    if isinstance(module, fx.GraphModule):
        for n in module.graph.nodes:
            tname = getattr(n.target, "__name__", str(n.target)).rsplit(".", 1)[-1]
            if n.op in ("call_function", "call_method") and (op.startswith(tname) or tname.startswith(op)
                                                             or n.name.startswith(op)):
                node = n
                break
    if node is None:
        return f"torch.onnx cannot express aten.{op} ({first[:300]}); replace that operation in the model"
    where = user_source_line(node)
    target = getattr(node.target, "__qualname__", str(node.target))
    return (f"torch.onnx cannot express node '{node.name}' ({target})" + (f" at {where}" if where else "")
            + f": {first[:200]}; replace that operation in the model")


def _input_names(model: nn.Module, n: int) -> list[str]:
    """"input" for one input (the name every sparsify file has had); the forward's names for several."""
    if n == 1:
        return ["input"]
    if isinstance(model, fx.GraphModule):
        names = [p.name for p in model.graph.nodes if p.op == "placeholder"]
        if len(names) == n:
            return names
    return [f"input_{i}" for i in range(n)]


def output_names(y: Any, notes: list[str] | None = None, inputs: Sequence[str] = ()) -> list[str]:
    """ONNX output names for a model output: "output" for one tensor (beside the one input's "input"),
    else one name per tensor from its place: dict keys ("logits"), tuple positions ("output_1"), joined by "."
    when nested ("boxes.0"), characters other than letters, digits, "_" and "." made "_". Leaves that
    are not tensors (None, numbers) get no name. Names stay unique: one already taken (``{"a": {"b":
    t}}`` and ``{"a.b": u}`` both read "a.b", or an output named like one of the ONNX ``inputs``)
    gets "_2", "_3"... in output order; each renaming (that and a key's changed characters) is
    described in one line appended to ``notes``."""
    import torch.utils._pytree as pytree

    places = []
    for path, leaf in pytree.tree_flatten_with_path(y)[0]:
        if not path:  # the output is one tensor: no place to name
            places.append(("", "output", "output"))
            continue
        if not isinstance(leaf, torch.Tensor):
            continue  # None / numbers are not ONNX outputs: naming them would shift the names after them
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if isinstance(y, (list, tuple)) and not hasattr(y, "_fields") and parts:
            parts[0] = f"output_{parts[0]}"
        joined = ".".join(parts)
        places.append((pytree.keystr(path), joined, re.sub(r"[^A-Za-z0-9_.]+", "_", joined) or "output"))
    wanted = {name for _, _, name in places}
    owner: dict[str, str] = {name: "a model input's" for name in inputs}
    final: dict[int, str] = {}
    # names kept as written first (a key "a_b" keeps it before "a b" becomes it), then in output order
    for i in sorted(range(len(places)), key=lambda i: places[i][1] != places[i][2]):
        where, _, name = places[i]
        new, k = name, 1
        while new in owner or (new != name and new in wanted):
            k += 1
            new = f"{name}_{k}"
        owner[new], final[i] = where, new
    names, renamed = [final[i] for i in range(len(places))], []
    for (where, joined, name), new in zip(places, names):
        if new != name:
            renamed.append(f"is '{new}' ('{name}' is {owner[name]})" if not where else
                           f"at {where} is '{new}' ('{name}' is {owner[name]})")
        elif new != joined:
            renamed.append(f"at {where} is '{new}'")
    if renamed and notes is not None:
        notes.append("ONNX output names are unique and use letters, digits, '_' and '.': the output "
                     + "; ".join(renamed))
    return names


def _check_outputs(y: Any) -> None:
    """ExportError for an output leaf ONNX cannot hold (a number, a string); None leaves are dropped."""
    import torch.utils._pytree as pytree

    for path, leaf in pytree.tree_flatten_with_path(y)[0]:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            where = pytree.keystr(path) or "the output"
            kind = type(leaf).__name__
            raise ExportError(f"the model returns {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({leaf!r:.40}) at "
                              f"{where}; ONNX outputs are tensors: return tensors (or None) only, e.g. "
                              f"torch.tensor(value)")


def _torch_export(module: nn.Module, example: tuple[torch.Tensor, ...], outputs: list[str] | None = None
                  ) -> onnx.ModelProto:
    """``torch.onnx.export`` with a dynamic batch dimension; ExportError naming the failing node."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # torch.onnx's own passes log warnings to stderr ("Skipped deduplication of initializer ...")
    loggers = [logging.getLogger(name) for name in ("torch", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    kwargs: dict[str, Any] = {"output_names": outputs} if outputs else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            program = torch.onnx.export(
                module, tuple(example), dynamo=True, opset_version=OPSET, verbose=False, optimize=True,
                input_names=_input_names(module, len(example)),
                dynamic_shapes=_dynamic_batch(module, len(example), batch), external_data=False, **kwargs,
            )
    except Exception as e:
        raise ExportError(_explain_failure(module, e)) from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    _check_dynamic_batch(program.model_proto, example)
    return program.model_proto


def _dynamic_batch(module: nn.Module, n: int, batch: Any) -> tuple[Any, ...]:
    """torch.export's ``dynamic_shapes`` for ``n`` inputs, axis 0 free: one entry per parameter of
    ``module.forward``, a tuple of them for a ``*xs`` parameter (``forward(self, *xs)`` failed with
    "inputs has 1 elements, but dynamic_shapes has 2")."""
    entries: list[Any] = []
    for p in inspect.signature(module.forward).parameters.values():
        if len(entries) >= n and p.kind != inspect.Parameter.VAR_POSITIONAL:
            break
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            rest = n - len(entries)
            entries.append(tuple({0: batch} for _ in range(rest)))
            return tuple(entries)
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            entries.append({0: batch})
    return tuple(entries) if len(entries) == n else tuple({0: batch} for _ in range(n))


def _check_dynamic_batch(model: onnx.ModelProto, example: tuple[torch.Tensor, ...]) -> None:
    """ExportError when an input's batch axis came out fixed: torch.export specialises it when the
    forward ties it to the example's size (``chunk(2, 0)`` of a batch made by ``torch.cat([x, x2], 0)``
    guards on it), and the file would then run only at the export's example batch."""
    for value in list(model.graph.input)[:len(example)]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"the exported model's batch axis is fixed at {dims[0].dim_value} (the export's example batch): "
                f"torch.export could not keep the batch axis of input '{value.name}' dynamic, because the forward "
                "computes along it with an op that depends on its size (e.g. chunk / split of a batch made by "
                "torch.cat([...], 0)); write such pieces as slices (f[:n], f[n:] with n = x.shape[0])")


# --------------------------------------------------------------------------------------------
# Autotune and verification


def _conv_input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shape (batch 1) of every value whose other dimensions are all known."""
    shapes = {}
    for name, shape in onnx_sparse.value_shapes(model).items():
        shape = [1, *shape[1:]] if shape and shape[0] == 0 else shape
        if shape and all(shape):
            shapes[name] = shape
    return shapes


def _single_node_model(node: onnx.NodeProto, inits: list[onnx.TensorProto], x_shape: list[int],
                       functions: list[onnx.FunctionProto]) -> bytes:
    from onnx import TensorProto, helper

    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend(["x"] + [t.name for t in inits])
    del n.output[:]
    n.output.append("y")
    graph = helper.make_graph([n], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(onnx_sparse.DOMAIN, 1)] if functions else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10, functions=functions).SerializeToString()


def make_autotuner(native: bool) -> onnx_sparse.Decide:
    """A per-layer decision that times dense Conv vs SparseConv on the layer's real shape (batch 1)."""
    shapes_cache: dict[int, dict[str, list[int]]] = {}

    def decide(model: onnx.ModelProto, node: onnx.NodeProto, w: np.ndarray, choice: ConvChoice) -> tuple[bool, str]:
        if not native:
            return False, "autotune: native kernel unavailable, the function body runs at dense speed"
        shapes = shapes_cache.setdefault(id(model), _conv_input_shapes(model))
        x_shape = shapes.get(node.input[0])
        if x_shape is None:
            return True, f"{choice.reason} (autotune: input shape unknown)"
        from onnx import helper, numpy_helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "kernel_shape"}
        bias = np.zeros(w.shape[0], np.float32)
        dense_node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
        dense = _single_node_model(dense_node, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")],
                                   x_shape, [])
        packed, row_ptr, col_idx = onnx_sparse.pack(w)
        sparse_node = onnx_sparse.sparse_conv_node(
            ["x", "w", "rp", "ci", "b"], ["y"],
            strides=attrs.get("strides", [1, 1]), pads=attrs.get("pads", [0, 0, 0, 0]),
            dilations=attrs.get("dilations", [1, 1]), group=int(attrs.get("group", 1)),
            in_channels=int(w.shape[1] * attrs.get("group", 1)))
        sparse = _single_node_model(sparse_node, [numpy_helper.from_array(packed, "w"),
                                                  numpy_helper.from_array(row_ptr, "rp"),
                                                  numpy_helper.from_array(col_idx, "ci"),
                                                  numpy_helper.from_array(bias, "b")],
                                    x_shape, [onnx_sparse.sparse_conv_function(OPSET)])
        feeds = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
        sessions = (open_session(dense, native=False), open_session(sparse, native=True))
        # the project's one latency loop: both variants side by side in interleaved bursts
        samples = time_bursts([lambda s=s: s.run(None, feeds) for s in sessions], burst_s=0.03, min_rounds=3,
                              min_runs=5, max_runs=30)
        choice.dense_ms, choice.sparse_ms = (float(np.median(t) * 1e3) for t in samples)
        faster = choice.sparse_ms < choice.dense_ms
        return faster, (f"autotune: sparse {choice.sparse_ms:.3f} ms vs dense {choice.dense_ms:.3f} ms "
                        f"at input {x_shape}")

    return decide


def _check_stateless(model: nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    """Raise ExportError when ``model`` (in eval mode) updates its state or gives another output for the
    same input on its second call: its forward updates state (``self.ema.mul_(0.5).add_(...)`` outside ``if
    self.training:``), which an ONNX file cannot keep between runs (compaction and verification
    failed on it with "please report it"). Runs a copy, twice (``_torch_outputs``: each call on its own
    copy of ``example``)."""
    probe = copy.deepcopy(model)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    first = _torch_outputs(probe, *example)
    second = _torch_outputs(probe, *example)
    # a state update that changes no output yet (a counter read by torch.where(self.count > 4, ...))
    # changes one later: refused as well
    changed = [k for k, v in probe.state_dict().items() if k in before and not torch.equal(v, before[k])]
    if not changed and all(a.shape == b.shape and np.array_equal(a, b, equal_nan=True) for a, b in zip(first, second)):
        return
    what = f"its forward updates {', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''}" if changed \
        else "its forward draws random numbers or keeps state between calls"
    raise ExportError(f"the model's eval-mode output changes from call to call on the same input ({what}), and an "
                      f"ONNX file computes one output per input; make that training-only (if self.training:) "
                      f"to export it")


def _torch_outputs(model: nn.Module, *xs: torch.Tensor) -> list[np.ndarray]:
    """The model's output tensors, flattened (dicts, tuples, nested) in the exporter's order. The model
    runs on copies of ``xs``: a forward that normalises its input in place (``x.sub_(mean)``) is
    stateless, and must not change the caller's input (the same array then goes to ONNX Runtime)."""
    import torch.utils._pytree as pytree

    with torch.no_grad():
        y = model(*(x.clone() for x in xs))
    return [t.detach().float().numpy() for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


# Verification outputs varying less than this (x max(1, their magnitude)) between images check little.
WEAK_CHECK_VARIATION = 1e-5


def verify_onnx(model_bytes: bytes, reference, input_shape: Sequence[Any], report: ExportReport,
                batches: Sequence[int] = VERIFY_BATCHES, tolerance: float = TOLERANCE, seed: int = 0) -> None:
    """Compare ORT (function body, and native kernel when built) with ``reference`` on random inputs.

    ``input_shape`` is one shape or a list of shapes (one per ONNX input, in order);
    ``reference(*xs: np.ndarray) -> list[np.ndarray]`` gives the expected outputs. Each output is
    compared on its own: max abs error <= ``tolerance`` x that output's max magnitude (floored at
    1e-6). Records the worst error per path in ``report.errors``; ExportError naming the output otherwise.
    """
    from ..report import input_shapes

    shapes = input_shapes(input_shape)
    paths = [("function-body", False)] + ([("native", True)] if report.native_available else [])
    rng = np.random.default_rng(seed)
    inputs = [[rng.standard_normal((b, *s[1:])).astype(np.float32) for s in shapes] for b in batches]
    expected = [reference(*xs) for xs in inputs]
    note = _weak_check_note(expected)
    if note is not None and note not in report.notes:
        report.notes.append(note)
    for label, native in paths:
        try:
            sess = open_session(model_bytes, native=native)
            names = [i.name for i in sess.get_inputs()]
            out_names = [o.name for o in sess.get_outputs()]
            if len(names) != len(shapes):
                raise ExportError(f"the ONNX model has {len(names)} inputs but the model takes {len(shapes)}")
            worst = 0.0
            for xs, ref in zip(inputs, expected):
                got = sess.run(None, dict(zip(names, xs)))
                if len(got) != len(ref):
                    raise ExportError(f"the ONNX model has {len(got)} outputs but the reference has {len(ref)}")
                for k, (r, g) in enumerate(zip(ref, got)):
                    if r.shape != g.shape and g.shape == (1, *r.shape) and xs[0].shape[0] == 1:
                        # ``pool(x).squeeze()`` drops the batch axis too at batch 1; the ONNX graph
                        # (dynamic batch) keeps it
                        raise ExportError(f"output {out_names[k]} loses its batch axis at batch 1 in PyTorch "
                                          f"({r.shape}, {g.shape} in ONNX): a squeeze() without a dim in forward "
                                          "removes it; squeeze the axes meant (x.squeeze((2, 3)) or x.flatten(1)) "
                                          "and transform again")
                    if r.shape != g.shape:
                        raise ExportError(f"verification failed: output {out_names[k]} has shape {g.shape} in ONNX "
                                          f"Runtime ({label}) but {r.shape} in PyTorch; please report it")
                    err = float(np.max(np.abs(r - g))) if r.size else 0.0
                    scale = float(np.max(np.abs(r))) if r.size else 0.0
                    worst = max(worst, err)
                    if not err <= tolerance * max(scale, 1e-6):
                        raise ExportError(
                            f"verification failed: ONNX Runtime ({label}) differs from the reference by {err:.3g} "
                            f"on output {out_names[k]} (output scale {scale:.3g}, batch {xs[0].shape[0]}); "
                            "the export is wrong, please report it"
                        )
        except SparsifyError:
            raise
        except Exception as e:
            raise ExportError(f"ONNX Runtime ({label}) cannot run the exported model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
        report.errors[label] = worst


def _weak_check_note(expected: Sequence[Sequence[np.ndarray]]) -> str | None:
    """A note when the reference outputs hardly depend on the input, so that agreeing checks little.

    ``expected``: per verification batch, the reference outputs ([batch, ...] each). An untrained
    network's activations can die out through its layers (zoo MobileNetV2 at 64x64 without BatchNorm
    statistics: outputs of 1e-9), and any export then "verifies" to 1e-20.
    """
    varies, scale, seen = 0.0, 0.0, False
    for outs in expected:
        for r in outs:
            r = np.asarray(r, dtype=np.float64)
            if r.ndim == 0 or r.shape[0] < 2 or not r.size:
                continue
            seen = True
            varies = max(varies, float(np.max(np.abs(r - r.mean(axis=0)))))
            scale = max(scale, float(np.max(np.abs(r))))
    if not seen or varies > WEAK_CHECK_VARIATION * max(scale, 1.0):
        return None
    return (f"verification checked little: on random inputs the model's outputs vary by at most {varies:.1g} "
            f"between images (largest magnitude {scale:.1g}), as an untrained network's can; load trained "
            "weights (--weights) or BatchNorm statistics from data for a meaningful check")


def zero_variance_hint(model: nn.Module) -> str | None:
    """Why two correct runtimes can disagree on ``model`` in eval mode, or None.

    A BatchNorm channel whose running variance is below its ``eps`` (a channel that was constant
    during training, e.g. behind a dead filter) multiplies any deviation of its input from the
    running mean by up to 1/sqrt(eps) (316x at eps 1e-5). Behind dead channels that deviation is
    rounding noise, so chains of such channels make the eval output depend on the order in which a
    runtime sums: ONNX Runtime and PyTorch are then both "right" and differ.
    """
    bad = [(name, int(c)) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_var is not None
           for c in (m.running_var < m.eps).nonzero().flatten().tolist()]
    if not bad:
        return None
    name, c = bad[0]
    return (f"{len(bad)} BatchNorm channel(s) have running variance below eps (e.g. {name} channel {c}) and amplify "
            "rounding differences up to 1/sqrt(eps) times in eval mode, so no two runtimes agree there: recompute "
            "the BatchNorm statistics on data where those channels vary (or with those channels removed), "
            "or export with --no-verify to accept the difference")


def _per_image_front(model: onnx.ModelProto, mode: bool | None) -> tuple[int, str]:
    """(leading nodes to run image by image, why): ``mode`` None is ``per_image.front_length``'s
    rule, True the whole graph, False none."""
    if mode is False:
        return 0, "off (--no-per-image)"
    if mode is True:
        return len(model.graph.node), "every node runs image by image (--per-image)"
    return _per_image.front_length(model)


def _split_and_verify(plain: onnx.ModelProto, mode: bool | None, report: ExportReport,
                      verify: Callable[[bytes], None] | None) -> onnx.ModelProto:
    """Split ``plain``'s front per image (``_per_image_front``) and check the result.

    ``verify(model_bytes)`` is the export's verification (None for --no-verify). A split model is
    verified as it will be written; when the split fails verification under the automatic rule
    (outputs that mix the images of a batch) the batched graph is verified and kept instead, with a
    note. Without verification a split model is still compared with the batched one in ONNX Runtime.
    """
    k, report.per_image = _per_image_front(plain, mode)
    model = plain
    if k:
        try:
            model = _per_image.split(plain, k)
        except ValueError as e:
            if mode:
                raise ExportError(f"--per-image cannot split this model: {e}; export without --per-image") from None
            k, report.per_image, model = 0, f"not split: {e}", plain
    report.per_image_nodes = k
    if not k:
        if verify is not None:
            verify(model.SerializeToString())
        return model
    try:
        if verify is not None:
            verify(model.SerializeToString())
        else:
            ref = open_session(plain.SerializeToString(), native=report.native_available)
            names = [i.name for i in ref.get_inputs()]
            verify_onnx(model.SerializeToString(), lambda *xs: ref.run(None, dict(zip(names, xs))),
                        report.input_shapes or [report.input_shape],
                        ExportReport(out="", source="", input_shape=[], dense=False,
                                     native_available=report.native_available))
        return model
    except ExportError as e:
        # the batched graph verified and the per-image one did not: the model's outputs mix the images
        # of a batch (batch statistics), not a wrong export
        why = str(e).replace("; the export is wrong, please report it", "")
        if mode:
            raise ExportError(f"--per-image: run image by image the model computes something else ({why}), as a "
                              f"model whose outputs mix the images of a batch does (e.g. BatchNorm with "
                              f"track_running_stats=False); export without --per-image") from None
        if verify is not None:
            verify(plain.SerializeToString())
        report.per_image_nodes = 0
        report.per_image = "not split: run image by image, the model failed verification (see the note)"
        report.notes.append(f"kept the batched graph: run image by image it failed verification, as a model whose "
                            f"outputs mix the images of a batch does ({why})")
        return plain


# --------------------------------------------------------------------------------------------
# Public entry points


def _finish(onnx_model: onnx.ModelProto, out: Path, report: ExportReport) -> ExportReport:
    onnx_sparse.check(onnx_model)
    with atomic_path(out) as tmp:
        onnx_sparse.save(onnx_model, tmp)
        report.file_bytes = tmp.stat().st_size
    return report


def export_model(model: nn.Module, input_shape: Sequence[Any], out: str | os.PathLike, *, dense: bool = False,
                 compact: bool = True, fold_bn: bool = True, dense_threshold: float | None = None, verify: bool = True,
                 autotune: bool = False, channel_align: int = CHANNEL_ALIGN, rules: Any = None,
                 per_image: bool | None = None, progress: Callable[[str], None] | None = None) -> ExportReport:
    """Export ``model`` to ONNX at ``out`` (atomic): SparseConv nodes where they win, verified in ORT.

    ``input_shape`` is one shape, or a list with one shape per model input (one ONNX input each,
    batch dynamic). One output tensor is named "output"; tuples, dicts or nested outputs become one
    named ONNX output per tensor (see ``output_names``). The model's eval-mode behaviour is exported.

    Compaction leaves every channel group at a multiple of ``channel_align`` channels (ORT's Conv
    is slower on unaligned counts); 1 removes every dead channel.

    ``dense`` writes every conv as a plain Conv with the masked weights (the baseline); ``compact``
    removes dead channels first (exact); each conv goes sparse below its measured per-layer density
    threshold (``onnx_sparse.sparse_threshold``) unless ``dense_threshold`` sets one for all layers;
    ``autotune`` also times dense vs sparse on the layer's shape (needs the native kernel to ever
    pick sparse). Masked 1-D convs are written as plain Convs with their masked weights (the
    SparseConv op is 2-D). ``rules`` (a rule registry) is what compaction knows about the user's
    leaf modules. ``per_image``: run the graph's front image by image in a Scan over the batch
    (``sparsify.runtime.per_image``): None up to the last SparseConv whose output reaches 512 KiB
    per image (none if no SparseConv's does), True the whole graph, False never. ``model`` is not modified.
    ``progress(stage)`` is called as each stage starts (a ResNet-50 at 224x224 takes half a minute).
    """
    from ..nn import SparseConv1d
    from ..report import input_shapes

    step = progress or (lambda stage: None)

    out = check_output_path(out)
    try:
        shapes = [list(s) for s in input_shapes(input_shape)]
    except (TypeError, ValueError, UsageError):
        shapes = []
    if not shapes or any(not s or any(d <= 0 for d in s) for s in shapes):
        raise ExportError(f"input shape {input_shape} is not a positive N,C,... shape; pass e.g. 1,3,32,32")
    report = ExportReport(out=str(out), source=type(model).__name__, input_shape=shapes[0], dense=dense,
                          native_available=native_available(), input_shapes=shapes)
    reference = copy.deepcopy(model).eval().float()
    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(2, *s[1:], generator=gen) for s in shapes)
    step("checking the model")
    _check_stateless(reference, example)
    step("compacting empty channels" if compact else "preparing the graph")
    work = _prepare(model, example, compact, fold_bn, report, channel_align, rules)
    with torch.no_grad():
        y = work(*example)
    _check_outputs(y)
    names = output_names(y, report.notes, _input_names(work, len(example)))
    step("writing ONNX (torch.onnx.export)")
    onnx_model = _torch_export(work, example, names)
    report.output_names = [o.name for o in onnx_model.graph.output]
    if any(isinstance(m, SparseConv1d) for m in model.modules()):
        report.notes.append("masked Conv1d layers are written as plain Convs with their masked weights "
                            "(the SparseConv op and kernel are 2-D)")
    if dense:
        report.layers = onnx_sparse.convert_model(onnx_model, dense_threshold=0.0)[1].choices
        for c in report.layers:
            c.reason = "--dense"
    else:
        step("timing each layer dense vs SparseConv (--autotune)" if autotune else "choosing SparseConv or Conv per layer")
        decide = make_autotuner(report.native_available) if autotune else None
        onnx_model, creport = onnx_sparse.convert_model(onnx_model, dense_threshold, decide)
        report.layers = creport.choices

    def check(model_bytes: bytes) -> None:
        try:
            verify_onnx(model_bytes, lambda *xs: _torch_outputs(reference, *(torch.from_numpy(x) for x in xs)),
                        shapes, report)
        except ExportError as e:
            hint = zero_variance_hint(reference)
            if hint is None or not str(e).startswith("verification failed"):
                raise
            raise ExportError(str(e).replace("; the export is wrong, please report it", "") + f"; {hint}") from None

    if verify:
        step("verifying in ONNX Runtime against PyTorch")
    onnx_model = _split_and_verify(onnx_model, per_image, report, check if verify else None)
    return _finish(onnx_model, out, report)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, rules: Any = None, **options: Any) -> ExportReport:
    """Export the model of a run directory (see ``export_model`` for the options, ``progress``
    among them); ``rules``: the custom Rule objects a run was transformed with, if any (named rules
    come from its recipe)."""
    from ..passes.rules import with_user_rules
    from ..rundir import load_run, read_summary, summary_note

    check_output_path(out)
    if options.get("progress") is not None:
        options["progress"]("rebuilding the run's model from its recipe")
    run = load_run(run_dir, rules)
    given = dict(rules or {})
    named = {k: v for k, v in (run.recipe.rules or {}).items() if not v.startswith("custom:")}
    report = export_model(run.model, run.recipe.shapes, out, rules=with_user_rules({**named, **given}) if
                          (named or given) else None, **options)
    report.source = str(run_dir)
    summary = read_summary(run_dir)
    norm = (summary.get("train") or {}).get("input_normalization")
    damaged = summary_note(run_dir)
    if damaged:
        report.notes.append(damaged)
    elif "train" not in summary and not run.recipe.weights:
        # a transform of a model without --weights: its weights are a fresh initialisation
        report.notes.append(f"{run_dir} was never trained and its transform took no --weights, so the exported "
                            f"weights are the model's initial ones (random, unless its code loads trained weights): "
                            f"`sparsify train {run_dir}` first to deploy it")
    if norm:
        report.notes.append(f"the run was trained on inputs normalised as {norm['text']} (summary.json: "
                            "train.input_normalization); feed the exported model inputs normalised the same way")
    return report


def export_onnx_file(src: str | os.PathLike, out: str | os.PathLike, *, dense_threshold: float | None = None,
                     verify: bool = True, autotune: bool = False, per_image: bool | None = None) -> ExportReport:
    """Convert an existing ONNX file's channel-sparse Convs to SparseConv, verified against the original.

    A file that ``sparsify export`` split per image is read as its batched graph (a front's Convs
    are converted, its SparseConvs refused like any) and split again (``per_image`` as in
    ``export_model``).
    """
    out = check_output_path(out)
    original = onnx_sparse.load(src)
    from .onnx_inspect import validate_model

    validate_model(original, src)  # a malformed SparseConv would be carried over (and run wrong) unnoticed
    original = _per_image.unsplit(original)
    init_names = {t.name for t in original.graph.initializer}
    runtime_inputs = [i for i in original.graph.input if i.name not in init_names]
    if len(runtime_inputs) != 1:
        raise ExportError(f"{src} has {len(runtime_inputs)} runtime inputs; only single-input models are supported")
    x_info = runtime_inputs[0]
    dims = x_info.type.tensor_type.shape.dim
    # a symbolic batch is 1 (then VERIFY_BATCHES); symbolic spatial axes VERIFY_SPATIAL: at 1x1 a 3x3
    # conv reads only its centre tap, and the check said "verified" with its other taps, pads and
    # strides never compared
    fixed = [d.HasField("dim_value") and d.dim_value > 0 for d in dims]
    shape = [d.dim_value if known else VERIFY_SPATIAL if i >= 2 else 1 for i, (d, known) in enumerate(zip(dims, fixed))]
    report = ExportReport(out=str(out), source=str(src), input_shape=shape, dense=False,
                          native_available=native_available())
    if verify and not all(fixed[2:]):
        report.notes.append(f"the input's spatial size is symbolic, so the check ran at {VERIFY_SPATIAL} on those "
                            f"axes (input shape {shape})")
    decide = make_autotuner(report.native_available) if autotune else None
    converted, creport = onnx_sparse.convert_model(original, dense_threshold, decide)
    report.layers = creport.choices
    check = None
    if verify:
        if x_info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            report.notes.append("not verified: the model input is not float32")
        else:
            ref_sess = open_session(original.SerializeToString(), native=False)
            fixed = bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0

            def check(model_bytes: bytes) -> None:
                verify_onnx(model_bytes, lambda x: ref_sess.run(None, {x_info.name: x}), [shape], report,
                            batches=(shape[0],) if fixed else VERIFY_BATCHES)
    converted = _split_and_verify(converted, per_image, report, check)
    return _finish(converted, out, report)


__all__ = ["ExportReport", "export_model", "export_run", "export_onnx_file", "convert_onnx", "open_session",
           "native_available", "densify", "check_output_path", "verify_onnx", "make_autotuner"]
