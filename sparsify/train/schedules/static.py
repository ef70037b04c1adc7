"""``static``: the masks chosen by the transform never change (sparse-random / PSN baselines)."""
from __future__ import annotations

from .base import Schedule


class Static(Schedule):
    """Train the weights only; the topology is fixed."""

    name = "static"
    dynamic = False
