"""CLI: `sparsify runtime ...` (native kernel status)."""
from __future__ import annotations

from ._common import app, err, handle_errors, out  # noqa: F401
