"""``sparsify compare``: per-arm statistics over seeds, and paired differences against a baseline arm.

Runs are read from their files only (``recipe.json``, ``summary.json``, ``metrics.jsonl``,
``study-status.json``); no model is rebuilt. A study directory gives its arms; loose run
directories are grouped into arms by everything but the seed (or by the arm a study gave them).

Per arm: test accuracy (%) mean +- standard error of the mean over seeds (``scipy.stats.sem``,
ddof 1) and each seed's value; live parameters (total, without the classifier, conv layers only)
and multiply-adds per sample (``sparsify.report.param_counts``); the mean fan-in CV of the masked
layers; which count a depth-multiplier arm matched. Against the baseline arm: the paired
difference in accuracy over the seeds both arms ran (percentage points), with a two-sided paired
t-test and its 95% confidence interval (``scipy.stats.ttest_rel``; Student 1908). Diverged and
unfinished runs are counted, not averaged.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._io import read_json
from ..errors import UsageError, name_list
from ..report import param_counts
from ..rundir import RECIPE, SUMMARY, is_run_dir, read_recipe
from .worker import JOB, STATUS

TEST = "two-sided paired t-test over common seeds (scipy.stats.ttest_rel), 95% confidence interval"
METRICS = "metrics.jsonl"


@dataclass
class RunRecord:
    """What compare reads from one run directory."""

    path: str
    arm: str
    seed: int
    status: str                               # done | diverged | unfinished
    method: str
    test_acc: float | None                    # percent
    counts: dict[str, int]                    # total, no_classifier, conv, macs
    fan_in_cv: float | None                   # mean over masked layers (None: no masked layer)
    match: dict[str, Any] | None
    params: dict[str, Any]
    schedule: str | None
    curve: list[dict[str, float]] = field(default_factory=list)   # per epoch: epoch, val_acc (%), train_loss


@dataclass
class ArmStats:
    """Statistics of one arm over its finished seeds."""

    arm: str
    series: str
    method: str
    n: int
    seeds: list[int]
    acc: list[float]                          # percent, per seed
    acc_mean: float | None
    acc_sem: float | None
    error_mean: float | None
    counts: dict[str, float]                  # means over the finished seeds
    fan_in_cv: float | None
    matched: str | None                       # "conv" / "total" for a matched depth-multiplier arm
    matched_to: str | None                    # the arm (or run) whose count it matched
    diverged: int
    unfinished: int


@dataclass
class PairedDiff:
    """Accuracy of ``arm`` minus the baseline's, paired by seed (percentage points)."""

    arm: str
    baseline: str
    n: int
    seeds: list[int]
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    t: float | None
    p: float | None
    note: str | None = None  # why there are no pairs although both arms finished runs


# Units of compare's JSON fields (those not named are counts, seeds or labels).
UNITS = {"runs.test_acc": "percent", "runs.curve.val_acc": "percent", "arms.acc": "percent",
         "arms.acc_mean": "percent", "arms.acc_sem": "percentage points", "arms.error_mean": "percent",
         "paired.mean": "percentage points", "paired.ci_low": "percentage points",
         "paired.ci_high": "percentage points"}


@dataclass
class Comparison:
    """The result of ``compare``: arms in order, paired differences, and every run read."""

    arms: list[ArmStats]
    paired: list[PairedDiff]
    baseline: str | None
    runs: list[RunRecord]
    test: str = TEST

    def to_json(self) -> dict[str, Any]:
        """The comparison as JSON; ``units`` names the unit of every accuracy field (``train --json``
        and ``summary.json`` give ``test_acc`` as a fraction of 1, compare in percent)."""
        return {"baseline": self.baseline, "test": self.test, "units": UNITS, "arms": [asdict(a) for a in self.arms],
                "paired": [asdict(p) for p in self.paired], "runs": [asdict(r) for r in self.runs]}

    def arm(self, name: str) -> ArmStats:
        return next(a for a in self.arms if a.arm == name)


def _curve(path: Path) -> list[dict[str, float]]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") == "epoch":
            val = r.get("val_acc")
            out.append({"epoch": r["epoch"], "val_acc": None if val is None or val != val else 100 * val,
                        "train_loss": r.get("train_loss")})
    return out


