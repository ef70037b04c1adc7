"""`sparsify bench` and sparsify.runtime.bench on tiny hand-made ONNX models (no exporter needed)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from sparsify.cli import app
from sparsify.errors import RuntimeBackendError, UsageError
from sparsify.runtime import bench as lib

FAST = ["--min-time", "0.01", "--repeats", "3", "--warmup", "1", "-q", "--no-memory"]


def conv_model(path: Path, cout: int = 8, hw: int = 12, batch: int | str = "N", seed: int = 0, cin: int = 3,
               density: float = 1.0) -> Path:
    """Conv(cin -> cout, 3x3, pad 1) + Relu with a dynamic (or fixed) batch dim; ``density`` keeps that share of kernels."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    w[rng.random((cout, cin)) >= density] = 0.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, hw, hw])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        "big": conv_model(tmp_path / "big.onnx", cout=16),
        "small": conv_model(tmp_path / "small.onnx", cout=4),
        "other_weights": conv_model(tmp_path / "other.onnx", cout=16, seed=1),
        "other_shape": conv_model(tmp_path / "wide.onnx", hw=20),
        "fixed": conv_model(tmp_path / "fixed.onnx", cout=16, batch=1),
    }


def test_bench_files_measures_every_combination(models):
    res = lib.bench_files([models["big"], models["small"], models["other_weights"]], batch_sizes=(1, 4),
                          threads=(1, 2), warmup=1, min_time=0.01, repeats=3)
    assert res.baseline == "big"
    assert len(res.rows) == 3 * 2 * 2
    for r in res.rows:
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms
        assert r.samples >= 3
        assert r.throughput == pytest.approx(r.batch / (r.median_ms / 1e3))
        assert r.peak_rss_mb > 10 and r.rss_increase_mb >= 0     # a fresh process per (file, batch)
        assert r.native is False                     # no ai.sparsify nodes in these files
        base = res.row("big", r.batch, r.threads)
        assert r.speedup == pytest.approx(base.median_ms / r.median_ms)
    # Same input for all variants: the baseline against itself is exact, other weights differ, other shapes are not compared.
    assert res.row("big", 4, 1).max_abs_diff == 0.0
    assert res.row("other", 4, 1).max_abs_diff > 0.1
    assert res.row("small", 4, 1).max_abs_diff is None
    assert [f.conv_nodes for f in res.files] == [1, 1, 1]


def test_cli_bench_writes_table_json_and_png(models, tmp_path):
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    r = CliRunner().invoke(app, ["bench", str(models["big"]), str(models["small"]), "-b", "1,2", "-t", "1",
                                 "--json-file", str(js), "--plot", str(png), "--memory", *FAST[:-1]])
    assert r.exit_code == 0, r.output
    assert "big" in r.stdout and "small" in r.stdout and "speedup" in r.stdout
    data = json.loads(js.read_text())
    assert data["baseline"] == "big"
    assert {f["label"] for f in data["files"]} == {"big", "small"}
    assert len(data["rows"]) == 4
    row = data["rows"][0]
    for key in ("label", "batch", "threads", "median_ms", "p10_ms", "p90_ms", "throughput", "speedup",
                "peak_rss_mb", "native", "max_abs_diff", "max_rel_diff"):
        assert key in row
    assert all(r["median_ms"] > 0 and r["throughput"] > 0 for r in data["rows"])
    assert all(r["peak_rss_mb"] >= data["settings"]["ort_only_process_peak_rss_mb"] > 10 for r in data["rows"])
    assert data["settings"]["batch_sizes"] == [1, 2] and data["settings"]["threads"] == [1]
    assert "onnxruntime" in data["environment"]["native"]
    head = png.read_bytes()
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 10_000
    assert not list(tmp_path.glob(".*.tmp"))          # atomic writes left no temp files


