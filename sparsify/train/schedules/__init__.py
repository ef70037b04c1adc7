"""Topology schedules, one module each, all implementing ``base.Schedule``."""
from __future__ import annotations

from ...errors import UsageError
from .base import Change, Plan, Schedule, ScheduleParams
from .incremental import Incremental
from .rigl import RigL
from .set import SET
from .sparse_momentum import SparseMomentum
from .static import Static

SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (Static, SparseMomentum, RigL, SET, Incremental)}


def schedule_class(name: str) -> type[Schedule]:
    """The schedule called ``name``; UsageError naming the choices otherwise."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise UsageError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


__all__ = ["Change", "Plan", "Schedule", "ScheduleParams", "SCHEDULES", "schedule_class"]
