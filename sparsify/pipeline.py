"""The pipeline: transform -> train -> export -> bench, and the variants of a run directory.

Orchestration over the stages, which never import it (see docs/design.md): ``run_pipeline`` is
``sparsify run``; ``export_variants`` makes the dense / compact / sparse / depth-equivalent ONNX
files that ``sparsify bench RUN`` times with ``sparsify.runtime.bench.bench_files``;
``plot_result`` draws a bench result.
"""
from __future__ import annotations

import shlex
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._io import save_figure
from .errors import UsageError
from .runtime.bench import BenchResult, bench_files, write_result_json


def plot_result(result: BenchResult, path: str | Path) -> Path:
    """Grouped bars of median latency (p10/p90 error bars) per variant, one panel per batch size, written
    atomically as PNG, PDF or SVG by ``path``'s suffix (PNG for any other)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    batches = result.settings["batch_sizes"]
    threads = result.settings["threads"]
    labels = [f.label for f in result.files]
    colors = plt.get_cmap("tab10").colors
    panel_width = max(4.0, 1.5 + 0.55 * len(labels) * len(threads))
    fig, axes = plt.subplots(1, len(batches), figsize=(panel_width * len(batches), 4.2), squeeze=False)
    width = 0.8 / len(labels)
    for ax, batch in zip(axes[0], batches):
        xs = np.arange(len(threads))
        for j, lab in enumerate(labels):
            rows = [result.row(lab, batch, t) for t in threads]
            med = np.array([r.median_ms for r in rows])
            lo = med - np.array([r.p10_ms for r in rows])
            hi = np.array([r.p90_ms for r in rows]) - med
            pos = xs - 0.4 + width * (j + 0.5)
            tag = f"{lab} (native)" if result.files[j].native else lab
            bars = ax.bar(pos, med, width * 0.92, yerr=[lo, hi], capsize=3, color=colors[j % len(colors)],
                          label=tag, error_kw={"elinewidth": 1, "ecolor": "0.25"})
            if j > 0:
                for b, r in zip(bars, rows):
                    ax.annotate(f"{r.speedup:.2f}x", (b.get_x() + b.get_width() / 2, r.p90_ms),
                                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{t} thread{'s' if t > 1 else ''}" for t in threads])
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("median latency per batch (ms)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=9, frameon=False)
    # wrapped to the figure's width (about 13 characters per inch at 10 pt): one 4-inch panel cut the
    # title off on both sides
    title = f"ONNX Runtime latency per variant (whiskers p10-p90; labels: speedup vs {result.baseline})"
    fig.suptitle(textwrap.fill(title, width=max(30, int(13 * fig.get_figwidth()))), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- variants of a run directory

VARIANTS = ("dense", "compact", "sparse", "depth")
VARIANT_HELP = {
    "dense": "masked weights as plain Conv (the baseline)",
    "compact": "dense Conv with empty channels removed",
    "sparse": "ai.sparsify::SparseConv nodes (the native kernel when registered)",
    "depth": "depth-multiplied dense model with the same live parameter count (sparse-random/psn runs)",
}


def parse_variants(text: str | Sequence[str] | None) -> list[str]:
    """``"dense,sparse"`` -> ["dense", "sparse"]; unknown names raise UsageError; None means all."""
    if text is None:
        return list(VARIANTS)
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        what = f"unknown variant {unknown[0]!r}" if unknown else "--variants is empty"
        raise UsageError(f"{what}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def live_params(model: Any) -> int:
    """Live parameters of ``model``: ``sparsify.nn.live_params`` (imported lazily: bench on .onnx files needs no torch)."""
    from .nn import live_params as count

    return count(model)


def depth_equivalent(recipe: Any, target_params: int, *, run_dir: str | Path | None = None,
                     divisor: int = 1) -> tuple[Any, float, int]:
    """The recipe's model depth-multiplied to the parameter count nearest ``target_params``.

    Alpha is read off the channel groups of the traced dense model (``DepthCounter`` and
    ``match_alpha`` of ``sparsify.passes.depth_multiplier``: no model is rewritten while searching),
    then the model is transformed once at it. ``divisor`` > 1 rounds every channel count to a
    multiple of it (``DepthMultiplierPass``); the count then moves in steps and the nearest step is
    taken. A user's model file that moved or changed since the run was made is taken from the run's
    own copy (``replay.replay_source``). Returns (model, alpha, parameters of the model).
    """
    return _depth_at(_trace_original(recipe, run_dir), recipe.seed, target_params, divisor)


def _depth_at(traced: Any, seed: int, target_params: int, divisor: int) -> tuple[Any, float, int]:
    """``depth_equivalent`` on the recipe's traced dense model (``_trace_original``; the pass works on a
    copy, so ``traced`` serves again, e.g. for ``_depth_shortfall``)."""
    from .methods import DepthMultiplierConfig
    from .passes.depth_multiplier import match_depth
    from .replay import apply_method

    alpha, _ = match_depth(traced.gm, traced.example, target_params, "total", divisor, traced.rules)
    model = apply_method(traced, DepthMultiplierConfig(alpha=alpha, divisor=divisor), seed).model
    return model, alpha, live_params(model)


def _depth_shortfall(traced: Any, target_params: int, divisor: int) -> str:
    """Why the depth-multiplied model of ``traced`` (``_depth_at``) misses ``target_params`` by more
    than DEPTH_MISMATCH: the channel counts rounded to multiples of ``divisor`` (unrounded widths
    would reach it), or channel groups that never shrink."""
    if divisor > 1:
        from .passes.depth_multiplier import match_depth

        _, n1 = match_depth(traced.gm, traced.example, target_params, "total", 1, traced.rules)
        if abs(n1 - target_params) <= DEPTH_MISMATCH * target_params:
            return (f"channel counts rounded to multiples of {divisor} move it in steps, too coarse for a model "
                    f"this small; unrounded widths would give {n1:,}")
    return "channel groups the model keeps whole, e.g. at its outputs, do not shrink"


def _trace_original(recipe: Any, run_dir: str | Path | None) -> Any:
    """The recipe's dense model traced before its method (``replay.trace_recipe``), from the run's
    copies of the user's files and traced state when ``run_dir`` is given."""
    from .replay import trace_recipe
    from .rundir import MODEL_IMPORTS, MODEL_SOURCE, RECIPE, TRACED_STATE

    run = Path(run_dir) if run_dir is not None else None
    return trace_recipe(recipe, run / MODEL_SOURCE if run else None, where=str(run / RECIPE) if run else "the recipe",
                        imports_copy=run / MODEL_IMPORTS if run else None,
                        traced_state=run / TRACED_STATE if run else None)


