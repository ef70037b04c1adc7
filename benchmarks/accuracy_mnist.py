"""MNIST test error, mean ± standard error over seeds, for the comparisons of issue 3.

Configurations (``--configs``, any subset):
  lenet5-dense        zoo lenet5, ordinary layers (transform --method none), static
  lenet5-sr           sparse-random at --density (convs masked), static
  lenet5-dm           depth-multiplier with alpha chosen so total parameters match lenet5-sr (Changpinyo Fig. 2)
  lenet5-sm5          sparse momentum at 5% of all weights (Dettmers Table 1 reports 0.69% for LeNet-5 Caffe)
  lenet300-dense      zoo lenet300-100, dense
  lenet300-sm5        sparse momentum at 5% of all weights (Dettmers Table 1: 1.53%)
Setup as in Dettmers & Zettlemoyer: SGD Nesterov 0.9, lr 0.1, weight decay 5e-4, batch 100, 10% of
train held out for validation, test error after the last epoch; cosine learning rate and far fewer
epochs than the papers' 100 (``--epochs``), so expect somewhat higher errors. Needs
``sparsify data fetch mnist``.

    python benchmarks/accuracy_mnist.py --configs lenet300-dense lenet300-sm5 --seeds 3 --epochs 10
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch

from sparsify.api import transform
from sparsify.errors import TrainingError
from sparsify.train import TrainConfig, fit
from sparsify.train.data import load_dataset

ALL = ["lenet5-dense", "lenet5-sr", "lenet5-dm", "lenet5-sm5", "lenet300-dense", "lenet300-sm5"]


def params_of(result: Any) -> int:
    return int(result.summary["totals"]["params"])


def matched_alpha(density: float, seed: int) -> float:
    """Depth multiplier whose total parameter count matches sparse-random at ``density`` (bisection)."""
    target = params_of(transform("zoo:lenet5", "sparse-random", density=density, seed=seed))
    lo, hi = 0.05, 1.0
    for _ in range(10):
        mid = (lo + hi) / 2
        if params_of(transform("zoo:lenet5", "depth-multiplier", alpha=mid, seed=seed)) > target:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def build(config: str, seed: int, density: float, alpha: float | None) -> tuple[Any, str]:
    """The transformed model for a configuration and the schedule to train it with."""
    every = {"include_linear": True, "include_classifier": True}
    if config == "lenet5-dense":
        return transform("zoo:lenet5", "none", seed=seed), "static"
    if config == "lenet5-sr":
        return transform("zoo:lenet5", "sparse-random", density=density, seed=seed), "static"
    if config == "lenet5-dm":
        return transform("zoo:lenet5", "depth-multiplier", alpha=alpha, seed=seed), "static"
    if config == "lenet5-sm5":
        return transform("zoo:lenet5", "sparse-random", density=0.05, seed=seed, **every), "sparse-momentum"
    if config == "lenet300-dense":
        return transform("zoo:lenet300-100", "none", seed=seed), "static"
    if config == "lenet300-sm5":
        return transform("zoo:lenet300-100", "sparse-random", density=0.05, seed=seed, **every), "sparse-momentum"
    raise SystemExit(f"unknown config {config}; choose from {ALL}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=ALL)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.1, help="density of lenet5-sr (and the matched lenet5-dm)")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    datasets: dict[tuple, Any] = {}
    results: dict[str, Any] = {}
    alpha = matched_alpha(args.density, 0) if "lenet5-dm" in args.configs else None
    for config in args.configs:
        errors, params, times, diverged = [], None, [], 0
        for seed in range(args.seeds):
            built, schedule = build(config, seed, args.density, alpha)
            shape = tuple(built.recipe.input_shape)
            if shape not in datasets:
                datasets[shape] = load_dataset("mnist", shape, data_dir=args.data_dir, train_limit=args.train_limit)
            cfg = TrainConfig(data="mnist", schedule=schedule, epochs=args.epochs, batch_size=100, seed=seed,
                              train_limit=args.train_limit, lr=args.lr)
            t0 = time.time()
            params = params_of(built)
            try:
                r = fit(built.model, datasets[shape], cfg, model_input=shape)
            except TrainingError as e:  # a diverged seed is a result too: count it, do not average it
                diverged += 1
                print(f"{config} seed {seed}: diverged ({e})", flush=True)
                continue
            times.append(time.time() - t0)
            errors.append(100.0 * (1.0 - r["test_acc"]))
            print(f"{config} seed {seed}: test error {errors[-1]:.2f}% ({times[-1]:.0f}s)", flush=True)
        mean = statistics.mean(errors) if errors else float("nan")
        se = statistics.stdev(errors) / math.sqrt(len(errors)) if len(errors) > 1 else float("nan")
        results[config] = {"error_mean": mean, "error_se": se, "errors": errors, "diverged": diverged,
                           "params_at_init": params, "lr": cfg.learning_rate,
                           "seeds": args.seeds, "epochs": args.epochs, "alpha": alpha if config == "lenet5-dm" else None}
    print(f"\nMNIST test error (%), {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'config':<16}{'params':>10}{'error %':>18}  diverged")
    for config, r in results.items():
        print(f"{config:<16}{r['params_at_init']:>10}{r['error_mean']:>10.2f} ± {r['error_se']:.2f}  {r['diverged']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
