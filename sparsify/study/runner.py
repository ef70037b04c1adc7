"""The study runner: every (arm, seed) of a spec as a run directory, trained side by side in processes.

Layout of a study directory::

    STUDY/spec.toml                 the spec as given (the latest invocation's)
    STUDY/study.json                arms, seeds, and every invocation (command, jobs, threads, wall time)
    STUDY/<arm>/seed-<s>/           one run directory per job (recipe, weights, metrics.jsonl, ...)
        study-job.json              what the job is (compared when the study is run again)
        study-status.json           written last: done (test accuracy) or diverged
    STUDY/logs/<arm>-seed-<s>.log   each worker's messages

Jobs run in separate processes (``sparsify.study.worker``), ``jobs`` at a time, each with
``threads`` intra-op threads (``OMP_NUM_THREADS`` and ``torch.set_num_threads``): oversubscribed
torch threads made a 2-thread training run 30x slower on a shared 2-core machine. Running a study
again skips finished jobs, resumes interrupted ones from their last epoch's checkpoint (or
retrains them from their initial weights when they have none) and starts the rest; a job whose
spec changed is refused unless ``force``, which redoes it (the old run stays until its job starts,
so a study stopped before then keeps it). Ctrl-C stops every worker; the study then resumes where
it stopped.
"""
from __future__ import annotations

import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .._io import atomic_path, check_writable, read_json, write_json
from ..errors import SparsifyError, UsageError
from ..machine import usable_cores
from .spec import LOGS, SPEC_COPY, STUDY_JSON, StudySpec, job_hash, job_key
from .worker import JOB, STATUS


class StudyError(SparsifyError):
    """A study that cannot go on: a job failed, or a directory holds something else."""


@dataclass
class Job:
    """One (arm, seed) of a study and its state."""

    arm: str
    seed: int
    run_dir: Path
    key: dict[str, Any]
    hash: str
    epochs: int
    match_run: Path | None = None
    depends_on: tuple[str, int] | None = None
    state: str = "pending"            # pending | running | done | diverged | failed
    resume: bool = False
    redo: bool = False                # a run of a changed spec (--force): removed when this job starts
    progress: float = 0.0             # epochs done (fractional) while running
    message: str = ""
    test_acc: float | None = None

    @property
    def id(self) -> tuple[str, int]:
        return (self.arm, self.seed)

    @property
    def log_name(self) -> str:
        return f"{self.arm}-seed-{self.seed}.log"


@dataclass
class StudyOutcome:
    """What one invocation did."""

    study_dir: Path
    total: int
    skipped: int
    done: int
    diverged: int
    wall_s: float
    jobs: list[Job] = field(default_factory=list)


Event = dict[str, Any]
OnEvent = Callable[[Event], None]


def run_dir_of(study_dir: Path, arm: str, seed: int) -> Path:
    return study_dir / arm / f"seed-{seed}"


def plan(spec: StudySpec, study_dir: str | Path, force: bool = False) -> list[Job]:
    """The jobs of ``spec`` in ``study_dir`` with their state on disk (done / diverged / pending, resume)."""
    from ..train.checkpoint import checkpoint_path
    from ..train.trainer import TrainConfig

    study_dir = Path(study_dir)
    jobs = []
    redone: set[tuple[str, int]] = set()  # (arm, seed) of the jobs whose spec changed
    contents: dict[tuple[str, str], str | None] = {}  # checksums of the named files, read once per plan
    for arm, seed in spec.jobs():
        key = _with_contents(job_key(arm, seed, spec.arms), contents)
        run_dir = run_dir_of(study_dir, arm.name, seed)
        job = Job(arm.name, seed, run_dir, key, job_hash(key), epochs=TrainConfig.from_dict(key["train"]).epochs)
        if arm.match is not None:
            job.depends_on = (arm.match, seed)
            job.match_run = run_dir_of(study_dir, arm.match, seed)
        if run_dir.exists():
            job_file = run_dir / JOB
            if not job_file.is_file():
                raise StudyError(f"{run_dir} exists but is not a run of this study (no {JOB}); remove it or "
                                 f"choose another --out")
            saved = json.loads(job_file.read_text())
            if _legacy_key(saved, key) and (arm.match, seed) not in redone:
                saved["hash"] = job.hash  # made before keys held the matched arm's / the files' checksums
            # the key holds the model file's and the data's checksums; a module the model file imports
            # is in the run's recipe (source_imports)
            changed, what = _first_difference(saved.get("key", {}), key) if saved.get("hash") != job.hash \
                else ("model", _model_change(run_dir))
            if what is not None:
                redone.add((arm.name, seed))
                if not force:
                    raise StudyError(f"the {changed} changed for arm {arm.name!r} seed {seed} since {run_dir} was "
                                     f"made ({what}); pass --force to redo the changed runs, or use another --out")
                # removed when its job starts, not here: a study stopped before then keeps the run
                job.redo = True
            else:
                status = read_json(run_dir / STATUS)
                if status.get("status") in ("done", "diverged"):
                    job.state = status["status"]
                    job.test_acc = status.get("test_acc")
                    job.progress = job.epochs
                else:
                    job.resume = checkpoint_path(run_dir).is_file()
        jobs.append(job)
    return jobs


