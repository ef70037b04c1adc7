"""Compaction benchmark: what removing dead channels buys, per zoo model, measured in ONNX Runtime.

For each model: a sparse model at 5% density (sparse-random by default; pass --run DIR for trained
runs, e.g. after sparse momentum), exported twice as plain dense Conv ONNX: uncompacted (masked
weights) and compacted. Prints parameters and MACs (dense-executed, from the ONNX files) before and
after, the share of channels removed, and ORT latency of both files measured side by side
(interleaved runs, one thread, batch 1), so machine noise hits both equally.

    python benchmarks/bench_compaction.py                       # all zoo models but the ImageNet-size ones
    python benchmarks/bench_compaction.py --models lenet5 vgg16n --density 0.05
    python benchmarks/bench_compaction.py --run runs/vgg-sm    # a trained run directory
    python benchmarks/bench_compaction.py --momentum-epochs 2   # train each model with sparse momentum first
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _latency(paths: list[Path], shape: tuple[int, ...], repeats: int, threads: int) -> list[float]:
    """Median ms per file, runs interleaved across files."""
    from sparsify.runtime.export import open_session

    sessions = [open_session(p, native=False, threads=threads) for p in paths]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t) * 1e3) for t in times]


def bench(label: str, model, input_shape, tmp: Path, repeats: int, threads: int) -> dict:
    from sparsify.runtime.export import export_model
    from sparsify.runtime.onnx_inspect import inspect_onnx

    shape = (1, *input_shape[1:])
    dense = export_model(model, shape, tmp / f"{label}-dense.onnx", dense=True, compact=False)
    comp = export_model(model, shape, tmp / f"{label}-compact.onnx", dense=True, compact=True)
    before, after = inspect_onnx(dense.out)["totals"], inspect_onnx(comp.out)["totals"]
    c = comp.compaction
    lat = _latency([Path(dense.out), Path(comp.out)], shape, repeats, threads)
    return {
        "model": label, "params_before": c["params_before"], "params_after": c["params_after"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "channels_removed": c["channels_removed"], "channels_total": c["channels_total"],
        "dense_ms": lat[0], "compact_ms": lat[1], "max_error": comp.errors.get("function-body"),
    }


def _trained(name: str, args: argparse.Namespace, tmp: Path):
    """Transform at --density (linears included) and train with sparse momentum; the trained model."""
    import sparsify

    path, res = sparsify.transform_to_dir(f"zoo:{name}", args.method, density=args.density, include_linear=True,
                                          out=tmp / f"{name}-run", seed=0)
    extra = {"train_limit": args.train_limit} if args.train_limit else {}
    metrics = sparsify.train(path, data=args.data, epochs=args.momentum_epochs, schedule="sparse-momentum",
                             prune_rate=0.5, **extra)
    print(f"{name}: sparse momentum {args.momentum_epochs} epochs on {args.data}, "
          f"test accuracy {metrics['test_acc']:.1%}", flush=True)
    return sparsify.load(path).model, res.recipe.input_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="zoo models (default: all but the ImageNet-size ones)")
    ap.add_argument("--method", default="sparse-random")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--run", nargs="*", default=[], help="run directories to benchmark instead of zoo models")
    ap.add_argument("--momentum-epochs", type=int, default=0,
                    help="train each zoo model with sparse momentum for this many epochs first (Dettmers' setting: "
                         "all layers at --density, prune rate 0.5), so the channels it empties are measured")
    ap.add_argument("--data", default="digits", help="data set for --momentum-epochs (default: bundled digits)")
    ap.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    from sparsify import zoo
    from sparsify.api import transform
    from sparsify.rundir import load_run

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.run:
            for r in args.run:
                run = load_run(r)
                rows.append(bench(Path(r).name, run.model, run.recipe.input_shape, tmp, args.repeats, args.threads))
                print(rows[-1], flush=True)
        else:
            for name in args.models or [n for n in zoo.names() if zoo.get(n).dataset != "imagenet"]:
                if args.momentum_epochs:
                    model, shape = _trained(name, args, tmp)
                else:
                    res = transform(f"zoo:{name}", method=args.method, density=args.density, seed=0)
                    model, shape = res.model, res.recipe.input_shape
                rows.append(bench(name, model, shape, tmp, args.repeats, args.threads))
                print(rows[-1], flush=True)
    print(f"\n{'model':16} {'params':>21} {'MACs (dense exec)':>25} {'channels removed':>18} "
          f"{'dense ms':>9} {'compact ms':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['model']:16} {r['params_before']:>10,}->{r['params_after']:<10,} "
              f"{r['macs_before']:>12,}->{r['macs_after']:<12,} "
              f"{r['channels_removed']:>6}/{r['channels_total']:<5} ({r['channels_removed'] / max(r['channels_total'], 1):5.1%}) "
              f"{r['dense_ms']:>9.3f} {r['compact_ms']:>10.3f} {r['dense_ms'] / r['compact_ms']:>7.2f}x")


if __name__ == "__main__":
    main()
