"""sparsify study: a tiny spec end to end, skipping finished runs, resuming after a killed worker and Ctrl-C."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsify.cli import app
from sparsify.study.runner import plan
from sparsify.study.spec import load_spec
from sparsify.train.run import metrics_in_progress

runner = CliRunner()

TINY = """
[study]
model = "zoo:mlp"
model_args = { hidden = [16] }
seeds = 2
baseline = "dense"
[train]
data = "digits"
epochs = 1
batch_size = 64
train_limit = 320
[arms.dense]
method = "none"
[arms.sparse]
method = "sparse-random"
density = 0.3
train = { schedule = "set" }
"""


def _status(run: Path) -> dict:
    return json.loads((run / "study-status.json").read_text())


def test_tiny_study_runs_every_arm_and_seed_then_skips_them(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    out = tmp_path / "study"
    res = runner.invoke(app, ["study", str(spec), "--out", str(out), "--jobs", "2", "-q"])
    assert res.exit_code == 0, res.output
    runs = [out / arm / f"seed-{s}" for arm in ("dense", "sparse") for s in (0, 1)]
    for run in runs:
        status = _status(run)
        assert status["status"] == "done" and 0 <= status["test_acc"] <= 1
        summary = json.loads((run / "summary.json").read_text())
        assert summary["train"]["test_acc"] == status["test_acc"]
        assert summary["train"]["config"]["seed"] == int(run.name.split("-")[1])
        start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert start["threads"] == 1 and start["omp_num_threads"] == "1"  # two jobs side by side: one thread each
    assert json.loads((runs[2] / "summary.json").read_text())["train"]["schedule"] == "set"
    record = json.loads((out / "study.json").read_text())
    assert record["invocations"][0]["complete"] and record["invocations"][0]["jobs"] == 2
    # each run's job hash, which compare checks a run against (runs made under an earlier spec)
    assert {arm: info["hashes"] for arm, info in record["arms"].items()} == {
        arm: {str(s): json.loads((out / arm / f"seed-{s}" / "study-job.json").read_text())["hash"] for s in (0, 1)}
        for arm in ("dense", "sparse")}
    assert (out / "spec.toml").read_text() == TINY
    before = {r: (r / "study-status.json").read_bytes() for r in runs}
    again = runner.invoke(app, ["study", str(spec), "--out", str(out), "-q"])
    assert again.exit_code == 0 and "4 already finished, 0 trained now" in again.stdout
    assert {r: (r / "study-status.json").read_bytes() for r in runs} == before
    # resumed from the study's own copy of the spec (no [study] name): the study keeps its name
    copy = runner.invoke(app, ["study", str(out / "spec.toml"), "--out", str(out), "-q"])
    assert copy.exit_code == 0 and "4 already finished" in copy.stdout
    record = json.loads((out / "study.json").read_text())
    assert record["name"] == "tiny" and len(record["invocations"]) == 3
    # a changed spec is refused for the runs it changes, and --force redoes only those
    spec.write_text(TINY.replace("density = 0.3", "density = 0.4"))
    changed = runner.invoke(app, ["study", str(spec), "--out", str(out), "-q"])
    assert changed.exit_code == 2 and "spec changed for arm 'sparse'" in changed.output
    assert "transform.density was 0.3, now 0.4" in changed.output
    # --force removed every changed run while planning: a study stopped before it reached one lost it
    jobs = plan(load_spec(spec), out, force=True)
    assert sorted((j.arm, j.redo) for j in jobs) == [("dense", False)] * 2 + [("sparse", True)] * 2
    assert {r: (r / "study-status.json").read_bytes() for r in runs} == before
    forced = runner.invoke(app, ["study", str(spec), "--out", str(out), "-q", "--force"])
    assert forced.exit_code == 0 and "2 already finished, 2 trained now" in forced.stdout
    assert json.loads((runs[2] / "recipe.json").read_text())["params"]["density"] == 0.4


SLOW = """
[study]
model = "zoo:mlp"
model_args = { hidden = [16] }
seeds = [0]
[train]
data = "digits"
batch_size = 8
lr = 0.05
[arms.first]
method = "none"
train = { epochs = 1 }
[arms.second]
method = "sparse-random"
density = 0.3
train = { epochs = 8 }
"""


def _start(spec: Path, out: Path) -> subprocess.Popen:
    code = "import sys; from sparsify.cli import main; sys.argv = ['sparsify'] + sys.argv[1:]; main()"
    # SIGINT at its default in the runner, as started from a terminal: a shell's background job (CI
    # under `&`) passes SIGINT ignored to its children, and the Ctrl-C below would never arrive
    return subprocess.Popen([sys.executable, "-c", code, "study", str(spec), "--out", str(out), "--jobs", "1", "--threads", "1",
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the study ended before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _epochs_done(run: Path) -> int:
    """Epochs of the training in progress (its metrics reach RUN/metrics.jsonl when it completes)."""
    try:
        lines = metrics_in_progress(run).read_text().splitlines()
    except OSError:
        return 0
    return sum(json.loads(s)["event"] == "epoch" for s in lines if s.strip())


@pytest.mark.heavy  # three study invocations with worker start-up: 30-60 s, outside CI's 15 minutes
def test_killed_worker_and_ctrl_c_resume_without_redoing_finished_runs(tmp_path):
    spec = tmp_path / "slow.toml"
    spec.write_text(textwrap.dedent(SLOW))
    out = tmp_path / "study"
    first, second = out / "first" / "seed-0", out / "second" / "seed-0"

    # 1. kill the second run's worker midway: the study reports the failure in one line, exit 2
    proc = _start(spec, out)
    _wait_for(lambda: (first / "study-status.json").is_file() and _epochs_done(second) >= 2, proc, "epoch 2")
    pid = int(re.search(r"pid (\d+)", (out / "logs" / "second-seed-0.log").read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "arm 'second' seed 0 failed" in stderr and "1 of 2 runs are finished" in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr  # progress lines, then the one error line
    finished_first = (first / "study-status.json").read_bytes()
    assert not (second / "study-status.json").exists()
    killed_at = _epochs_done(second)

    # 2. rerun, then Ctrl-C (SIGINT to the runner) after one more epoch: exit 130, resumable
    proc = _start(spec, out)
    _wait_for(lambda: _epochs_done(second) > killed_at, proc, "an epoch after resuming")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: 1 of 2 runs are finished; run the same command again to resume" in stderr

    # 3. rerun to the end: the finished run is not redone, the second resumes from its checkpoint
    res = runner.invoke(app, ["study", str(spec), "--out", str(out), "--jobs", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert (first / "study-status.json").read_bytes() == finished_first
    status = _status(second)
    assert status["status"] == "done" and status["resumed"]
    lines = [json.loads(s) for s in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["event"] == "epoch"] == list(range(1, 9))  # each epoch once
    assert [r["event"] for r in lines].count("start") == 1
    log = (out / "logs" / "second-seed-0.log").read_text()
    assert log.count("resuming after epoch") == 2
    record = json.loads((out / "study.json").read_text())
    assert [i["complete"] for i in record["invocations"]] == [False, False, True]


@pytest.mark.parametrize("where", ["a-file", "a-file/sub"])
def test_an_out_that_cannot_be_made_is_one_line_before_any_work(tmp_path, where):
    # os.mkdir's FileExistsError / NotADirectoryError came out as a 50-line traceback, exit 1
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    (tmp_path / "a-file").write_text("")
    res = runner.invoke(app, ["study", str(spec), "--out", str(tmp_path / where), "-q"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "--out" in res.output and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "tiny.toml"]


@pytest.mark.parametrize("record", [None, '{"mine": true}', "[]"])
def test_an_out_with_the_users_files_is_refused_not_overwritten(tmp_path, record):
    # study --out . in a project folder overwrote its spec.toml and merged into its study.json
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "spec.toml").write_text("# my notes")
    if record is not None:
        (proj / "study.json").write_text(record)
    before = {p.name: p.read_bytes() for p in proj.iterdir()}
    res = runner.invoke(app, ["study", str(spec), "--out", str(proj), "-q"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "not a study's" in res.output
    assert {p.name: p.read_bytes() for p in proj.iterdir()} == before


MATCHED = """
[study]
model = "zoo:mlp"
seeds = 1
[train]
data = "digits"
epochs = 1
[arms.sparse]
method = "sparse-random"
density = 0.1
[arms.depth]
method = "depth-multiplier"
match = "sparse"
count = "conv"
"""


def _finish(jobs, legacy: bool = False) -> None:
    """Write the job files a finished study leaves (as worker.py does); ``legacy``: keys as written
    before they held the matched arm's key."""
    from sparsify.study.runner import CONTENT_KEYS
    from sparsify.study.spec import job_hash

    for j in jobs:
        # before keys held the matched arm's key and the files' checksums
        key = {k: v for k, v in j.key.items() if k != "matched" and k not in CONTENT_KEYS} if legacy else j.key
        j.run_dir.mkdir(parents=True)
        (j.run_dir.parent.parent / "study.json").write_text(json.dumps({"invocations": []}))
        (j.run_dir / "study-job.json").write_text(json.dumps({"key": key, "hash": job_hash(key)}))
        (j.run_dir / "study-status.json").write_text(json.dumps({"status": "done", "test_acc": 0.5}))


