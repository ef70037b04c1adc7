"""Per-layer benchmark of the native ai.sparsify::SparseConv kernel against ONNX Runtime's Conv.

Two layer sets: CIFAR-size 3x3 stride-1 convs (Cin = Cout, the original table) and the layers of a
ResNet at 224x224 (3x3 stride 1 on 56x56 down to 7x7, 1x1 expand / reduce convs, 3x3/s2 and
1x1/s2 downsampling). For each layer it times, interleaved in one run (rounds of bursts, medians of
single runs; ORT's default spinning workers, left to go idle between bursts:
sparsify.runtime.bench.time_bursts), three sessions on the same machine state:
  dense   ORT Conv with the masked dense weight (what the sparse model costs without the kernel),
  sparse  the native SparseConv with random channel masks of exactly round(d * Cin) inputs per output,
  dm      ORT Conv with the same live parameter count by depth multiplication (Cin and Cout times
          sqrt(d), rounded to multiples of 8).
and prints speed-up vs dense, the ideal 1/d, the fraction of ideal reached, sparse/dm latency, and
"export": the speed-up of what the exporter writes for that layer (its per-layer rule,
sparsify.runtime.onnx_sparse.sparse_threshold, keeps a plain Conv above the layer's threshold: 1.00x).
It also sweeps density to find where the sparse kernel stops beating dense Conv (the crossover),
the measurements behind that rule.

`--set depthwise` times the depthwise convs of MobileNetV2 / EfficientNet-B0 instead: the native
kernel's depthwise path (a SparseConv with one connection per channel, density 1) against ORT's
Conv alone in a graph, where ORT reorders the input into its blocked NCHWc layout and the output
back, which is what a depthwise conv between two SparseConvs costs when ORT runs it. "export" says
whether the exporter writes such a conv as a SparseConv next to SparseConvs
(sparsify.runtime.onnx_sparse.depthwise_native).

    python benchmarks/bench_kernel.py                    # both sets (long on 2 cores)
    python benchmarks/bench_kernel.py --set large --threads 1 --no-sweep --cpu-clock
    python benchmarks/bench_kernel.py --only 1x1 --densities 0.1
    python benchmarks/bench_kernel.py --set depthwise --threads 1 --batches 1 8
    python benchmarks/bench_kernel.py --set stems --threads 1 --no-sweep --cpu-clock
    python benchmarks/bench_kernel.py --quick            # CI smoke: fewer shapes and repetitions
    python benchmarks/bench_kernel.py --json out.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sparsify.runtime import native
from sparsify.runtime.bench import SPIN_SETTLE_S, time_bursts, vector_aligned
from sparsify.runtime.onnx_sparse import (DOMAIN, DOMAIN_VERSION, depthwise_native, regroups, shared_fan_in_share,
                                         sparse_conv_node, sparse_threshold)

@dataclass(frozen=True)
class Layer:
    """One convolution: cin -> cout channels, k x k kernel, stride, pad k // 2, input plane hw x hw."""

    cin: int
    cout: int
    k: int = 3
    stride: int = 1
    hw: int = 32

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.pad - self.k) // self.stride + 1

    @property
    def label(self) -> str:
        kind = f"{self.k}x{self.k}" + (f"/s{self.stride}" if self.stride != 1 else "")
        chans = f"{self.cin}" if self.cin == self.cout else f"{self.cin}->{self.cout}"
        return f"{kind} {chans}@{self.hw}"


# CIFAR-size 3x3 stride-1 layers (Cin = Cout): the README's original per-layer table, kept as a
# regression check.
SMALL = [Layer(64, 64, hw=32), Layer(128, 128, hw=16), Layer(256, 256, hw=8), Layer(256, 256, hw=28),
         Layer(512, 512, hw=4)]
# ImageNet-size (224x224 input) layers: ResNet's 3x3 stride-1 convs per stage, its 1x1 expand /
# reduce convs on 56x56 down to 7x7, and its downsampling convs (3x3/s2 in the bottleneck,
# 1x1/s2 on the shortcut).
LARGE = [Layer(64, 64, hw=56), Layer(128, 128, hw=28), Layer(256, 256, hw=14), Layer(512, 512, hw=7),
         Layer(64, 256, 1, hw=56), Layer(256, 64, 1, hw=56), Layer(128, 512, 1, hw=28), Layer(512, 128, 1, hw=28),
         Layer(256, 1024, 1, hw=14), Layer(1024, 256, 1, hw=14), Layer(512, 2048, 1, hw=7), Layer(2048, 512, 1, hw=7),
         Layer(128, 128, 3, 2, 56), Layer(256, 256, 3, 2, 28), Layer(512, 512, 3, 2, 14),
         Layer(256, 512, 1, 2, 56), Layer(512, 1024, 1, 2, 28), Layer(1024, 2048, 1, 2, 14)]
