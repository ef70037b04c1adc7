"""sparsify.runtime.native: library discovery, sessions, error translation, `sparsify runtime info`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from native_models import dense_model, random_case, sparse_model
from sparsify.cli import app
from sparsify.errors import RuntimeBackendError
from sparsify.runtime import native

NATIVE_OK = native.info()["loadable"]
ALLOW_MISSING = os.environ.get("SPARSIFY_ALLOW_NO_NATIVE") == "1"


def _need_native() -> None:
    if NATIVE_OK:
        return
    if ALLOW_MISSING:
        pytest.skip("native kernel not built (SPARSIFY_ALLOW_NO_NATIVE=1)")
    pytest.fail(f"native SparseConv kernel not loadable: {native.info()['reason']}")


def test_library_loaded_twice_in_one_process() -> None:
    """Two sessions register the library twice; both run, also after the first one is gone."""
    _need_native()
    rng = np.random.default_rng(0)
    case = random_case(rng, 8, 6, 3, 0.5, pads=(1, 1, 1, 1))
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    ref = native.session(dense_model(case), native=False).run(None, {"X": x})[0]
    first = native.session(sparse_model(case), 1)
    second = native.session(sparse_model(case), 2)
    y1 = first.run(None, {"X": x})[0]
    del first
    y2 = second.run(None, {"X": x})[0]
    third = native.session(sparse_model(case))
    np.testing.assert_allclose(y1, ref, atol=1e-4)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y2, third.run(None, {"X": x})[0])


def test_fresh_process_loads_twice_and_exits_cleanly(tmp_path: Path) -> None:
    """Registering in a new interpreter, twice, then exiting (library unload) does not crash."""
    _need_native()
    model = tmp_path / "m.onnx"
    model.write_bytes(sparse_model(random_case(np.random.default_rng(3), 4, 4, 3, 0.5, pads=(1, 1, 1, 1))))
    code = (
        "import numpy as np; from sparsify.runtime import native\n"
        f"a = native.session({str(model)!r}); b = native.session({str(model)!r})\n"
        "x = np.ones((1, 4, 5, 5), np.float32)\n"
        "assert (a.run(None, {'X': x})[0] == b.run(None, {'X': x})[0]).all(); print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_info_reports_the_library() -> None:
    _need_native()
    status = native.info()
    assert status["library"] == str(native.library_path())
    assert status["api_version"] == native.ORT_API_VERSION
    assert status["isa"] and status["reason"] is None
    # the library registers the plain op and both fused-activation ops the exporter writes
    from sparsify.runtime.onnx_sparse import DOMAIN, SPARSE_OPS

    assert status["ops"] == [f"{DOMAIN}::{op}" for op in SPARSE_OPS]


def test_missing_library_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSIFY_NATIVE_LIB", str(tmp_path / "nope.so"))
    assert native.library_path() is None
    status = native.info()
    assert status["loadable"] is False and "nope.so" in status["reason"]


def test_corrupt_library_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv("SPARSIFY_NATIVE_LIB", str(bad))
    status = native.info()
    assert status["loadable"] is False and "bad.so" in status["reason"]
    with pytest.raises(RuntimeBackendError, match="cannot be loaded|not a sparsify kernel"):
        native.session(dense_model(random_case(np.random.default_rng(0), 2, 2, 1, 1.0)))


def test_session_without_native_runs_standard_onnx() -> None:
    case = random_case(np.random.default_rng(4), 3, 5, 3, 1.0, strides=(2, 2))
    sess = native.session(dense_model(case), intra_op_threads=1, native=False)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert sess.run(None, {"X": np.ones((1, 3, 7, 7), np.float32)})[0].shape == (1, 5, 3, 3)


def test_missing_and_corrupt_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeBackendError, match="does not exist"):
        native.session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RuntimeBackendError, match="cannot load"):
        native.session(junk)
    with pytest.raises(RuntimeBackendError, match="intra_op_threads"):
        native.session(junk, intra_op_threads=0)


def test_cli_runtime_info() -> None:
    result = CliRunner().invoke(app, ["runtime", "info"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.output and "loadable" in result.output
    if NATIVE_OK:
        assert "yes" in result.output and str(native.library_path()) in result.output


def test_cli_runtime_info_require_fails_without_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSIFY_NATIVE_LIB", str(tmp_path / "none.so"))
    result = CliRunner().invoke(app, ["runtime", "info", "--json", "--require"])
    assert result.exit_code == 2
    assert '"loadable": false' in result.output


def test_a_multi_line_onnx_runtime_error_keeps_its_detail_on_one_line():
    from sparsify.runtime.native import _kernel_message

    e = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x for the "
                     "following indices\n index: 0 Got: 3 Expected: 2\n Please fix either the inputs/outputs or the model.")
    msg = _kernel_message(e)
    assert "\n" not in msg and "index: 0 Got: 3 Expected: 2" in msg