def bench_variants(files: Sequence[tuple[str, Path]], progress: Any = None, **options: Any) -> BenchResult:
    """Time a run's exported variants (``export_variants``' (name, path) pairs) side by side with
    ``bench_files``, labelled by variant; ``options`` go to bench_files. The depth variant is
    another model (fewer channels, its own weights): its outputs differ from the baseline's by
    construction, so no output difference is recorded for it (it read 1e+00, like a wrong export),
    and the others are compared with the first variant that is not it (``--variants depth,dense``
    compared dense with depth)."""
    names = [n for n, _ in files]
    reference = next((i for i, n in enumerate(names) if n != "depth"), None)
    result = bench_files([p for _, p in files], labels=names, progress=progress, reference=reference, **options)
    for r in result.rows:
        if r.label == "depth":
            r.max_abs_diff = r.max_rel_diff = None
    return result


def export_variants(run_dir: str | Path, out_dir: str | Path, variants: Sequence[str],
                    progress: Any | None = None) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """Export the requested variants of a run into ``out_dir`` as ``VARIANT.onnx``; returns
    [(label, path)] and notes per variant (``export_model_variants``; the run is loaded once)."""
    from .passes.rules import with_user_rules
    from .rundir import load_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    named = {k: v for k, v in (run.recipe.rules or {}).items() if not v.startswith("custom:")}
    files, notes, _ = export_model_variants(run.model, run.recipe, out_dir, variants, run_dir=run_dir,
                                            rules=with_user_rules(named) if named else None,
                                            depth_divisor=DEPTH_DIVISOR, progress=progress)
    return files, notes


# `bench RUN`'s depth baseline rounds its channel counts to multiples of this: ONNX Runtime runs
# unaligned counts slowly (a MobileNet-like depth model at alpha 0.727, channels 6, 35, 12, 18,
# ran 0.55-0.62x of dense), which flattered the sparse model beside it.
DEPTH_DIVISOR = 8
# A depth baseline further than this from the sparse run's live parameters is no equal-parameter one.
DEPTH_MISMATCH = 0.1