# Depthwise convs (C channels, k x k, stride, input plane): MobileNetV2's 3x3 ones and
# EfficientNet-B0's 3x3 / 5x5 ones, 112x112 down to 7x7.
DEPTHWISE = [(32, 3, 1, 112), (96, 3, 2, 112), (144, 3, 1, 56), (144, 3, 2, 56), (192, 3, 1, 28), (192, 3, 2, 28),
             (384, 3, 1, 14), (576, 3, 1, 14), (960, 3, 1, 7), (240, 5, 2, 56), (240, 5, 1, 28), (480, 5, 1, 14),
             (672, 5, 2, 14), (1152, 5, 1, 7)]
# Stems: strided convs on the 3 input channels of an image, whose densities can only be 1/3 or 2/3
# (one or two input channels per output channel): ResNet's and DenseNet's 7x7/s2, MobileNetV2's
# and EfficientNet-B0's 3x3/s2. Their channels repeat a few fan-ins, which the kernel regroups into
# blocks of four.
STEMS = [Layer(3, 64, 7, 2, 224), Layer(3, 32, 3, 2, 224)]
STEM_DENSITIES = (1 / 3, 2 / 3)
SETS = {"small": (SMALL, (1, 16)), "large": (LARGE, (1, 8)), "stems": (STEMS, (1, 8))}  # layers, default batch sizes
QUICK = [SMALL[0], SMALL[2], LARGE[5], LARGE[13]]
DENSITIES = (0.1, 0.5)
SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _model(nodes, inits, cin: int) -> bytes:
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", cin, "H", "W"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString()


def _attrs(lay: Layer) -> dict:
    return dict(strides=[lay.stride] * 2, pads=[lay.pad] * 4, dilations=[1, 1], group=1)


def dense_conv(weight: np.ndarray, bias: np.ndarray, lay: Layer) -> bytes:
    node = helper.make_node("Conv", ["X", "Wd", "B"], ["Y"], kernel_shape=[lay.k, lay.k], **_attrs(lay))
    return _model([node], {"Wd": weight, "B": bias}, weight.shape[1])


def sparse_conv(weight: np.ndarray, mask: np.ndarray, bias: np.ndarray, lay: Layer) -> bytes:
    rows, cols = np.nonzero(mask)
    inits = {
        "W": np.ascontiguousarray(weight[rows, cols], np.float32),
        "row_ptr": np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64),
        "col_idx": cols.astype(np.int64),
        "B": bias,
    }
    node = sparse_conv_node(["X", "W", "row_ptr", "col_idx", "B"], ["Y"], in_channels=weight.shape[1], **_attrs(lay))
    return _model([node], inits, weight.shape[1])


