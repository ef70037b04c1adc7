"""The train stage: data sets, the sparse trainer, topology schedules, checkpoints, fit-profile."""
from __future__ import annotations

from .run import train_run
from .trainer import TrainConfig, fit

__all__ = ["TrainConfig", "fit", "train_run"]