@pytest.mark.parametrize("legacy", [False, True])
def test_changing_the_matched_arm_redoes_the_arm_that_matches_it(tmp_path, legacy):
    # the depth arm's alpha was chosen for the sparse arm's old parameter count: --force redid only
    # the sparse arm, and compare said "conv of sparse" for counts 3x apart
    spec = tmp_path / "s.toml"
    spec.write_text(MATCHED)
    out = tmp_path / "study"
    _finish(plan(load_spec(spec), out), legacy)
    assert [j.state for j in plan(load_spec(spec), out)] == ["done", "done"]  # unchanged: nothing to redo
    spec.write_text(MATCHED.replace("density = 0.1", "density = 0.3"))
    changed = runner.invoke(app, ["study", str(spec), "--out", str(out), "-q"])
    assert changed.exit_code == 2 and "spec changed for arm 'sparse'" in changed.output
    assert sorted((j.arm, j.redo) for j in plan(load_spec(spec), out, force=True)) == [("depth", True),
                                                                                       ("sparse", True)]
    if not legacy:  # the matching arm's refusal names the matched arm's setting that moved
        from sparsify.study.runner import StudyError

        (out / "sparse").rename(tmp_path / "gone")  # so that the depth arm's refusal is the first
        spec.write_text(MATCHED.replace("density = 0.1", "density = 0.2"))
        with pytest.raises(StudyError, match="matched.transform.density was 0.1, now 0.2"):
            plan(load_spec(spec), out)


