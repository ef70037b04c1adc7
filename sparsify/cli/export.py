"""CLI commands of the export stage."""
from __future__ import annotations

from ._common import app, err, handle_errors, out  # noqa: F401
