"""ONNX Runtime sessions with the native ``ai.sparsify::SparseConv`` kernel when it is built.

The kernel is a custom-op shared library compiled at install time (see setup.py) into this
directory. When it is missing, sessions still run exported models through the standard-ONNX
function body each SparseConv node carries (dense speed); ``info()`` says why it is missing.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import RuntimeBackendError

LIB_NAME = "_sparseconv.so"
REASON_NAME = "_sparseconv.build.json"
ORT_API_VERSION = 29  # the ORT API the library is built against (headers of onnxruntime 1.29)
_HERE = Path(__file__).resolve().parent


def library_path() -> Path | None:
    """The built custom-op library ($SPARSIFY_NATIVE_LIB overrides), or None when not built."""
    override = os.environ.get("SPARSIFY_NATIVE_LIB")
    path = Path(override) if override else _HERE / LIB_NAME
    return path if path.is_file() else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def _kernel_message(e: BaseException) -> str:
    """ORT wraps errors as '[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ...'; keep the useful tail, as one
    line (ORT continues some messages on further lines: "... indices\n index: 0 Got: 3 Expected: 2")."""
    line = " ".join(str(e).split()) or type(e).__name__
    marker = "SparseConv:"
    return line[line.index(marker):] if marker in line else line


def _build_failure_reason() -> str:
    reason_file = _HERE / REASON_NAME
    try:
        return str(json.loads(reason_file.read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return ("the native kernel was not built at install time; reinstall with `pip install -v -e .` "
                "and read the 'sparsify native kernel' warning")


def _register(so: ort.SessionOptions, lib: Path) -> None:
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as e:  # ORT raises its own pybind exception types (not RuntimeError)
        raise RuntimeBackendError(
            f"the native SparseConv library {lib} cannot be loaded ({_first_line(e)}); "
            "rebuild it with `pip install -e .`, or pass --no-native (native=False in the API)"
        ) from None


def info() -> dict[str, Any]:
    """Status of the native kernel: ORT version, library path, whether it loads, and why not."""
    lib = library_path()
    result: dict[str, Any] = {
        "onnxruntime_version": ort.__version__,
        "library": str(lib) if lib else None,
        "loadable": False,
        "api_version": None,
        "isa": None,
        "ops": [],
        "reason": None,
    }
    if lib is None:
        override = os.environ.get("SPARSIFY_NATIVE_LIB")
        result["reason"] = (f"SPARSIFY_NATIVE_LIB={override} is not a file" if override
                            else _build_failure_reason())
        return result
    try:
        handle = ctypes.CDLL(str(lib))
        describe = handle.SparsifyKernelInfo
        describe.restype = ctypes.c_char_p
        fields = dict(kv.split("=", 1) for kv in describe().decode().split(";") if "=" in kv)
        result["api_version"] = int(fields.get("api_version", "0")) or None
        result["isa"] = fields.get("isa")
        result["ops"] = [op for op in fields.get("op", "").split(",") if op]
    except (OSError, AttributeError, ValueError) as e:
        result["reason"] = f"{lib} is not a sparsify kernel library ({_first_line(e)}); rebuild with `pip install -e .`"
        return result
    try:
        _register(ort.SessionOptions(), lib)
    except RuntimeBackendError as e:
        result["reason"] = str(e)
        return result
    result["loadable"] = True
    return result


class SparsifySession(ort.InferenceSession):
    """An InferenceSession whose run() reports kernel and input errors as RuntimeBackendError."""

    def run(self, output_names, input_feed, run_options=None):  # type: ignore[override]
        try:
            return super().run(output_names, input_feed, run_options)
        except RuntimeBackendError:
            raise
        except Exception as e:  # ORT's pybind exception types do not share a useful base
            raise RuntimeBackendError(f"ONNX Runtime failed to run the model: {_kernel_message(e)}") from None


THREADS_CONFIG_KEY = "ai.sparsify.intra_op_num_threads"  # read by the kernel (sparseconv_op.cc)


SPINNING = True  # ``session``'s default for spinning=None


def session(
    path_or_bytes: str | os.PathLike[str] | bytes,
    intra_op_threads: int | None = None,
    native: bool = True,
    spinning: bool | None = None,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """A CPU InferenceSession that uses the native SparseConv kernel when built and native=True.

    ``spinning=False`` stops idle intra-op workers from busy-waiting (ORT spins by default; when
    several sessions take turns, one session's spinning workers take the next one's core for up to
    ~40 ms, which ``bench.time_bursts`` waits out instead); None: ``SPINNING`` (ORT's default, True;
    the test session turns it off, where two pytest workers share two cores).
    ``profile_prefix`` turns on ORT's per-node profiling (``end_profiling()`` returns the file).
    """
    so = ort.SessionOptions()
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    spin = SPINNING if spinning is None else spinning
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 4  # failures surface as RuntimeBackendError; ORT need not log them too
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise RuntimeBackendError(f"intra_op_threads={intra_op_threads} must be >= 1")
        so.intra_op_num_threads = int(intra_op_threads)
        # The kernel cannot ask ORT for the thread count; it splits work for the threads it is
        # told of (one thread: whole images in one pass, no tasks).
        so.add_session_config_entry(THREADS_CONFIG_KEY, str(int(intra_op_threads)))
    if native:
        lib = library_path()
        if lib is not None:
            _register(so, lib)
    if isinstance(path_or_bytes, (bytes, bytearray)):
        model: str | bytes = bytes(path_or_bytes)
        where = "the in-memory model"
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise RuntimeBackendError(f"ONNX file {path} does not exist; export a model first (sparsify export)")
        model = str(path)
        where = str(path)
    try:
        return SparsifySession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = _kernel_message(e)
        if msg.startswith("SparseConv:"):
            raise RuntimeBackendError(f"the SparseConv kernel rejected {where}: {msg}") from None
        raise RuntimeBackendError(f"ONNX Runtime cannot load {where}: {msg} (is it a valid, complete ONNX file?)") from None
