"""Whole-model ONNX Runtime latency: dense export vs sparse-op export vs depth-multiplied equivalent.

For each zoo model, sparse-random at density 0.1 (untrained weights, BatchNorm statistics
calibrated on random inputs so that outputs depend on the input; latency does not depend on values),
exported three ways and timed side by side in one run (interleaved bursts, same input):

  dense   the masked weights as plain Conv (the baseline)
  sparse  ai.sparsify::SparseConv nodes, the native kernel when it is registered
  depth   the depth-multiplied dense model with the same live parameter count

Prints per-model tables, the sparse/dense and depth/sparse ratios, whether dense and sparse
outputs agree, and checks the issue's targets (vgg16n >= 5x faster than dense at batch 1 and 16;
2 threads >= 1.6x faster than 1 thread at batch 16). Usage::

    python benchmarks/bench_models.py [--quick] [--models vgg16n,resnet20] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from sparsify import api, pipeline, zoo
from sparsify._io import write_json
from sparsify.runtime import bench as lib

MODELS = ("vgg16n", "resnet20", "mobilenetv2", "lenet5")
DENSITY = 0.1
SPEEDUP_TARGET = 5.0          # vgg16n sparse vs dense export, batch 1 and 16
THREAD_TARGET = 1.6           # 2 threads vs 1 thread at batch 16
REL_TOL = 1e-4                # dense vs sparse outputs: max |diff| <= REL_TOL * max |dense output|

console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 110)   # logs keep whole tables


def calibrate_bn(model, input_shape, batches: int = 4, n: int = 32) -> None:
    """Set BatchNorm running statistics from random inputs, as training would.

    Untrained zoo models at density 0.1 have activations that shrink layer by layer (fan-in is 10x
    smaller than the init assumes): the outputs are then the classifier bias for every input and a
    dense-vs-sparse output comparison would prove nothing. Calibrated statistics make the outputs
    depend on the input; the script prints how much they vary.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                      # cumulative average over the calibration batches
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(batches if bns else 0):
            model(torch.randn(n, *input_shape[1:], generator=gen))
    model.eval()


def output_spread(path: Path) -> float:
    """Std of the file's outputs across 8 random inputs relative to their max magnitude (0: a constant model)."""
    import numpy as np

    sess = lib.make_session(path, 1, native=False)
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(5).standard_normal([8] + list(inp.shape[1:]), dtype=np.float32)
    y = sess.run(None, {inp.name: x})[0]
    return float(y.std(axis=0).mean() / max(np.abs(y).max(), 1e-30))


