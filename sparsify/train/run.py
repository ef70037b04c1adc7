"""Training a run directory: load it, train it, write weights, metrics and summary back."""
from __future__ import annotations

import contextlib
import json
import os
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


def metrics_in_progress(run_dir: str | Path) -> Path:
    """Where the training in progress writes its metrics: beside its checkpoint,
    ``RUN/checkpoints/metrics.jsonl``. It becomes ``RUN/metrics.jsonl`` when the training completes
    (or diverges), together with the weights and summary; readers of the run never see it before."""
    return checkpoint_path(run_dir).parent / METRICS


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
    """Replace the run's weights, summary.json (refreshed report, ``train`` section) and metrics.jsonl
    (from ``metrics_in_progress``) with the training's, together.

    Each is first written whole under a temporary name beside its target; the renames follow one
    another only then, so ``export``, ``bench`` and ``sparsify.load`` never meet the new weights
    beside the old summary or metrics (a failure before the renames leaves all three as they were,
    and the checkpoint, which ``--resume`` finishes from).
    """
    summary = read_summary(run_dir)
    summary.update(_refreshed_report(model, model_input, summary))
    summary["train"] = train
    staged = metrics_in_progress(run_dir)
    with contextlib.ExitStack() as renames:  # each atomic_path renames its file as the block ends
        weights = renames.enter_context(atomic_path(run_dir / WEIGHTS))
        save_weights(run_dir, model, name=weights.name)
        write_json(renames.enter_context(atomic_path(run_dir / SUMMARY)), summary)
        if staged.is_file():
            renames.enter_context(atomic_path(run_dir / METRICS)).write_bytes(staged.read_bytes())
    staged.unlink(missing_ok=True)


def _keep_last_good(run_dir: Path, run: Any, model_input: tuple[int, ...], ckpt: Path, cfg: TrainConfig,
                    e: DivergenceError) -> str:
    """After a divergence: make the last completed epoch (its checkpoint) the run's weights; say what was kept."""
    if e.good_epochs == 0 or not ckpt.is_file():
        staged = metrics_in_progress(run_dir)
        if staged.is_file():  # the record of the divergence: a result, like the epochs kept otherwise
            os.replace(staged, run_dir / METRICS)
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


def _note_resumable(run_dir: Path, ckpt: Path, cfg: TrainConfig, log: LogFn | None) -> None:
    """Tell a user whose training stopped after an epoch what the run directory now holds."""
    if log is None:
        return
    try:
        epoch = f"epoch {int(load_checkpoint(ckpt)['epoch'])} of {cfg.epochs}"
    except Exception:  # a damaged checkpoint: --resume will say so
        epoch = "an epoch"
    log(f"note: training stopped after {epoch}; {run_dir}'s weights, summary.json and metrics.jsonl are as "
        f"they were, the stopped training is in {ckpt.parent}: {shlex.join(['sparsify', 'train', str(run_dir), '--resume'])} "
        f"continues it")


def _model_name(model: str) -> str:
    """A recipe's model for a message: ``zoo:resnet20`` as it is, a file by its name (``net.py:build``)."""
    return model if model.startswith(("zoo:", "torchvision:")) else Path(model).name


def train_run(run_dir: str | Path, *, resume: bool = False, force: bool = False, log: LogFn | None = None,
              progress: ProgressFn | None = None, **config: Any) -> dict[str, Any]:
    """Train the run in ``run_dir`` with the TrainConfig fields given as keywords; return final metrics.

    The training in progress writes ``checkpoints/last.pt`` and ``checkpoints/metrics.jsonl``
    (``metrics_in_progress``) every epoch; only when it completes do the trained
    ``weights.safetensors``, ``summary.json`` (refreshed report and a ``train`` section) and
    ``metrics.jsonl`` replace the run's, together (``_write_back``). A training that stops before
    (Ctrl-C, a kill) leaves those three as they were, an earlier training's included, beside the
    resumable checkpoint. ``resume`` continues the checkpoint (bit-identical to an uninterrupted
    run); an existing checkpoint is otherwise refused unless ``force``, which trains again from
    the run's initial weights (``weights.init.safetensors``, written by ``transform``). Under
    torchrun it trains with DistributedDataParallel.

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
        # The training in progress lives in checkpoints/ (last.pt, metrics.jsonl) until it completes:
        # the run's weights, summary.json and metrics.jsonl stay whole, an earlier training's too
        # (--force), whenever it stops. If it stops before an epoch completes (an interrupt, an error;
        # a divergence is a result, see _keep_last_good), checkpoints/ is put back as it was.
        staged = metrics_in_progress(run_dir)
        made = [p for p in (staged, init) if not p.exists()]
        made_dir = not ckpt.parent.exists()
        old_staged = staged.read_bytes() if staged.is_file() else None
        ckpt_before = _stamp(ckpt)

        def after_stop() -> None:
            if not Reducer().is_main:
                return
            if _stamp(ckpt) != ckpt_before:
                _note_resumable(run_dir, ckpt, cfg, log)
                return
            for p in made:
                p.unlink(missing_ok=True)
            if old_staged is not None:
                with atomic_path(staged) as tmp:
                    tmp.write_bytes(old_staged)
            if made_dir:
                with contextlib.suppress(OSError):
                    ckpt.parent.rmdir()

        if Reducer().is_main:
            ckpt.parent.mkdir(exist_ok=True)
            if not init.is_file():
                shutil.copyfile(run_dir / WEIGHTS, init)  # an older run: its weights before any training here
        try:
            result = fit(run.model, data, cfg, model_input=model_input, checkpoint=ckpt,
                         metrics_path=staged, resume_state=state, log=log, progress=progress)
            if Reducer().is_main:
                _write_back(run_dir, run.model, model_input, result)
        except DivergenceError as e:
            kept = _keep_last_good(run_dir, run, model_input, ckpt, cfg, e) if Reducer().is_main else ""
            retry = shlex.join(["sparsify", "train", str(run_dir), "--force", "--lr", f"{cfg.learning_rate / 10:g}"])
            raise DivergenceError(e.what, epoch=e.epoch, good_epochs=e.good_epochs, lr=e.lr,
                                  advice=f"stopped ({kept}); retry from the initial weights with a lower learning "
                                         f"rate: {retry}") from None
        except BaseException:
            after_stop()
            raise
        Reducer().barrier()
        return result
    finally:
        shutdown(created)
