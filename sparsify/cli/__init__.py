"""The ``sparsify`` command line: one typer app, one module per pipeline stage.

The modules only parse arguments, call the library and print; every ``SparsifyError`` becomes one
line on stderr and exit code 2 (see ``_common.handle_errors``).
"""
from __future__ import annotations

from ._common import app

# Importing the stage modules registers their commands on ``app``.
from . import transform as _transform  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401
from . import export as _export  # noqa: E402,F401
from . import bench as _bench  # noqa: E402,F401
from . import runtime as _runtime  # noqa: E402,F401
from . import study as _study  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
