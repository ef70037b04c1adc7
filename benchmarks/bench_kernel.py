"""Per-layer benchmark of the native ai.sparsify::SparseConv kernel against ONNX Runtime's Conv.

For each 3x3 / stride 1 / pad 1 layer (C in = C out) it times, interleaved in one run (rounds of
bursts, medians of single runs; ORT's default spinning workers, left to go idle between bursts:
sparsify.runtime.bench.time_bursts), three sessions on the same machine state:
  dense   ORT Conv with the masked dense weight (what the sparse model costs without the kernel),
  sparse  the native SparseConv with random channel masks of exactly round(d * C) inputs per output,
  dm      ORT Conv with the same live parameter count by depth multiplication (C*sqrt(d) in and out).
and prints speed-up vs dense, the ideal 1/d, the fraction of ideal reached, sparse/dm latency, and
"export": the speed-up of what the exporter writes for that layer (its per-layer rule,
sparsify.runtime.onnx_sparse.sparse_threshold, keeps a plain Conv above the layer's threshold: 1.00x).
It also sweeps density to find where the sparse kernel stops beating dense Conv (the crossover),
the measurements behind that rule.

    python benchmarks/bench_kernel.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_kernel.py --quick    # CI smoke: fewer shapes and repetitions
    python benchmarks/bench_kernel.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sparsify.runtime import native
from sparsify.runtime.bench import SPIN_SETTLE_S, time_bursts
from sparsify.runtime.onnx_sparse import sparse_threshold

SHAPES = [(64, 32), (128, 16), (256, 8), (256, 28), (512, 4)]  # (C, H=W)
QUICK_SHAPES = [(64, 32), (256, 8)]
DENSITIES = (0.1, 0.5)
SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _model(nodes, inits, cin: int) -> bytes:
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", cin, "H", "W"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.sparsify", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString()


def _attrs() -> dict:
    return dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1)


def dense_conv(weight: np.ndarray, bias: np.ndarray) -> bytes:
    node = helper.make_node("Conv", ["X", "Wd", "B"], ["Y"], kernel_shape=[3, 3], **_attrs())
    return _model([node], {"Wd": weight, "B": bias}, weight.shape[1])


def sparse_conv(weight: np.ndarray, mask: np.ndarray, bias: np.ndarray) -> bytes:
    rows, cols = np.nonzero(mask)
    inits = {
        "W": np.ascontiguousarray(weight[rows, cols], np.float32),
        "row_ptr": np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64),
        "col_idx": cols.astype(np.int64),
        "B": bias,
    }
    node = helper.make_node("SparseConv", ["X", "W", "row_ptr", "col_idx", "B"], ["Y"], domain="ai.sparsify", **_attrs())
    return _model([node], inits, weight.shape[1])


def layer(c: int, d: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random weight, a channel mask with exactly round(d*c) live inputs per output, bias."""
    live = max(1, round(d * c))
    mask = np.zeros((c, c), bool)
    for o in range(c):
        mask[o, rng.choice(c, live, replace=False)] = True
    weight = rng.standard_normal((c, c, 3, 3)).astype(np.float32) * mask[:, :, None, None]
    return weight, mask, rng.standard_normal(c).astype(np.float32)


