"""Training a run directory: load it, train it, write weights, metrics and summary back."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from .._io import atomic_path, check_writable, write_json
from ..errors import DivergenceError, RunDirError, UsageError
from ..rundir import SUMMARY, WEIGHTS, WEIGHTS_INIT, load_run, load_weights, read_recipe, read_summary, save_weights
from .checkpoint import checkpoint_path, load_checkpoint
from .data import load_dataset
from .distributed import Reducer, init_from_env, shutdown
from .trainer import LogFn, ProgressFn, TrainConfig, fit, output_classes

METRICS = "metrics.jsonl"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Settings added after checkpoints were first written, with the values those checkpoints trained with.
_BEFORE_DEFAULTS = {"warmup_steps": 0, "clip_grad_norm": None}


def _resume_config(state: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    saved = {**_BEFORE_DEFAULTS, **json.loads(state["config"])}
    differing = {k: v for k, v in overrides.items() if k in saved and saved[k] != v}
    if differing:
        k = next(iter(differing))
        was = "its default" if saved[k] is None else repr(saved[k])
        raise UsageError(f"--resume continues the checkpoint's settings, but {_flag(k)} {differing[k]!r} differs "
                         f"from the checkpoint's {was}; drop {_flag(k)} or start again with --force")
    return TrainConfig.from_dict(saved)


def _refreshed_report(model: Any, input_shape: tuple[int, ...], summary: dict[str, Any]) -> dict[str, Any]:
    """The per-layer report for the trained masks (dynamic schedules change live counts and fan-in)."""
    from ..report import layer_report, with_ratios

    report = layer_report(model, input_shape)
    if "original_totals" in summary:
        report = with_ratios(report, {"totals": summary["original_totals"]})
    return report


def _write_back(run_dir: Path, model: Any, model_input: tuple[int, ...], train: dict[str, Any]) -> None:
    """Save the trained weights and the refreshed report with its ``train`` section."""
    save_weights(run_dir, model)
    summary = read_summary(run_dir)
    summary.update(_refreshed_report(model, model_input, summary))
    summary["train"] = train
    write_json(run_dir / SUMMARY, summary)


def _keep_last_good(run_dir: Path, run: Any, model_input: tuple[int, ...], ckpt: Path, cfg: TrainConfig,
                    e: DivergenceError) -> str:
    """After a divergence: make the last completed epoch (its checkpoint) the run's weights; say what was kept."""
    if e.good_epochs == 0 or not ckpt.is_file():
        return "the run's weights are unchanged"
    state = load_checkpoint(ckpt)
    run.model.load_state_dict(state["model"])
    history = json.loads(state["history"])
    _write_back(run_dir, run.model, model_input, {
        "diverged": str(e.what), "epochs_completed": int(state["epoch"]), "config": cfg.to_dict(),
        **{k: history[-1].get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
    })
    return f"{WEIGHTS} and {METRICS} hold epoch{'s 1-' if e.good_epochs > 1 else ' '}{e.good_epochs}"


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of ``path``, None when absent: tells whether a file was rewritten."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _model_name(model: str) -> str:
    """A recipe's model for a message: ``zoo:resnet20`` as it is, a file by its name (``net.py:build``)."""
    return model if model.startswith(("zoo:", "torchvision:")) else Path(model).name


def train_run(run_dir: str | Path, *, resume: bool = False, force: bool = False, log: LogFn | None = None,
              progress: ProgressFn | None = None, **config: Any) -> dict[str, Any]:
    """Train the run in ``run_dir`` with the TrainConfig fields given as keywords; return final metrics.

    Writes ``checkpoints/last.pt`` every epoch, ``metrics.jsonl``, and at the end the trained
    ``weights.safetensors`` and a ``train`` section in ``summary.json``. ``resume`` continues the
    checkpoint (bit-identical to an uninterrupted run); an existing checkpoint is otherwise
    refused unless ``force``, which trains again from the run's initial weights
    (``weights.init.safetensors``, written by ``transform``). Under torchrun it trains with
    DistributedDataParallel.

    Raises DivergenceError (a TrainingError) when the loss becomes non-finite or far above where
    it started; the completed epochs are kept (``metrics.jsonl``, the checkpoint, and their
    weights as the run's weights).
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
                          f"or --force to train again from the run's initial weights")
    check_writable(run_dir / WEIGHTS, "the run directory: ")
    created = init_from_env()
    try:
        run = load_run(run_dir)
        init = run_dir / WEIGHTS_INIT
        if force and not resume and init.is_file():
            load_weights(run.model, init)
        elif force and not resume and log is not None and Reducer().is_main:
            log(f"note: {run_dir} has no {WEIGHTS_INIT} (made by an older sparsify), so training starts again "
                f"from its current weights, not the ones transform made")
        model_input = tuple(int(d) for d in recipe.input_shape)
        # Before anything is written: the model must score classes (not return a dict or a tuple),
        # and a file model's class count (the recipe knows only a zoo model's) is its output width.
        classes = output_classes(run.model, model_input, _model_name(recipe.model), recipe.seed)
        data = load_dataset(cfg.data, model_input,
                            data_dir=cfg.data_dir, num_classes=recipe.num_classes or classes,
                            val_fraction=cfg.val_fraction, train_limit=cfg.train_limit, normalize=cfg.normalize)
        # If training stops before an epoch completes (an interrupt, an error; a divergence is a
        # result and keeps its record in metrics.jsonl), the run directory is put back as it was:
        # the files this run made are removed, and metrics.jsonl (which fit rewrites at once) of a run
        # trained before (--force) is restored to go with that run's checkpoint, weights and summary.
        made = [p for p in (run_dir / METRICS, init) if not p.exists()]
        old_metrics = (run_dir / METRICS).read_bytes() if (run_dir / METRICS).is_file() else None
        ckpt_before = _stamp(ckpt)

        def undo_if_no_epoch() -> None:
            if not Reducer().is_main or _stamp(ckpt) != ckpt_before:
                return
            for p in made:
                p.unlink(missing_ok=True)
            if old_metrics is not None:
                with atomic_path(run_dir / METRICS) as tmp:
                    tmp.write_bytes(old_metrics)

        if Reducer().is_main and not init.is_file():
            shutil.copyfile(run_dir / WEIGHTS, init)  # an older run: its weights before any training here
        try:
            result = fit(run.model, data, cfg, model_input=model_input, checkpoint=ckpt,
                         metrics_path=run_dir / METRICS, resume_state=state, log=log, progress=progress)
        except DivergenceError as e:
            kept = _keep_last_good(run_dir, run, model_input, ckpt, cfg, e) if Reducer().is_main else ""
            retry = shlex.join(["sparsify", "train", str(run_dir), "--force", "--lr", f"{cfg.learning_rate / 10:g}"])
            raise DivergenceError(e.what, epoch=e.epoch, good_epochs=e.good_epochs, lr=e.lr,
                                  advice=f"stopped ({kept}); retry from the initial weights with a lower learning "
                                         f"rate: {retry}") from None
        except BaseException:
            undo_if_no_epoch()
            raise
        if Reducer().is_main:
            _write_back(run_dir, run.model, model_input, result)
        Reducer().barrier()
        return result
    finally:
        shutdown(created)