def layer(lay: Layer, d: float, rng: np.random.Generator, block: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random weight, a channel mask with exactly round(d*cin) live inputs per output (the same
    inputs for each run of `block` output channels), bias."""
    live = max(1, round(d * lay.cin))
    mask = np.zeros((lay.cout, lay.cin), bool)
    for o in range(0, lay.cout, block):
        mask[o:o + block, rng.choice(lay.cin, live, replace=False)] = True
    weight = rng.standard_normal((lay.cout, lay.cin, lay.k, lay.k)).astype(np.float32) * mask[:, :, None, None]
    return weight, mask, rng.standard_normal(lay.cout).astype(np.float32)


def dm_channels(c: int, d: float) -> int:
    """Channels of the depth-multiplied layer with the same live parameters: c * sqrt(d), rounded
    to a multiple of 8 (ORT's Conv is slower on unaligned counts) when c is."""
    x = c * math.sqrt(d)
    return max(8, 8 * round(x / 8)) if c % 8 == 0 else max(1, round(x))


def time_interleaved(sessions: dict, feeds: dict, reps: int, min_sample_s: float, threads: int,
                     clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per run of each session, in `reps` rounds of interleaved bursts."""
    runs = [lambda s=sess, f=feeds[name]: s.run(None, f) for name, sess in sessions.items()]
    samples = time_bursts(runs, burst_s=min_sample_s, min_rounds=reps, clock=clock,
                          settle_s=SPIN_SETTLE_S if threads > 1 else 0.0)
    return {name: statistics.median(s) for name, s in zip(sessions, samples)}


def rule_threshold(lay: Layer, mask: np.ndarray | None = None) -> float:
    """The density below which the exporter writes this layer (with this channel mask) as SparseConv."""
    shared = (shared_fan_in_share(mask, regroup=regroups((lay.k, lay.k), (lay.stride, lay.stride)))
              if mask is not None else 0.0)
    return sparse_threshold((lay.k, lay.k), (lay.stride,) * 2, (1, 1), lay.cin, (lay.out_hw, lay.out_hw), shared)[0]


def bench_layer(lay: Layer, n: int, threads: int, d: float, reps: int, min_sample_s: float,
                rng: np.random.Generator, with_dm: bool = True, cpu_clock: bool = False, block: int = 1) -> dict:
    weight, mask, bias = layer(lay, d, rng, block)
    x = vector_aligned(rng.standard_normal((n, lay.cin, lay.hw, lay.hw)).astype(np.float32))
    sessions = {
        "dense": native.session(dense_conv(weight, bias, lay), threads, native=False),
        "sparse": native.session(sparse_conv(weight, mask, bias, lay), threads),
    }
    feeds = {"dense": {"X": x}, "sparse": {"X": x}}
    cin_dm, cout_dm = dm_channels(lay.cin, d), dm_channels(lay.cout, d)
    if with_dm:
        wdm = rng.standard_normal((cout_dm, cin_dm, lay.k, lay.k)).astype(np.float32)
        bdm = rng.standard_normal(cout_dm).astype(np.float32)
        sessions["dm"] = native.session(dense_conv(wdm, bdm, lay), threads, native=False)
        feeds["dm"] = {"X": vector_aligned(rng.standard_normal((n, cin_dm, lay.hw, lay.hw)).astype(np.float32))}
    y_s = sessions["sparse"].run(None, feeds["sparse"])[0]
    y_d = sessions["dense"].run(None, feeds["dense"])[0]
    err = float(np.abs(y_s - y_d).max() / max(1.0, float(np.abs(y_d).max())))
    if err > 1e-4:
        raise SystemExit(f"SparseConv disagrees with dense Conv at {lay.label} d={d}: rel err {err:.2e}")
    # With one intra-op thread ORT runs the node on the calling thread, so that thread's CPU time
    # measures the kernels without the time other processes take on a shared machine.
    clock = time.thread_time if (cpu_clock and threads == 1) else time.perf_counter
    t = time_interleaved(sessions, feeds, reps, min_sample_s, threads, clock)
    row = {"layer": lay.label, "cin": lay.cin, "cout": lay.cout, "k": lay.k, "stride": lay.stride, "HW": lay.hw,
           "N": n, "threads": threads, "density": d, "block": block, "dm_channels": [cin_dm, cout_dm],
           "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3,
           "speedup": t["dense"] / t["sparse"], "ideal": 1.0 / d}
    row["frac_ideal"] = row["speedup"] / row["ideal"]
    row["rule_threshold"] = rule_threshold(lay, mask)
    row["export_speedup"] = row["speedup"] if d < row["rule_threshold"] else 1.0
    if with_dm:
        row["dm_ms"] = t["dm"] * 1e3
        row["sparse_over_dm"] = t["sparse"] / t["dm"]
    return row


def bench_depthwise(c: int, k: int, stride: int, hw: int, n: int, threads: int, reps: int, min_sample_s: float,
                    rng: np.random.Generator) -> dict:
    """ORT's depthwise Conv (with its NCHWc reorders) vs the native depthwise path on one layer."""
    attrs = dict(strides=[stride] * 2, pads=[k // 2] * 4, dilations=[1, 1], group=c)
    weight = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    dense = _model([helper.make_node("Conv", ["X", "Wd", "B"], ["Y"], kernel_shape=[k, k], **attrs)],
                   {"Wd": weight, "B": bias}, c)
    inits = {"W": weight[:, 0].copy(), "row_ptr": np.arange(c + 1, dtype=np.int64),
             "col_idx": np.zeros(c, np.int64), "B": bias}
    sparse = _model([sparse_conv_node(["X", "W", "row_ptr", "col_idx", "B"], ["Y"], in_channels=c, **attrs)], inits, c)
    sessions = {"ort": native.session(dense, threads, native=False), "native": native.session(sparse, threads)}
    x = vector_aligned(rng.standard_normal((n, c, hw, hw)).astype(np.float32))
    feeds = {name: {"X": x} for name in sessions}
    y_n, y_o = (sessions[name].run(None, {"X": x})[0] for name in ("native", "ort"))
    err = float(np.abs(y_n - y_o).max() / max(1.0, float(np.abs(y_o).max())))
    if err > 1e-4:
        raise SystemExit(f"the depthwise path disagrees with ORT's Conv at {c}@{hw} {k}x{k}/s{stride}: rel err {err:.2e}")
    t = time_interleaved(sessions, feeds, reps, min_sample_s, threads)
    out = (hw + 2 * (k // 2) - k) // stride + 1
    return {"layer": f"dw {k}x{k}" + (f"/s{stride}" if stride > 1 else "") + f" {c}@{hw}", "N": n, "threads": threads,
            "ort_ms": t["ort"] * 1e3, "native_ms": t["native"] * 1e3, "ort_over_native": t["ort"] / t["native"],
            "export": depthwise_native((k, k), (stride, stride), (1, 1), [k // 2] * 4, 1, (out, out))}


def run_depthwise(args: argparse.Namespace, reps: int, min_sample_s: float) -> list[dict]:
    rows = []
    hdr = f"{'layer':>20} {'N':>3} {'thr':>3} | {'ORT ms':>8} {'native ms':>9} | {'ORT/native':>10} {'export':>7}"
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    for c, k, stride, hw in DEPTHWISE[:3] if args.quick else DEPTHWISE:
        for n in args.batches or ((1,) if args.quick else (1, 8)):
            for thr in args.threads:
                r = bench_depthwise(c, k, stride, hw, n, thr, reps, min_sample_s, rng)
                rows.append(r)
                print(f"{r['layer']:>20} {n:>3} {thr:>3} | {r['ort_ms']:>8.3f} {r['native_ms']:>9.3f} | "
                      f"{r['ort_over_native']:>9.2f}x {'sparse' if r['export'] else 'Conv':>7}", flush=True)
    return rows


def crossover(lay: Layer, n: int, threads: int, reps: int, min_sample_s: float,
              rng: np.random.Generator, cpu_clock: bool = False, block: int = 1) -> dict:
    """Speed-up over the density sweep; the crossover is where it falls to 1 (interpolated)."""
    pts = []
    for d in SWEEP:
        r = bench_layer(lay, n, threads, d, reps, min_sample_s, rng, with_dm=False, cpu_clock=cpu_clock, block=block)
        pts.append((d, r["speedup"]))
    cross = None
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if s0 >= 1.0 > s1:
            cross = d0 + (d1 - d0) * (s0 - 1.0) / (s0 - s1)
            break
    if cross is None:
        cross = 1.0 if pts[-1][1] >= 1.0 else pts[0][0]
    return {"layer": lay.label, "N": n, "threads": threads, "block": block, "sweep": pts, "crossover": cross}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (CI smoke)")
    ap.add_argument("--set", choices=["small", "large", "all", "depthwise", "stems"], default="all",
                    help="layer set: small (CIFAR-size 3x3), large (224x224 ResNet shapes), all (default: both), "
                         "depthwise (MobileNetV2 / EfficientNet-B0 depthwise convs: native path vs ORT's), stems "
                         "(7x7/s2 and 3x3/s2 on 3 input channels, densities 1/3 and 2/3)")
    ap.add_argument("--only", default=None, help="only layers whose label contains one of these comma-separated strings")
    ap.add_argument("--densities", type=float, nargs="+", default=None,
                    help="densities (default 0.1 0.5; stems 1/3 2/3)")
    ap.add_argument("--reps", type=int, default=None, help="timed samples per session (default 11, quick 3)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the crossover density sweep")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default 1 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes (default: 1 16 for the small set, 1 8 for the large one; quick 1)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time 1-thread runs by the thread's CPU time (robust on a busy machine); others by wall clock")
    ap.add_argument("--blocks", type=int, nargs="+", default=[1],
                    help="output channels per shared fan-in of the masks, one row each (default 1; e.g. 1 4: "
                         "the transform's --block 4, whose 1x1 convs the kernel runs 4 channels per loaded vector)")
    ap.add_argument("--json", type=Path, default=None, help="write all measurements to this file")
    args = ap.parse_args(argv)

    inf = native.info()
    if not inf["loadable"]:
        print(f"native kernel not available: {inf['reason']}", file=sys.stderr)
        return 2
    if args.densities is None:
        args.densities = list(STEM_DENSITIES if args.set == "stems" else DENSITIES)
    reps = args.reps or (3 if args.quick else 11)
    min_sample_s = 0.002 if args.quick else 0.01
    if args.set == "depthwise":
        print(f"onnxruntime {inf['onnxruntime_version']}, kernel isa={inf['isa']}, reps={reps} (medians, interleaved)")
        rows = run_depthwise(args, reps, min_sample_s)
        if args.json:
            args.json.write_text(json.dumps({"info": inf, "depthwise": rows}, indent=1))
        return 0
    plan: list[tuple[Layer, tuple[int, ...]]] = []
    for name in (("small", "large") if args.set == "all" else (args.set,)):
        layers, default_batches = SETS[name]
        for lay in layers:
            if args.quick and lay not in QUICK:
                continue
            if args.only and not any(part in lay.label for part in args.only.split(",")):
                continue
            plan.append((lay, tuple(args.batches or ((1,) if args.quick else default_batches))))
    threads_list = tuple(args.threads)
    rng = np.random.default_rng(0)
    clock_name = "thread CPU time for 1 thread, wall clock otherwise" if args.cpu_clock else "wall clock"
    print(f"onnxruntime {inf['onnxruntime_version']}, kernel isa={inf['isa']}, reps={reps} "
          f"(medians, interleaved; {clock_name})")

    rows = []
    hdr = (f"{'layer':>20} {'N':>3} {'thr':>3} {'d':>4} {'blk':>3} | {'dense ms':>9} {'sparse ms':>9} {'dm ms':>8} | "
           f"{'speedup':>7} {'ideal':>5} {'%ideal':>6} {'sp/dm':>6} {'export':>7}")
    print(hdr)
    print("-" * len(hdr))
    for lay, batches in plan:
        for n in batches:
            for thr in threads_list:
                for d, blk in itertools.product(args.densities, args.blocks):
                    r = bench_layer(lay, n, thr, d, reps, min_sample_s, rng, cpu_clock=args.cpu_clock, block=blk)
                    rows.append(r)
                    print(f"{lay.label:>20} {n:>3} {thr:>3} {d:>4.2f} {blk:>3} | {r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} "
                          f"{r['dm_ms']:>8.3f} | {r['speedup']:>6.2f}x {r['ideal']:>5.1f} {100 * r['frac_ideal']:>5.0f}% "
                          f"{r['sparse_over_dm']:>6.2f} {r['export_speedup']:>6.2f}x", flush=True)

    scaling = []
    for lay, batches in plan:
        for d, blk in itertools.product(args.densities, args.blocks):
            sel = [r for r in rows if r["layer"] == lay.label and r["density"] == d and r["N"] == max(batches)
                   and r["block"] == blk]
            one = [r for r in sel if r["threads"] == 1]
            two = [r for r in sel if r["threads"] == 2]
            if one and two:
                scaling.append({"layer": lay.label, "N": max(batches), "density": d, "block": blk,
                                "sparse_2t_speedup": one[0]["sparse_ms"] / two[0]["sparse_ms"],
                                "dense_2t_speedup": one[0]["dense_ms"] / two[0]["dense_ms"]})
    if scaling:
        print("\nthread scaling at the largest batch (time 1 thread / time 2 threads):")
    for s in scaling:
        print(f"  {s['layer']:>20} N={s['N']} d={s['density']:.2f} block={s['block']}: sparse {s['sparse_2t_speedup']:.2f}x, "
              f"dense {s['dense_2t_speedup']:.2f}x")

    crossovers = []
    threshold = None
    if not args.no_sweep:
        print("\ncrossover density (sparse no longer faster than dense Conv), batch 1, 1 thread:")
        threshold = {}
        for lay, _ in plan:
            for block in args.blocks:
                cr = crossover(lay, 1, 1, max(3, reps // 2), min_sample_s, rng, cpu_clock=args.cpu_clock, block=block)
                crossovers.append(cr)
                # The rule for a mask of this block size (its share of channels in shared-fan-in runs).
                rule = rule_threshold(lay, layer(lay, 0.5, rng, block)[1])
                threshold[f"{lay.label} block={block}"] = rule
                sweep = " ".join(f"{d:.1f}:{s:.2f}x" for d, s in cr["sweep"])
                print(f"  {lay.label:>20} block={block}: crossover d={cr['crossover']:.2f}, exporter rule: sparse "
                      f"below d={rule:.2f}   [{sweep}]", flush=True)

    if args.json:
        args.json.write_text(json.dumps({"info": inf, "rows": rows, "thread_scaling": scaling,
                                         "crossovers": crossovers, "rule_thresholds": threshold}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