def _model_change(run_dir: Path) -> str | None:
    """Why a study run's model file no longer holds what the run was made from (None: it does, or
    the run has no recipe yet): runs of an edited model file were pooled with the old model's."""
    from ..errors import RunDirError
    from ..replay import source_change
    from ..rundir import read_recipe

    try:
        return source_change(read_recipe(run_dir))
    except RunDirError:
        return None


# What a job key holds of the files it names (runner-side: the spec names them, their contents can
# change between invocations): the model file's sha256, the data's fingerprint.
CONTENT_KEYS = ("model_sha256", "data_fingerprint")


def _with_contents(key: dict[str, Any], cache: dict[tuple[str, str], str | None]) -> dict[str, Any]:
    """``key`` with what its model file and data hold, the matched arm's key too: an edited model
    file or a rebuilt .npz changes the job's hash, so the rerun redoes the run (and the arms that
    match it) and compare counts the old run as another spec's."""
    from ..models import model_file
    from .._io import file_sha256
    from ..train.data import data_fingerprint

    model, data = key["model"], str(key["train"].get("data", ""))
    if ("model", model) not in cache:
        file = model_file(model)
        cache[("model", model)] = file_sha256(file) if file is not None and file.is_file() else None
    if ("data", data) not in cache:
        cache[("data", data)] = data_fingerprint(data)
    out = {**key, "model_sha256": cache[("model", model)], "data_fingerprint": cache[("data", data)]}
    if isinstance(key.get("matched"), dict):
        out["matched"] = _with_contents(key["matched"], cache)
    return out


def _without(key: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: _without(v, names) if k == "matched" and isinstance(v, dict) else v
            for k, v in key.items() if k not in names}


def _legacy_key(saved: dict[str, Any], key: dict[str, Any]) -> bool:
    """True for a job file written before job keys held the matched arm's key or the files'
    checksums, whose key is otherwise the same (its model is checked through the run's recipe)."""
    old = saved.get("key")
    if not isinstance(old, dict):
        return False
    plain = _without(key, CONTENT_KEYS)
    return saved.get("hash") in (job_hash(plain), job_hash({k: v for k, v in plain.items() if k != "matched"})) \
        and not any(name in old for name in CONTENT_KEYS)


def _first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> tuple[str, str]:
    """(what changed: spec, model or data; how), for the refusal."""
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                return _first_difference(a, b, f"{prefix}{k}.")
            if k == "model_sha256" and a is not None:
                return "model", f"{new.get('model', '?')} changed" + (" (the matched arm's)" if prefix else "")
            if k == "data_fingerprint" and a is not None:
                return "data", f"data {new.get('train', {}).get('data', '?')} changed" + \
                    (" (the matched arm's)" if prefix else "")
            return "spec", f"{prefix}{k} was {a!r}, now {b!r}"
    return "spec", "unknown difference"


def default_study_dir(spec: StudySpec) -> Path:
    """``runs/study-<name>``."""
    return Path("runs") / f"study-{spec.name}"


