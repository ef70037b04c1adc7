"""Does default training learn? Several models, dense and sparse, under candidate trainer settings.

Each (model, method, setting) is transformed (dense: ``--method none``; sparse: sparse-random at
density 0.1) and trained on scikit-learn's digits (resized to the model's input; grey channels
replicated for 3-channel models) with the trainer's defaults overridden by the setting. Printed
per run: train loss of the first epoch and the last, the largest single-step loss, validation
accuracy after epoch 1 and at the end, test accuracy, and whether the loss became non-finite.
Chance is 10%. This is how the trainer's defaults (warm-up, learning rate, clipping) were chosen.

    python benchmarks/train_defaults.py                                  # the default grid
    python benchmarks/train_defaults.py --models lenet5 resnet-user --settings base warmup --epochs 5
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from sparsify.api import transform
from sparsify.errors import TrainingError
from sparsify.train import TrainConfig, fit
from sparsify.train.data import load_dataset


class Block(nn.Module):
    """conv-bn-relu, conv-bn, residual add, relu."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResidualUser(nn.Module):
    """What a user writes: conv-bn-relu stem, one residual block, a strided conv, pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block = Block(32)
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.down(self.block(self.stem(x))).mean((2, 3)))


class ResidualFlatUser(nn.Module):
    """The residual CNN with a flatten -> linear head (no global pooling), as many tutorials write it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = Block(16)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 14 * 14, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


MODELS = {
    "lenet5": ("zoo:lenet5", None),
    "resnet20": ("zoo:resnet20", None),
    "vgg16n": ("zoo:vgg16n", None),
    "mobilenetv2": ("zoo:mobilenetv2", None),
    "resnet-user": (ResidualUser, (1, 1, 28, 28)),
    "resflat-user": (ResidualFlatUser, (1, 1, 28, 28)),
    "plain-user": (str(Path(__file__).resolve().parents[1] / "examples" / "plain_cnn.py"), None),
}
SETTINGS = {
    # the trainer before warm-up and clipping existed: SGD (Nesterov) lr 0.1, cosine
    "base": {"warmup_steps": 0, "clip_grad_norm": 0},
    "warmup": {"clip_grad_norm": 0},                # linear warm-up over the first epoch (at most 500 steps)
    "warmup-clip": {},                              # the defaults: warm-up and global gradient norm clipped to 2
    "lr0.05-warmup": {"lr": 0.05, "clip_grad_norm": 0},
    "adam": {"optimizer": "adam", "clip_grad_norm": 0},
}


def run_one(model: str, method: str, setting: str, epochs: int, seed: int) -> dict:
    spec, shape = MODELS[model]
    target = spec() if isinstance(spec, type) else spec
    kw = {"density": 0.1} if method == "sparse-random" else {}
    result = transform(target, method, seed=seed, input_shape=shape, **kw)
    input_shape = tuple(result.recipe.input_shape)
    data = load_dataset("digits", input_shape, num_classes=10)
    cfg = TrainConfig.from_dict({"data": "digits", "epochs": epochs, "seed": seed, **SETTINGS[setting]})
    steps: list[float] = []
    epochs_seen: list[dict] = []

    def on_event(ev: dict) -> None:
        if ev["kind"] == "step":
            steps.append(ev["loss"])
        elif ev["kind"] == "epoch":
            epochs_seen.append(ev)

    t0 = time.process_time()
    row = {"model": model, "method": method, "setting": setting, "seed": seed}
    try:
        out = fit(result.model, data, cfg, model_input=input_shape, progress=on_event)
        row.update(test_acc=round(out["test_acc"], 4), nonfinite=False)
    except TrainingError:
        row.update(test_acc=None, nonfinite=True)
    finite = [s for s in steps if math.isfinite(s)]
    row.update(
        first_loss=round(steps[0], 3) if steps else None,
        max_step_loss=round(max(finite), 2) if finite else None,
        train_loss=[round(e["train_loss"], 3) for e in epochs_seen],
        val_acc=[round(e["val_acc"], 3) for e in epochs_seen],
        val_loss=[round(e["val_loss"], 3) for e in epochs_seen],
        cpu_s=round(time.process_time() - t0, 1),
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=["none", "sparse-random"])
    ap.add_argument("--settings", nargs="+", default=["base", "warmup"], choices=list(SETTINGS))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", action="store_true", help="one JSON line per run instead of a table row")
    args = ap.parse_args()
    if not args.json:
        print(f"{'model':12} {'method':13} {'setting':16} seed {'loss 1st/max':>14} {'val acc ep1 -> end':>20} "
              f"{'test':>6}  cpu s")
    for model in args.models:
        for method in args.methods:
            for setting in args.settings:
                for seed in args.seeds:
                    r = run_one(model, method, setting, args.epochs, seed)
                    if args.json:
                        print(json.dumps(r), flush=True)
                        continue
                    va = r["val_acc"]
                    acc = f"{va[0]:.3f} -> {va[-1]:.3f}" if va else "-"
                    test = "nan" if r["nonfinite"] else f"{r['test_acc']:.3f}"
                    print(f"{model:12} {method:13} {setting:16} {seed:4} {r['first_loss']!s:>6}/{r['max_step_loss']!s:>7} "
                          f"{acc:>20} {test:>6}  {r['cpu_s']}", flush=True)


if __name__ == "__main__":
    main()
