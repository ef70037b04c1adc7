"""Two-thread speed against where the machine's two CPUs sit: sparse export vs its depth baseline.

On a shared VM the two vCPUs run on whichever host cores the hypervisor picks, sometimes in one
cache domain, sometimes not. A sparse export whose front runs image by image (``per_image``)
synchronises its threads once per node and image and hands every layer's output from one core's
cache to the other's; a dense model spends long stretches in each conv. This script shows how
each reacts: in alternating short bursts it times the sparse export and the equal-parameter
depth-multiplied model on two intra-op threads and, after each pair of bursts, the one-way time of
a cache-line handoff between CPU 0 and CPU 1 (a 20-line C probe built with the system's ``cc``).
It prints one row per pair and a summary per placement: "near" (handoff below ``--far-ns``) and
"far", each with the median two-thread times, sparse/depth, and the two-thread scaling against one
thread (one-thread times measured before and after, in the same process).

Usage::

    python benchmarks/bench_thread_placement.py [--model resnet50] [--block 4] [--density 0.1]
        [--batch-size 8] [--seconds 90] [--far-ns 150] [--quick]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_imagenet import CALIBRATION, DIVISOR, MODELS
from bench_models import export_variants
from sparsify import zoo
from sparsify.runtime import bench as lib

QUICK_SHAPE = (1, 3, 64, 64)

# One-way handoff of a cache line between threads pinned to CPU 0 and CPU 1, in ns.
PROBE_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
static _Alignas(64) atomic_int flag;
enum { N = 200000 };
static void pin(int c) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(c, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s); }
static void* other(void* a) {
  (void)a; pin(1);
  for (int i = 0; i < N; ++i) {
    while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 1) {}
    atomic_store_explicit(&flag, 2 * i + 2, memory_order_release);
  }
  return 0;
}
int main(void) {
  pin(0); pthread_t t; pthread_create(&t, 0, other, 0);
  struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < N; ++i) {
    atomic_store_explicit(&flag, 2 * i + 1, memory_order_release);
    while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 2) {}
  }
  clock_gettime(CLOCK_MONOTONIC, &b); pthread_join(t, 0);
  printf("%.0f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (2.0 * N));
  return 0;
}
"""


def build_probe(tmp: Path) -> Path:
    """Compile PROBE_C into tmp; SystemExit with a one-line reason when it cannot."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench_thread_placement: no C compiler (cc) found for the handoff probe; install gcc")
    src, exe = tmp / "handoff.c", tmp / "handoff"
    src.write_text(PROBE_C)
    r = subprocess.run([cc, "-O2", "-pthread", str(src), "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench_thread_placement: the handoff probe did not build: {r.stderr.strip()[:200]}")
    return exe


def burst(sess, feed: dict, seconds: float) -> float:
    """Median ms of one burst of runs over about `seconds` (``time_bursts``: after the spin settle and
    one untimed run; at least 3 runs)."""
    samples = lib.time_bursts([lambda: sess.run(None, feed)], burst_s=seconds, min_runs=3,
                              settle_s=lib.SPIN_SETTLE_S)[0]
    return statistics.median(samples) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", help="zoo name (default resnet50)")
    ap.add_argument("--block", type=int, default=4, help="output channels per shared fan-in (default 4)")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=90.0, help="how long to alternate the bursts")
    ap.add_argument("--burst", type=float, default=0.3, help="seconds per burst")
    ap.add_argument("--far-ns", type=float, default=150.0, help="handoff time from which the CPUs count as far apart")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run for CI: ResNet-18 at {QUICK_SHAPE[2]}x{QUICK_SHAPE[3]}, batch 1, a few seconds "
                         "(checks the script runs; the figures mean nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.seconds, args.burst = "resnet18", 1, 2.0, 0.05
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("bench_thread_placement: needs CPUs 0 and 1; run it on a machine with two or more CPUs")
    if args.model not in MODELS:
        raise SystemExit(f"bench_thread_placement: unknown model {args.model!r}; one of {', '.join(MODELS)}")
    _, model_args = MODELS[args.model]
    shape = QUICK_SHAPE if args.quick else tuple(zoo.get(args.model).input_shape)
    with tempfile.TemporaryDirectory(prefix="bench-thread-placement-") as tmpdir:
        tmp = Path(tmpdir)
        probe = build_probe(tmp)
        files, _ = export_variants(args.model, tmp, density=args.density, model_args=model_args, input_shape=shape,
                                   divisor=DIVISOR, calibration=CALIBRATION, block=args.block)
        paths = dict(files)
        x = np.random.default_rng(0).standard_normal((args.batch_size, *shape[1:]), dtype=np.float32)
        sessions = {(v, t): lib.make_session(paths[v], t) for v in ("sparse", "depth") for t in (1, 2)}
        feed = {sessions[("sparse", 1)].get_inputs()[0].name: x}

        def one_thread() -> dict[str, float]:
            return {v: burst(sessions[(v, 1)], feed, 4 * args.burst) for v in ("sparse", "depth")}

        def handoff() -> float:
            return float(subprocess.run([str(probe)], capture_output=True, text=True, check=True).stdout)

        print(f"{args.model} density {args.density} block {args.block} batch {args.batch_size}, 2 threads; "
              f"handoff = one-way cache-line handoff CPU 0 <-> CPU 1")
        first = one_thread()
        rows = []
        end = time.perf_counter() + args.seconds
        print(f"{'pair':>4} {'sparse ms':>10} {'depth ms':>9} {'sparse/depth':>12} {'handoff ns':>10}")
        while time.perf_counter() < end or not rows:
            s = burst(sessions[("sparse", 2)], feed, args.burst)
            d = burst(sessions[("depth", 2)], feed, args.burst)
            h = handoff()
            rows.append((s, d, h))
            print(f"{len(rows):>4} {s:>10.2f} {d:>9.2f} {s / d:>12.2f} {h:>10.0f}", flush=True)
        last = one_thread()
    one = {v: statistics.median([first[v], last[v]]) for v in first}
    print(f"\n1 thread: sparse {one['sparse']:.2f} ms, depth {one['depth']:.2f} ms (median of before and after)")
    print(f"{'placement':<10} {'pairs':>5} {'sparse ms':>10} {'depth ms':>9} {'sparse/depth':>12} "
          f"{'sparse 1t/2t':>12} {'depth 1t/2t':>11}")
    for label, pick in (("near", lambda h: h < args.far_ns), ("far", lambda h: h >= args.far_ns)):
        sel = [r for r in rows if pick(r[2])]
        if not sel:
            print(f"{label:<10} {0:>5}")
            continue
        s = statistics.median(r[0] for r in sel)
        d = statistics.median(r[1] for r in sel)
        print(f"{label:<10} {len(sel):>5} {s:>10.2f} {d:>9.2f} {s / d:>12.2f} {one['sparse'] / s:>12.2f} "
              f"{one['depth'] / d:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