def time_interleaved(sessions: dict, feeds: dict, reps: int, min_sample_s: float, threads: int,
                     clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per run of each session, in `reps` rounds of interleaved bursts."""
    runs = [lambda s=sess, f=feeds[name]: s.run(None, f) for name, sess in sessions.items()]
    samples = time_bursts(runs, burst_s=min_sample_s, min_rounds=reps, clock=clock,
                          settle_s=SPIN_SETTLE_S if threads > 1 else 0.0)
    return {name: statistics.median(s) for name, s in zip(sessions, samples)}


def bench_layer(c: int, hw: int, n: int, threads: int, d: float, reps: int, min_sample_s: float,
                rng: np.random.Generator, with_dm: bool = True, cpu_clock: bool = False) -> dict:
    weight, mask, bias = layer(c, d, rng)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    sessions = {
        "dense": native.session(dense_conv(weight, bias), threads, native=False),
        "sparse": native.session(sparse_conv(weight, mask, bias), threads),
    }
    feeds = {"dense": {"X": x}, "sparse": {"X": x}}
    cdm = max(1, round(c * math.sqrt(d)))
    if with_dm:
        wdm = rng.standard_normal((cdm, cdm, 3, 3)).astype(np.float32)
        sessions["dm"] = native.session(dense_conv(wdm, bias[:cdm].copy()), threads, native=False)
        feeds["dm"] = {"X": rng.standard_normal((n, cdm, hw, hw)).astype(np.float32)}
    y_s = sessions["sparse"].run(None, feeds["sparse"])[0]
    y_d = sessions["dense"].run(None, feeds["dense"])[0]
    err = float(np.abs(y_s - y_d).max() / max(1.0, float(np.abs(y_d).max())))
    if err > 1e-4:
        raise SystemExit(f"SparseConv disagrees with dense Conv at C={c} HW={hw} d={d}: rel err {err:.2e}")
    # With one intra-op thread ORT runs the node on the calling thread, so that thread's CPU time
    # measures the kernels without the time other processes take on a shared machine.
    clock = time.thread_time if (cpu_clock and threads == 1) else time.perf_counter
    t = time_interleaved(sessions, feeds, reps, min_sample_s, threads, clock)
    row = {"C": c, "HW": hw, "N": n, "threads": threads, "density": d, "dm_channels": cdm,
           "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3,
           "speedup": t["dense"] / t["sparse"], "ideal": 1.0 / d}
    row["frac_ideal"] = row["speedup"] / row["ideal"]
    row["rule_threshold"] = sparse_threshold((3, 3), (1, 1), (1, 1), c, (hw, hw))[0]
    row["export_speedup"] = row["speedup"] if d < row["rule_threshold"] else 1.0
    if with_dm:
        row["dm_ms"] = t["dm"] * 1e3
        row["sparse_over_dm"] = t["sparse"] / t["dm"]
    return row


def crossover(c: int, hw: int, n: int, threads: int, reps: int, min_sample_s: float,
              rng: np.random.Generator, cpu_clock: bool = False) -> dict:
    """Speed-up over the density sweep; the crossover is where it falls to 1 (interpolated)."""
    pts = []
    for d in SWEEP:
        r = bench_layer(c, hw, n, threads, d, reps, min_sample_s, rng, with_dm=False, cpu_clock=cpu_clock)
        pts.append((d, r["speedup"]))
    cross = None
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if s0 >= 1.0 > s1:
            cross = d0 + (d1 - d0) * (s0 - 1.0) / (s0 - s1)
            break
    if cross is None:
        cross = 1.0 if pts[-1][1] >= 1.0 else pts[0][0]
    return {"C": c, "HW": hw, "N": n, "threads": threads, "sweep": pts, "crossover": cross}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (CI smoke)")
    ap.add_argument("--reps", type=int, default=None, help="timed samples per session (default 11, quick 3)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the crossover density sweep")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default 1 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 16, quick 1)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time 1-thread runs by the thread's CPU time (robust on a busy machine); others by wall clock")
    ap.add_argument("--json", type=Path, default=None, help="write all measurements to this file")
    args = ap.parse_args(argv)

    inf = native.info()
    if not inf["loadable"]:
        print(f"native kernel not available: {inf['reason']}", file=sys.stderr)
        return 2
    reps = args.reps or (3 if args.quick else 11)
    min_sample_s = 0.002 if args.quick else 0.01
    shapes = QUICK_SHAPES if args.quick else SHAPES
    batches = tuple(args.batches or ((1,) if args.quick else (1, 16)))
    threads_list = tuple(args.threads)
    rng = np.random.default_rng(0)
    clock_name = "thread CPU time for 1 thread, wall clock otherwise" if args.cpu_clock else "wall clock"
    print(f"onnxruntime {inf['onnxruntime_version']}, kernel isa={inf['isa']}, reps={reps} "
          f"(medians, interleaved; {clock_name})")

    rows = []
    hdr = (f"{'layer':>10} {'N':>3} {'thr':>3} {'d':>4} | {'dense ms':>9} {'sparse ms':>9} {'dm ms':>8} | "
           f"{'speedup':>7} {'ideal':>5} {'%ideal':>6} {'sp/dm':>6} {'export':>7}")
    print(hdr)
    print("-" * len(hdr))
    for c, hw in shapes:
        for n in batches:
            for thr in threads_list:
                for d in DENSITIES:
                    r = bench_layer(c, hw, n, thr, d, reps, min_sample_s, rng, cpu_clock=args.cpu_clock)
                    rows.append(r)
                    print(f"{c:>4}@{hw:>2}x{hw:<2} {n:>3} {thr:>3} {d:>4.1f} | {r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} "
                          f"{r['dm_ms']:>8.3f} | {r['speedup']:>6.2f}x {r['ideal']:>5.1f} {100 * r['frac_ideal']:>5.0f}% "
                          f"{r['sparse_over_dm']:>6.2f} {r['export_speedup']:>6.2f}x", flush=True)

    scaling = []
    for c, hw in shapes:
        for d in DENSITIES:
            one = [r for r in rows if (r["C"], r["HW"], r["density"], r["threads"]) == (c, hw, d, 1) and r["N"] == max(batches)]
            two = [r for r in rows if (r["C"], r["HW"], r["density"], r["threads"]) == (c, hw, d, 2) and r["N"] == max(batches)]
            if one and two:
                scaling.append({"C": c, "HW": hw, "N": max(batches), "density": d,
                                "sparse_2t_speedup": one[0]["sparse_ms"] / two[0]["sparse_ms"],
                                "dense_2t_speedup": one[0]["dense_ms"] / two[0]["dense_ms"]})
    print(f"\nthread scaling at batch {max(batches)} (time 1 thread / time 2 threads):")
    for s in scaling:
        print(f"  {s['C']:>4}@{s['HW']}x{s['HW']} d={s['density']:.1f}: sparse {s['sparse_2t_speedup']:.2f}x, "
              f"dense {s['dense_2t_speedup']:.2f}x")

    crossovers = []
    if not args.no_sweep:
        print("\ncrossover density (sparse no longer faster than dense Conv), batch 1, 1 thread:")
        for c, hw in shapes:
            cr = crossover(c, hw, 1, 1, max(3, reps // 2), min_sample_s, rng, cpu_clock=args.cpu_clock)
            crossovers.append(cr)
            sweep = " ".join(f"{d:.1f}:{s:.2f}x" for d, s in cr["sweep"])
            print(f"  {c:>4}@{hw}x{hw}: crossover d={cr['crossover']:.2f}   [{sweep}]", flush=True)
        for cr in crossovers:
            thr = sparse_threshold((3, 3), (1, 1), (1, 1), cr["C"], (cr["HW"], cr["HW"]))[0]
            print(f"  exporter rule for {cr['C']}@{cr['HW']}x{cr['HW']}: sparse below d={thr:.2f} "
                  f"(measured crossover {cr['crossover']:.2f})")
        threshold = {f"{cr['C']}@{cr['HW']}": sparse_threshold((3, 3), (1, 1), (1, 1), cr["C"], (cr["HW"], cr["HW"]))[0]
                     for cr in crossovers}
    else:
        threshold = None

    if args.json:
        args.json.write_text(json.dumps({"info": inf, "rows": rows, "thread_scaling": scaling,
                                         "crossovers": crossovers, "rule_thresholds": threshold}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
