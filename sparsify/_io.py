"""Atomic writes: an output is either complete or absent, never half-written.

Outputs get the permissions a plain ``open()`` / ``mkdir()`` would give them under the user's
umask (``tempfile`` creates its files 0600 and directories 0700). ``check_writable`` tells before
any long work whether an output location can be written at all.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_allows(path: Path, is_dir: bool) -> None:
    """Give a file made by ``tempfile`` (0600 / 0700) the mode ``open``/``mkdir`` would have given it."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _os_error(path: Path, what: str, e: OSError, where: Path | None = None) -> Exception:
    from .errors import SparsifyError

    reason = e.strerror or type(e).__name__
    place = f"{where} does not accept new files ({reason})" if where is not None else reason
    return SparsifyError(f"cannot write {what}{path}: {place}; choose a location you can write to")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (model files, weights, data sets, downloads)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str | os.PathLike, what: str = "", *, parents: bool = True) -> None:
    """Raise SparsifyError unless ``path`` (a file or directory to create or replace) can be written.

    With ``parents`` (the writer creates missing directories) the nearest existing ancestor must be
    a directory in which a file can be created (tried, then removed); without, ``path``'s own
    directory must exist. ``what`` names the option in the message, e.g. ``"--plot "``.
    """
    from .errors import SparsifyError

    p = Path(path).expanduser()
    anchor = p.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():  # before "does not exist": out.onnx/x.onnx named a file that exists
        raise SparsifyError(f"cannot write {what}{p}: {anchor} is a file, not a directory; choose another location")
    if not parents and not p.parent.is_dir():
        raise SparsifyError(f"cannot write {what}{p}: directory {p.parent} does not exist; create it or choose "
                            f"another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparsify-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _os_error(p, what, e, anchor) from None


def check_new_file(path: Path, flag: str, force: bool = False, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse, before any long work, an output file option (``flag``, e.g. ``"--plot"``) that names a
    directory, another kind of file than ``suffixes`` allow, an existing file without ``force``
    (a plot written over the model being timed, or over a run's summary.json, lost it), or a
    place that cannot be written. Raises SparsifyError (UsageError for the options)."""
    from .errors import UsageError

    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file is written as its suffix says; give a file ending in "
                         f"{', '.join(suffixes)}")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it or choose another {flag}")
    check_writable(path, f"{flag} ", parents=False)


PLOT_FORMATS = (".png", ".pdf", ".svg")  # matplotlib writes each; the file's suffix chooses


def save_figure(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    """Write a matplotlib figure atomically, as PNG, PDF or SVG by ``path``'s suffix (PNG otherwise)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format={".pdf": "pdf", ".svg": "svg"}.get(path.suffix.lower(), "png"), dpi=dpi)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    if not path.parent.exists():
        from .errors import SparsifyError

        raise SparsifyError(
            f"cannot write {path}: directory {path.parent} does not exist; create it or choose another path"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _os_error(path, "", e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _as_umask_allows(tmp_path, is_dir=False)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, unreadable, not JSON or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output_dir(path: str | os.PathLike, force: bool = False, what: str = "--out ",
                     replaces: str | None = None) -> None:
    """Refuse an output directory that ``atomic_dir`` would refuse, or that cannot be written; before any work.

    Never the current directory or one above it (``--out .``, ``""``, ``..``: replacing it would
    take the working directory away). ``replaces``: with ``force``, a non-empty directory is
    replaced only when it holds this file (a run directory's recipe.json): ``--force`` with a
    mistyped ``--out`` deleted a folder of the user's files."""
    from .errors import RunDirError

    path = Path(path)
    here = Path.cwd()
    if path.name in ("", ".", "..") or path.resolve() in (here, *here.parents):
        raise RunDirError(f"{what}{str(path) or '(empty)'} is the current directory or one above it; give the "
                          f"name of a new directory")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; choose another {what.strip() or 'output'}")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise RunDirError(f"output directory {path} exists and is not empty; pass --force to replace it")
        if replaces is not None and not (path / replaces).is_file():
            raise RunDirError(f"{path} holds files but no {replaces}, so it is not a run directory, and --force "
                              f"replaces only those; choose another {what.strip() or 'output'} or empty it yourself")
    check_writable(path, what)


@contextlib.contextmanager
def dir_lock(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on the existing directory ``path`` for the block.

    Another process holding it makes this raise RunDirError(``busy``) at once, rather than wait.
    The lock is on the directory itself (no lock file is left behind) and goes with the process
    however it ends. Where ``fcntl`` is missing (Windows) the block runs unlocked.
    """
    from .errors import RunDirError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise RunDirError(f"cannot open {path} ({e.strerror or type(e).__name__}); check that it exists and that you "
                          "may read it") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(busy) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, replaces: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``path`` only when the block succeeds.

    An existing non-empty ``path`` is refused unless ``force`` (and, given ``replaces``, unless it
    holds that file: see ``check_output_dir``); with ``force`` it is replaced only after the new
    content is complete.
    """
    path = Path(path)
    check_output_dir(path, force, replaces=replaces)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _os_error(path, "", e) from None
    try:
        yield tmp
        _as_umask_allows(tmp, is_dir=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
