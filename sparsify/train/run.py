"""Training a run directory: load it, train it, write weights, metrics and summary back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import write_json
from ..errors import RunDirError, UsageError
from ..rundir import SUMMARY, load_run, read_recipe, save_weights
from .checkpoint import checkpoint_path, load_checkpoint
from .data import load_dataset
from .distributed import Reducer, init_from_env, shutdown
from .trainer import LogFn, ProgressFn, TrainConfig, fit

METRICS = "metrics.jsonl"


def _resume_config(state: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    saved = json.loads(state["config"])
    differing = {k: v for k, v in overrides.items() if k in saved and saved[k] != v}
    if differing:
        k = next(iter(differing))
        raise UsageError(f"--resume continues the checkpoint's settings, but {k}={differing[k]!r} differs from "
                         f"its {saved[k]!r}; drop the option or start again with --force")
    return TrainConfig.from_dict(saved)


def _refreshed_report(model: Any, input_shape: tuple[int, ...], summary: dict[str, Any]) -> dict[str, Any]:
    """The per-layer report for the trained masks (dynamic schedules change live counts and fan-in)."""
    from ..report import layer_report, with_ratios

    report = layer_report(model, input_shape)
    if "original_totals" in summary:
        report = with_ratios(report, {"totals": summary["original_totals"]})
    return report


def train_run(run_dir: str | Path, *, resume: bool = False, force: bool = False, log: LogFn | None = None,
              progress: ProgressFn | None = None, **config: Any) -> dict[str, Any]:
    """Train the run in ``run_dir`` with the TrainConfig fields given as keywords; return final metrics.

    Writes ``checkpoints/last.pt`` every epoch, ``metrics.jsonl``, and at the end the trained
    ``weights.safetensors`` and a ``train`` section in ``summary.json``. ``resume`` continues the
    checkpoint (bit-identical to an uninterrupted run); an existing checkpoint is otherwise
    refused unless ``force``. Under torchrun it trains with DistributedDataParallel.
    """
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    ckpt = checkpoint_path(run_dir)
    state = None
    if resume:
        state = load_checkpoint(ckpt)
        cfg = _resume_config(state, config)
    else:
        cfg = TrainConfig.from_dict(config)
    cfg.validate()  # a bad argument is reported before anything about the run's state
    if len(recipe.shapes) > 1:
        raise UsageError(f"the model of {run_dir} takes {len(recipe.shapes)} inputs but the data sets give one image "
                         "per example; train it with your own loop (sparsify.load(RUN).model keeps its masks with "
                         "sparsify.train.trainer.enforce_masks) or export it as it is")
    if not resume and ckpt.exists() and not force:
        raise RunDirError(f"{run_dir} already has a training checkpoint ({ckpt}); pass --resume to continue it "
                          f"or --force to train again from the run's weights")
    created = init_from_env()
    try:
        run = load_run(run_dir)
        model_input = tuple(int(d) for d in recipe.input_shape)
        data = load_dataset(cfg.data, model_input,
                            data_dir=cfg.data_dir, num_classes=recipe.num_classes,
                            val_fraction=cfg.val_fraction, train_limit=cfg.train_limit)
        if len(model_input) == 2 and data.train.x[0].numel() != model_input[1]:
            raise UsageError(f"the model takes vectors of {model_input[1]} values but {cfg.data} images have "
                             f"{data.train.x[0].numel()}; choose a matching data set")
        result = fit(run.model, data, cfg, model_input=model_input, checkpoint=ckpt,
                     metrics_path=run_dir / METRICS, resume_state=state, log=log, progress=progress)
        if Reducer().is_main:
            save_weights(run_dir, run.model)
            summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
            summary.update(_refreshed_report(run.model, model_input, summary))
            summary["train"] = result
            write_json(run_dir / SUMMARY, summary)
        Reducer().barrier()
        return result
    finally:
        shutdown(created)