def run_study(spec: StudySpec, study_dir: str | Path | None = None, *, jobs: int | None = None,
              threads: int | None = None, force: bool = False, on_event: OnEvent | None = None,
              command: list[str] | None = None) -> StudyOutcome:
    """Run (or resume) every job of ``spec`` under ``study_dir``; returns what was done.

    ``jobs`` processes run side by side (default: the usable cores), each with ``threads`` torch
    intra-op threads (default: cores // jobs, at least 1). ``on_event`` receives progress events
    (``plan``, ``job-start``, ``job-progress``, ``job-end``). Raises StudyError when a job fails
    (the other workers are stopped; every finished run stays) and KeyboardInterrupt on Ctrl-C
    after stopping the workers; rerunning resumes in both cases.
    """
    study_dir = Path(study_dir) if study_dir is not None else default_study_dir(spec)
    cores = usable_cores()
    jobs = cores if jobs is None else int(jobs)
    if jobs < 1:
        raise UsageError(f"--jobs {jobs} must be at least 1")
    threads = max(1, cores // jobs) if threads is None else int(threads)
    if threads < 1:
        raise UsageError(f"--threads {threads} must be at least 1")
    if study_dir.exists() and not study_dir.is_dir():
        raise UsageError(f"--out {study_dir} exists and is not a directory; choose another --out")
    if study_dir.is_dir() and any(study_dir.iterdir()) and not _is_study_record(study_dir / STUDY_JSON):
        # its spec.toml and study.json would be overwritten / merged into, its files mixed with runs
        raise UsageError(f"--out {study_dir} holds files that are not a study's (no study record {STUDY_JSON}); "
                         f"choose a new or empty --out")
    check_writable(study_dir, "--out ")  # a path that cannot be made: one line, before any work
    job_list = plan(spec, study_dir, force=force)
    study_dir.mkdir(parents=True, exist_ok=True)
    record = read_json(study_dir / STUDY_JSON)
    invocation = {"command": shlex.join(command) if command else None, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "jobs": jobs, "threads_per_job": threads, "cores": cores, "niceness": os.nice(0)}
    # A spec without [study] name is named after its file: resuming from another copy of it (the
    # study's own spec.toml) keeps the name the study has.
    name = spec.name if spec.named or not record.get("name") else record["name"]
    record.update(name=name, description=spec.description, baseline=spec.baseline,
                  spec=str(spec.path) if spec.path else None,
                  # where the spec's relative file names point (the study's own spec.toml copy keeps its text)
                  spec_dir=str(spec.base_dir) if spec.base_dir is not None else record.get("spec_dir"),
                  arms={a.name: {"method": a.method, "series": a.series, "match": a.match, "count": a.count,
                                 "seeds": a.seeds, "model": a.model,
                                 # compare counts a run only when it was made under this spec (its job hash)
                                 "hashes": {str(j.seed): j.hash for j in job_list if j.arm == a.name}}
                        for a in spec.arms.values()})
    record.setdefault("invocations", []).append(invocation)
    write_json(study_dir / STUDY_JSON, record)  # first: it marks the folder as a study's (see above)
    (study_dir / LOGS).mkdir(exist_ok=True)
    if spec.text:
        with atomic_path(study_dir / SPEC_COPY) as tmp:
            tmp.write_text(spec.text)

    emit = on_event or (lambda _e: None)
    skipped = sum(j.state in ("done", "diverged") for j in job_list)
    emit({"kind": "plan", "study_dir": str(study_dir), "jobs": job_list, "total": len(job_list), "skipped": skipped,
          "workers": jobs, "threads": threads})
    t0 = time.time()
    try:
        _Scheduler(job_list, study_dir, jobs, threads, emit).run()
    finally:
        wall = time.time() - t0
        invocation.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=round(wall, 1),
                          ran=sum(j.state in ("done", "diverged") for j in job_list) - skipped,
                          complete=all(j.state in ("done", "diverged") for j in job_list))
        write_json(study_dir / STUDY_JSON, record)
    return StudyOutcome(study_dir, len(job_list), skipped, sum(j.state == "done" for j in job_list),
                        sum(j.state == "diverged" for j in job_list), wall, job_list)


def _is_study_record(path: Path) -> bool:
    return isinstance(read_json(path).get("invocations"), list)


class _Worker:
    """A running worker process and the unread part of its output."""

    def __init__(self, job: Job, proc: subprocess.Popen, log: Any) -> None:
        self.job = job
        self.proc = proc
        self.log = log
        self.buffer = b""
        self.result: dict[str, Any] | None = None
        self.steps_per_epoch: int | None = None


