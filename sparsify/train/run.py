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
from ..nn import sparse_modules
from ..passes.trace import training_draws_note
from ..rundir import (SUMMARY, WEIGHTS, WEIGHTS_INIT, load_run, load_weights, read_recipe, read_summary, run_lock,
                      save_weights)
from .checkpoint import checkpoint_path, load_checkpoint
from .data import absolute_data_paths, load_dataset
from .distributed import Reducer, init_from_env, shutdown
from .schedules.base import flag
from .trainer import LogFn, ProgressFn, TrainConfig, fit, output_classes

METRICS = "metrics.jsonl"


def metrics_in_progress(run_dir: str | Path) -> Path:
    """Where the training in progress writes its metrics: beside its checkpoint,
    ``RUN/checkpoints/metrics.jsonl``. It becomes ``RUN/metrics.jsonl`` when the training completes
    (or diverges), together with the weights and summary; readers of the run never see it before."""
    return checkpoint_path(run_dir).parent / METRICS


# Settings added after checkpoints were first written, with the values those checkpoints trained with.
_BEFORE_DEFAULTS = {"warmup_steps": 0, "clip_grad_norm": None, "model_output": "logits"}


def _trained_before_message(run_dir: Path, ckpt: Path) -> str:
    """Why ``train`` without --resume / --force stops on a run with a checkpoint: finished or not."""
    again = "--force to train again from the run's initial weights"
    try:
        state = load_checkpoint(ckpt)
        done, total = int(state["epoch"]), int(json.loads(state["config"])["epochs"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: the plain message
        return f"{run_dir} already has a training checkpoint ({ckpt}); pass --resume to continue it or {again}"
    if done >= total and metrics_in_progress(run_dir).is_file():
        # the last epoch ended, but the process stopped before the weights and summary were saved
        return (f"{run_dir} finished its training ({done} of {total} epochs, {ckpt}) but its results were not "
                f"saved (the process stopped first); pass --resume to save them or {again}")
    if done >= total:
        return f"{run_dir} is already trained ({done} of {total} epochs, {ckpt}); pass {again}"
    return (f"{run_dir} has an unfinished training ({done} of {total} epochs, {ckpt}); pass --resume to continue "
            f"it or {again}")


def _resume_config(state: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    # checkpoints written before data paths were made absolute: relative to where resume runs
    saved = absolute_data_paths({**_BEFORE_DEFAULTS, **json.loads(state["config"])})
    differing = {k: v for k, v in overrides.items() if k in saved and saved[k] != v}
    if differing:
        k = next(iter(differing))
        was = "its default" if saved[k] is None else repr(saved[k])
        raise UsageError(f"--resume continues the checkpoint's settings, but {flag(k)} {differing[k]!r} differs "
                         f"from the checkpoint's {was}; drop {flag(k)} or start again with --force")
    cfg = TrainConfig.from_dict(saved)
    cfg.unused = {}  # settings an older version accepted for another schedule and ignored
    return cfg


def _refreshed_report(run: Any, input_shape: tuple[int, ...], summary: dict[str, Any]) -> dict[str, Any]:
    """The per-layer report for the trained masks of ``run.model`` (dynamic schedules change live
    counts and fan-in), read with the rules the run was traced with, as transform and inspect read it
    (without them a ``--leaf`` module's ``--rule conv`` weights counted as dense, its MACs as none)."""
    from ..replay import recipe_registry
    from ..report import layer_report, with_ratios

    report = layer_report(run.model, input_shape, recipe_registry(run.recipe))
    if "original_totals" in summary:
        report = with_ratios(report, {"totals": summary["original_totals"]})
    return report


def _layer_change(run: Any, init: Path, input_shape: tuple[int, ...], summary: dict[str, Any],
                  trained: dict[str, Any]) -> dict[str, Any] | None:
    """How training changed the per-layer densities, and so the MACs, of the run as transformed.

    ``trained`` is the trained model's report (``_refreshed_report``); the masks transform made are
    read from ``init`` (``weights.init.safetensors``) and reported by the same ``layer_report``.
    None when every masked layer kept its number of live connections (static, set, rigl from the
    run's budgets: MACs unchanged), or when ``init`` lacks a layer's mask. Otherwise, each as
    ``{"before": transformed, "after": trained}``: ``macs`` (multiply-adds per sample at batch 1,
    every weight layer), ``macs_of_dense`` (over the dense model's, None when summary.json has no
    ``original_totals``), and ``layers``: ``{name: {"density": ..., "macs": ...}}`` of the layers
    whose density changed (density: live mask entries over all).
    """
    from safetensors import safe_open

    layers = sparse_modules(run.model)
    if not layers or not init.is_file():
        return None
    with safe_open(str(init), framework="pt") as f:
        keys = set(f.keys())
        if any(f"{n}.mask" not in keys for n in layers):
            return None
        made = {n: f.get_tensor(f"{n}.mask") for n in layers}
    if any(made[n].shape != m.mask.shape for n, m in layers.items()) or all(
            int((made[n] > 0).sum()) == int((m.mask > 0).sum()) for n, m in layers.items()):
        return None
    masks = {n: m.mask for n, m in layers.items()}
    try:  # the report of the transformed masks: the same counter, on the same graph and shapes
        for n, m in layers.items():
            m.mask = made[n].to(masks[n])
        before = _refreshed_report(run, input_shape, summary)
    finally:
        for n, m in layers.items():
            m.mask = masks[n]
    pair = lambda b, a: {"before": b, "after": a}  # noqa: E731
    after_layers = {rec["name"]: rec for rec in trained["layers"]}
    return {
        "macs": pair(before["totals"]["macs"], trained["totals"]["macs"]),
        "macs_of_dense": pair((before.get("ratios") or {}).get("macs"), (trained.get("ratios") or {}).get("macs")),
        "layers": {rec["name"]: {"density": pair(rec["density"], after_layers[rec["name"]]["density"]),
                                 "macs": pair(rec["macs"], after_layers[rec["name"]]["macs"])}
                   for rec in before["layers"]
                   if rec["name"] in after_layers and rec["density"] != after_layers[rec["name"]]["density"]},
    }


def _layer_change_note(cfg: TrainConfig, change: dict[str, Any]) -> str:
    """The line that tells a user their MACs (and speed-up) are not what transform reported."""
    init = getattr(cfg.params, "init", "run")
    who = cfg.schedule + (f" --init {init}" if init != "run" else "")
    ratio, macs = change["macs_of_dense"], change["macs"]
    if ratio["before"] is not None and ratio["after"] is not None:
        now, was = f"{ratio['after']:.3f}x of dense", f"{ratio['before']:.3f}x"
    else:
        now, was = f"{macs['after']:,}", f"{macs['before']:,}"
    n = len(change["layers"])
    moved = f"note: {who} moved weights between {n} layer{'s' if n != 1 else ''}"
    where = "per-layer densities: train.layer_change in summary.json"
    if macs["before"] == macs["after"]:  # e.g. between linear layers: a weight costs one MAC in each
        return f"{moved}; MACs unchanged at {now} ({where})"
    return f"{moved}: MACs now {now}, not transform's {was} ({where})"


def _write_back(run_dir: Path, model: Any, report: dict[str, Any], train: dict[str, Any]) -> None:
    """Replace the run's weights, summary.json (``report``, from ``_refreshed_report``, and the
    ``train`` section) and metrics.jsonl (from ``metrics_in_progress``) with the training's, together.

    Each is first written whole under a temporary name beside its target; the renames follow one
    another only then, so ``export``, ``bench`` and ``sparsify.load`` never meet the new weights
    beside the old summary or metrics (a failure before the renames leaves all three as they were,
    and the checkpoint, which ``--resume`` finishes from).
    """
    summary = read_summary(run_dir)
    summary.update(report)
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
    # the kept weights expect the inputs the training fed them: export and bench read the
    # normalisation (and class names) from here, as after a training that completed
    data = json.loads(state["data"]) if isinstance(state.get("data"), str) else {}
    kept = {"input_normalization": data.get("normalization")}
    if data.get("classes") is not None:
        kept["class_names"] = data["classes"]
    _write_back(run_dir, run.model, _refreshed_report(run, model_input, read_summary(run_dir)), {
        "diverged": str(e.what), "epochs_completed": int(state["epoch"]), "config": cfg.to_dict(),
        **{k: history[-1].get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")}, **kept,
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


def input_problem(shapes: list[list[int]] | list[tuple[int, ...]]) -> str | None:
    """Why ``sparsify train`` cannot feed a model with these input shapes (a phrase after "the
    model ..."), or None: its data sets give one [N, F], [N, C, L] or [N, C, H, W] example each."""
    own_loop = ("; train it with your own loop (sparsify.load(RUN).model keeps its masks with "
                "sparsify.train.trainer.enforce_masks) or export it as it is")
    if len(shapes) > 1:
        return f"takes {len(shapes)} inputs but the data sets give one image per example{own_loop}"
    if len(shapes[0]) > 4:  # the loader read [N, C, D, H, W]'s last three axes as an image
        return (f"takes {len(shapes[0])}-D inputs {list(shapes[0])} but the data sets give [N, F], [N, C, L] or "
                f"[N, C, H, W] examples{own_loop}")
    return None


def train_run(run_dir: str | Path, *, resume: bool = False, force: bool = False, log: LogFn | None = None,
              progress: ProgressFn | None = None, resumable: bool = True, **config: Any) -> dict[str, Any]:
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

    A schedule that changed the per-layer densities of the run as transformed (sparse momentum,
    ``rigl`` with ``init="erk"``) changed its MACs too: the result, and so summary.json's ``train``
    section, then holds ``layer_change`` (see ``_layer_change``) and ``log`` gets a note saying so.

    ``resumable`` False: the caller removes ``run_dir`` when the training stops (``sparsify run``'s
    temporary directory), so no ``--resume`` is offered.

    Raises DivergenceError (a TrainingError) when the loss becomes non-finite or far above where
    it started; the completed epochs are kept (``metrics.jsonl``, the checkpoint, and their
    weights as the run's weights).
    """
    if resume and force:  # the resume silently won
        raise UsageError("--resume continues the run's checkpoint and --force discards it; give one of them")
    config = absolute_data_paths(config)
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
    untrainable = input_problem(recipe.shapes)
    if untrainable:
        raise UsageError(f"the model of {run_dir} {untrainable}")
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun's other ranks share rank 0's directory
            stack.enter_context(run_lock(run_dir))
        if not resume and ckpt.exists() and not force:
            raise RunDirError(_trained_before_message(run_dir, ckpt))
        check_writable(run_dir / WEIGHTS, "the run directory: ")
        return _train_locked(run_dir, recipe, ckpt, cfg, state, resume=resume, force=force, log=log,
                             progress=progress, resumable=resumable, normalize_given="normalize" in config)


def _train_locked(run_dir: Path, recipe: Any, ckpt: Path, cfg: TrainConfig, state: dict[str, Any] | None, *,
                  resume: bool, force: bool, log: LogFn | None, progress: ProgressFn | None,
                  resumable: bool, normalize_given: bool = False) -> dict[str, Any]:
    """train_run's work, under its lock on ``run_dir``."""
    created = init_from_env()
    try:
        run = load_run(run_dir)
        init = run_dir / WEIGHTS_INIT
        if force and not resume and init.is_file():
            load_weights(run.model, init)
        elif force and not resume and log is not None and Reducer().is_main:
            log(f"note: {run_dir} has no {WEIGHTS_INIT} (made by an older sparsify), so training starts again "
                f"from its current weights, not the ones transform made")
        draws = training_draws_note(run.model)
        if draws is not None and log is not None and Reducer().is_main:
            log(f"warning: {draws}")  # the transform said so too; training is where it bites
        model_input = tuple(int(d) for d in recipe.input_shape)
        # Before anything is written: the model must score classes (not return a dict or a tuple),
        # and a file model's class count (the recipe knows only a zoo model's) is its output width.
        classes = output_classes(run.model, model_input, _model_name(recipe.model), recipe.seed)
        data = load_dataset(cfg.data, model_input,
                            data_dir=cfg.data_dir, num_classes=recipe.num_classes or classes,
                            val_fraction=cfg.val_fraction, train_limit=cfg.train_limit, normalize=cfg.normalize)
        if recipe.weights and data.normalization is not None and not normalize_given and not resume \
                and log is not None and Reducer().is_main:
            # weights trained on pixels in [0, 1] lost 44 points to the standardised inputs, silently
            log(f"note: {run_dir} starts from trained weights ({Path(str(recipe.weights.get('source', '?'))).name}) "
                f"and its inputs are standardised with the training split's mean and std (--normalize, the "
                f"default); if the weights were trained on other preprocessing, pass --no-normalize and give "
                f"the data as they saw it")
        # The training in progress lives in checkpoints/ (last.pt, metrics.jsonl) until it completes:
        # the run's weights, summary.json and metrics.jsonl stay whole, an earlier training's too
        # (--force), whenever it stops. If it stops before an epoch completes (an interrupt, an error;
        # a divergence is a result, see _keep_last_good), checkpoints/ is put back as it was.
        staged = metrics_in_progress(run_dir)
        made = [p for p in (staged, init) if not p.exists()]
        made_dir = not ckpt.parent.exists()
        old_staged = staged.read_bytes() if staged.is_file() else None
        ckpt_before = _stamp(ckpt)
        trained_before = (run_dir / METRICS).is_file()

        def after_stop() -> None:
            if not Reducer().is_main:
                return
            if _stamp(ckpt) != ckpt_before:
                if resumable:
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
                summary = read_summary(run_dir)
                report = _refreshed_report(run, model_input, summary)
                change = _layer_change(run, init, model_input, summary, report)
                if change is not None:
                    result["layer_change"] = change
                _write_back(run_dir, run.model, report, result)
                if change is not None and log is not None:
                    log(_layer_change_note(cfg, change))
        except DivergenceError as e:
            if e.good_epochs == 0 and trained_before:
                # --force over an earlier training that diverged before an epoch completed: the
                # earlier training's weights, summary and metrics.jsonl stay the run's, together.
                after_stop()
                kept = f"the run's weights and {METRICS} are the earlier training's, unchanged"
            elif Reducer().is_main:
                kept = _keep_last_good(run_dir, run, model_input, ckpt, cfg, e)
            else:
                kept = ""
            # the diverged training's own settings (its data above all), with a tenth of its rate
            lower = TrainConfig.from_dict({**cfg.to_dict(), "lr": float(f"{cfg.learning_rate / 10:g}")})
            retry = shlex.join(["sparsify", "train", str(run_dir), "--force", *lower.cli_args()])
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
