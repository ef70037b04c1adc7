"""How long the transform stage takes on a ResNet-50-sized graph (target: under 2 s).

Times trace + channel graph + pass (each method) on zoo:resnet50 at 1x3x224x224, after one
warm-up run (the first forward of a process pays for oneDNN's kernel setup). Building the
model (random init of 25.6M weights) is not part of the stage and is timed separately.

    python benchmarks/bench_transform.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsify import zoo
from sparsify.passes.channel_graph import ChannelGraph
from sparsify.passes.depth_multiplier import DepthMultiplierPass
from sparsify.passes.sparsity import PSNPass, SparseRandomPass
from sparsify.passes.trace import propagate_shapes, trace

PASSES = {
    "sparse-random d=0.1": lambda: SparseRandomPass(0.1),
    "psn lognormal d=0.1": lambda: PSNPass(0.1, profile="lognormal", include_linear=False),
    "depth-multiplier a=0.5": lambda: DepthMultiplierPass(0.5),
}


def stage(model: torch.nn.Module, example: torch.Tensor, make_pass) -> dict[str, float]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    gm = trace(model)
    t1 = time.perf_counter()
    propagate_shapes(gm, example)
    t2 = time.perf_counter()
    ChannelGraph.build(gm)
    t3 = time.perf_counter()
    make_pass()(gm, example)
    t4 = time.perf_counter()
    cpu = time.process_time() - c0
    return {"trace": t1 - t0, "shapes": t2 - t1, "channel graph": t3 - t2, "pass": t4 - t3, "total": t4 - t0,
            "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t = time.perf_counter()
    model = zoo.get("resnet50").build().eval()
    build = time.perf_counter() - t
    example = torch.randn(1, 3, 224, 224)
    print(f"resnet50: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{len(trace(model).graph.nodes)} fx nodes, build {build:.2f} s (not counted), "
          f"torch threads {torch.get_num_threads()}")
    stage(model, example, PASSES["sparse-random d=0.1"])  # warm-up
    print(f"{'pass':<24}{'trace':>8}{'shapes':>8}{'graph':>8}{'pass':>8}{'total':>8}{'cpu':>8}"
          f"   (median of {args.repeats}, s; cpu = process CPU time, all threads)")
    for name, make in PASSES.items():
        runs = [stage(model, example, make) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        verdict = "ok" if med["total"] < 2.0 else "OVER 2 s"
        print(f"{name:<24}{med['trace']:>8.3f}{med['shapes']:>8.3f}{med['channel graph']:>8.3f}"
              f"{med['pass']:>8.3f}{med['total']:>8.3f}{med['cpu']:>8.3f}   {verdict}")


if __name__ == "__main__":
    main()
