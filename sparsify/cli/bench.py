"""CLI commands of the bench stage: `sparsify bench` and the one-command pipeline `sparsify run`."""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich import box
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from ..errors import UsageError
from . import transform as T
from ._common import app, err, handle_errors, out


def _int_list(option: str, text: str) -> list[int]:
    """Parse ``1,16`` into [1, 16]; UsageError otherwise."""
    try:
        vals = [int(t) for t in text.split(",")]  # an empty item ("1,,2") is a typo, not nothing
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{option} {text!r} is not a list of positive integers; write e.g. 1,16")
    return vals


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr, exposed as a ``progress(description, done, total)`` callback."""
    if quiet or not err.is_terminal:  # a live display leaves blank lines in a pipe or a log file
        yield None
        return
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task("starting", total=1)

        def update(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        yield update


def _ms(x: float) -> str:
    """Milliseconds with about four significant digits."""
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def bench_table(result: Any, title: str | None = None) -> Table:
    """The result of a bench as a rich table: one row per (variant, batch, threads)."""
    t = Table(title=title or f"ONNX Runtime latency (speedup vs {result.baseline})", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("variant", no_wrap=True)
    for col in ("batch\n×thr", "median\nms", "p10-p90\nms", "samples\n/s", "speedup", "peak\nRSS MB"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("native", no_wrap=True)
    t.add_column("rel\ndiff", justify="right", no_wrap=True)
    last = None
    for r in sorted(result.rows, key=lambda r: (r.batch, r.threads)):
        if last is not None and (r.batch, r.threads) != last:
            t.add_section()
        last = (r.batch, r.threads)
        t.add_row(
            r.label, f"{r.batch}×{r.threads}", _ms(r.median_ms), f"{_ms(r.p10_ms)}-{_ms(r.p90_ms)}",
            f"{r.throughput:,.0f}", "1.00x" if r.label == result.baseline else Text(f"{r.speedup:.2f}x", style="bold"),
            "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}", "yes" if r.native else "no",
            "-" if r.max_rel_diff is None else f"{r.max_rel_diff:.0e}",
        )
    return t


def _memory_line(result: Any) -> str | None:
    """What the peak RSS column measures."""
    base = result.settings.get("ort_only_process_peak_rss_mb")
    if base is None:
        return None
    return f"peak RSS: a fresh process that loads one variant and runs one batch (onnxruntime alone: {base:.0f} MB)"


def _write_outputs(result: Any, json_out: Path | None, plot: Path | None) -> None:
    """Write --json and --plot atomically and say where they went (stderr)."""
    from ..pipeline import plot_result
    from ..runtime.bench import write_result_json

    if json_out is not None:
        write_result_json(result, json_out)
        err.print(f"wrote {json_out}")
    if plot is not None:
        plot_result(result, plot)
        err.print(f"wrote {plot}")


def _native_line(result: Any) -> str:
    """One line saying which path ran the ai.sparsify nodes."""
    st = result.environment["native"]
    if not any(f.sparse_nodes for f in result.files):
        return "no file has ai.sparsify nodes; all variants ran ONNX Runtime's own kernels"
    if any(f.native for f in result.files):
        return f"ai.sparsify nodes ran the native kernel ({st.get('library')})"
    if not result.settings["native"]:
        why = "disabled with --no-native"
    elif st.get("loadable"):
        why = "the library was registered but ORT's profile shows no SparseConv kernel"
    else:
        why = st.get("why_not") or "library not loadable"
    return f"ai.sparsify nodes ran their standard-ONNX function body (native kernel not used: {why})"


@app.command("bench")
@handle_errors
def bench(
    paths: list[Path] = typer.Argument(..., help="ONNX files (the first is the baseline), or one run directory.",
                                       show_default=False),
    batch_size: str = typer.Option("1", "--batch-size", "-b", help="Batch sizes, comma-separated, e.g. 1,16."),
    threads: str = typer.Option("1", "--threads", "-t", help="Intra-op thread counts, comma-separated, e.g. 1,2."),
    variants: Optional[str] = typer.Option(
        None, "--variants", help="With a run directory: which variants to build, from dense,compact,sparse,depth "
        "(default all; the first is the baseline)."),
    keep: Optional[Path] = typer.Option(None, "--keep", help="With a run directory: keep the exported variants in "
                                        "this directory (default: a temporary one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (instead of the table)."),
    json_out: Optional[Path] = typer.Option(None, "--json-file", help="Write the results as JSON to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a latency plot here (.png, .pdf or .svg, "
                                                             "as its suffix says)."),
    warmup: int = typer.Option(5, help="Untimed runs per session before measuring."),
    min_time: float = typer.Option(0.5, "--min-time", help="Measured seconds per variant and configuration, at least."),
    repeats: int = typer.Option(10, help="Measured runs per variant and configuration, at least."),
    native: bool = typer.Option(True, "--native/--no-native", help="Register the native SparseConv kernel when available."),
    memory: bool = typer.Option(True, "--memory/--no-memory",
                                help="Measure each variant's peak RSS in a fresh process, before loading it here "
                                     "(a batch too large for memory then fails in one line)."),
    spin: bool = typer.Option(True, "--spin/--no-spin", help="Let ORT worker threads spin between runs, as "
                              "ORT does by default (variants are timed in turn, with a pause for the "
                              "spinning to stop between them)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing --json-file and --plot files, and "
                               "VARIANT.onnx files in the --keep directory."),
) -> None:
    """Measure ONNX Runtime latency of ONNX files side by side, or of the variants of a run directory."""
    from .. import pipeline
    from ..rundir import is_run_dir
    from ..runtime import bench as lib

    batches = _int_list("--batch-size", batch_size)
    thread_counts = _int_list("--threads", threads)
    lib.check_settings(warmup=warmup, min_time=min_time, repeats=repeats)
    _check_outputs(paths, json_out, plot, keep, force)
    _warn_oversubscribed(thread_counts)
    dirs = [p for p in paths if p.is_dir()]
    opts = dict(batch_sizes=batches, threads=thread_counts, warmup=warmup, min_time=min_time, repeats=repeats,
                native=native, spinning=spin, memory=memory)
    if dirs:
        if len(dirs) > 1:
            raise UsageError(f"give one run directory, not {len(dirs)}: bench times the variants of one run; to "
                             "compare runs, export each (sparsify export RUN --out RUN.onnx) and bench the .onnx files")
        if len(paths) != 1:
            raise UsageError("give either one run directory or .onnx files, not both")
        run_dir = dirs[0]
        if not is_run_dir(run_dir):
            raise UsageError(f"{run_dir} is a directory but not a run directory; give .onnx files or a run directory")
        names = pipeline.parse_variants(variants)
        if keep is not None:
            from .._io import check_new_file

            keep.mkdir(parents=True, exist_ok=True)
            for name in names:   # the user's own files of those names stay unless --force
                check_new_file(keep / f"{name}.onnx", "--keep", force)
        with contextlib.ExitStack() as stack:
            where = keep if keep is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="sparsify-bench-"))
            progress = stack.enter_context(_progress(quiet))
            files, notes = pipeline.export_variants(run_dir, where, names, progress=progress)
            result = pipeline.bench_variants(files, progress=progress, **opts)
        if keep is None:
            for f in result.files:                      # the temporary exports are gone; keep only their names
                f.path = Path(f.path).name
        result.notes.update(notes, run_dir=str(run_dir), variants_dir=None if keep is None else str(keep))
        for line in _variant_notes(notes):
            err.print(line)
    else:
        if variants is not None or keep is not None:
            raise UsageError("--variants and --keep apply to a run directory; with .onnx files every file is a variant")
        with _progress(quiet) as progress:
            result = lib.bench_files(paths, progress=progress, **opts)
        differ = _different_outputs(result)
        if differ:
            result.notes["outputs_differ_from_baseline"] = differ
            err.print(f"note: {', '.join(differ)} computed other outputs than {result.baseline} on the same input "
                      f"(max relative difference above {OUTPUT_REL_TOL:g}): the files do not compute the same model, "
                      "so the speed-ups compare different work", highlight=False)
    if as_json:
        out.print_json(json.dumps(result.to_json(), default=str))
    else:
        out.print(bench_table(result))
        if _memory_line(result):
            out.print(_memory_line(result))
    _print_machine_lines(result)
    _write_outputs(result, json_out, plot)


# Two exports of one model agree to float32 rounding (~1e-6 of the output scale); far above it,
# the files compute different models (another density, another network).
OUTPUT_REL_TOL = 1e-3


def _different_outputs(result: Any) -> list[str]:
    """Labels of the files whose outputs differ from the baseline's beyond OUTPUT_REL_TOL (or in shape)."""
    differ = []
    for f in result.files[1:]:
        rels = [r.max_rel_diff for r in result.rows if r.label == f.label]
        if any(v is None or v > OUTPUT_REL_TOL for v in rels):
            differ.append(f.label)
    return differ


