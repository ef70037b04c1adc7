"""Studies: multi-seed experiments (``sparsify study``) and their comparison (``sparsify compare``).

``load_spec(path)`` reads a TOML study spec (format: ``sparsify.study.spec``), ``run_study(spec,
out)`` trains every arm x seed as a run directory, side by side in processes, resumably
(``sparsify.study.runner``), and ``compare(paths)`` collects run directories or a study directory
into per-arm statistics with paired differences against a baseline (``sparsify.study.compare``).
Imports are lazy: workers set their thread count before torch is imported.
"""
from __future__ import annotations

from typing import Any


def load_spec(path: Any) -> Any:
    """Read and validate a study spec: see ``sparsify.study.spec.load_spec``."""
    from .spec import load_spec as f

    return f(path)


def run_study(*args: Any, **kwargs: Any) -> Any:
    """Run or resume a study: see ``sparsify.study.runner.run_study``."""
    from .runner import run_study as f

    return f(*args, **kwargs)


def compare(*args: Any, **kwargs: Any) -> Any:
    """Per-arm statistics of run directories or a study: see ``sparsify.study.compare.compare``."""
    from .compare import compare as f

    return f(*args, **kwargs)
