"""Latency benchmark of ONNX files in ONNX Runtime, measured side by side.

``bench_files`` times every (file, batch size, threads) combination with the same random input,
interleaving the files in bursts so that machine noise hits all variants alike, and reports
median / p10 / p90 latency, throughput, speedup against the first file (the baseline), peak RSS,
and whether the native ``ai.sparsify::SparseConv`` kernel ran. ``time_bursts`` is the one latency
loop (also of ``benchmarks/``); ``_probe_peak_rss`` measures a variant's peak RSS in a fresh process.
Making the variants of a run and drawing the figure is ``sparsify.pipeline``'s.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._io import write_json
from ..errors import RuntimeBackendError, UsageError
from . import native as _native
from .onnx_sparse import SPARSE_OPS

from .onnx_sparse import DOMAIN as SPARSE_DOMAIN
BURSTS = 5  # interleaved bursts per variant and configuration (min_time / BURSTS seconds each)


@dataclass
class FileInfo:
    """What bench learned about one ONNX file before timing it."""

    path: str
    label: str
    input_name: str
    input_shape: list[int | str]      # as declared; dim 0 is the batch (int if fixed, else its name)
    sparse_nodes: int                 # ai.sparsify nodes in the main graph
    conv_nodes: int                   # plain Conv nodes in the main graph
    native: bool                      # the native kernel ran (seen in an ORT profile of one run)
    extra_inputs: list[tuple[str, list[int | str]]] = field(default_factory=list)  # a model's further inputs

    def feed(self, batch: int, rng: np.random.Generator, first: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Random float32 data for every input at ``batch`` (``first`` for the first input if given)."""
        x = first if first is not None else rng.standard_normal([batch] + [int(d) for d in self.input_shape[1:]],
                                                               dtype=np.float32)
        feed = {self.input_name: x}
        for name, dims in self.extra_inputs:
            feed[name] = rng.standard_normal([batch] + [int(d) for d in dims[1:]], dtype=np.float32)
        return feed


@dataclass
class BenchRow:
    """Latency of one (file, batch size, threads) combination."""

    label: str
    batch: int
    threads: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    throughput: float                 # samples per second at the median latency
    speedup: float                    # baseline median / this median, same batch and threads
    samples: int
    peak_rss_mb: float | None         # peak RSS of a fresh process that loads this file and runs this batch
    rss_increase_mb: float | None     # that peak minus the peak of a process that only imports ORT
    native: bool
    max_abs_diff: float | None        # max |output - baseline output| on the same input (None: shapes differ)
    max_rel_diff: float | None        # max_abs_diff / max |baseline output|


@dataclass
class BenchResult:
    """Everything one bench measured, serialisable with ``to_json``."""

    files: list[FileInfo]
    rows: list[BenchRow]
    settings: dict[str, Any]
    environment: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)   # how the variants were made (depth alpha, ...)

    @property
    def baseline(self) -> str:
        """Label of the baseline file (the first one)."""
        return self.files[0].label

    def row(self, label: str, batch: int, threads: int) -> BenchRow:
        """The row of ``label`` at (batch, threads); KeyError if absent."""
        for r in self.rows:
            if r.label == label and r.batch == batch and r.threads == threads:
                return r
        raise KeyError((label, batch, threads))

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``bench.json``."""
        return {
            "baseline": self.baseline,
            "files": [dataclasses.asdict(f) for f in self.files],
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "settings": self.settings,
            "environment": self.environment,
            "notes": self.notes,
        }


# ---------------------------------------------------------------- native kernel / sessions


def native_status() -> dict[str, Any]:
    """Whether the native kernel library can be registered, and ORT's version."""
    import onnxruntime as ort

    status: dict[str, Any] = {"onnxruntime": ort.__version__, "library": None, "loadable": False, "why_not": None}
    try:
        info = dict(_native.info())
    except Exception as e:  # a broken build must not stop a dense benchmark
        status["why_not"] = f"native.info() failed: {e}"
        return status
    status.update({k: v for k, v in info.items() if k not in ("onnxruntime_version", "reason")})
    status["loadable"] = bool(info.get("loadable"))
    status["why_not"] = None if status["loadable"] else (info.get("reason") or "the native library is not loadable")
    return status


