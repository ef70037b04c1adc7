"""The train stage: data sets, the sparse trainer, topology schedules, checkpoints, fit-profile.

The package itself is callable, ``sparsify.train(run_dir, **config)`` == ``train_run``, so the
public API name and the subpackage name do not fight over the ``sparsify.train`` attribute.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from .run import train_run
from .trainer import TrainConfig, fit


class _CallableModule(types.ModuleType):
    def __call__(self, run_dir: Any, **kwargs: Any) -> dict[str, Any]:
        """Train a run directory: see ``train_run``."""
        return train_run(run_dir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["TrainConfig", "fit", "train_run"]