def test_other_work_on_the_machine_while_timing_is_measured_and_noted(models, monkeypatch):
    # a tester's jobs loading both CPUs reversed a 1.28x / 1.94x ranking; the table gave no sign of it
    idle = lib.bench_files([models["big"], models["small"]], warmup=1, min_time=0.01, repeats=3)
    share = idle.environment["other_cpu_share"]
    assert share is None or 0.0 <= share <= 1.0
    readings = iter([(100.0, 50.0, 10.0), (110.0, 50.0 + 14.0, 10.0 + 2.0)])  # 12 of the 20 core-seconds elsewhere
    monkeypatch.setattr(lib, "_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(lib.os, "cpu_count", lambda: 2)
    busy = lib.bench_files([models["big"], models["small"]], warmup=1, min_time=0.01, repeats=3)
    assert busy.environment["other_cpu_share"] == 0.6
    assert lib.busy_note(busy) == ("note: other processes took 60% of the CPUs while the files were timed: ratios "
                                   "can be off by more than the p10-p90 spread shows; rerun on an idle machine")
    busy.environment["other_cpu_share"] = 0.05
    assert lib.busy_note(busy) is None
    readings = iter([(100.0, 50.0, 10.0), (110.0, 50.0 + 14.0, 10.0 + 2.0)])
    r = CliRunner().invoke(app, ["bench", str(models["big"]), str(models["small"]), *FAST])
    assert r.exit_code == 0 and "other processes took 60% of the CPUs" in r.output


def test_cli_refuses_different_input_shapes(models):
    r = CliRunner().invoke(app, ["bench", str(models["big"]), str(models["other_shape"]), *FAST])
    assert r.exit_code == 2
    assert "input shapes differ" in r.output and "Nx3x12x12" in r.output and "Nx3x20x20" in r.output
    assert "Traceback" not in r.output


def test_fixed_batch_that_differs_is_refused(models):
    with pytest.raises(UsageError, match="fixed batch size 1"):
        lib.bench_files([models["big"], models["fixed"]], batch_sizes=(4,), min_time=0, repeats=1)
    res = lib.bench_files([models["big"], models["fixed"]], batch_sizes=(1,), warmup=0, min_time=0, repeats=1, memory=False)
    assert res.row("fixed", 1, 1).max_abs_diff == 0.0


def test_one_file_as_a_string_and_batch_sizes_past_any_input(models):
    """sparsify.bench("m.onnx") read the string letter by letter ("r does not exist"); a batch of
    10**20 ended in numpy's ValueError (traceback)."""
    import sparsify

    res = sparsify.bench(str(models["big"]), warmup=0, min_time=0, repeats=1, memory=False)
    assert [r.label for r in res.rows] == ["big"]
    r = CliRunner().invoke(app, ["bench", str(models["big"]), "--batch-size", "99999999999999999999", *FAST])
    assert r.exit_code == 2 and "Traceback" not in r.output and "out of memory" in r.output
    r = CliRunner().invoke(app, ["bench", str(models["big"]), "--threads", "99999999999", *FAST])
    assert r.exit_code == 2 and "Traceback" not in r.output and "the most it can be" in r.output


@pytest.mark.parametrize("content", [None, b"this is not protobuf \x00\xff"])
def test_missing_or_corrupt_file_is_one_clear_line(models, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(RuntimeBackendError, match="bad.onnx"):
        lib.bench_files([models["big"], bad], min_time=0, repeats=1)
    r = CliRunner().invoke(app, ["bench", str(models["big"]), str(bad), *FAST])
    assert r.exit_code == 2
    assert "bad.onnx" in r.output and len(r.output.strip().splitlines()) == 1


def test_unknown_variant_is_refused(models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text("{}")
    (run / "weights.safetensors").write_bytes(b"")
    r = CliRunner().invoke(app, ["bench", str(run), "--variants", "dense,sparse,fast", *FAST])
    assert r.exit_code == 2
    assert "unknown variant 'fast'" in r.output and "dense, compact, sparse, depth" in r.output
    r = CliRunner().invoke(app, ["bench", str(models["big"]), "--variants", "dense", *FAST])
    assert r.exit_code == 2 and "run directory" in r.output


def test_duplicate_labels(models):
    copy = models["big"].parent / "sub"
    copy.mkdir()
    shutil.copy(models["big"], copy / "big.onnx")
    res = lib.bench_files([models["big"], copy / "big.onnx"], warmup=0, min_time=0, repeats=1, memory=False)
    assert [f.label for f in res.files] == [f"{models['big'].parent.name}/big", "sub/big"]


def test_sparse_op_file_is_detected_and_matches_dense(tmp_path):
    from sparsify.runtime.onnx_sparse import convert_onnx

    dense = conv_model(tmp_path / "dense.onnx", cin=16, cout=16, density=0.2)
    report = convert_onnx(dense, tmp_path / "sparse.onnx")
    assert report.sparse_nodes == 1
    res = lib.bench_files([dense, tmp_path / "sparse.onnx"], batch_sizes=(2,), warmup=1, min_time=0, repeats=2)
    sparse = res.files[1]
    assert sparse.sparse_nodes == 1 and sparse.conv_nodes == 0 and res.files[0].sparse_nodes == 0
    assert sparse.native == bool(res.environment["native"]["loadable"])
    assert res.row("sparse", 2, 1).max_abs_diff < 1e-4 and res.row("sparse", 2, 1).max_rel_diff < 1e-5
    res = lib.bench_files([dense, tmp_path / "sparse.onnx"], warmup=0, min_time=0, repeats=1, native=False, memory=False)
    assert res.files[1].native is False


def test_time_bursts_interleaves_rewarmed_bursts() -> None:
    """Each round gives every callable one burst in rotating order, each burst led by one untimed
    run; the samples are single timed runs, and the stop rule counts rounds, runs and seconds."""
    from sparsify.runtime.bench import time_bursts

    now = [0.0]
    calls: list[str] = []

    def clock() -> float:
        return now[0]

    def runner(name: str, cost: float):
        def run() -> None:
            calls.append(name)
            now[0] += cost
        return run

    costs = {"a": 0.001, "b": 0.004, "c": 0.002}
    samples = time_bursts([runner(k, v) for k, v in costs.items()], burst_s=0.01, min_rounds=3,
                          min_runs=2, min_time=0.05, clock=clock)
    for name, s in zip(costs, samples):
        assert all(abs(t - costs[name]) < 1e-12 for t in s) and sum(s) >= 0.05
    # bursts a, b, c | b, c, a | c, a, b ... (rotating start, never the same callable twice in a row)
    bursts = [calls[0]] + [cur for prev, cur in zip(calls, calls[1:]) if cur != prev]
    rounds = len(bursts) // 3
    assert rounds >= 3 and len(bursts) == 3 * rounds and bursts[:9] == list("abcbcacab")
    for name, s in zip(costs, samples):  # one untimed run leads each burst
        assert calls.count(name) == len(s) + rounds
    # max_runs stops the loop even when min_time is out of reach
    capped = time_bursts([runner("c", 0.0)], burst_s=1.0, min_time=10.0, max_runs=7, clock=clock)
    assert len(capped[0]) == 7


@pytest.mark.parametrize("offset", [0, 4, 16, 60])
def test_vector_aligned(offset: int) -> None:
    """vector_aligned copies x to data `offset` bytes past a 64-byte boundary, values and shape kept."""
    x = np.random.default_rng(offset).standard_normal((2, 3, 5, 7)).astype(np.float32)
    y = lib.vector_aligned(x, offset)
    assert y.ctypes.data % 64 == offset and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x)
    with pytest.raises(ValueError, match="multiple of the item size"):
        lib.vector_aligned(x, 2)


def test_plot_format_follows_its_suffix_and_others_are_refused(models, tmp_path):
    # --plot p.pdf wrote PNG bytes under a .pdf name (and p.txt, and a name without suffix)
    pdf = tmp_path / "p.pdf"
    r = CliRunner().invoke(app, ["bench", str(models["big"]), "-b", "1", "-t", "1", "--plot", str(pdf), *FAST[:-1]])
    assert r.exit_code == 0, r.output
    assert pdf.read_bytes()[:5] == b"%PDF-"
    for bad in ("p.txt", "plot"):
        r = CliRunner().invoke(app, ["bench", str(models["big"]), "--plot", str(tmp_path / bad), *FAST[:-1]])
        assert r.exit_code == 2 and ".png, .pdf, .svg" in r.output and not (tmp_path / bad).exists(), r.output


def test_existing_output_files_are_kept_without_force(models, tmp_path):
    # --json-file model.onnx wrote JSON over the model being timed; --plot replaced a file silently
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(models["big"].read_bytes())
    for flag in ("--json-file", "--plot"):
        target = victim if flag == "--json-file" else tmp_path / "old.png"
        target.write_bytes(target.read_bytes() if target.exists() else b"old")
        before = target.read_bytes()
        r = CliRunner().invoke(app, ["bench", str(models["big"]), "-b", "1", "-t", "1", flag, str(target), *FAST[:-1]])
        assert r.exit_code == 2 and "exists; pass --force" in r.output and target.read_bytes() == before, r.output
    js = tmp_path / "old.json"
    js.write_text("{}")
    r = CliRunner().invoke(app, ["bench", str(models["big"]), "-b", "1", "-t", "1", "--json-file", str(js), "--force",
                                 *FAST[:-1]])
    assert r.exit_code == 0 and "rows" in json.loads(js.read_text()), r.output


def test_more_threads_than_cores_is_a_warning(models, monkeypatch):
    # -t 8 on 2 cores timed contention (p90 45x the median) without a word
    from sparsify import machine

    monkeypatch.setattr(machine, "usable_cores", lambda: 1)
    r = CliRunner().invoke(app, ["bench", str(models["big"]), "-b", "1", "-t", "1,2", *FAST[:-1]])
    assert r.exit_code == 0 and "--threads asks for 2 threads on 1 usable core" in r.output, r.output
    r = CliRunner().invoke(app, ["bench", str(models["big"]), "-b", "1", "-t", "1", *FAST[:-1]])
    assert r.exit_code == 0 and "usable core" not in r.output


def test_files_with_different_numbers_of_inputs_say_so(tmp_path):
    # "takes batchx3x32x32 but ... takes batchx3x32x32": the second file's other input was not named
    import torch.nn as nn

    from sparsify.runtime.export import export_model

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x, y):
            return self.c(x) + y

    one = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    export_model(one, (1, 3, 8, 8), tmp_path / "one.onnx", verify=False)
    export_model(Two().eval(), [(1, 3, 8, 8), (1, 4, 8, 8)], tmp_path / "two.onnx", verify=False)
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "one.onnx"), str(tmp_path / "two.onnx"), *FAST[:-1]])
    assert r.exit_code == 2 and "takes 2 inputs" in r.output, r.output


