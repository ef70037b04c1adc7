"""CLI commands of studies: ``study`` (run a multi-seed spec) and ``compare`` (statistics over runs)."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ._common import app, err, handle_errors, out

SPEC_HELP = """Run every arm x seed of a study spec (TOML) as a run directory, side by side, resumably.

\b
A spec (full format: `python -c "import sparsify.study.spec as s; print(s.__doc__)"`):
  [study]
  model = "zoo:lenet300-100"      # as `sparsify transform` takes it
  seeds = 5                       # seeds 0..4, or a list [0, 1, 2]
  baseline = "dense"              # optional: compare's default baseline
  [train]                         # shared `sparsify train` settings
  data = "mnist"                  #   (underscores: batch_size, lr_schedule, ...)
  epochs = 100
  [arms.dense]
  method = "none"
  [arms.momentum]
  method = "sparse-random"        # + density, include_linear, profile, ...
  density = 0.05
  train = { schedule = "sparse-momentum" }
  [arms.depth]
  method = "depth-multiplier"
  match = "momentum"              # alpha chosen to equal arm momentum's
  count = "conv"                  #   live conv (or total) parameters

\b
Runs go to OUT/<arm>/seed-<s>/ (default OUT: runs/study-<name>). Running the same command again
skips finished runs and resumes interrupted ones from their last epoch (Ctrl-C is safe). With
several jobs, each worker process gets its own torch threads (--threads, default cores/jobs).
Then: `sparsify compare OUT`.
"""


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _StudyView:
    """Rich progress over the whole study (epochs of every run) and one bar per running job."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None
        self.total: TaskID | None = None
        self.tasks: dict[tuple[str, int], TaskID] = {}
        self.jobs: list[Any] = []
        self.t0 = time.time()

    def _overall(self) -> None:
        if self.bar is None or self.total is None:
            return
        finished = sum(j.state in ("done", "diverged") for j in self.jobs)
        self.bar.update(self.total, completed=sum(min(j.progress, j.epochs) for j in self.jobs),
                        description=f"runs {finished}/{len(self.jobs)}")

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev["kind"]
        if kind == "plan":
            self.jobs = ev["jobs"]
            err.print(f"study {ev['study_dir']}: {ev['total']} runs, {ev['skipped']} already finished; "
                      f"{ev['workers']} job(s) at a time, {ev['threads']} torch thread(s) each", highlight=False)
            from ..machine import oversubscribed_note

            busy = oversubscribed_note(min(ev["workers"], len(ev["jobs"]) - ev["skipped"]) * ev["threads"],
                                       "--jobs x --threads")
            if busy:
                err.print(f"warning: {busy}", highlight=False)
            if self.quiet:
                return
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err,
                                transient=True)
            self.bar.start()
            self.total = self.bar.add_task("runs", total=sum(j.epochs for j in self.jobs))
            self._overall()
        elif kind == "job-start" and self.bar is not None:
            j = ev["job"]
            self.tasks[j.id] = self.bar.add_task(f"  {j.arm} seed {j.seed}" + (" (resumed)" if j.resume else ""),
                                                 total=j.epochs, completed=j.progress)
        elif kind == "job-progress" and self.bar is not None:
            j, e = ev["job"], ev["event"]
            if j.id in self.tasks:
                extra = f" val acc {e['val_acc']:.2%}" if e.get("val_acc") is not None else ""
                self.bar.update(self.tasks[j.id], completed=j.progress,
                                description=f"  {j.arm} seed {j.seed} epoch {min(int(j.progress) + 1, j.epochs)}"
                                            f"/{j.epochs}{extra}")
            self._overall()
        elif kind == "job-end":
            j = ev["job"]
            if self.bar is not None and j.id in self.tasks:
                self.bar.remove_task(self.tasks.pop(j.id))
            self._overall()
            finished = sum(x.state in ("done", "diverged") for x in self.jobs)
            what = (f"test acc {j.test_acc:.2%}" if j.state == "done" and j.test_acc is not None
                    else f"{j.state}: {j.message}")
            wall = f", {_fmt_time(ev['wall_s'])}" if ev.get("wall_s") is not None else ""
            err.print(f"{j.arm} seed {j.seed}: {what} ({finished}/{len(self.jobs)} runs{wall}, "
                      f"{_fmt_time(time.time() - self.t0)} so far)", highlight=False, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@app.command("study", help=escape(SPEC_HELP))  # the spec's [tables] are text, not rich markup
@handle_errors
def study(
    spec: Path = typer.Argument(..., help="Study spec (TOML)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory (default runs/study-<name>)"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Runs trained side by side (default: the cores)"),
    threads: Optional[int] = typer.Option(None, help="Torch threads per run (default: cores / jobs, at least 1)"),
    force: bool = typer.Option(False, help="Redo runs whose spec changed since they were made"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (one line per finished run stays)"),
) -> None:
    from ..study.runner import run_study
    from ..study.spec import load_spec

    parsed = load_spec(spec)
    view = _StudyView(quiet)
    try:
        result = run_study(parsed, out_dir, jobs=jobs, threads=threads, force=force, on_event=view,
                           command=["sparsify", *sys.argv[1:]])
    except KeyboardInterrupt:
        view.close()
        done = sum(j.state in ("done", "diverged") for j in view.jobs)
        err.print(f"interrupted: {done} of {len(view.jobs)} runs are finished; run the same command again to resume",
                  highlight=False)
        raise typer.Exit(code=130) from None
    finally:
        view.close()
    trained = result.done + result.diverged - result.skipped
    out.print(f"study {result.study_dir}: {result.total} runs ({result.skipped} already finished, {trained} trained "
              f"now, {result.diverged} diverged) in {_fmt_time(result.wall_s)}; "
              f"compare them with `{shlex.join(['sparsify', 'compare', str(result.study_dir)])}`", highlight=False)


def _pm(mean: float | None, sem: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {sem:.2f}" if sem is not None else f"{mean:.2f}"


def render_comparison(c: Any) -> list[Any]:
    """The three tables of ``sparsify compare``: accuracy, size, paired differences (each fits 80 columns)."""
    from rich.table import Table

    from ..study.compare import seeds_text, short_count

    acc = Table(title="test accuracy (%): mean ± s.e. over seeds", title_justify="left")
    for col, just in (("arm", "left"), ("n", "right"), ("accuracy", "right"), ("error", "right"), ("per seed", "left")):
        acc.add_column(col, justify=just, overflow="fold")
    for a in c.arms:
        n = str(a.n) + (f" (+{a.diverged} div.)" if a.diverged else "") + (f" ({a.unfinished} unf.)" if a.unfinished else "")
        acc.add_row(a.arm, n, _pm(a.acc_mean, a.acc_sem), "-" if a.error_mean is None else f"{a.error_mean:.2f}",
                    seeds_text(a.acc))
    size = Table(title="live parameters and MACs per sample (seed means)", title_justify="left")
    for col in ("arm", "total", "w/o clf", "conv", "MACs", "fan-in CV", "matched"):
        size.add_column(col, justify="left" if col in ("arm", "matched") else "right", overflow="fold")
    for a in c.arms:
        cv = "-" if a.fan_in_cv is None else f"{a.fan_in_cv:.2f}"
        size.add_row(a.arm, short_count(a.counts.get("total")), short_count(a.counts.get("no_classifier")),
                     short_count(a.counts.get("conv")), short_count(a.counts.get("macs")), cv,
                     f"{a.matched} of {a.matched_to}" if a.matched else "")
    tables = [acc, size]
    if c.paired:
        diff = Table(title=f"accuracy minus {c.baseline}'s, paired by seed (pp)", title_justify="left",
                     caption="two-sided paired t-test over the common seeds (scipy.stats.ttest_rel)",
                     caption_justify="left")
        for col in ("arm", "pairs", "difference", "95% CI", "p"):
            diff.add_column(col, justify="left" if col == "arm" else "right")
        for d in c.paired:
            ci = "-" if d.ci_low is None else f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]"
            diff.add_row(d.arm, str(d.n), "-" if d.mean is None else f"{d.mean:+.2f}", ci,
                         "-" if d.p is None else f"{d.p:.3g}")
        tables.append(diff)
    return tables


@app.command("compare")
@handle_errors
def compare(
    paths: List[Path] = typer.Argument(..., help="Run directories, or a study directory (`sparsify study`)"),
    baseline: Optional[str] = typer.Option(None, help="Arm the others are compared with, paired by seed "
                                                      "(default: the study's baseline, else the first arm)"),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON"),
    plot: Optional[Path] = typer.Option(None, help="Write a plot (.png, .pdf or .svg, as its suffix says): accuracy "
                                                   "against live parameters, learning curves"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --plot file"),
) -> None:
    """Per-arm test accuracy (mean ± s.e. and each seed), live parameters and MACs, and paired differences
    against a baseline arm with a paired t-test's 95% confidence interval (scipy.stats)."""
    from ..study.compare import compare as run_compare
    from ..study.compare import plot_comparison

    from .._io import PLOT_FORMATS, check_new_file

    if plot is not None:  # before reading the runs: a plot over a run's summary.json lost it
        check_new_file(plot, "--plot", force, PLOT_FORMATS)
    result = run_compare(paths, baseline=baseline)
    if plot is not None:
        plot_comparison(result, plot)
        err.print(f"wrote {plot}", highlight=False)
    if as_json:
        out.print_json(json.dumps(result.to_json()))
        return
    for table in render_comparison(result):
        out.print(table)
    for d in result.paired:
        if d.note:
            err.print(f"note: no paired test of {d.arm}: {d.note}", highlight=False, markup=False)
