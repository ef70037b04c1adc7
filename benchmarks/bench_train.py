"""Training overhead of each topology schedule vs dense training of the same model.

Dense = the traced model with ordinary Conv2d/Linear layers (``transform --method none``) trained
with the same optimiser; every schedule trains the sparse-random version (masked layers, masks
enforced after each step, dense-gradient taps and topology updates as the schedule needs).
Configurations are measured interleaved, round after round, on the same synthetic batches, in
process CPU time with one thread (on a shared machine wall time mostly measures the neighbours);
the reported ratio is the median over rounds of (schedule epoch / dense epoch of that round). Epoch 2 of 3 is timed: it contains a sparse-momentum
update (none after the last epoch; with fewer steps per epoch than MNIST's 540 its cost is
amortised over fewer steps, so the figure is an upper bound) and RigL updates at the rate of
ΔT = 100 on a 540-step MNIST epoch.

    python benchmarks/bench_train.py                       # lenet5 and lenet300-100
    python benchmarks/bench_train.py --models lenet5 --rounds 5 --samples 2000 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsify.api import transform
from sparsify.train import TrainConfig, fit
from sparsify.train.data import load_dataset

SCHEDULES = ["static", "sparse-momentum", "rigl", "set", "incremental"]
SPARSE_KW = {"lenet5": {}, "lenet300-100": {"include_linear": True}}


def epoch_time(model_name: str, method: str, schedule: str, data, steps: int, density: float) -> float:
    """CPU seconds of training epoch 2 of 3 (no validation) for one configuration."""
    kw = SPARSE_KW.get(model_name, {})
    if method == "none":
        result = transform(f"zoo:{model_name}", "none")
    else:
        result = transform(f"zoo:{model_name}", "sparse-random", density=density, **kw)
    model = result.model
    cfg = TrainConfig(data="synthetic", schedule=schedule, epochs=3, batch_size=100, val_fraction=0.0,
                      update_every=max(1, round(100 * steps / 540)) if schedule == "rigl" else None,
                      double_every=max(1, steps // 2) if schedule == "incremental" else None)
    cpu = {}

    def on_event(event):
        if event["kind"] == "epoch":
            cpu[event["epoch"]] = time.process_time()

    fit(model, data, cfg, model_input=tuple(result.recipe.input_shape), progress=on_event)
    return cpu[2] - cpu[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lenet5", "lenet300-100"])
    ap.add_argument("--schedules", nargs="+", default=SCHEDULES)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--samples", type=int, default=None,
                    help="training examples per epoch, batch size 100 (default: 2000 lenet5, 20000 others)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU time sums all threads)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": torch.get_num_threads(), "density": args.density, "models": {}}
    for model_name in args.models:
        samples = args.samples or (2000 if model_name == "lenet5" else 20000)
        shape = tuple(transform(f"zoo:{model_name}", "none").recipe.input_shape)
        data = load_dataset("synthetic", shape, num_classes=10, val_fraction=0.0,
                            synthetic_size=(samples, 100))
        steps = samples // 100
        rows: dict[str, list[float]] = {s: [] for s in ["dense"] + args.schedules}
        ratios: dict[str, list[float]] = {s: [] for s in args.schedules}
        for _ in range(args.rounds):
            t_dense = epoch_time(model_name, "none", "static", data, steps, args.density)
            rows["dense"].append(t_dense)
            for s in args.schedules:
                t = epoch_time(model_name, "sparse-random", s, data, steps, args.density)
                rows[s].append(t)
                ratios[s].append(t / t_dense)
        res = {"samples": samples, "dense_epoch_s": statistics.median(rows["dense"]),
               "schedules": {s: {"epoch_s": statistics.median(rows[s]), "ratio": statistics.median(ratios[s]),
                                 "ratios": [round(r, 4) for r in ratios[s]]} for s in args.schedules}}
        out["models"][model_name] = res
        if not args.json:
            print(f"\n{model_name}: {samples} samples/epoch, density {args.density}, "
                  f"{torch.get_num_threads()} threads, {args.rounds} rounds; dense epoch {res['dense_epoch_s']:.3f} CPU s")
            print(f"{'schedule':<16}{'CPU s':>10}{'vs dense':>10}   per-round ratios")
            for s, r in res["schedules"].items():
                print(f"{s:<16}{r['epoch_s']:>10.3f}{r['ratio']:>9.3f}x   {r['ratios']}")
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
