"""Facts about the machine this process runs on that commands act on (no heavy imports)."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def oversubscribed_note(threads: int, what: str = "--threads") -> str | None:
    """A one-line warning when ``threads`` busy threads exceed the usable cores: they share cores,
    and latencies measure the contention (a 2-core machine's p90 grew 45x at 8 threads) and
    training slows down badly; None otherwise."""
    cores = usable_cores()
    if threads <= cores:
        return None
    return (f"{what} asks for {threads} threads on {cores} usable core{'s' if cores > 1 else ''}: they take turns, "
            f"so timings measure the contention and work runs slower; use at most {cores}")
