"""Would a per-image front help the dense baselines too? Dense and depth models, batched vs split.

The export splits only graphs with SparseConvs (``sparsify.runtime.per_image``): their sparse
layers wait on memory once a batch's activations leave the cache. This script checks that the
comparison stays fair: it exports bench_imagenet's dense and depth-multiplied (equal live
parameters) variants, gives each a front run image by image up to its last node of any kind with an
output of 512 KiB per image, and times the batched and the split file side by side
(``sparsify.runtime.bench.bench_files``, interleaved bursts). Prints split speed-up per variant,
batch and thread count (> 1: the split would help that baseline).

Usage::

    python benchmarks/bench_per_image_baselines.py [--models resnet18,resnet50,densenet121]
        [--batch-size 1,8] [--threads 1] [--density 0.1] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx

from bench_imagenet import CALIBRATION, DIVISOR, MODELS
from bench_models import export_variants
from sparsify.runtime import bench as lib
from sparsify.runtime import per_image

QUICK_SHAPE = (1, 3, 112, 112)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,densenet121")
    ap.add_argument("--batch-size", default="1,8")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run for CI: ResNet-18 at {QUICK_SHAPE[2]}x{QUICK_SHAPE[3]} (its 7x7 stem's output "
                         "still reaches 512 KiB), batch 1, short timing (the figures mean nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.threads, args.min_time = "resnet18", "1", "1", 0.1
    batches = [int(b) for b in args.batch_size.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    print("variant          batch thr   batched ms   split ms   batched/split   front")
    with tempfile.TemporaryDirectory(prefix="bench-per-image-") as tmp:
        for name in args.models.split(","):
            _, model_args = MODELS[name]
            files, _ = export_variants(name, Path(tmp), density=args.density, model_args=model_args,
                                       divisor=DIVISOR, calibration=CALIBRATION,
                                       input_shape=QUICK_SHAPE if args.quick else None)
            for variant, path in files:
                if variant == "sparse":
                    continue
                model = onnx.load(str(path))
                k, why = per_image.front_length(model, any_node=True)
                if not k:
                    print(f"{name} {variant}: not split ({why})")
                    continue
                split = Path(tmp) / f"{name}-{variant}-split.onnx"
                onnx.save(per_image.split(model, k), str(split))
                res = lib.bench_files([path, split], labels=["batched", "split"], batch_sizes=batches,
                                      threads=threads, min_time=args.min_time, memory=False)
                for b in batches:
                    for t in threads:
                        a, s = res.row("batched", b, t).median_ms, res.row("split", b, t).median_ms
                        print(f"{name + ' ' + variant:16s} {b:5d} {t:3d} {a:12.2f} {s:10.2f} {a / s:15.2f}   "
                              f"{k} of {len(model.graph.node)} nodes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
