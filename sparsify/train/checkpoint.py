"""Training checkpoints: one file, replaced atomically at every epoch end.

A checkpoint holds the model state (weights and masks), optimiser state, schedule state, the
global torch RNG state (dropout), the epoch reached, the configuration and the metrics history.
It is a ``torch.save`` of tensors and plain values only and is read back with
``torch.load(weights_only=True)``: no pickled code. An interrupted write leaves the previous
checkpoint untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._io import atomic_path
from ..errors import RunDirError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
FORMAT = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    """Where a run directory keeps its last checkpoint."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (the directory is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"no checkpoint at {path}; start training without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged files
        raise RunDirError(f"checkpoint {path} cannot be read ({type(e).__name__}); "
                          f"start again with --force") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RunDirError(f"checkpoint {path} has an unknown format; start again with --force")
    return state
