"""Check issue 9's "done means" end to end on the failing-model cases and every zoo model.

For each model (every file in a cases folder, its grey variant where the factory takes ``in_ch``,
and every ``sparsify zoo`` model; the 224x224 ones at a smaller input) this checks:

- transform: sparse-random at density 0.1 and 0.5, psn at 0.1, depth-multiplier at alpha 0.5;
- export: each run exports with the default options (compaction on, verification on), as
  ``sparsify export RUN --out F`` does;
- ort-body / ort-native: ONNX Runtime through the SparseConv function body and through the native
  kernel equals ``sparsify.load(RUN).model`` in eval mode, relative error (max abs difference over
  max abs output) <= 1e-4 per output. Before export the run's BatchNorm statistics are calibrated
  on random batches (cumulative average) and written back, so that activations are not trivial;
- deterministic: two eval calls of the loaded model give equal outputs;
- named-outputs: a dict/tuple output is exported as one ONNX output per tensor, named after its
  place (dict key, tuple position);
- density-1: sparse-random at density 1 (linear layers included), loaded with the original's
  calibrated weights, equals the original nn.Module in eval mode.

It prints one line per model x check (PASS / FAIL with the one-line reason), then a summary, and
exits 1 if anything failed. This is a correctness check, not a timing script::

    python benchmarks/verify_coverage.py                        # cases + zoo
    python benchmarks/verify_coverage.py --only P10 --only resnet18
    python benchmarks/verify_coverage.py --cases ../shared/cases/models --no-zoo
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import sparsify
from sparsify import zoo
from sparsify.errors import SparsifyError
from sparsify.models import _import_file, _UserImports, load_model
from sparsify.report import input_shapes
from sparsify.rundir import save_weights
from sparsify.runtime.export import native_available, open_session, output_names

# ../shared/cases next to the checkout (or next to the folder of worktrees).
DEFAULT_CASES = next((p / "shared" / "cases" / "models" for p in Path(__file__).resolve().parents[1:4]
                      if (p / "shared" / "cases" / "models").is_dir()), Path("../shared/cases/models"))
SMALL_224 = (1, 3, 64, 64)      # the ImageNet-size zoo models are checked at this input (speed)
METHODS = [("sparse-random-0.1", "sparse-random", {"density": 0.1}),
           ("sparse-random-0.5", "sparse-random", {"density": 0.5}),
           ("psn-0.1", "psn", {"density": 0.1}),
           ("depth-multiplier-0.5", "depth-multiplier", {"alpha": 0.5})]
TOLERANCE = 1e-4


def conv_leaves(module: Any) -> list[str]:
    """Conv subclasses of a model file that override forward (dynamic "same" padding): torch.fx cannot
    trace them, so they are leaves (``--leaf``) with the conv rule (``--rule NAME=conv``)."""
    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, type) and issubclass(obj, nn.modules.conv._ConvNd)
                  and "forward" in vars(obj) and obj.__module__ == module.__name__)


@dataclass
class Case:
    label: str
    spec: str
    shapes: list[tuple[int, ...]]
    model_args: dict[str, Any] = field(default_factory=dict)
    leaf_modules: list[str] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)

    @property
    def shape_arg(self) -> Any:
        return self.shapes[0] if len(self.shapes) == 1 else self.shapes


def case_models(folder: Path) -> list[Case]:
    """Every model file of ``folder``; a grey variant (one input channel) where the factory takes in_ch.
    A file with one INPUT_SHAPE whose forward takes several tensors gets that shape for each."""
    cases = []
    for f in sorted(folder.glob("*.py")):
        with _UserImports(f.resolve()):
            module = _import_file(f.resolve())
        shape = getattr(module, "INPUT_SHAPES", None) or [getattr(module, "INPUT_SHAPE")]
        shapes = input_shapes(shape)
        factory = getattr(module, "build_model", None)
        net = getattr(module, "Net", None)
        n_inputs = len(inspect.signature(net.forward).parameters) - 1 if net is not None else 1
        if len(shapes) == 1 and n_inputs > 1:
            shapes = shapes * n_inputs
        leaves = conv_leaves(module)
        rules = {name: "conv" for name in leaves}
        cases.append(Case(f.stem, str(f), shapes, leaf_modules=leaves, rules=rules))
        if factory is not None and "in_ch" in inspect.signature(factory).parameters:
            grey = [(shapes[0][0], 1) + tuple(shapes[0][2:])] + shapes[1:]
            cases.append(Case(f.stem + "[grey]", str(f), grey, {"in_ch": 1}, leaves, rules))
    return cases


def zoo_models() -> list[Case]:
    out = []
    for name in zoo.names():
        shape = tuple(zoo.get(name).input_shape)
        if shape[-1] >= 224:
            shape = SMALL_224
        out.append(Case(f"zoo:{name}", f"zoo:{name}", [shape]))
    return out


# ------------------------------------------------------------------------------------------------


def leaves(y: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


def batch(shapes, n: int, seed: int, scale: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *s[1:], generator=g) * scale for s in shapes]


def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    if ref.shape != got.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    return float(np.abs(ref - got).max()) / max(float(np.abs(ref).max()), 1e-6)


def calibrate_bn(model: nn.Module, shapes, batches: int = 3, n: int = 8) -> None:
    """BatchNorm running statistics from a few random batches (cumulative average), eval mode after."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(*batch(shapes, n, 100 + i))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def why(e: BaseException) -> str:
    if isinstance(e, SparsifyError):
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"{Path(t.filename).name}:{t.lineno}" for t in reversed(tb) if "sparsify" in t.filename), "")
    return f"CRASH {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} ({where})"


