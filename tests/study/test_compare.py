"""sparsify compare: statistics checked against values computed by hand from the seeds' accuracies."""
from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sparsify import api
from sparsify.cli import app
from sparsify.study.compare import compare

runner = CliRunner()
T_975_DF2 = 4.302652729911275   # Student t, 97.5% quantile, 2 degrees of freedom (printed tables)
ACC = {"a": [0.912, 0.931, 0.925], "b": [0.951, 0.948, 0.969]}
LR = {"a": 0.1, "b": 0.05}


def _fake_run(base, path, arm: str, seed: int, acc: float | None, status: str = "done", job: bool = True) -> None:
    shutil.copytree(base, path)
    summary = json.loads((path / "summary.json").read_text())
    config = {"seed": seed, "schedule": "static", "lr": LR[arm], "data": "digits", "epochs": 2}
    if acc is not None:
        summary["train"] = {"test_acc": acc, "config": config}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"event": "start"}, {"event": "epoch", "epoch": 1, "val_acc": 0.5 + seed / 100, "train_loss": 1.0},
        {"event": "epoch", "epoch": 2, "val_acc": 0.6 + seed / 100, "train_loss": 0.5})))
    if job:
        (path / "study-job.json").write_text(json.dumps({"key": {"arm": arm, "seed": seed, "train": config}}))
        (path / "study-status.json").write_text(json.dumps({"status": status, "test_acc": acc}))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study directory whose runs carry known test accuracies (one real transformed run, copied)."""
    root = tmp_path_factory.mktemp("cmp")
    base, _ = api.transform_to_dir("zoo:mlp", "sparse-random", density=0.5, model_args={"hidden": [16]},
                                   out=root / "base")
    s = root / "study"
    for arm, accs in ACC.items():
        for seed, acc in enumerate(accs):
            _fake_run(base, s / arm / f"seed-{seed}", arm, seed, acc)
    _fake_run(base, s / "b" / "seed-3", "b", 3, None, status="diverged")
    (s / "study.json").write_text(json.dumps({"name": "t", "baseline": "a", "arms": {
        "a": {"method": "sparse-random", "series": "A", "seeds": [0, 1, 2, 3]},   # seed 3 never ran
        "b": {"method": "sparse-random", "series": "B", "seeds": [0, 1, 2, 3]}}}))
    return root


def test_statistics_match_the_hand_computation(study):
    c = compare([study / "study"])
    assert c.baseline == "a" and [a.arm for a in c.arms] == ["a", "b"]
    for arm, accs in ACC.items():
        x = [100 * v for v in accs]
        stats = c.arm(arm)
        assert stats.acc == pytest.approx(x) and stats.n == 3 and stats.seeds == [0, 1, 2]
        assert stats.acc_mean == pytest.approx(sum(x) / 3)
        assert stats.acc_sem == pytest.approx(statistics.stdev(x) / math.sqrt(3))
        assert stats.error_mean == pytest.approx(100 - sum(x) / 3)
    assert (c.arm("a").unfinished, c.arm("a").diverged) == (1, 0)
    assert (c.arm("b").unfinished, c.arm("b").diverged) == (0, 1)
    d = [100 * (b - a) for a, b in zip(ACC["a"], ACC["b"])]
    mean, sd = sum(d) / 3, statistics.stdev(d)
    t = mean / (sd / math.sqrt(3))
    (pair,) = c.paired
    assert (pair.arm, pair.baseline, pair.n, pair.seeds) == ("b", "a", 3, [0, 1, 2])
    assert pair.mean == pytest.approx(mean) and pair.t == pytest.approx(t)
    assert pair.ci_low == pytest.approx(mean - T_975_DF2 * sd / math.sqrt(3))
    assert pair.ci_high == pytest.approx(mean + T_975_DF2 * sd / math.sqrt(3))
    assert pair.p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))  # two-sided, 2 df: closed form


def test_counts_come_from_the_runs_reports(study):
    c = compare([study / "study"])
    report = json.loads((study / "base" / "summary.json").read_text())
    assert c.arm("a").counts["total"] == report["totals"]["params"]
    assert c.arm("a").counts["no_classifier"] == report["totals"]["params_no_classifier"]
    assert c.arm("a").counts["conv"] == 0 and c.arm("a").counts["macs"] == report["totals"]["macs"]
    masked = [l["fan_in_cv"] for l in report["layers"] if l["sparse"]]
    assert c.arm("a").fan_in_cv == pytest.approx(sum(masked) / len(masked))


def test_loose_run_dirs_group_by_everything_but_the_seed(study, tmp_path):
    base = study / "base"
    runs = []
    for arm, accs in ACC.items():
        for seed, acc in enumerate(accs):
            p = tmp_path / f"{arm}{seed}"
            _fake_run(base, p, arm, seed, acc, job=False)
            runs.append(p)
    c = compare(runs, baseline=None)
    assert len(c.arms) == 2 and sorted(a.n for a in c.arms) == [3, 3]
    by_first_acc = {round(a.acc[0], 1): a for a in c.arms}
    assert by_first_acc[91.2].acc == pytest.approx([100 * v for v in ACC["a"]])


def test_study_runs_given_one_by_one_group_by_their_job_key_not_the_arm_name_alone(study, tmp_path):
    # the "a" arms of two studies of other data were pooled into one arm of n=2
    runs = [study / "study" / "a" / f"seed-{s}" for s in (0, 1)]
    other = tmp_path / "a-elsewhere"
    shutil.copytree(runs[1], other)
    job = json.loads((other / "study-job.json").read_text())
    job["key"]["train"]["data"] = "/data/other"
    (other / "study-job.json").write_text(json.dumps(job))
    c = compare(runs + [other], baseline=None)
    assert sorted((a.arm, a.n) for a in c.arms) == [("a", 2), ("a-2", 1)]


@pytest.mark.parametrize("shift", [0.0, 1 / 3])
def test_the_same_difference_for_every_seed_is_no_test_not_p_0(study, tmp_path, shift):
    # a tiny test set: accuracy 2/3 against 1/3 for every seed read "+33.33 [+33.33, +33.33] p 0"
    runs = []
    for arm, acc in (("a", 1 / 3), ("b", 1 / 3 + shift)):
        for seed in range(3):
            p = tmp_path / f"{arm}{seed}"
            _fake_run(study / "base", p, arm, seed, acc + seed / 7, job=False)
            runs.append(p)
    c = compare(runs, baseline="sparse-random-d0.5")  # loose runs are named by their recipe (lr tells them apart)
    (pair,) = c.paired
    assert pair.n == 3 and pair.mean == pytest.approx(100 * shift)
    assert pair.p is None and pair.t is None and pair.ci_low is None and "no spread" in pair.note


@pytest.mark.parametrize("record", ['{"arms": {"a": {"seeds": ["x"]}}}', "[]", "{not json", '{"arms": 3}'])
def test_a_damaged_study_record_is_one_line(tmp_path, record):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(record)  # ValueError / AttributeError, or an empty table, exit 0
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "s")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "study.json is damaged" in res.output


def _plotted(study, tmp_path, monkeypatch, counts: tuple[int, int], c: Any = None) -> tuple[Any, Any]:
    """The comparison ``c`` (default: the study's) with its arms' live counts set to ``counts``, and
    its figure, drawn."""
    import sparsify._io
    from sparsify.study.compare import plot_comparison

    figs = []
    monkeypatch.setattr(sparsify._io, "save_figure", lambda fig, path, dpi: figs.append(fig) or path)
    c = c or compare([study / "study"])
    for arm, n in zip(c.arms, counts):
        arm.counts = {"total": n, "conv": n}
    plot_comparison(c, tmp_path / "p.png")
    (fig,) = figs
    fig.canvas.draw()
    return c, fig


def _count_labels(ax) -> list[str]:
    lo, hi = ax.get_xlim()
    return [t.get_text() for t in ax.xaxis.get_majorticklabels() + ax.xaxis.get_minorticklabels()
            if t.get_text() and lo <= t.get_position()[0] <= hi]


def test_parameter_axes_within_one_decade_have_numbers(study, tmp_path, monkeypatch):
    # counts of 1.45k-2.82k: a log axis with no power of ten in range, minor labels off: no number at all
    c, fig = _plotted(study, tmp_path, monkeypatch, (1450, 2820))
    for ax in fig.axes[:2]:
        lo, hi = ax.get_xlim()
        assert hi / lo < 10
        assert _count_labels(ax), ax.get_xlabel()
        # each point carries the arm name the learning curves (third panel) are labelled with
        assert {t.get_text() for t in ax.texts} == {a.arm for a in c.arms if a.arm != a.series} == {"a", "b"}


def test_plot_labels_counts_in_one_style_and_epochs_as_whole_numbers(study, tmp_path, monkeypatch):
    """A log axis over 50k-200k showed "50k", "10^5", "200k"; the learning curves of two epochs
    ticked 1.2, 1.4, ..."""
    c, fig = _plotted(study, tmp_path, monkeypatch, (50_000, 200_000))
    labels = _count_labels(fig.axes[0])
    assert labels and all(re.fullmatch(r"[0-9.]+[kMG]?", t) for t in labels), labels
    epochs = [t.get_position()[0] for t in fig.axes[2].xaxis.get_majorticklabels() if t.get_text()]
    assert epochs and all(float(e).is_integer() for e in epochs), epochs
    for r in c.runs:  # a one-epoch study: the locator has less than one epoch to place whole ticks in
        r.curve = r.curve[:1]
    _, fig = _plotted(study, tmp_path, monkeypatch, (50_000, 200_000), c)
    assert [t.get_text() for t in fig.axes[2].xaxis.get_majorticklabels() if t.get_text()] == ["1"]


def test_cli_tables_json_plot_and_errors(study, tmp_path):
    res = runner.invoke(app, ["compare", str(study / "study")])
    assert res.exit_code == 0, res.output
    assert all(len(line) <= 80 for line in res.stdout.splitlines()), res.stdout
    shown = [f"{statistics.mean(x):.2f} ± {statistics.stdev(x) / math.sqrt(3):.2f}"
             for x in ([100 * v for v in accs] for accs in ACC.values())]
    diff = 100 * (statistics.mean(ACC["b"]) - statistics.mean(ACC["a"]))
    for text in (*shown, f"{diff:+.2f}", "ttest_rel", "1 div", "1 unf"):
        assert text in res.stdout
    data = json.loads(runner.invoke(app, ["compare", str(study / "study"), "--json", "--baseline", "b"]).stdout)
    assert data["baseline"] == "b" and data["paired"][0]["arm"] == "a"
    assert data["paired"][0]["mean"] == pytest.approx(-data["arms"][1]["acc_mean"] + data["arms"][0]["acc_mean"])
    # accuracies in percent, as `units` says (summary.json and `train --json` hold fractions of 1)
    assert data["units"]["runs.test_acc"] == "percent" and data["units"]["paired.mean"] == "percentage points"
    done = [r for r in data["runs"] if r["status"] == "done"]
    assert done and all(r["test_acc"] == pytest.approx(100 * json.loads(
        (Path(r["path"]) / "summary.json").read_text())["train"]["test_acc"]) for r in done)
    plot = tmp_path / "cmp.png"
    assert runner.invoke(app, ["compare", str(study / "study"), "--plot", str(plot)]).exit_code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --plot wrote a PNG over any file: a run's summary.json, the ONNX file a user named by mistake
    summary = next((study / "study").rglob("summary.json"))
    before = summary.read_bytes()
    for target, said in ((summary, ".png, .pdf, .svg"), (plot, "exists; pass --force")):
        r = runner.invoke(app, ["compare", str(study / "study"), "--plot", str(target)])
        assert r.exit_code == 2 and said in r.output and r.output.strip().count("\n") == 0, r.output
    assert summary.read_bytes() == before
    assert runner.invoke(app, ["compare", str(study / "study"), "--plot", str(plot), "--force"]).exit_code == 0
    svg = tmp_path / "cmp.svg"
    assert runner.invoke(app, ["compare", str(study / "study"), "--plot", str(svg)]).exit_code == 0
    assert b"<svg" in svg.read_bytes()[:400]
    bad = runner.invoke(app, ["compare", str(study / "study"), "--baseline", "zzz"])
    assert bad.exit_code == 2 and "not an arm" in bad.output and bad.output.strip().count("\n") == 0
    missing = runner.invoke(app, ["compare", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_runs_that_share_a_seed_are_not_paired_by_it(study, tmp_path):
    # Three loose runs whose masks differ (transform --seed) but trained with one --seed: keyed by seed,
    # they made three "pairs" of the last run against one baseline run (p 0, a CI of width 0)
    base = study / "base"
    runs = []
    for i, acc in enumerate(ACC["b"]):
        runs.append(tmp_path / f"b{i}")
        _fake_run(base, runs[-1], "b", 0, acc, job=False)
    runs.append(tmp_path / "a0")
    _fake_run(base, runs[-1], "a", 0, ACC["a"][0], job=False)
    c = compare(runs, baseline=None)
    (pair,) = c.paired
    assert pair.n == 0 and pair.p is None and pair.ci_low is None and pair.mean is None
    assert "share seed 0" in pair.note and "own --seed" in pair.note
    res = runner.invoke(app, ["compare", *map(str, runs), "--baseline", c.baseline])
    assert res.exit_code == 0 and "no paired test of" in res.output and "share seed 0" in res.output, res.output


def test_a_path_given_twice_is_counted_once(study, monkeypatch):
    """`compare A A` (or `A ./A/`, or a study and one of its runs) read each run twice: n 6 instead
    of 3 and a standard error shrunk by sqrt(2), with no word."""
    one = compare([study / "study"])
    monkeypatch.chdir(study)
    for paths in (["study", "study"], ["study", "./study/"], ["study", "study/a/seed-0"]):
        c = compare(paths)
        assert [(a.arm, a.n, a.acc_sem) for a in c.arms] == [(a.arm, a.n, a.acc_sem) for a in one.arms], paths
    loose = compare(["study/a/seed-0", "study/a/seed-1", "study/a/seed-0"])
    assert [a.n for a in loose.arms] == [2]


def test_two_studies_of_one_spec_name_stay_apart(study, tmp_path):
    """r.toml and v2/r.toml both name their study "r": their arms were pooled into r/a (n 6, seeds
    0, 0, 1, 1, ...) though one study trained 25 epochs and the other 2."""
    other = tmp_path / "other"
    shutil.copytree(study / "study", other)
    c = compare([study / "study", other])
    assert sorted(a.arm for a in c.arms) == sorted(f"{p}/{arm}" for p in (study / "study", other) for arm in "ab")
    assert all(a.n == 3 for a in c.arms)


def test_a_run_made_under_an_earlier_spec_is_not_counted(study, tmp_path):
    """A --force rerun after a spec change stopped before redoing every run: the old runs were
    averaged with the new ones as results of the new spec."""
    s = tmp_path / "s"
    shutil.copytree(study / "study", s)
    record = json.loads((s / "study.json").read_text())
    for arm in "ab":
        record["arms"][arm]["hashes"] = {str(seed): f"h{seed}" for seed in range(4)}
    (s / "study.json").write_text(json.dumps(record))
    for arm in "ab":
        for seed in range(3):
            job = json.loads((s / arm / f"seed-{seed}" / "study-job.json").read_text())
            job["hash"] = f"h{seed}" if seed != 1 else "made-under-the-old-spec"
            (s / arm / f"seed-{seed}" / "study-job.json").write_text(json.dumps(job))
    c = compare([s])
    assert c.arm("a").seeds == [0, 2] and c.arm("a").unfinished == 2
    assert c.arm("a").acc == pytest.approx([100 * ACC["a"][0], 100 * ACC["a"][2]])


def test_the_matched_arm_is_named_from_any_directory(study, tmp_path, monkeypatch):
    """The recipe keeps the matched run's path relative to where the study ran ("A/sr/seed-0"):
    from another directory compare said "conv of seed-0"."""
    s = tmp_path / "s"
    shutil.copytree(study / "study", s)
    for seed in range(3):
        run = s / "b" / f"seed-{seed}"
        recipe = json.loads((run / "recipe.json").read_text())
        recipe["params"]["match"] = {"run": f"elsewhere/a/seed-{seed}", "count": "conv"}
        (run / "recipe.json").write_text(json.dumps(recipe))
        job = json.loads((run / "study-job.json").read_text())
        job["key"]["match"] = "a"
        (run / "study-job.json").write_text(json.dumps(job))
    monkeypatch.chdir(tmp_path)
    assert (compare([s]).arm("b").matched, compare([s]).arm("b").matched_to) == ("conv", "a")
    assert compare([Path("s"), study / "study"]).arm("s/b").matched_to == "s/a"  # two studies named "t"


def test_loose_runs_of_an_edited_model_file_are_two_arms(study, tmp_path):
    """The group key left out the recipe's source_sha256: runs of a model file before and after an
    edit (width 16 -> 32) were averaged as one arm."""
    base = study / "base"
    for seed in (0, 1, 2):
        _fake_run(base, tmp_path / f"r{seed}", "a", seed, ACC["a"][seed], job=False)
    recipe = json.loads((tmp_path / "r2" / "recipe.json").read_text())
    recipe["source_sha256"] = "0" * 64  # the file held something else when this run was made
    (tmp_path / "r2" / "recipe.json").write_text(json.dumps(recipe))
    c = compare([tmp_path / f"r{seed}" for seed in (0, 1, 2)])
    assert sorted(a.n for a in c.arms) == [1, 2]


def test_a_loose_depth_run_names_the_renamed_arm_it_matched(tmp_path, monkeypatch):
    """Two loose arms of one label (sparse-random at 0.25, the second with its classifier masked
    too) are told apart as "sparse-random-d0.25" and "sparse-random-d0.25-2"; a depth-multiplier
    run matched to a run of the second said it matched the first (the label of the run it read)."""
    monkeypatch.chdir(tmp_path)
    a, _ = api.transform_to_dir("zoo:lenet5", density=0.25, out="a")
    b, _ = api.transform_to_dir("zoo:lenet5", density=0.25, include_classifier=True, out="b")
    c, _ = api.transform_to_dir("zoo:lenet5", "depth-multiplier", match=b, count="total", out="c")
    result = compare([a, b, c])
    arm_of = {Path(r.path).name: r.arm for r in result.runs}
    assert arm_of["a"] != arm_of["b"] and arm_of["b"].endswith("-2")
    assert result.arm(arm_of["c"]).matched_to == arm_of["b"]
    assert compare([b, c]).arm(arm_of["c"]).matched_to == "sparse-random-d0.25"