def read_run(path: str | Path, arm: str | None = None) -> RunRecord:
    """One run directory as a RunRecord (RunDirError when ``path`` is not a run directory)."""
    p = Path(path)
    recipe = read_recipe(p)
    summary = read_json(p / SUMMARY)
    job = read_json(p / JOB)
    status = read_json(p / STATUS)
    train = summary.get("train") or {}
    seed = int((job.get("key") or {}).get("seed", train.get("config", {}).get("seed", recipe.seed)))
    state = status.get("status") or ("done" if train else "unfinished")
    if state == "done" and not train:
        state = "unfinished"
    masked = [l["fan_in_cv"] for l in summary.get("layers", []) if l.get("sparse")]
    try:
        counts = param_counts(summary)
    except (KeyError, TypeError):
        counts = {}
    schedule = (train.get("config") or (job.get("key") or {}).get("train") or {}).get("schedule", "static")
    return RunRecord(
        path=str(p), arm=arm or (job.get("key") or {}).get("arm") or _arm_label(recipe.method, recipe.params, schedule),
        seed=seed, status=state, method=recipe.method,
        test_acc=100 * train["test_acc"] if state == "done" and train.get("test_acc") is not None else None,
        counts=counts, fan_in_cv=sum(masked) / len(masked) if masked else None,
        match=recipe.params.get("match"), params={k: v for k, v in recipe.params.items() if k != "match"},
        schedule=schedule, curve=_curve(p / METRICS),
    )


def _arm_label(method: str, params: dict[str, Any], schedule: str | None) -> str:
    """A name for loose runs grouped into one arm: method, its main parameter, the schedule."""
    parts = [method]
    if params.get("density") is not None:
        parts.append(f"d{params['density']:g}")
    if params.get("alpha") is not None:
        parts.append(f"a{params['alpha']:g}")
    if method == "psn":
        parts.append(str(params.get("profile")))
    if schedule and schedule != "static":
        parts.append(schedule)
    return "-".join(parts)


def _group_key(r: RunRecord) -> str:
    """Loose runs are one arm when everything but the seed agrees (the model file's checksum too:
    runs of an edited model file were pooled with the old one's)."""
    summary = read_json(Path(r.path) / SUMMARY)
    cfg = dict((summary.get("train") or {}).get("config") or {})
    cfg.pop("seed", None)
    recipe = read_json(Path(r.path) / RECIPE)
    recipe = {k: v for k, v in recipe.items() if k not in ("seed", "versions")}
    recipe["params"] = {k: v for k, v in (recipe.get("params") or {}).items() if k != "match"}
    return json.dumps([recipe, cfg], sort_keys=True)


def _is_study(record: dict[str, Any]) -> bool:
    arms = record.get("arms")
    return isinstance(arms, dict) and all(
        isinstance(info, dict) and isinstance(info.get("seeds", []), list)
        and all(isinstance(s, int) and not isinstance(s, bool) for s in info.get("seeds", [])) for info in arms.values())


def _unseeded(key: dict[str, Any]) -> dict[str, Any]:
    return {k: _unseeded(v) if isinstance(v, dict) else v for k, v in key.items() if k != "seed"}


def _job_group(r: RunRecord) -> str:
    """A study's runs given one by one are one arm when their job keys agree but for the seed (the
    arm's name alone pooled the "dense" arms of two studies of different models and data)."""
    key = read_json(Path(r.path) / JOB).get("key")
    return json.dumps(["study", r.arm, _unseeded(key) if isinstance(key, dict) else None], sort_keys=True)


def collect(paths: Sequence[str | Path]) -> tuple[list[RunRecord], dict[str, str], str | None]:
    """Read the runs of study directories and run directories; returns (runs, series by arm, study baseline)."""
    from .runner import STUDY_JSON

    if not paths:
        raise UsageError("give run directories or a study directory to compare")
    runs: list[RunRecord] = []
    series: dict[str, str] = {}
    baseline = None
    # a path given twice (`compare A A`, `A ./A/`, or a study and one of its runs) is one path: its
    # runs counted twice shrank the standard error
    given: set[Path] = set()
    unique = [p for p in (Path(raw) for raw in paths) if not (p.resolve() in given or given.add(p.resolve()))]
    seen: set[Path] = set()  # the runs read from the studies
    studies = {p: read_json(p / STUDY_JSON) for p in unique if (p / STUDY_JSON).is_file()}
    for p, study in studies.items():
        if not _is_study(study):  # was a traceback, or an empty table and exit 0
            raise UsageError(f"{p / STUDY_JSON} is damaged (not a study record); rerun `sparsify study` on this "
                             f"--out to rewrite it, or compare the run directories under {p}")
    names = [str(study.get("name", p.name)) for p, study in studies.items()]
    for p in unique:
        if p in studies:
            study = studies[p]
            name = str(study.get("name", p.name))
            # two studies of one spec name (r.toml and v2/r.toml) were pooled into one arm: their paths tell them apart
            prefix = "" if len(studies) == 1 else f"{name}/" if names.count(name) == 1 else f"{p}/"
            baseline = baseline or (prefix + study["baseline"] if study.get("baseline") else None)
            for arm, info in (study.get("arms") or {}).items():
                series[prefix + arm] = info.get("series") or info.get("method", arm)
                hashes = info.get("hashes") if isinstance(info.get("hashes"), dict) else {}
                for seed in info.get("seeds", []):
                    run = p / arm / f"seed-{seed}"
                    if is_run_dir(run):
                        seen.add(run.resolve())
                        record = read_run(run, arm=prefix + arm)
                        if str(seed) in hashes and read_json(run / JOB).get("hash") != hashes[str(seed)]:
                            # made under an earlier spec (a --force rerun stopped before redoing it): not
                            # this spec's result
                            record.status, record.test_acc = "unfinished", None
                        runs.append(record)
                    else:
                        runs.append(RunRecord(str(run), prefix + arm, int(seed), "unfinished", info.get("method", "?"),
                                              None, {}, None, None, {}, None))
    loose = [read_run(p) for p in unique if p not in studies and p.resolve() not in seen]
    if loose:
        groups: dict[str, list[RunRecord]] = {}
        for r in loose:
            groups.setdefault(_job_group(r) if (Path(r.path) / JOB).is_file() else _group_key(r), []).append(r)
        taken = set(series)
        for members in groups.values():
            name = members[0].arm
            k = 2
            while name in taken:
                name, k = f"{members[0].arm}-{k}", k + 1
            taken.add(name)
            for r in members:
                r.arm = name
            series[name] = members[0].method if not members[0].match else \
                f"{members[0].method} (equal {members[0].match['count']})"
            runs.extend(members)
    return runs, series, baseline