def _warn_oversubscribed(thread_counts: list[int]) -> None:
    from ..machine import oversubscribed_note

    note = oversubscribed_note(max(thread_counts))
    if note:
        err.print(f"warning: {note}", highlight=False)


def _check_outputs(paths: list[Path], json_out: Path | None, plot: Path | None, keep: Path | None,
                   force: bool = False) -> None:
    """Refuse output locations that cannot be written, or would overwrite a file without --force,
    before any exporting or timing."""
    from .._io import PLOT_FORMATS, check_new_file, check_writable

    stray = next((p for p in paths if p.suffix == ".json" and not p.is_dir()), None)
    if stray is not None:
        raise UsageError(f"{stray} is not an ONNX file; --json is a flag now (print JSON): write the results to a "
                         f"file with --json-file {stray}")
    if plot is not None:
        check_new_file(plot, "--plot", force, PLOT_FORMATS)
    if json_out is not None:
        check_new_file(json_out, "--json-file", force)
    if keep is not None:
        if keep.exists() and not keep.is_dir():
            raise UsageError(f"--keep {keep} is a file; give a directory for the exported variants")
        check_writable(keep / "x", "--keep ")


def _print_machine_lines(result: Any) -> None:
    """After the table: whether the native kernel ran, and a note when other work shared the CPUs."""
    from ..runtime.bench import busy_note

    err.print(_native_line(result))
    busy = busy_note(result)
    if busy:
        err.print(busy, highlight=False)