class _Scheduler:
    """Starts workers as slots and dependencies allow, reads their events, stops them on error or Ctrl-C."""

    def __init__(self, jobs: list[Job], study_dir: Path, slots: int, threads: int, emit: OnEvent) -> None:
        self.jobs = jobs
        self.study_dir = study_dir
        self.slots = slots
        self.threads = threads
        self.emit = emit
        self.running: dict[int, _Worker] = {}
        self.selector = selectors.DefaultSelector()
        self.prepared = {j.id for j in jobs if (j.run_dir / JOB).is_file()}
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "PYTHONUNBUFFERED": "1"}

    def _ready(self) -> Job | None:
        for j in self.jobs:
            if j.state == "pending" and (j.depends_on is None or j.depends_on in self.prepared):
                return j
        return None

    def _start(self, job: Job) -> None:
        if job.redo:
            shutil.rmtree(job.run_dir)
            job.redo = False
        payload = {"run_dir": str(job.run_dir), "key": job.key, "hash": job.hash, "threads": self.threads,
                   "match_run": str(job.match_run) if job.match_run else None}
        log = open(self.study_dir / LOGS / job.log_name, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "sparsify.study.worker", json.dumps(payload)],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=self.env,
                                start_new_session=True)  # Ctrl-C reaches workers through the runner only
        w = _Worker(job, proc, log)
        self.running[proc.stdout.fileno()] = w
        self.selector.register(proc.stdout, selectors.EVENT_READ, w)
        job.state = "running"
        self.emit({"kind": "job-start", "job": job})

    def run(self) -> None:
        try:
            while True:
                while len(self.running) < self.slots and (job := self._ready()) is not None:
                    self._start(job)
                if not self.running:
                    stuck = [j for j in self.jobs if j.state == "pending"]
                    if stuck:  # cannot happen while every matched arm runs after its target; never end silently
                        raise StudyError(f"arm {stuck[0].arm!r} seed {stuck[0].seed} cannot start: the run it "
                                         f"matches ({stuck[0].depends_on[0]!r}) was not prepared")
                    break
                for key, _ in self.selector.select(timeout=0.5):
                    self._read(key.data)
                for w in list(self.running.values()):
                    if w.proc.poll() is not None:
                        self._read(w, final=True)
                        self._finish(w)
        except KeyboardInterrupt:
            self._stop_all()
            raise
        except BaseException:
            self._stop_all()
            raise

    def _read(self, w: _Worker, final: bool = False) -> None:
        fd = w.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                chunk = b""
            if not chunk:
                break
            w.buffer += chunk
            if not final:
                break
        *lines, w.buffer = w.buffer.split(b"\n")
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self._on_event(w, ev)

    def _on_event(self, w: _Worker, ev: dict[str, Any]) -> None:
        job, kind = w.job, ev.get("kind")
        if kind == "prepared":
            self.prepared.add(job.id)
        elif kind in ("start", "step", "epoch"):
            if kind == "start":
                w.steps_per_epoch = max(1, int(ev["total_steps"]) // max(int(ev["epochs"]), 1))
            spe = w.steps_per_epoch
            if kind == "epoch":
                job.progress = float(ev["epoch"])
            elif kind == "step" and spe:
                job.progress = int(ev["step"]) / spe
            elif kind == "start" and spe:
                job.progress = int(ev["start_step"]) / spe
            self.emit({"kind": "job-progress", "job": job, "event": ev})
        elif kind in ("end", "error"):
            w.result = ev

    def _finish(self, w: _Worker) -> None:
        self.selector.unregister(w.proc.stdout)
        del self.running[w.proc.stdout.fileno()]
        w.proc.stdout.close()
        w.log.close()
        job, res, code = w.job, w.result or {}, w.proc.returncode
        if res.get("kind") == "end":
            job.state = res["status"]
            job.test_acc = res.get("test_acc")
            job.message = res.get("message", "")
            job.progress = job.epochs
            self.emit({"kind": "job-end", "job": job, "wall_s": res.get("wall_s")})
            return
        job.state = "failed"
        job.message = res.get("message") or (f"the worker exited with code {code} (see "
                                             f"{self.study_dir / LOGS / job.log_name})")
        self.emit({"kind": "job-end", "job": job})
        self._stop_all()
        done = sum(j.state in ("done", "diverged") for j in self.jobs)
        raise StudyError(f"arm {job.arm!r} seed {job.seed} failed: {job.message}; fix it and run the study again "
                         f"to resume ({done} of {len(self.jobs)} runs are finished)")

    def _stop_all(self) -> None:
        """SIGINT every worker (each keeps its last finished epoch), then wait; kill what does not stop."""
        for w in self.running.values():
            if w.proc.poll() is None:
                try:
                    w.proc.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 30
        for w in list(self.running.values()):
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            try:
                self.selector.unregister(w.proc.stdout)
            except (KeyError, ValueError):
                pass
            w.proc.stdout.close()
            w.log.close()
            if w.job.state == "running":
                w.job.state = "pending"
        self.running.clear()