def compare(paths: Sequence[str | Path], baseline: str | None = None) -> Comparison:
    """Per-arm statistics and paired differences against ``baseline`` (default: the study's, else the first arm)."""
    from scipy import stats

    runs, series, study_baseline = collect(paths)
    arms: dict[str, list[RunRecord]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    if baseline is not None and baseline not in arms:
        raise UsageError(f"--baseline {baseline!r} is not an arm here; choose one of {', '.join(arms)}")
    baseline = baseline or (study_baseline if study_baseline in arms else next(iter(arms), None))
    arm_of = {Path(r.path).resolve(): r.arm for r in runs}
    out: list[ArmStats] = []
    for name, members in arms.items():
        done = sorted((r for r in members if r.status == "done"), key=lambda r: r.seed)
        acc = [r.test_acc for r in done]
        n = len(acc)
        mean = float(sum(acc) / n) if n else None
        sem = float(stats.sem(acc)) if n >= 2 else None
        keys = sorted({k for r in done for k in r.counts})
        counts = {k: sum(r.counts.get(k, 0) for r in done) / n for k in keys} if n else {}
        cvs = [r.fan_in_cv for r in done if r.fan_in_cv is not None]
        first = members[0]
        out.append(ArmStats(
            arm=name, series=series.get(name, first.method), method=first.method, n=n, seeds=[r.seed for r in done],
            acc=acc, acc_mean=mean, acc_sem=sem, error_mean=None if mean is None else 100 - mean, counts=counts,
            fan_in_cv=sum(cvs) / len(cvs) if cvs else None,
            matched=(first.match or {}).get("count"),
            matched_to=_matched_to(first, arm_of),
            diverged=sum(r.status == "diverged" for r in members),
            unfinished=sum(r.status == "unfinished" for r in members),
        ))
    paired = []
    if baseline is not None:
        base = {r.seed: r.test_acc for r in arms[baseline] if r.status == "done"}
        for a in out:
            if a.arm == baseline:
                continue
            repeated = _repeated_seed(arms[a.arm]) or _repeated_seed(arms[baseline])
            if repeated is not None:
                # pairs are keyed by seed: runs that share one (transform --seed differs, train --seed
                # not) made three "pairs" of one run against one baseline run, p 0 with a CI of width 0
                paired.append(PairedDiff(a.arm, baseline, 0, [], None, None, None, None, None, note=repeated))
                continue
            seeds = [s for s in a.seeds if s in base]
            mine = {s: v for s, v in zip(a.seeds, a.acc)}
            x = [mine[s] for s in seeds]
            y = [base[s] for s in seeds]
            diff = PairedDiff(a.arm, baseline, len(seeds), seeds, None, None, None, None, None)
            if seeds:
                diff.mean = sum(xi - yi for xi, yi in zip(x, y)) / len(seeds)
            d = [xi - yi for xi, yi in zip(x, y)]
            if len(seeds) >= 2 and max(d) - min(d) <= 1e-9 * max(1.0, abs(d[0])):
                # scipy's answer for differences with no spread is p 0 (t inf) with a CI of width 0,
                # or nan when they are all zero: the test is undefined, say so
                diff.note = (f"the difference is {diff.mean:+.2f} points for every seed (no spread; the "
                             f"t-test is undefined): run more seeds, or test on more examples")
            elif len(seeds) >= 2:
                with warnings.catch_warnings():  # nearly equal differences: scipy warns of precision loss;
                    warnings.simplefilter("ignore", RuntimeWarning)  # the t and CI it returns are still reported
                    res = stats.ttest_rel(x, y)
                    ci = res.confidence_interval(confidence_level=0.95)
                diff.t, diff.p = _finite(res.statistic), _finite(res.pvalue)
                diff.ci_low, diff.ci_high = _finite(ci.low), _finite(ci.high)
            paired.append(diff)
    return Comparison(out, paired, baseline, runs)


def _repeated_seed(members: Sequence[RunRecord]) -> str | None:
    """Why runs of one arm cannot be paired by seed (two finished runs share one), else None."""
    by_seed: dict[int, list[str]] = {}
    for r in members:
        if r.status == "done":
            by_seed.setdefault(r.seed, []).append(r.path)
    for seed, paths in by_seed.items():
        if len(paths) > 1:
            return (f"runs {name_list(paths)} of {members[0].arm} share seed {seed} (the training's --seed), so "
                    f"they cannot be paired by seed: train each with its own --seed")
    return None


def _matched_to(r: RunRecord, arm_of: Mapping[Path, str]) -> str | None:
    """The arm of the run a depth-multiplier run ``r`` matched: a study run's job key names it (the
    recipe's path to the matched run is relative to where the study ran); else the arm that run is
    in here (``arm_of``: resolved run directory -> arm, the arm as collect named it: ``sparse-2``
    when two arms shared a name), else its own job key, else its directory name."""
    if not r.match:
        return None
    key = read_json(Path(r.path) / JOB).get("key") or {}
    arm, own = key.get("match"), key.get("arm")
    if isinstance(arm, str):
        # with the study's prefix when several studies are compared (r.arm is "<study>/<arm>")
        return (r.arm[:-len(own)] if isinstance(own, str) and own and r.arm.endswith(own) else "") + arm
    run = Path(r.match["run"])
    for place in (run, Path(r.path).parent / run):
        if place.resolve() in arm_of:
            return arm_of[place.resolve()]
    return (read_json(run / JOB).get("key") or {}).get("arm") or run.name


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------- plot


def plot_comparison(c: Comparison, path: str | Path) -> Path:
    """Accuracy against live parameters (total and conv), and validation-accuracy learning curves.

    One point per arm (mean, error bar +- s.e.; named where its name is not its series'), arms of one
    series joined in order of parameter count; learning curves are the mean over each arm's finished
    seeds. Written atomically, as PNG, PDF or SVG by the file's suffix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    from .._io import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    by_series: dict[str, list[ArmStats]] = {}
    for a in c.arms:
        if a.n:
            by_series.setdefault(a.series, []).append(a)
    for ax, key, label in ((axes[0], "total", "live parameters (total)"),
                           (axes[1], "conv", "live conv parameters")):
        for s, arms in by_series.items():
            pts = sorted((a.counts.get(key, 0), a.acc_mean, a.acc_sem or 0.0, a.arm) for a in arms
                         if a.counts.get(key))
            if not pts:
                continue
            xs, ys, es, names = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=s)
            for x, y, name in zip(xs, ys, names):  # the arm names the learning curves are labelled with
                if name != s:
                    ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {label}", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(label)
            continue
        ax.set_xscale("log")
        # one style for every label: matplotlib's 10^5 beside our 50k and 200k read as two scales
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: short_count(v)))
        lo, hi = ax.get_xlim()
        if hi / lo < 10:
            # within one decade there is no labelled power of ten: label 2x and 5x, as 2k, 5k, ...
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: short_count(v)))
        else:
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on longer ranges
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    runs_by_arm: dict[str, list[RunRecord]] = {}
    for r in c.runs:
        if r.status == "done" and r.curve:
            runs_by_arm.setdefault(r.arm, []).append(r)
    for arm, rs in runs_by_arm.items():
        epochs = sorted({p["epoch"] for r in rs for p in r.curve})
        mean = []
        for e in epochs:
            vals = [p["val_acc"] for r in rs for p in r.curve if p["epoch"] == e and p["val_acc"] is not None]
            mean.append(sum(vals) / len(vals) if vals else float("nan"))
        ax.plot(epochs, mean, label=arm, marker="o" if len(epochs) <= 12 else None, markersize=3)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs (it ticked 1.2, 1.4, ...)
    shown_epochs = sorted({p["epoch"] for rs in runs_by_arm.values() for r in rs for p in r.curve})
    if len(shown_epochs) == 1:  # a range of less than one epoch: the locator fell back to 0.95, 0.96, ...
        ax.set_xticks(shown_epochs)
    ax.set_ylabel("validation accuracy (%), mean over seeds")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def seeds_text(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def short_count(n: float | None) -> str:
    """12,970 -> 13.0k; 1,859,151 -> 1.86M."""
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


def natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