def _variant_notes(notes: dict[str, Any]) -> list[str]:
    """How the depth variant was made (or why it was skipped), and what the dense one is when that
    is not the run's own model, one line each."""
    lines = [f"dense: {notes['dense']}"] if isinstance(notes.get("dense"), str) else []
    note = notes.get("depth")
    if note is None:
        return lines
    if isinstance(note, str):
        return lines + [f"depth: {note}"]
    # repr: the shortest text that is the same float, so `transform --alpha` with it rebuilds this model
    divisor = note.get("divisor", 1)
    rounded = f", channels rounded to multiples of {divisor}" if divisor > 1 else ""
    lines += [f"depth: alpha={note['alpha']!r}{rounded}, {note['live_params']:,} live params "
             f"(sparse run: {note['target_live_params']:,}); another model, so its outputs are not compared (rel diff -)"]
    if note.get("mismatch"):
        lines.append(f"warning: depth: {note['mismatch']}")
    return lines


STAGES = ("transform", "train", "export", "bench")


@contextlib.contextmanager
def _pipeline_progress(quiet: bool) -> Iterator[Callable[[str, str, int, int], None] | None]:
    """One rich display for the whole pipeline: an overall bar over the stages and a bar for the current one."""
    if quiet or not err.is_terminal:
        yield None
        return
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}", table_column=Column(width=44, no_wrap=True)),
                   BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err,
                   transient=False)
    with bar:
        overall = bar.add_task("pipeline: transform", total=len(STAGES))
        current = bar.add_task("", total=1)

        def update(stage: str, description: str, done: int, total: int) -> None:
            bar.update(overall, description=f"pipeline: {stage}", completed=STAGES.index(stage))
            bar.update(current, description=f"  {description}", completed=done, total=max(total, 1))

        yield update
        bar.update(overall, description="pipeline: done", completed=len(STAGES))
        bar.update(current, visible=False)