TINY_MODEL = """
import torch.nn as nn
INPUT_SHAPE = (1, 1, 8, 8)
def build_model(width=16):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 10))
"""


def test_editing_the_model_file_redoes_its_runs(tmp_path):
    """The job key names the model file, not what it holds: after an edit (width 16 -> 32) the rerun
    said "already finished" for the old runs and trained only new seeds, and compare averaged the
    two models in one arm."""
    from sparsify import api
    from sparsify.study.runner import StudyError

    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nmodel = "tiny.py"\nseeds = 1\n[train]\ndata = "digits"\nepochs = 1\n'
                    '[arms.sr]\nmethod = "sparse-random"\ndensity = 0.3\n')
    out = tmp_path / "study"
    (job,) = plan(load_spec(spec), out)
    api.transform_to_dir(job.key["model"], "sparse-random", density=0.3, seed=0, out=job.run_dir)
    (job.run_dir / "study-job.json").write_text(json.dumps({"key": job.key, "hash": job.hash}))
    (job.run_dir / "study-status.json").write_text(json.dumps({"status": "done", "test_acc": 0.5}))
    assert [j.state for j in plan(load_spec(spec), out)] == ["done"]
    model.write_text(TINY_MODEL.replace("width=16", "width=32"))
    with pytest.raises(StudyError, match=r"^the model changed for arm 'sr' seed 0 since .* \(.*tiny.py changed\); "
                                         r"pass --force"):
        plan(load_spec(spec), out)
    assert [(j.state, j.redo) for j in plan(load_spec(spec), out, force=True)] == [("pending", True)]


def test_a_diverged_study_run_advises_changing_the_spec(tmp_path):
    """It advised `sparsify train RUN --force --lr ...`: a run retrained by hand is no longer its
    spec's, and the study went on skipping it as diverged."""
    from sparsify.study.worker import run_job

    spec = tmp_path / "s.toml"
    spec.write_text(TINY.replace("epochs = 1", "epochs = 1\nlr = 1e30").split("[arms.sparse]")[0])
    (job,) = [j for j in plan(load_spec(spec), tmp_path / "study") if j.seed == 0]
    status = run_job({"run_dir": str(job.run_dir), "key": job.key, "hash": job.hash, "match_run": None},
                     lambda ev: None, lambda msg: None)
    assert status["status"] == "diverged"
    assert re.fullmatch(r"training diverged: .*; lower lr in arm dense's train settings \(e\.g\. lr = 1e\+29\) "
                        r"and run the study again with --force", status["message"]), status["message"]