def export_variants(name: str, tmp: Path, autotune: bool = False, *, density: float = DENSITY,
                    model_args: dict | None = None, input_shape: tuple[int, ...] | None = None, divisor: int = 1,
                    compact: bool = True, calibration: tuple[int, int] = (4, 32),
                    block: int = 1) -> tuple[list[tuple[str, Path]], dict]:
    """Transform zoo model ``name`` sparse-random at ``density`` and export dense, sparse and depth variants.

    ``divisor``: the depth variant's channel counts are rounded to multiples of it (its alpha is the
    nearest equal-parameter one, ``sparsify.pipeline.depth_equivalent``); ``compact=False`` exports
    the sparse variant without compaction; ``calibration``: (batches, batch size) for calibrate_bn;
    ``block``: output channels per shared fan-in (the transform's ``block``).
    """
    entry = zoo.get(name)
    shape = tuple(input_shape or entry.input_shape)
    res = api.transform(f"zoo:{name}", method="sparse-random", density=density, seed=0, input_shape=shape,
                        model_args=model_args, block=block)
    calibrate_bn(res.model, shape, *calibration)
    files, variant_notes, reports = pipeline.export_model_variants(
        res.model, res.recipe, tmp, ("dense", "sparse", "depth"), prefix=f"{name}-", depth_divisor=divisor,
        autotune=autotune, compact=compact, prepare=lambda m: calibrate_bn(m, shape, *calibration))
    depth = variant_notes["depth"]
    notes = {"live_params": depth["target_live_params"], "depth_alpha": depth["alpha"],
             "depth_live_params": depth["live_params"], "depth_divisor": divisor,
             "export": reports["sparse"].to_json(), "dense_export": reports["dense"].to_json()}
    return files, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing (0.15 s per variant and configuration)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    ap.add_argument("--batch-size", default="1,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per variant and configuration")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--autotune", action="store_true", help="export the sparse variant with per-layer autotuning")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every model this many times with fresh sessions and report median ratios "
                         "(2-thread figures on a shared machine vary between rounds)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batch_size.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    min_time = args.min_time if args.min_time is not None else (0.15 if args.quick else 0.6)

    status = lib.native_status()
    console.print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores "
                  "(timings are only as quiet as the machine)")
    console.print(f"onnxruntime {status['onnxruntime']}; native kernel: "
                  + (f"loadable ({status.get('library')})" if status["loadable"] else f"NOT loadable ({status.get('why_not')})"))
    summary: dict = {"models": {}, "settings": {"density": DENSITY, "batches": batches, "threads": threads,
                                                "min_time": min_time, "autotune": args.autotune,
                                                "rounds": args.rounds}, "native": status}
    checks: list[tuple[str, bool, str]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmpdir:
        for name in names:
            tmp = Path(tmpdir)
            console.rule(f"{name} sparse-random density {DENSITY}")
            files, notes = export_variants(name, tmp, autotune=args.autotune)
            rounds = [lib.bench_files([p for _, p in files], labels=[n for n, _ in files], batch_sizes=batches,
                                      threads=threads, min_time=min_time, repeats=5 if args.quick else 10,
                                      memory=r == 0)
                      for r in range(args.rounds)]
            result = rounds[0]
            from sparsify.cli.bench import bench_table

            console.print(bench_table(result, title=f"{name}: latency in ORT, speedup vs dense export"
                                      + (f" (round 1 of {args.rounds})" if args.rounds > 1 else "")))
            spread = output_spread(files[0][1])
            console.print(f"dense output spread across inputs {spread:.2e} of its max (non-zero: the output check is meaningful)")
            console.print(f"live params {notes['live_params']:,}; depth-multiplier alpha {notes['depth_alpha']:.4f} "
                          f"gives {notes['depth_live_params']:,}; sparse file native: {result.files[1].native}, "
                          f"SparseConv nodes {result.files[1].sparse_nodes}, plain Conv nodes {result.files[1].conv_nodes}")

            def ms(label: str, b: int, t: int) -> list[float]:
                return [r.row(label, b, t).median_ms for r in rounds]

            def med_ratio(num: list[float], den: list[float]) -> tuple[float, str]:
                vals = [a / c for a, c in zip(num, den)]
                extra = f" ({' '.join(f'{v:.2f}' for v in vals)})" if len(vals) > 1 else ""
                return statistics.median(vals), extra

            ratios = Table(title=f"{name}: latency ratios (>1: sparse faster; thread scaling: 1 thread / N threads)"
                           + (f"; medians of {args.rounds} rounds, each round in brackets" if args.rounds > 1 else ""),
                           title_justify="left", box=box.SIMPLE_HEAD)
            for col in ("batch", "threads", "dense/\nsparse", "depth/\nsparse", "sparse\nscaling", "dense\nscaling",
                        "dense vs sparse\noutputs (rel)"):
                ratios.add_column(col, justify="right", no_wrap=True)
            model_rows = []
            for b in batches:
                for t in threads:
                    d, s, dp = ms("dense", b, t), ms("sparse", b, t), ms("depth", b, t)
                    rel = max(r.row("sparse", b, t).max_rel_diff or 0.0 for r in rounds)
                    ok = all(r.row("sparse", b, t).max_rel_diff is not None for r in rounds) and rel <= REL_TOL and spread > 1e-4
                    speed, speed_s = med_ratio(d, s)
                    depth, depth_s = med_ratio(dp, s)
                    scaling = dscaling = ""
                    if t != threads[0]:
                        sc, sc_s = med_ratio(ms("sparse", b, threads[0]), s)
                        dsc, dsc_s = med_ratio(ms("dense", b, threads[0]), d)
                        scaling, dscaling = f"{sc:.2f}x{sc_s}", f"{dsc:.2f}x{dsc_s}"
                        if b == max(batches) and t == 2 and threads[0] == 1:
                            checks.append((f"{name} sparse: 2 threads vs 1 at batch {b} >= {THREAD_TARGET}x",
                                           sc >= THREAD_TARGET, f"{sc:.2f}x"))
                    ratios.add_row(str(b), str(t), f"{speed:.2f}x{speed_s}", f"{depth:.2f}x{depth_s}", scaling, dscaling,
                                   f"{'equal' if ok else 'DIFFER'} {rel:.0e}")
                    checks.append((f"{name} outputs dense == sparse (b{b}, t{t})", ok, f"rel {rel:.1e}"))
                    if name == "vgg16n":
                        checks.append((f"vgg16n sparse >= {SPEEDUP_TARGET}x dense (b{b}, t{t})",
                                       speed >= SPEEDUP_TARGET, f"{speed:.2f}x"))
                    model_rows.append({"batch": b, "threads": t, "dense_ms": statistics.median(d),
                                       "sparse_ms": statistics.median(s), "depth_ms": statistics.median(dp),
                                       "dense_over_sparse": speed, "depth_over_sparse": depth,
                                       "per_round_dense_over_sparse": [a / c for a, c in zip(d, s)]})
            console.print(ratios)
            summary["models"][name] = {"notes": dict(notes, output_spread=spread), "summary": model_rows,
                                       "rounds": [r.to_json() for r in rounds]}
            for _, p in files:
                p.unlink(missing_ok=True)
    console.rule("summary")
    table = Table(title=f"whole-model ORT latency, sparse-random density {DENSITY} (median ms"
                  + (f" and ratios, medians of {args.rounds} rounds" if args.rounds > 1 else "") + "; ratios > 1: sparse faster)",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("model", "batch", "thr", "dense", "sparse", "depth", "dense/sparse", "depth/sparse", "native"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for name, entry in summary["models"].items():
        native_ran = entry["rounds"][0]["files"][1]["native"]
        for r in entry["summary"]:
            table.add_row(name, str(r["batch"]), str(r["threads"]), f"{r['dense_ms']:.3f}", f"{r['sparse_ms']:.3f}",
                          f"{r['depth_ms']:.3f}", f"{r['dense_over_sparse']:.2f}x", f"{r['depth_over_sparse']:.2f}x",
                          "yes" if native_ran else "no")
            if r["threads"] == threads[-1]:
                table.add_section()
    console.print(table)
    console.rule("targets")
    for what, ok, value in checks:
        if "outputs" in what and ok:
            continue
        console.print(f"{'PASS' if ok else 'FAIL'}  {what}: {value}")
    bad_outputs = [w for w, ok, _ in checks if "outputs" in w and not ok]
    console.print("dense and sparse outputs agree everywhere" if not bad_outputs else f"outputs differ: {bad_outputs}")
    console.print(f"total time {time.perf_counter() - t_start:.0f} s; load average after: "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    summary["checks"] = [{"what": w, "pass": ok, "value": v} for w, ok, v in checks]
    if args.json is not None:
        write_json(args.json, summary)
    return 0 if not bad_outputs else 1


if __name__ == "__main__":
    sys.exit(main())