class Results:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool, str]] = []

    def add(self, model: str, check: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((model, check, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {model:32s} {check:34s} {detail}", flush=True)
        return ok


def check_run(case: Case, mlabel: str, run_dir: Path, tmp: Path, res: Results) -> None:
    """Calibrate and rewrite the run's weights, export it by default, compare ORT with the loaded run."""
    run = sparsify.load(run_dir, None)
    calibrate_bn(run.model, case.shapes)
    save_weights(run_dir, run.model)
    onnx_path = tmp / f"{mlabel}.onnx"
    try:
        rep = sparsify.export(run_dir, onnx_path)
    except Exception as e:  # noqa: BLE001 - each failure is a line of the report
        res.add(case.label, f"export:{mlabel}", False, why(e))
        return
    res.add(case.label, f"export:{mlabel}", True,
            f"compacted {len((rep.compaction or {}).get('removed', {}) or {})} group(s)" if rep.compaction else "")
    model = sparsify.load(run_dir).model.eval()
    xs = batch(case.shapes, 3, 7)
    with torch.no_grad():
        y = model(*xs)
        first, second = leaves(y), leaves(model(*xs))
    same = len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))
    res.add(case.label, f"deterministic:{mlabel}", same, "" if same else "two eval calls differ")
    spread = max(float(t.std(0).max()) / max(float(t.abs().max()), 1e-12) for t in first if t.shape[0] > 1)
    paths = [("ort-body", False)] + ([("ort-native", True)] if native_available() else [])
    for label, native in paths:
        try:
            sess = open_session(onnx_path, native=native)
            names = [i.name for i in sess.get_inputs()]
            got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})
            if len(got) != len(first):
                res.add(case.label, f"{label}:{mlabel}", False, f"{len(got)} outputs, PyTorch has {len(first)}")
                continue
            err = max(rel_error(r.numpy(), g) for r, g in zip(first, got))
            res.add(case.label, f"{label}:{mlabel}", err <= TOLERANCE,
                    f"rel err {err:.2e} (output spread over the batch {spread:.2g})")
        except Exception as e:  # noqa: BLE001
            res.add(case.label, f"{label}:{mlabel}", False, why(e))
    if not native_available():
        res.add(case.label, f"ort-native:{mlabel}", False, "native kernel not built")
    expected = output_names(y)
    if expected is not None:
        sess = open_session(onnx_path)
        got_names = [o.name for o in sess.get_outputs()]
        res.add(case.label, f"named-outputs:{mlabel}", got_names == expected, f"{got_names}")


def check_density_1(case: Case, tmp: Path, res: Results) -> None:
    original = load_model(case.spec, case.model_args, seed=0).module
    calibrate_bn(original, case.shapes)
    weights = tmp / "original.pt"
    torch.save(original.state_dict(), weights)
    try:
        full = sparsify.transform(case.spec, "sparse-random", density=1.0, include_linear=True, seed=0,
                                  weights=weights, input_shape=case.shape_arg, model_args=case.model_args or None,
                                  leaf_modules=case.leaf_modules, rules=case.rules or None).model.eval()
    except Exception as e:  # noqa: BLE001
        res.add(case.label, "density-1", False, why(e))
        return
    xs = batch(case.shapes, 2, 3)
    with torch.no_grad():
        a, b = leaves(original.eval()(*xs)), leaves(full(*xs))
    if len(a) != len(b):
        res.add(case.label, "density-1", False, f"{len(b)} outputs, the original has {len(a)}")
        return
    err = max(rel_error(p.numpy(), q.numpy()) for p, q in zip(a, b))
    res.add(case.label, "density-1", err <= 1e-5, f"rel err {err:.2e}")


def check_model(case: Case, res: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="verify-") as d:
        tmp = Path(d)
        for mlabel, method, kwargs in METHODS:
            run_dir = tmp / mlabel
            try:
                sparsify.transform_to_dir(case.spec, method, out=run_dir, seed=0, input_shape=case.shape_arg,
                                          model_args=case.model_args or None, leaf_modules=case.leaf_modules,
                                          rules=case.rules or None, **kwargs)
            except Exception as e:  # noqa: BLE001
                res.add(case.label, f"transform:{mlabel}", False, why(e))
                continue
            res.add(case.label, f"transform:{mlabel}", True)
            try:
                check_run(case, mlabel, run_dir, tmp, res)
            except Exception as e:  # noqa: BLE001
                res.add(case.label, f"check:{mlabel}", False, why(e))
        try:
            check_density_1(case, tmp, res)
        except Exception as e:  # noqa: BLE001
            res.add(case.label, "density-1", False, why(e))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="folder of model files (default: %(default)s)")
    p.add_argument("--no-zoo", action="store_true", help="skip the zoo models")
    p.add_argument("--no-cases", action="store_true", help="skip the case files")
    p.add_argument("--only", action="append", default=[], help="only models whose label contains this (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models: list[Case] = []
    if not args.no_cases:
        if not args.cases.is_dir():
            print(f"cases folder {args.cases} not found; pass --cases DIR or --no-cases", file=sys.stderr)
            return 2
        models += case_models(args.cases)
    if not args.no_zoo:
        models += zoo_models()
    if args.only:
        models = [m for m in models if any(o in m.label for o in args.only)]
    res = Results()
    t0 = time.perf_counter()
    for case in models:
        check_model(case, res)
    failed = [r for r in res.rows if not r[2]]
    bad_models = sorted({r[0] for r in failed})
    print(f"\nsummary: {len(res.rows) - len(failed)}/{len(res.rows)} checks passed on {len(models)} models "
          f"({len(bad_models)} with a failure) in {time.perf_counter() - t0:.0f} s")
    for model, check, _, detail in failed:
        print(f"  FAIL {model} {check}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