def native_kernel_ran(path: str | Path, input_name: str, x: np.ndarray,
                      extra: dict[str, np.ndarray] | None = None) -> bool:
    """Run ``path`` once with ORT profiling and tell whether a node executed as the native SparseConv kernel.

    Without the library ORT inlines each SparseConv's function body (ScatterElements + Conv), so a
    profiled node whose op is SparseConv proves the native kernel ran.
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sparsify-prof-") as tmp:
        sess = make_session(path, 1, native=True, profile_prefix=str(Path(tmp) / "prof"))
        sess.run(None, {input_name: x, **(extra or {})})
        events = json.loads(Path(sess.end_profiling()).read_text())
    return any(e.get("cat") == "Node" and (e.get("args") or {}).get("op_name") in SPARSE_OPS for e in events)


def make_session(path: str | Path, threads: int, native: bool = True, spinning: bool = True,
                 profile_prefix: str | None = None) -> Any:
    """A benchmark session: ``native.session`` with ``threads`` intra-op threads.

    Spinning workers (ORT's default, what a deployment runs) keep a core busy for a while after
    each run; ``time_bursts`` lets them settle before another session's burst.
    """
    return _native.session(path, intra_op_threads=threads, native=native, spinning=spinning,
                           profile_prefix=profile_prefix)


# ---------------------------------------------------------------- inspecting the files


def _inspect(path: Path, label: str) -> FileInfo:
    """Read the file's float inputs and count its sparse / Conv nodes; clear errors otherwise."""
    import onnx

    if not path.is_file():
        raise RuntimeBackendError(f"{path} does not exist; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise RuntimeBackendError(
            f"{path} is not a readable ONNX model ({type(e).__name__}); re-export it with `sparsify export`"
        ) from None
    from .onnx_inspect import validate_model
    from .per_image import unsplit

    validate_model(model, path)
    graph = unsplit(model).graph
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if not inputs:
        raise UsageError(f"{path} has no inputs; bench feeds random float32 tensors, export a model with inputs")
    shapes = [_input_dims(path, i) for i in inputs]
    inp, dims = inputs[0], shapes[0]
    sparse = sum(1 for n in graph.node if n.domain == SPARSE_DOMAIN)
    conv = sum(1 for n in graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx"))
    return FileInfo(
        path=str(path), label=label, input_name=inp.name, input_shape=dims,
        sparse_nodes=sparse, conv_nodes=conv, native=False,
        extra_inputs=[(i.name, d) for i, d in zip(inputs[1:], shapes[1:])],
    )


def _input_dims(path: Path, inp: Any) -> list[int | str]:
    """An input's declared dims (batch may be symbolic); UsageError for what bench cannot feed."""
    import onnx

    tt = inp.type.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise UsageError(f"{path}: input {inp.name!r} is not float32; bench feeds random float32 data")
    dims: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif i == 0:
            dims.append(d.dim_param or "N")
        else:
            raise UsageError(
                f"{path}: input dimension {i} is symbolic ({d.dim_param or '?'}); bench needs fixed non-batch dims, "
                "export with a concrete input shape"
            )
    if not dims:
        raise UsageError(f"{path}: input {inp.name!r} has no shape; export with a concrete input shape")
    return dims


def _check_shapes(files: Sequence[FileInfo], batch_sizes: Sequence[int]) -> None:
    """Refuse files whose inputs differ beyond the batch dim, or whose fixed batch cannot serve a batch size."""
    ref = files[0]
    for f in files[1:]:
        if f.input_shape[1:] != ref.input_shape[1:] or [d[1:] for _, d in f.extra_inputs] != \
                [d[1:] for _, d in ref.extra_inputs]:
            def inputs(x: FileInfo) -> str:
                shapes = [x.input_shape] + [d for _, d in x.extra_inputs]
                n = len(shapes)
                return (f"{n} inputs " if n > 1 else "") + " and ".join(_shape_str(d) for d in shapes)

            raise UsageError(
                f"input shapes differ: {ref.path} takes {inputs(ref)} but {f.path} takes {inputs(f)}; bench "
                f"compares variants of one model, give files with the same inputs"
            )
    for f in files:
        b0 = f.input_shape[0]
        if isinstance(b0, int):
            bad = [b for b in batch_sizes if b != b0]
            if bad:
                raise UsageError(
                    f"{f.path} has a fixed batch size {b0} but --batch-size asks for {bad[0]}; "
                    f"use --batch-size {b0} or re-export with a dynamic batch dimension"
                )


def _shape_str(shape: Sequence[int | str]) -> str:
    return "x".join(str(d) for d in shape)


# ---------------------------------------------------------------- memory

_MEMORY_PROBE = r"""
import json, resource, sys
try:  # when memory runs out, the kernel's out-of-memory killer takes this probe, not the bench
    with open("/proc/self/oom_score_adj", "w") as fh:
        fh.write("1000")
except OSError:
    pass
args = json.loads(sys.argv[1])
import numpy as np
import onnxruntime as ort
if args["path"]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if args["library"]:
        so.register_custom_ops_library(args["library"])
    sess = ort.InferenceSession(args["path"], so, providers=["CPUExecutionProvider"])
    feed = {args["input"]: np.zeros(args["shape"], dtype=np.float32)}
    feed.update({k: np.zeros(v, dtype=np.float32) for k, v in args.get("extra", {}).items()})
    for _ in range(2):
        sess.run(None, feed)
peak = 0.0
try:
    with open("/proc/self/status") as fh:
        peak = next(int(l.split()[1]) / 1024.0 for l in fh if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps(peak))
"""


# What ONNX Runtime and Python say when an allocation fails (an address-space limit, no overcommit).
_OUT_OF_MEMORY = ("Failed to allocate memory", "bad_alloc", "MemoryError")


def _probe_peak_rss(path: str | None, input_name: str = "", shape: Sequence[int] = (), library: str | None = None,
                    extra: dict[str, Sequence[int]] | None = None) -> float:
    """Peak RSS (MiB) of a fresh process that imports ORT and, with ``path``, loads it and runs it twice.

    A separate process gives each variant its own honest peak: in this process the allocator keeps
    memory from earlier work resident, which hides what a session really needs. It is also the
    bench's guard against running out of memory: the probe runs before this process loads the
    file, and offers itself to the out-of-memory killer first (oom_score_adj 1000).

    Raises RuntimeBackendError when the probe fails; out of memory (killed by SIGKILL, or an
    allocation failure) is said as such, with what to do.
    """
    import json
    import signal
    import subprocess
    import sys

    args = json.dumps({"path": path, "input": input_name, "shape": list(shape), "library": library,
                       "extra": {k: list(v) for k, v in (extra or {}).items()}})
    try:
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, args], capture_output=True, text=True,
                              timeout=600, check=True)
        return float(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
        code = getattr(e, "returncode", None)  # negative: the signal that ended the probe
        killed = code == -signal.SIGKILL
        detail = (getattr(e, "stderr", "") or "").strip()
        if path is not None and (killed or any(m in detail for m in _OUT_OF_MEMORY)):
            batch = f" at batch {shape[0]}" if shape else ""
            how = "killed, by the out-of-memory killer most likely" if killed else "refused memory"
            raise RuntimeBackendError(f"{path} does not fit in memory{batch} (the process measuring it was {how}, "
                                      f"beside the variants already loaded); use a smaller --batch-size") from None
        why = (detail.splitlines()[-1][:160] if detail else f"exit status {code}" if isinstance(code, int)
               else type(e).__name__)
        raise RuntimeBackendError(f"measuring the memory of {path or 'onnxruntime'} failed ({why}); "
                                  "pass memory=False (--no-memory) to skip it") from None


# ---------------------------------------------------------------- timing


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def bench_files(
    paths: Sequence[str | Path] | str | Path,
    batch_sizes: Sequence[int] = (1,),
    threads: Sequence[int] = (1,),
    *,
    labels: Sequence[str] | None = None,
    warmup: int = 5,
    min_time: float = 0.5,
    repeats: int = 10,
    max_repeats: int = 2000,
    native: bool = True,
    spinning: bool = True,
    memory: bool = True,
    seed: int = 0,
    progress: Any | None = None,
    reference: int | None = 0,
) -> BenchResult:
    """Time each file at each (batch, threads) with the same random input; the first file is the baseline.

    Outputs are compared (``max_abs_diff``, ``max_rel_diff``) with those of file ``reference`` (an
    index into ``paths``; None: no comparison, for files that are different models).

    Every file is warmed up ``warmup`` runs, then the files are timed in interleaved bursts
    (``time_bursts``: BURSTS rounds, rotating who goes first, each burst re-warmed by one untimed
    run) until each has ``repeats`` runs and ``min_time`` seconds of measured runs, or
    ``max_repeats`` runs. ``spinning``: ORT's worker threads spin between runs, its default.
    With ``memory``, each (file, batch) is also loaded in a fresh process
    to measure its peak RSS. ``progress(description, done, total)`` is called between steps when given.
    """
    if isinstance(paths, (str, os.PathLike)):  # one file: a string was read letter by letter
        paths = [paths]
    if not paths:
        raise UsageError("bench needs at least one .onnx file (the first one is the baseline)")
    batch_sizes = _positive("--batch-size", batch_sizes)
    threads = _positive("--threads", threads, most=1024)
    check_settings(warmup=warmup, min_time=min_time, repeats=repeats, max_repeats=max_repeats)
    paths = [Path(p) for p in paths]
    labels = list(labels) if labels is not None else _default_labels(paths)
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
        raise UsageError("bench needs one distinct label per file")

    cpu_before = _cpu_seconds()  # what the machine and this process had used when the work started
    status = native_status()
    native_ok = bool(native and status["loadable"])
    files = [_inspect(p, lab) for p, lab in zip(paths, labels)]
    _check_shapes(files, batch_sizes)

    rng = np.random.default_rng(seed)
    for f in files:
        if f.sparse_nodes and native_ok:
            # at batch 1 where the batch is free: the memory probe guards the batch sizes asked for
            b = f.input_shape[0] if isinstance(f.input_shape[0], int) else 1
            probe = f.feed(b, rng)
            x0 = probe.pop(f.input_name)
            f.native = _guarded(f, b, lambda: native_kernel_ran(f.path, f.input_name, x0, probe))
    library = str(status["library"]) if native_ok and status.get("library") else None
    base_rss = _probe_peak_rss(None) if memory else 0.0
    peaks: dict[tuple[str, int], float] = {}
    rows: list[BenchRow] = []
    configs = [(b, t) for b in batch_sizes for t in threads]
    total = len(configs) * (len(files) + 1)
    done = 0
    for batch, nthreads in configs:
        shape = [batch] + [int(d) for d in files[0].input_shape[1:]]
        shared = files[0].feed(batch, rng)  # every variant gets the same data
        sessions, outputs = [], []
        for f in files:
            if progress is not None:
                progress(f"loading {f.label} (batch {batch}, {nthreads} thr)", done, total)
            feed = dict(zip([f.input_name] + [n for n, _ in f.extra_inputs], shared.values()))
            if memory and (f.label, batch) not in peaks:  # first: a batch too large fails here, in one line
                peaks[(f.label, batch)] = _probe_peak_rss(f.path, f.input_name, shape, library,
                                                          {n: v.shape for n, v in list(feed.items())[1:]})
            sess = make_session(f.path, nthreads, native=native, spinning=spinning)
            y = _guarded(f, batch, lambda: [sess.run(None, feed)[0] for _ in range(max(warmup, 1))][-1])
            sessions.append((sess, feed))
            outputs.append(np.asarray(y))
            done += 1
        if progress is not None:
            progress(f"timing batch {batch}, {nthreads} thr", done, total)
        runs = [lambda sess=sess, feed=feed: sess.run(None, feed) for sess, feed in sessions]
        samples = time_bursts(runs, burst_s=min_time / BURSTS, min_rounds=BURSTS if min_time > 0 else 1,
                              min_runs=repeats, min_time=min_time, max_runs=max_repeats,
                              settle_s=SPIN_SETTLE_S if spinning and nthreads > 1 else 0.0)
        done += 1
        base_median = float(np.median(samples[0]))
        ref = outputs[reference] if reference is not None else None
        for i, f in enumerate(files):
            s = samples[i]
            med = float(np.median(s))
            diff = (
                float(np.max(np.abs(outputs[i] - ref)))
                if ref is not None and outputs[i].shape == ref.shape else None
            )
            scale = float(np.max(np.abs(ref))) if ref is not None and ref.size else 0.0
            rel = None if diff is None else (diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
            rows.append(BenchRow(
                label=f.label, batch=batch, threads=nthreads,
                median_ms=med * 1e3, p10_ms=_percentile(s, 10) * 1e3, p90_ms=_percentile(s, 90) * 1e3,
                throughput=batch / med if med > 0 else float("inf"),
                speedup=base_median / med if med > 0 else float("inf"),
                samples=len(s), peak_rss_mb=_mb(peaks.get((f.label, batch))),
                rss_increase_mb=_mb(None if (f.label, batch) not in peaks else peaks[(f.label, batch)] - base_rss),
                native=f.native, max_abs_diff=diff, max_rel_diff=rel,
            ))
        del sessions, runs, outputs  # the next batch's sessions load without these beside them
    if progress is not None:
        progress("done", total, total)
    settings = {
        "batch_sizes": list(batch_sizes), "threads": list(threads), "warmup": warmup, "min_time": min_time,
        "repeats": repeats, "max_repeats": max_repeats, "native": native, "seed": seed,
        "inter_op_threads": 1, "execution_mode": "sequential", "thread_spinning": spinning, "memory": memory,
        "ort_only_process_peak_rss_mb": _mb(base_rss) if memory else None,
        "order": f"{BURSTS} interleaved bursts, rotating start, one untimed run before each",
    }
    environment = {
        "native": status, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average": _load_average(), "other_cpu_share": _other_share(cpu_before, _cpu_seconds()),
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return BenchResult(files=files, rows=rows, settings=settings, environment=environment)


def _load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds all cores spent busy (``/proc/stat``: user .. steal), CPU seconds of
    this process and its waited-for children); None where ``/proc/stat`` is not there."""
    import resource

    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return time.monotonic(), busy, own


def _other_share(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """The share of the machine's CPU time that other processes (and, on a VM, other guests) took
    between two ``_cpu_seconds`` readings: 0 on an idle machine, 1 with every core busy elsewhere."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    other = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(0.0, other) / ((after[0] - before[0]) * (os.cpu_count() or 1)), 3)


# Other work taking at least this share of the CPUs while the files are timed can move the
# interleaved ratios by more than their p10-p90 spread shows.
BUSY_SHARE = 0.2


def busy_note(result: BenchResult) -> str | None:
    """A one-line note when other processes took ``BUSY_SHARE`` or more of the CPUs while timing, else None."""
    share = result.environment.get("other_cpu_share")
    if share is None or share < BUSY_SHARE:
        return None
    return (f"note: other processes took {share:.0%} of the CPUs while the files were timed: ratios can be off by "
            f"more than the p10-p90 spread shows; rerun on an idle machine")


def check_settings(*, warmup: int = 5, min_time: float = 0.5, repeats: int = 10, max_repeats: int = 2000) -> None:
    """UsageError naming the option, for timing settings that cannot work (checked before any work)."""
    import math

    checks = [
        (warmup >= 0, f"--warmup must be >= 0, not {warmup}"),
        (repeats >= 1, f"--repeats must be at least 1, not {repeats}"),
        (repeats <= max_repeats, f"--repeats must be at most {max_repeats}, not {repeats}"),
        (math.isfinite(min_time) and min_time >= 0, f"--min-time must be >= 0 seconds, not {min_time:g}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _guarded(f: FileInfo, batch: int, call: Any) -> Any:
    """Run ``call()``; turn an ORT failure into one RuntimeBackendError line naming the file."""
    try:
        return call()
    except Exception as e:  # ORT's pybind exceptions share no useful base
        if any(m in str(e) for m in _OUT_OF_MEMORY):  # --no-memory: ORT's arena dump was the message
            raise RuntimeBackendError(f"{f.path} does not fit in memory at batch {batch} (ONNX Runtime could not "
                                      f"allocate its activations); use a smaller --batch-size") from None
        if isinstance(e, RuntimeBackendError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeBackendError(f"ONNX Runtime failed running {f.path} at batch {batch}: {msg}") from None


# ORT's intra-op workers, with spinning on (its default), keep a core busy for up to ~40 ms after a
# run (measured on the 2-core machine); a session that runs next must wait that long or share.
SPIN_SETTLE_S = 0.06


def time_bursts(runs: Sequence[Callable[[], Any]], *, burst_s: float, min_rounds: int = 1, min_runs: int = 1,
                min_time: float = 0.0, max_runs: int = 1_000_000, settle_s: float = 0.0,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per run of each callable, measured side by side in interleaved bursts.

    Each round gives every callable one burst, rotating who goes first: after ``settle_s`` of sleep
    (so that spinning workers of the previous session have gone idle), one untimed run that
    brings its weights back into cache after the others ran, then timed runs for about
    ``burst_s`` (at least one). A model deployed alone runs warm; single runs alternating with a
    large model measured the small one cold (vgg16n sparse: 0.77 ms round-robin, 0.55 ms alone).
    Rounds go on until there are ``min_rounds`` and every callable has ``min_runs`` timed runs
    and ``min_time`` seconds of them, or one reaches ``max_runs``. Returns single-run times.
    """
    n = len(runs)
    samples: list[list[float]] = [[] for _ in range(n)]
    spent = [0.0] * n
    r = 0
    while True:
        for k in range(n):
            i = (r + k) % n
            if settle_s > 0:
                time.sleep(settle_s)
            runs[i]()
            start = clock()
            while True:
                t0 = clock()
                runs[i]()
                dt = clock() - t0
                samples[i].append(dt)
                spent[i] += dt
                if clock() - start >= burst_s or len(samples[i]) >= max_runs:
                    break
        r += 1
        if any(len(s) >= max_runs for s in samples):
            return samples
        if r >= min_rounds and all(len(s) >= min_runs for s in samples) and min(spent) >= min_time:
            return samples


def vector_aligned(x: np.ndarray, offset: int = 0) -> np.ndarray:
    """A C-contiguous copy of ``x`` whose data starts ``offset`` bytes past a 64-byte boundary.

    ONNX Runtime allocates the tensors that pass between a model's nodes on 64-byte boundaries,
    numpy only on 16: a layer timed alone on a numpy input reads every 64-byte vector of a 56x56
    plane across two cache lines (1x1 256->64 on 56x56, batch 8, density 0.1: 1.4x slower than on
    an aligned input). ``offset`` (a multiple of the item size) makes a misaligned one on purpose.
    """
    if offset % x.itemsize:
        raise ValueError(f"offset {offset} is not a multiple of the item size {x.itemsize}")
    buf = np.empty(x.size + (64 + offset) // x.itemsize, x.dtype)
    start = (-buf.ctypes.data % 64 + offset) // x.itemsize
    out = buf[start:start + x.size].reshape(x.shape)
    out[...] = x
    return out


def _mb(x: float | None) -> float | None:
    return None if x is None else round(float(x), 1)


def _positive(name: str, values: Sequence[int], most: int | None = None) -> list[int]:
    vals = [int(v) for v in values]
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{name} needs positive integers, got {list(values)!r}")
    if most is not None and any(v > most for v in vals):
        raise UsageError(f"{name} {max(vals)} is more than {most:,}, the most it can be")
    return list(dict.fromkeys(vals))


def _default_labels(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with the parent directory name where they clash."""
    stems = [p.stem for p in paths]
    out = []
    for p, s in zip(paths, stems):
        lab = s if stems.count(s) == 1 else f"{p.parent.name}/{s}"
        out.append(lab)
    seen: dict[str, int] = {}
    uniq = []
    for lab in out:
        seen[lab] = seen.get(lab, 0) + 1
        uniq.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return uniq


# ---------------------------------------------------------------- outputs


def write_result_json(result: BenchResult, path: str | Path) -> Path:
    """Write ``result`` as JSON atomically."""
    write_json(path, result.to_json())
    return Path(path)