def test_plot_title_fits_a_single_panel(models, tmp_path, monkeypatch):
    # one batch size and one thread count: a 4-inch figure cut its 85-character title off on both sides
    import sparsify.pipeline as pipeline

    figs = []
    monkeypatch.setattr(pipeline, "save_figure", lambda fig, path, dpi: figs.append(fig) or path)
    result = lib.bench_files([models["big"], models["small"]], batch_sizes=[1], threads=[1], warmup=1,
                             min_time=0.01, repeats=3, memory=False)
    pipeline.plot_result(result, tmp_path / "p.png")
    (fig,) = figs
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)


def test_a_batch_too_large_for_memory_fails_in_one_line_before_this_process_loads_it(tmp_path, monkeypatch):
    """A batch that does not fit was run in the bench process itself, where the out-of-memory killer
    ended it with no word ("Killed", exit 137). The memory probe now runs first, in its own process;
    here an address-space limit on it stands in for a machine's RAM (the main process stays unlimited)."""
    import resource
    import subprocess

    model = conv_model(tmp_path / "wide.onnx", cout=128, hw=64)  # batch 256: 537 MB per activation
    real_run = subprocess.run
    limit = 700 << 20

    def limited(cmd, **kw):
        return real_run(cmd, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)), **kw)

    loaded = []
    real_session = lib.make_session
    monkeypatch.setattr(subprocess, "run", limited)
    monkeypatch.setattr(lib, "make_session", lambda path, *a, **k: loaded.append(Path(path)) or real_session(path, *a, **k))
    fits = lib.bench_files([model], batch_sizes=(1,), warmup=0, min_time=0, repeats=1)
    assert fits.rows[0].peak_rss_mb is not None and loaded == [model]
    with pytest.raises(RuntimeBackendError) as e:
        lib.bench_files([model], batch_sizes=(256,), warmup=0, min_time=0, repeats=1)
    assert str(e.value) == (f"{model} does not fit in memory at batch 256 (the process measuring it was refused "
                            "memory, beside the variants already loaded); use a smaller --batch-size")
    assert loaded == [model]  # the batch-256 session was never made here


