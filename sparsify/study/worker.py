"""One study job in its own process: ``python -m sparsify.study.worker JOB_JSON``.

The runner starts one worker per (arm, seed) with ``OMP_NUM_THREADS`` set; the worker sets torch's
intra-op threads before torch does any work, transforms the run directory if it does not exist
yet, trains it (resuming its checkpoint if it has one), and writes ``study-status.json`` last.
Events go to stdout as JSON lines (see ``runner``); messages to stderr, which the runner keeps in
the study's ``logs/`` folder. Exit codes: 0 done or diverged, 2 a SparsifyError, 130 interrupted.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

JOB = "study-job.json"
STATUS = "study-status.json"

Emit = Callable[[dict[str, Any]], None]


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (torch did parallel work): harmless
        pass


def prepare(job: dict[str, Any]) -> None:
    """Transform the job's run directory atomically, with ``study-job.json`` inside it."""
    from .. import api
    from .._io import atomic_dir, write_json

    run_dir = Path(job["run_dir"])
    kwargs = dict(job["key"]["transform"])
    if job["key"]["match"] is not None:
        kwargs.update(match=job["match_run"], count=job["key"]["count"])
    shape = job["key"]["input_shape"]
    with atomic_dir(run_dir) as tmp:
        api.transform_to_dir(job["key"]["model"], job["key"]["method"], out=tmp, force=True, seed=job["key"]["seed"],
                             input_shape=tuple(shape) if shape else None, model_args=job["key"]["model_args"],
                             **kwargs)
        write_json(tmp / JOB, {"key": job["key"], "hash": job["hash"]})


def _last_event(metrics: Path) -> dict[str, Any]:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def run_job(job: dict[str, Any], emit: Emit, log: Callable[[str], None]) -> dict[str, Any]:
    """Prepare (if needed) and train one job; returns the status written to ``study-status.json``."""
    from .._io import write_json
    from ..errors import DivergenceError, RunDirError, TrainingError
    from ..rundir import is_run_dir
    from ..train.checkpoint import checkpoint_path
    from ..train.run import METRICS, train_run

    run_dir = Path(job["run_dir"])
    t0 = time.time()
    if not is_run_dir(run_dir):
        prepare(job)
    emit({"kind": "prepared"})
    config = dict(job["key"]["train"])
    resume = checkpoint_path(run_dir).is_file()
    last = {"t": 0.0}

    def progress(ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        now = time.time()
        if kind == "step" and now - last["t"] < 1.0:
            return
        last["t"] = now
        if kind in ("start", "step", "epoch"):
            emit({k: v for k, v in ev.items() if k in ("kind", "total_steps", "epochs", "start_step", "step", "epoch",
                                                         "val_acc", "train_loss")})

    try:
        try:
            result = train_run(run_dir, resume=resume, log=log, progress=progress, **config)
        except RunDirError as e:
            if not resume:
                raise
            log(f"cannot resume ({e}); training again from the run's weights")
            result = train_run(run_dir, force=True, log=log, progress=progress, **config)
    except TrainingError as e:
        last_event = _last_event(run_dir / METRICS)
        if last_event.get("event") != "diverged":
            raise
        # not the trainer's `sparsify train RUN --force --lr ...`: a study run retrained by hand is no
        # longer its spec's, and the study keeps skipping it as diverged
        message = (f"training diverged: {e.what}; lower lr in arm {job['key']['arm']}'s train settings (e.g. lr = "
                   f"{e.lr / 10:g}) and run the study again with --force" if isinstance(e, DivergenceError)
                   else str(e).splitlines()[0])
        status = {"status": "diverged", "message": message, "epoch": last_event.get("epoch"),
                  "hash": job["hash"], "wall_s": round(time.time() - t0, 1)}
        write_json(run_dir / STATUS, status)
        return status
    status = {"status": "done", "test_acc": result["test_acc"], "resumed": resume, "hash": job["hash"],
              "wall_s": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(run_dir / STATUS, status)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(argv[0])
    # SIGTERM from the runner: stop like Ctrl-C (the last epoch's checkpoint stays, outputs are atomic)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _set_threads(int(job["threads"]))

    def emit(ev: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    def log(message: str) -> None:
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        sys.stderr.flush()

    from ..errors import SparsifyError

    log(f"job {job['key']['arm']} seed {job['key']['seed']} in {job['run_dir']} (pid {os.getpid()}, "
        f"{job['threads']} thread(s))")
    try:
        status = run_job(job, emit, log)
        emit({"kind": "end", **status})
        log(f"{status['status']}")
        return 0
    except KeyboardInterrupt:
        log("interrupted; the run resumes from its last finished epoch")
        return 130
    except BrokenPipeError:  # the runner is gone
        return 141
    except SparsifyError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        log(f"error: {message}")
        try:
            emit({"kind": "error", "message": message})
        except BrokenPipeError:
            pass
        return 2
    except Exception as e:  # a bug: keep the traceback in the log, one line for the runner
        log(traceback.format_exc())
        try:
            emit({"kind": "error", "message": f"{type(e).__name__}: {e} (a bug; the traceback is in the log)"})
        except BrokenPipeError:
            pass
        return 3


if __name__ == "__main__":
    sys.exit(main())