def export_model_variants(model: Any, recipe: Any, out_dir: str | Path, variants: Sequence[str], *,
                          rules: Any = None, run_dir: str | Path | None = None, prefix: str = "",
                          depth_divisor: int = 1, autotune: bool = False, compact: bool = True,
                          prepare: Any | None = None, progress: Any | None = None,
                          ) -> tuple[list[tuple[str, Path]], dict[str, Any], dict[str, Any]]:
    """Export a transformed model (of ``recipe``) as the variants `bench` compares, into ``out_dir``
    as ``{prefix}{variant}.onnx``: ``dense`` (plain Convs of the masked weights), ``compact`` (dense,
    empty channels removed), ``sparse`` (SparseConv where it pays; ``autotune``: per layer by timing,
    ``compact``: with compaction) and ``depth``, the depth-multiplied model with the same live
    parameters (``depth_equivalent``; ``depth_divisor`` rounds its channel counts; ``run_dir``: where
    a user's model file is looked up; ``prepare(model)`` is applied to it before export, e.g. to
    calibrate BatchNorm). ``depth`` is skipped (with a note) for methods that mask no connections
    (``MethodConfig.masked``: depth-multiplier, none).

    Returns [(label, path)], notes per variant (``depth``: alpha, live_params, target_live_params,
    divisor) and the ExportReport of each variant written. A depth-multiplier run's own model is
    exported as ``depth`` (for ``compact`` and ``sparse`` too: it has no masks) and ``dense`` is the
    original model of its recipe, with notes saying so. Raises UsageError for an unknown variant.
    """
    from .methods import method_class
    from .runtime.export import export_model

    variants = parse_variants(variants)
    out_dir = Path(out_dir)
    files: list[tuple[str, Path]] = []
    notes: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    thinned = recipe.method == "depth-multiplier"
    if thinned:
        # The run's model is itself the depth-multiplied one and has no masks: it is timed as
        # "depth" against the original dense model (the thinned model was timed against itself, 1.00x)
        variants = list(dict.fromkeys("depth" if v in ("compact", "sparse") else v for v in variants))
    for i, name in enumerate(variants):
        if progress is not None:
            progress(f"exporting {name}", i, len(variants))
        # export_model's stages (a 224x224 model's export takes half a minute)
        stage = (None if progress is None else
                 lambda s, name=name, i=i: progress(f"exporting {name}: {s}", i, len(variants)))
        target = out_dir / f"{prefix}{name}.onnx"
        if thinned and name == "dense":
            original = _trace_original(recipe, run_dir).gm
            reports[name] = export_model(original, recipe.shapes, target, dense=True, compact=False, progress=stage)
            notes["dense"] = f"the original model ({live_params(original):,} live params, its initial weights)"
        elif thinned and name == "depth":
            reports[name] = export_model(model, recipe.shapes, target, dense=True, compact=False, rules=rules, progress=stage)
            notes["depth"] = (f"the run's depth-multiplied model (alpha={recipe.params.get('alpha')!r}, "
                              f"{live_params(model):,} live params); another model than the original, so its "
                              f"outputs are not compared (rel diff -)")
        elif name == "depth":
            if not method_class(recipe.method).masked:
                notes["depth"] = f"skipped: the run's method is {recipe.method!r}, not sparse-random or psn"
                continue
            target_params = live_params(model)
            traced = _trace_original(recipe, run_dir)
            depth, alpha, n = _depth_at(traced, recipe.seed, target_params, depth_divisor)
            if prepare is not None:
                prepare(depth)
            # the exact alpha: widths are ceil(alpha * C), so a rounded one (0.5 for 0.5000000000000001) rebuilds another model
            notes["depth"] = {"alpha": alpha, "live_params": n, "target_live_params": target_params,
                              "divisor": depth_divisor}
            if abs(n - target_params) > DEPTH_MISMATCH * target_params:
                notes["depth"]["mismatch"] = (
                    f"no depth multiplier reaches the sparse run's {target_params:,} live parameters (the nearest "
                    f"has {n:,}: {_depth_shortfall(traced, target_params, depth_divisor)}); "
                    f"it is not an equal-parameter baseline")
            reports[name] = export_model(depth, recipe.shapes, target, dense=True, compact=False, progress=stage)
        elif name == "sparse":
            reports[name] = export_model(model, recipe.shapes, target, rules=rules, autotune=autotune, compact=compact, progress=stage)
        else:
            reports[name] = export_model(model, recipe.shapes, target, dense=True, compact=name == "compact", rules=rules, progress=stage)
        files.append((name, target))
    if progress is not None:
        progress("exported", len(variants), len(variants))
    return files, notes, reports


# ---------------------------------------------------------------- the one-command pipeline