def test_an_out_of_memory_kill_of_the_probe_is_named(tmp_path, monkeypatch):
    import signal
    import subprocess

    real_run = subprocess.run

    def killed(cmd, **kw):  # the probe of the file; the one of onnxruntime alone runs
        if json.loads(cmd[-1])["path"] is None:
            return real_run(cmd, **kw)
        raise subprocess.CalledProcessError(-signal.SIGKILL, cmd, output="", stderr="")

    monkeypatch.setattr(subprocess, "run", killed)
    result = CliRunner().invoke(app, ["bench", str(conv_model(tmp_path / "m.onnx")), "-b", "64",
                                      *FAST[:-1]])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'm.onnx'} does not fit in memory at batch 64 (the process measuring it was killed, "
        "by the out-of-memory killer most likely, beside the variants already loaded); use a smaller --batch-size")


def test_without_the_probe_an_allocation_failure_is_named_too(tmp_path, monkeypatch):
    """--no-memory (or a single huge batch before the probe ran first): ORT's arena dump,
    "bfc_arena.cc:360 ... Failed to allocate memory for requested buffer of size 4096000000", was the line."""
    class Session:
        def run(self, *a, **k):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bfc_arena.cc:360 void* onnxruntime::BFCArena::"
                               "AllocateRawInternal(size_t, bool) Failed to allocate memory for requested buffer")

    model = conv_model(tmp_path / "m.onnx")
    monkeypatch.setattr(lib, "make_session", lambda *a, **k: Session())
    with pytest.raises(RuntimeBackendError) as e:
        lib.bench_files([model], batch_sizes=(64,), warmup=0, min_time=0, repeats=1, memory=False)
    assert str(e.value) == (f"{model} does not fit in memory at batch 64 (ONNX Runtime could not allocate its "
                            "activations); use a smaller --batch-size")