@app.command("run")
@handle_errors
def run(
    model: str = typer.Argument("zoo:lenet5", help="zoo:NAME or path/to/model.py[:NAME]."),
    method: str = T.METHOD,
    density: Optional[float] = typer.Option(None, help="Fraction of live channel connections (default 0.1 for sparse methods)."),
    alpha: Optional[float] = T.ALPHA,
    divisor: Optional[int] = T.DIVISOR,
    match: Optional[Path] = T.MATCH,
    count: Optional[str] = T.COUNT,
    profile: Optional[str] = T.PROFILE,
    profile_param: Optional[List[str]] = T.PROFILE_PARAM,
    allocation: str = T.ALLOCATION,
    block: Optional[int] = T.BLOCK,
    include_linear: Optional[bool] = T.INCLUDE_LINEAR,
    include_classifier: bool = T.INCLUDE_CLASSIFIER,
    rescale_init: Optional[bool] = T.RESCALE_INIT,
    weights: Optional[Path] = T.WEIGHTS,
    seed: int = typer.Option(0, help="Seed of masks, weights and data order."),
    input_shape: Optional[str] = T.INPUT_SHAPE,
    model_args: Optional[str] = T.MODEL_ARGS,
    leaf: Optional[List[str]] = T.LEAF,
    rule: Optional[List[str]] = T.RULE,
    data: str = typer.Option("digits", help="Training data: digits (bundled: no download), mnist, fashion-mnist, "
                             "cifar10, a folder of images in class subfolders, or an .npz file."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where data sets are read from (default: the cache)."),
    epochs: int = typer.Option(3, help="Training epochs."),
    schedule: str = typer.Option("static", help="Topology schedule during training (static, sparse-momentum, rigl, set, ...)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the trainer's)."),
    train_batch_size: Optional[int] = typer.Option(None, "--train-batch-size", help="Training batch size (default: the trainer's)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="Random crop and horizontal flip of training images (default: on "
                                                "for an image folder, off otherwise)"),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize",
                                             help="Standardise inputs with the training split's mean and std "
                                                  "(default); --no-normalize feeds the data as it is, e.g. for "
                                                  "--weights trained on your own preprocessing"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<model>-<method>-<density or alpha>[-N], e.g. runs/lenet5-sparse-random-0.1)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory at --out (a folder without recipe.json is never replaced)."),
    bench_batch_size: Optional[str] = typer.Option(None, "--bench-batch-size", help="Bench batch sizes, "
                                                   "comma-separated (default 1,16)."),
    old_batch_size: Optional[str] = typer.Option(None, "--batch-size", "-b", hidden=True,
                                                 help="Deprecated spelling of --bench-batch-size."),
    threads: str = typer.Option("1", "--threads", "-t", help="Bench intra-op thread counts, comma-separated."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Variants to bench (default dense,compact,sparse[,depth])."),
    min_time: float = typer.Option(0.3, "--min-time", help="Measured seconds per variant and configuration, at least."),
    as_json: bool = typer.Option(False, "--json", help="Print the bench results as JSON (instead of the table)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """The whole pipeline in one command: transform -> train -> export -> bench, results in the run directory."""
    from .. import pipeline
    from ..methods import make_config, method_class
    from ..rundir import default_run_dir
    from ..runtime import bench as lib

    if old_batch_size is not None:
        if bench_batch_size is not None:
            raise UsageError("give --bench-batch-size only (--batch-size is its old spelling)")
        err.print("note: `run --batch-size` is now --bench-batch-size (train's --batch-size is the training batch; "
                  "here that is --train-batch-size)", highlight=False)
        bench_batch_size = old_batch_size
    sparse_method = method_class(method).masked
    if density is None and sparse_method:
        density = 0.1
    names = pipeline.parse_variants(variants) if variants is not None else (
        ["dense", "compact", "sparse"] + (["depth"] if sparse_method else []))
    transform_options = T.transform_options(
        method=method, density=density, alpha=alpha, divisor=divisor, match=match, count=count, profile=profile,
        profile_param=profile_param, allocation=allocation, block=block, include_linear=include_linear,
        include_classifier=include_classifier, rescale_init=rescale_init, weights=weights, seed=seed,
        input_shape=input_shape, model_args=model_args, leaf=leaf, rule=rule)
    if match is None:  # the method's own checks, before any work (with --match, alpha is found later)
        make_config(**transform_options)
    train_options: dict[str, Any] = dict(data=data, epochs=epochs, schedule=schedule, seed=seed)
    if lr is not None:
        train_options["lr"] = lr
    if data_dir is not None:
        train_options["data_dir"] = str(data_dir)
    if train_batch_size is not None:
        if train_batch_size < 1:  # TrainConfig's message names train's --batch-size, which run does not have
            raise UsageError(f"--train-batch-size must be at least 1, not {train_batch_size}")
        train_options["batch_size"] = train_batch_size
    if augment is not None:
        train_options["augment"] = augment
    if normalize is not None:
        train_options["normalize"] = normalize
    bench_options = dict(batch_sizes=_int_list("--bench-batch-size", bench_batch_size or "1,16"),
                         threads=_int_list("--threads", threads), min_time=min_time)
    lib.check_settings(min_time=min_time)
    _check_train_options(train_options)
    _warn_oversubscribed(bench_options["threads"])
    target = out_dir if out_dir is not None else default_run_dir(model, method, density if density is not None else alpha, next_free=True)
    log = (lambda _m: None) if quiet else (lambda m: err.print(m, highlight=False, markup=False))
    with _pipeline_progress(quiet) as progress:
        run_dir, result, notes = pipeline.run_pipeline(
            model, target, transform_options=transform_options, train_options=train_options, variants=names,
            bench_options=bench_options, force=force, progress=progress, log=log)
    tr = notes.get("train") or {}
    if as_json:
        out.print_json(json.dumps({"run_dir": str(run_dir), **result.to_json()}, default=str))
    else:
        out.print(bench_table(result, title=f"{model} {method}: ONNX Runtime latency (speedup vs {result.baseline})"))
        if _memory_line(result):
            out.print(_memory_line(result))
    _print_machine_lines(result)
    for w in tr.get("warnings") or []:
        err.print(f"warning: {w}", highlight=False)
    if as_json:
        return
    if "test_acc" in tr:
        n = tr.get("epochs")
        out.print(f"trained {n} epoch{'' if n == 1 else 's'} on {tr.get('data')}: test accuracy {tr['test_acc']:.1%}")
    for line in _variant_notes(notes):
        out.print(line)
    out.print(f"run directory: {run_dir}  (.onnx variants, bench.json, plot.png)")


def _check_train_options(options: dict[str, Any]) -> None:
    """The training settings' own checks, before the transform starts."""
    from ..train import TrainConfig

    TrainConfig.from_dict(options).validate()
