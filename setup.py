"""Build the native ONNX Runtime custom-op library (ai.sparsify::SparseConv) during install.

Project metadata lives in pyproject.toml; this file only adds the C++ kernel. The kernel is a plain
ORT custom-op library (loaded with SessionOptions.register_custom_ops_library), not a Python
extension: it is compiled directly with the C++ compiler into sparsify/runtime/_sparseconv.so.

ORT's C headers are not in the onnxruntime wheel. They are taken, in this order, from
$SPARSIFY_ORT_HEADERS (a directory holding onnxruntime_c_api.h), from the user cache, or from the
npm package com.github.asus4.onnxruntime@0.4.9 (ORT 1.29, API 29), fetched with `npm pack`,
checked against a pinned sha256, and unpacked (headers only) into the cache.

The build never fails the install: without a compiler, npm or network it prints a warning,
records why in sparsify/runtime/_sparseconv.build.json, and sparsify falls back to the function
body stored in each exported ONNX file. Set SPARSIFY_NO_NATIVE=1 to skip the build on purpose.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
NPM_SHA256 = "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
HEADERS_IN_TARBALL = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
ORT_API_VERSION = 29
LIB_NAME = "_sparseconv.so"
REASON_NAME = "_sparseconv.build.json"
# Longest compile first (CPU seconds on the 2-core VM: avx512 54, avx512y 40, base 25, avx2 16, op 7), so
# that the two compilers of a 2-core install finish together rather than one waiting on the AVX-512 unit.
SOURCES = ["csrc/sparseconv_avx512.cc", "csrc/sparseconv_avx512y.cc", "csrc/sparseconv_base.cc", "csrc/sparseconv_avx2.cc",
           "csrc/sparseconv_op.cc"]
DEPENDS = ["csrc/sparseconv_common.h", "csrc/sparseconv_kernel.h"]
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-DORT_API_MANUAL_INIT", "-ffp-contract=fast"]
# Per-file ISA flags: only the AVX2 / AVX-512 units get them; the op dispatches at run time
# (__builtin_cpu_supports), so the library runs on any x86_64. Never -march=native.
ISA_FLAGS = {"csrc/sparseconv_avx2.cc": ["-mavx2", "-mfma"],
             "csrc/sparseconv_avx512.cc": ["-mavx512f", "-mavx2", "-mfma"],
             "csrc/sparseconv_avx512y.cc": ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma"]}


class NativeBuildError(Exception):
    """The native kernel cannot be built here (the install goes on without it)."""


def _warn(msg: str) -> None:
    print(f"WARNING (sparsify native kernel): {msg}", file=sys.stderr, flush=True)


def _cache_dir() -> Path:
    base = os.environ.get("SPARSIFY_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    sub = "" if os.environ.get("SPARSIFY_CACHE_DIR") else "sparsify"
    return Path(base) / sub / f"ort-headers-api{ORT_API_VERSION}-{NPM_SHA256[:12]}"


def _have_headers(d: Path) -> bool:
    return (d / "onnxruntime_c_api.h").is_file()


def _fetch_headers(dest: Path) -> None:
    """npm pack the pinned package, check its sha256, extract only the headers into dest."""
    npm = shutil.which("npm")
    if npm is None:
        raise NativeBuildError("npm not found, so the ONNX Runtime headers cannot be fetched; "
                               "install npm or set SPARSIFY_ORT_HEADERS=dir")
    with tempfile.TemporaryDirectory(prefix="sparsify-ort-") as tmp:
        try:
            subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise NativeBuildError(f"`npm pack {NPM_PACKAGE}` failed (no network?): "
                                   f"{detail.decode(errors='replace').strip().splitlines()[-1:] or e}") from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise NativeBuildError(f"`npm pack {NPM_PACKAGE}` produced no tarball")
        digest = hashlib.sha256()
        with open(tarballs[0], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != NPM_SHA256:
            raise NativeBuildError(f"{tarballs[0].name} has sha256 {digest.hexdigest()}, expected {NPM_SHA256}; "
                                   "refusing to use it")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                for member in tar:
                    if not (member.isfile() and member.name.startswith(HEADERS_IN_TARBALL)):
                        continue
                    name = member.name[len(HEADERS_IN_TARBALL):]
                    if "/" in name or not name.endswith(".h"):
                        continue
                    src = tar.extractfile(member)
                    assert src is not None
                    (staging / name).write_bytes(src.read())
            if not _have_headers(staging):
                raise NativeBuildError(f"{NPM_PACKAGE} does not contain {HEADERS_IN_TARBALL}onnxruntime_c_api.h")
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def ort_headers() -> Path:
    """Directory with the ORT C/C++ headers: $SPARSIFY_ORT_HEADERS, the cache, or freshly fetched."""
    env = os.environ.get("SPARSIFY_ORT_HEADERS")
    if env:
        if not _have_headers(Path(env)):
            raise NativeBuildError(f"SPARSIFY_ORT_HEADERS={env} has no onnxruntime_c_api.h")
        return Path(env)
    dest = _cache_dir()
    if not _have_headers(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"sparsify: fetching ONNX Runtime headers ({NPM_PACKAGE}) into {dest}", file=sys.stderr, flush=True)
        _fetch_headers(dest)
    return dest


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    cmd = shlex.split(cxx)
    if not cmd or shutil.which(cmd[0]) is None:
        for cand in ("c++", "g++", "clang++"):
            if shutil.which(cand):
                return [cand]
        raise NativeBuildError("no C++ compiler found (install g++ or clang++, or set CXX)")
    return cmd


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise NativeBuildError(f"compiler failed: {' '.join(cmd[:3])} ... (output above)")


def compile_library(out: Path, tmp: Path) -> None:
    """Compile csrc/ into the custom-op shared library at out."""
    if sys.platform == "win32":
        raise NativeBuildError("building the native kernel on Windows is not supported yet")
    headers = ort_headers()
    cxx = _compiler()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    objs, jobs = [], []
    tmp.mkdir(parents=True, exist_ok=True)
    for src in SOURCES:
        if src in ISA_FLAGS and not x86:
            continue
        obj = tmp / (Path(src).stem + ".o")
        jobs.append(cxx + CXXFLAGS + ISA_FLAGS.get(src, []) + ["-I", str(headers), "-c", str(ROOT / src), "-o", str(obj)])
        objs.append(str(obj))
    # one compiler per core: the sources are independent (the install took minutes one by one)
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        for done in [pool.submit(_run, cmd) for cmd in jobs]:
            done.result()  # the first NativeBuildError, once all have run
    if not x86:
        raise NativeBuildError("only x86_64 builds are wired up (the op dispatches to the AVX2 unit)")
    link = ["-shared", "-Wl,-undefined,error"] if sys.platform == "darwin" else ["-shared", "-Wl,--no-undefined"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    _run(cxx + link + objs + ["-o", str(tmp_out)])
    os.replace(tmp_out, out)


class BuildNative(build_ext):
    """build_ext that compiles the custom-op library and never fails the install."""

    _failure: str | None = None

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full dotted name and with the last component only; keep the package part.
        parts = fullname.split(".")
        if parts[-1] == "_sparseconv":
            return os.path.join(*parts[:-1], LIB_NAME)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name))
        reason_file = out.with_name(REASON_NAME)
        reason_file.unlink(missing_ok=True)
        try:
            if os.environ.get("SPARSIFY_NO_NATIVE") == "1":
                raise NativeBuildError("SPARSIFY_NO_NATIVE=1 was set at install time")
            compile_library(out, Path(self.build_temp) / "sparseconv")
            self._failure = None
        except NativeBuildError as e:
            out.unlink(missing_ok=True)
            _warn(f"{e}. sparsify still works: ONNX files run through their portable function body "
                  "(dense speed). Fix the cause and reinstall to get the sparse speed-up.")
            self._failure = str(e)
            reason_file.parent.mkdir(parents=True, exist_ok=True)
            reason_file.write_text(json.dumps({"built": False, "reason": self._failure}) + "\n")

    def copy_extensions_to_source(self) -> None:
        """Editable / --inplace builds: put the library, or the reason it is missing, in the tree."""
        super().copy_extensions_to_source()
        pkg = ROOT / "sparsify" / "runtime"
        if self._failure is None:
            (pkg / REASON_NAME).unlink(missing_ok=True)
        else:
            (pkg / LIB_NAME).unlink(missing_ok=True)
            (pkg / REASON_NAME).write_text(json.dumps({"built": False, "reason": self._failure}) + "\n")


setup(
    ext_modules=[Extension("sparsify.runtime._sparseconv", sources=SOURCES, depends=DEPENDS, optional=True)],
    cmdclass={"build_ext": BuildNative},
)
