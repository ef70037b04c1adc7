"""Shared pieces of the CLI: the app, the consoles, and the error boundary."""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import SparsifyError, UsageError

app = typer.Typer(
    name="sparsify",
    help="Compile PyTorch models into channel-sparse ones, retrain them, export them to ONNX, "
    "and measure how much faster they run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Results go to stdout; progress and messages to stderr so that `--json > file` stays clean.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print ``message`` as the one error line and return the exit to raise (code 2)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)  # "[study]" is text
    return typer.Exit(code=2)


def handle_errors(fn: F) -> F:
    """Turn SparsifyError into one line + exit 2, and Ctrl-C into one line + exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SparsifyError as e:
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except KeyboardInterrupt:
            err.print("interrupted; completed outputs are intact, partial ones were removed")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """Parse ``1,3,32,32`` into a tuple of positive ints (None stays None)."""
    if text is None:
        return None
    sep = "," if "," in text else "x"
    try:
        dims = tuple(int(t) for t in text.split(sep))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r} is not a list of positive integers; write e.g. 1,3,32,32")
    return dims
