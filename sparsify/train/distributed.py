"""Distributed helpers: torchrun detection, process-group set-up and all-reduces.

Under ``torchrun`` (RANK / WORLD_SIZE in the environment) the trainer wraps the model in
DistributedDataParallel (gloo on CPU, nccl on CUDA). Topology schedules reduce their statistics
through a ``Reducer`` so every rank takes the same decision; single-process runs use the same
object with no-op reductions.
"""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


class Reducer:
    """All-reduce helpers that are no-ops in a single process."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` over ranks, in place."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world_size)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` with rank ``src``'s value, in place."""
        if self.active:
            dist.broadcast(t, src)
        return t

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment asks for more than one process (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group described by the environment; return True if this call created it."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


def shutdown(created: bool) -> None:
    """Destroy the process group if ``init_from_env`` created it."""
    if created and dist.is_initialized():
        release_process_group()


def release_process_group() -> None:
    """Tear the process group down safely.

    A DistributedDataParallel wrapper left for the garbage collector still owns gloo work; if it is
    freed after the group is destroyed (at interpreter exit) the process aborts ("terminate called
    without an active exception"). Collect it first, and let no rank leave while another still
    communicates.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