def run_pipeline(
    model: str,
    out: str | Path,
    *,
    transform_options: dict[str, Any],
    train_options: dict[str, Any],
    variants: Sequence[str] = ("dense", "compact", "sparse"),
    bench_options: dict[str, Any] | None = None,
    force: bool = False,
    progress: Any | None = None,
    log: Any | None = None,
) -> tuple[Path, BenchResult, dict[str, Any]]:
    """Transform -> train -> export -> bench into run directory ``out``; returns (run dir, bench result, notes).

    The .onnx variants, ``bench.json`` and ``plot.png`` are written into the run directory, which
    appears only when every stage succeeded (an existing ``out`` is refused unless ``force``).
    ``progress(stage, description, done, total)`` is called as the stages advance; ``log`` gets the
    training's one-line messages (how the data were adapted to the model, warnings).
    """
    from . import api
    from ._io import atomic_dir
    from .rundir import RECIPE
    from .train import train_run

    def stage(name: str) -> Any:
        if progress is None:
            return None
        return lambda desc, done, total: progress(name, desc, done, total)

    run_dir = Path(out)
    notes: dict[str, Any] = {}
    where = "training"
    stopped = False
    # --force over a finished run: Ctrl-C keeps it (the new run's partial work goes)
    replacing = run_dir.is_dir() and any(run_dir.iterdir())
    with atomic_dir(run_dir, force=force, replaces=RECIPE) as tmp:
        if progress is not None:
            progress("transform", f"transforming {model}", 0, 1)
        api.transform_to_dir(model, out=tmp, force=True, **transform_options)
        if progress is not None:
            progress("transform", "transformed", 1, 1)
        try:
            # its own note would name the temporary directory; PipelineInterrupted names the run's
            trained = train_run(tmp, progress=_train_progress(stage("train")), log=log, resumable=False,
                                **train_options)
            where = "export"
            kept = ("data", "schedule", "epochs", "steps", "test_acc", "test_loss", "val_acc", "density",
                    "weight_density", "warnings")
            notes["train"] = {k: trained.get(k) for k in kept}
            files, export_notes = export_variants(tmp, tmp, variants, progress=stage("export"))
            notes.update(export_notes)
            where = "bench"
            result = bench_variants(files, progress=stage("bench"), **(bench_options or {}))
            result.notes.update(notes)
            for f in result.files:                      # name the files where they will live
                f.path = str(run_dir / Path(f.path).name)
            write_result_json(result, tmp / "bench.json")
            plot_result(result, tmp / "plot.png")
        except KeyboardInterrupt:
            if replacing:
                raise PipelineInterrupted(run_dir, where, False, kept_earlier=True) from None
            # Ctrl-C once the transform is done: what is complete becomes the run directory (a
            # trained model, a training's checkpoint) instead of going with the temporary one
            stopped = True
            resumable = where == "training" and (tmp / "checkpoints" / "last.pt").is_file()
    if stopped:
        raise PipelineInterrupted(run_dir, where, resumable, train_options)
    return run_dir, result, notes


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C in ``sparsify run`` after the transform: the run directory holds what was complete.
    ``str()`` says what to run next (with ``train_options``, the training the run asked for)."""

    def __init__(self, run_dir: Path, stage: str, resumable: bool, train_options: dict[str, Any] | None = None,
                 kept_earlier: bool = False) -> None:
        if kept_earlier:
            super().__init__(f"interrupted during {stage}; {run_dir} is unchanged (the run --force was to replace "
                             "is kept): run the command again to replace it")
            return
        # the files `run` would have written: bench alone only prints them
        bench = shlex.join(["sparsify", "bench", str(run_dir), "--keep", str(run_dir), "--json-file",
                            str(run_dir / "bench.json"), "--plot", str(run_dir / "plot.png"), "--force"])
        if stage == "training":
            from .train.schedules.base import flag

            named = ("data", "data_dir", "epochs", "schedule", "lr", "batch_size", "seed")  # train's own flags
            given = " ".join(f"{flag(k)} {shlex.quote(str(v))}" for k, v in (train_options or {}).items()
                             if k in named and v is not None)
            then = (f"`sparsify train {run_dir} --resume` continues the training" if resumable else
                    f"`sparsify train {run_dir}{' ' + given if given else ''}` trains it as this run would have")
            then += f", then `{bench}` exports and times it"
            kept = "the transformed model"
        else:
            then, kept = f"`{bench}` exports and times its variants as this run would have", "the trained model"
        super().__init__(f"interrupted during {stage}; {kept} is in {run_dir}: {then}")


def _train_progress(update: Any | None) -> Any | None:
    """Adapt the trainer's event dicts to a ``(description, done, total)`` progress callback."""
    if update is None:
        return None
    state = {"total": 1}

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "start":
            state["total"] = int(ev.get("total_steps") or 1)
            update("training", int(ev.get("start_step") or 0), state["total"])
        elif kind == "step":
            update(f"training epoch {ev['epoch']}: loss {ev['loss']:.3f}, acc {ev['acc']:.1%}",
                   int(ev["step"]), state["total"])
        elif kind == "epoch":
            update(f"epoch {ev['epoch']}: val acc {ev.get('val_acc', float('nan')):.1%}", int(ev["step"]), state["total"])
        elif kind == "done":
            update(f"trained: test acc {ev.get('test_acc', float('nan')):.1%}", state["total"], state["total"])

    return on_event