def test_resuming_from_the_studys_own_spec_copy_reads_relative_paths_where_the_spec_was(tmp_path, monkeypatch):
    """The copy (OUT/spec.toml) holds the original text: `data = "d.npz"` beside the original spec
    was looked for beside the copy ("data d.npz: no such file")."""
    import numpy as np

    specs = tmp_path / "specs"
    specs.mkdir()
    rng = np.random.default_rng(0)
    np.savez(specs / "d.npz", x=rng.random((40, 28, 28)).astype(np.float32), y=np.arange(40) % 4)
    (specs / "s.toml").write_text(TINY.replace('data = "digits"', 'data = "d.npz"').replace("seeds = 2", "seeds = 1")
                                  .replace("train_limit = 320\n", ""))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    first = runner.invoke(app, ["study", "../specs/s.toml", "--out", "st", "-q"])
    assert first.exit_code == 0, first.output
    monkeypatch.chdir(tmp_path)
    again = runner.invoke(app, ["study", "cwd/st/spec.toml", "--out", "cwd/st", "-q"])
    assert again.exit_code == 0 and "2 already finished, 0 trained now" in again.stdout, again.output


def test_rebuilding_the_data_file_redoes_its_runs(tmp_path):
    """The spec names d.npz; rebuilt in place between two `study` invocations, the finished runs of
    the old data were kept as results of the new (the model file's edit, above, likewise)."""
    import numpy as np

    from sparsify.study.runner import StudyError
    from sparsify.study.worker import prepare

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((40, 28, 28)).astype(np.float32), y=np.arange(40) % 4)
    spec = tmp_path / "s.toml"
    spec.write_text(TINY.replace('data = "digits"', 'data = "d.npz"').replace("seeds = 2", "seeds = 1")
                    .split("[arms.sparse]")[0])
    out = tmp_path / "study"
    (job,) = plan(load_spec(spec), out)
    prepare({"run_dir": str(job.run_dir), "key": job.key, "hash": job.hash, "match_run": None})
    (job.run_dir / "study-status.json").write_text(json.dumps({"status": "done", "test_acc": 0.5}))
    assert [j.state for j in plan(load_spec(spec), out)] == ["done"]
    np.savez(tmp_path / "d.npz", x=rng.random((40, 28, 28)).astype(np.float32), y=np.arange(40) % 4)
    with pytest.raises(StudyError, match=r"^the data changed for arm 'dense' seed 0 since .* \(data .*d\.npz changed\)"):
        plan(load_spec(spec), out)
    assert [j.redo for j in plan(load_spec(spec), out, force=True)] == [True]


def test_editing_the_matched_arms_model_file_redoes_the_arm_that_matches_it(tmp_path):
    """The depth arm (its own model file b.py) matches the sparse arm's parameter count (a.py): a.py
    edited, --force redid only the sparse arm, and compare paired a depth alpha chosen for the old
    model; an interrupted --force left the old runs counted (the job hash did not cover the file)."""
    (tmp_path / "a.py").write_text(TINY_MODEL)
    (tmp_path / "b.py").write_text(TINY_MODEL)
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nmodel = "a.py"\nseeds = 1\n[train]\ndata = "digits"\nepochs = 1\n'
                    '[arms.sparse]\nmethod = "sparse-random"\ndensity = 0.3\n'
                    '[arms.depth]\nmodel = "b.py"\nmethod = "depth-multiplier"\nmatch = "sparse"\ncount = "conv"\n')
    out = tmp_path / "study"
    jobs = plan(load_spec(spec), out)
    _finish(jobs)
    assert [j.state for j in plan(load_spec(spec), out)] == ["done", "done"]
    (tmp_path / "a.py").write_text(TINY_MODEL.replace("width=16", "width=32"))
    again = plan(load_spec(spec), out, force=True)
    assert [(j.arm, j.redo) for j in again] == [("sparse", True), ("depth", True)]
    assert all(j.hash != old.hash for j, old in zip(again, jobs))  # what compare checks each run against
    from sparsify.study.runner import StudyError

    with pytest.raises(StudyError, match=r"the model changed for arm 'sparse' seed 0 .*a\.py changed\)"):
        plan(load_spec(spec), out)
