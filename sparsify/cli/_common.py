"""Shared pieces of the CLI: the app, the consoles, and the error boundary.

Two boundaries turn every failure a user can cause into one ``error:`` line on stderr and exit
code 2: ``handle_errors`` around each command (``SparsifyError``), and ``_Group.main`` around the
whole app (values that typer/click reject while parsing: a non-number for ``--density``, an unknown
command, a missing argument), which otherwise print a multi-line usage box.
"""
from __future__ import annotations

import errno
import functools
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer import _click
from typer.core import TyperCommand, TyperGroup

from ..errors import SparsifyError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

# Results go to stdout; progress and messages to stderr so that `--json > file` stays clean.
# Text is printed as written: no markup or emoji codes in it are interpreted (a path like
# runs/[red]x or model.py:A: is the user's), so styled output passes markup=True and escapes
# what it interpolates, or styles a rich Text.
out = Console(soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _flags_without_type(params: list[Any]) -> list[Any]:
    """Show on/off flags as flags in help: typer's rich help gives every option a type column (``<bool>``)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))

    def main(self, args: Any = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Run the app; a value click rejects becomes one ``error:`` line and exit code 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        restore = _watch_sigint()
        try:
            with warnings.catch_warnings():
                # torch's and onnx's UserWarnings are addressed to developers; a user's command prints
                # its own lines only (set PYTHONWARNINGS to see them).
                if not sys.warnoptions:
                    for module in ("torch", "onnx", "onnxscript", "onnx_ir"):
                        warnings.filterwarnings("ignore", category=UserWarning, module=module)
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except _click.ClickException as e:
            fail(_usage_line(e))
            sys.exit(2)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        finally:
            restore()
        sys.exit(rv if isinstance(rv, int) else 0)


# Ctrl-C during a command, also when the KeyboardInterrupt it raised never reached handle_errors:
# one that lands in a lazy import inside torch (tracing imports torch._dynamo on first use) leaves a
# half-initialised module behind, and the command then failed with "torch.fx cannot trace MODEL
# (AttributeError: module 'torch._dynamo' has no attribute ...)", blaming the user's model, or
# torch swallowed it and the command ran on.
_sigint = threading.Event()
_signal_number: int | None = None  # the signal that stopped the command: SIGINT, or SIGTERM (kill, timeout)


def _on_sigint(signum: int, frame: Any) -> None:
    global _signal_number
    _signal_number = signum
    _sigint.set()
    signal.default_int_handler(signum, frame)


def _watch_sigint() -> Callable[[], None]:
    """Note every SIGINT of this command (``_sigint``), and take SIGTERM as one (``kill``, ``timeout``:
    Python's default ended the process at once, leaving temporary directories behind); returns what
    restores the previous handlers."""
    global _signal_number
    _sigint.clear()
    _signal_number = None
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    # a shell's background job (`cmd &`) starts with SIGINT ignored: SIGTERM is still taken
    watch_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if watch_int:
        signal.signal(signal.SIGINT, _on_sigint)
    term = signal.getsignal(signal.SIGTERM)
    if term is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigint)

    def restore() -> None:
        if watch_int:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if term is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _sigint.clear()

    return restore


def _interrupted(e: BaseException | None = None) -> typer.Exit:
    """The one line for a stopped command (what an interrupt that kept work says, else the general
    one) and its exit: 130 for Ctrl-C, 143 for SIGTERM."""
    kept = str(e) if isinstance(e, KeyboardInterrupt) and str(e) else None
    err.print(kept or "interrupted; completed outputs are intact, partial ones were removed", highlight=False)
    return typer.Exit(code=128 + (_signal_number or signal.SIGINT))


def _usage_line(e: Any) -> str:
    """Click's message on one line, with where to read the usage."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    return f"{message.rstrip('.')}{where}"


class SparsifyTyper(typer.Typer):
    """typer.Typer whose groups and commands are the classes above, with ``-h`` as well as ``--help``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", _Group)
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("pretty_exceptions_enable", False)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("cls", _Command)
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        return super().command(*args, **kwargs)


app = SparsifyTyper(
    name="sparsify",
    help="Compile PyTorch models into channel-sparse ones, retrain them, export them to ONNX, "
    "and measure how much faster they run.",
    no_args_is_help=True,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"sparsify {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Compile PyTorch models into channel-sparse ones, retrain them, export them to ONNX, and measure
    how much faster they run."""


def fail(message: str) -> typer.Exit:
    """Print ``message`` as the one error line and return the exit to raise (code 2)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)  # "[study]" is text
    return typer.Exit(code=2)


_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


# How an allocation that cannot be served surfaces: numpy's MemoryError (ValueError for a size past
# what an array can index: a batch of 10**20), torch's CPU allocator (RuntimeError), ONNX Runtime's
# arena (its RuntimeException / Fail).
_OOM_TEXT = ("can't allocate memory", "failed to allocate memory", "bad_alloc", "bad allocation",
             "maximum allowed dimension exceeded", "array is too big")


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(t in str(e).lower() for t in _OOM_TEXT)


def handle_errors(fn: F) -> F:
    """Turn SparsifyError into one line + exit 2, and Ctrl-C (``_sigint``) into one line + exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            rv = fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, _click.ClickException):
            raise
        except SparsifyError as e:
            if _sigint.is_set():  # the error is the interrupt's doing (see _sigint)
                raise _interrupted() from None
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except KeyboardInterrupt as e:
            raise _interrupted(e) from None
        except OSError as e:
            if _sigint.is_set():
                raise _interrupted() from None
            if e.errno == errno.ENAMETOOLONG:  # a path component over the file system's 255 bytes
                raise fail(f"{e.strerror} ({e.filename}); choose a shorter name") from None
            if e.errno not in _STORAGE_ERRORS:
                raise
            # a full disk or a read-only file system while writing: the writers leave no partial file
            where = f" ({e.filename})" if e.filename else ""
            raise fail(f"{e.strerror or e}{where}; nothing was left half-written: free some space, or write to "
                       f"another place, and retry") from None
        except Exception as e:
            if _sigint.is_set():
                raise _interrupted() from None
            if _out_of_memory(e):
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise fail(f"out of memory ({first}); use a smaller --batch-size (or smaller inputs), or close "
                           f"other programs, and retry") from None
            raise
        if _sigint.is_set():  # swallowed on the way: the command ran on, but the user asked to stop
            raise _interrupted()
        return rv

    return wrapper  # type: ignore[return-value]


def parse_shape(text: str | None) -> tuple[int, ...] | list[tuple[int, ...]] | None:
    """Parse ``1,3,32,32`` into a tuple of positive ints, or ``1,3,32,32;1,3,16,16`` (one shape per
    model input) into a list of them (None stays None)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(";")]
    shapes = []
    for part in parts:
        sep = "," if "," in part else "x"
        try:
            dims = tuple(int(t) for t in part.split(sep))
        except ValueError:
            dims = ()
        if not dims or any(d <= 0 for d in dims):
            raise UsageError(f"--input-shape {text!r} is not a list of positive integers; write e.g. 1,3,32,32, "
                             "or \"1,3,32,32;1,3,32,32\" for a model with two inputs")
        shapes.append(dims)
    return shapes[0] if len(shapes) == 1 else shapes
