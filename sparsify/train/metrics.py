"""Per-layer topology statistics for ``metrics.jsonl``, and its first record (``start_record``).

Fan-in is counted in mask entries (input channels for a conv, inputs for a linear layer).
Gradient concentration (PSN paper): the mean gradient magnitude of the top-decile fan-in units
over the mean of all units, where a unit's gradient magnitude is the L1 norm of the gradient of
its incoming weights, accumulated over every ``GRAD_SAMPLE_EVERY``-th step of the epoch (a sample
keeps the per-step cost negligible for wide linear layers).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from ..nn import SPARSE_LAYERS, live_params
from ..profiles import cv, empty_channels

GRAD_SAMPLE_EVERY = 10


def grad_concentration(fan_in: torch.Tensor, unit_grad: torch.Tensor) -> float | None:
    """Mean gradient magnitude of the top-decile fan-in units / mean over all units."""
    n = fan_in.numel()
    mean_all = float(unit_grad.double().mean())
    if n == 0 or mean_all <= 0:
        return None
    k = max(1, n // 10)
    top = torch.argsort(-fan_in.double(), stable=True)[:k]
    return float(unit_grad.double()[top].mean()) / mean_all


class GradAccumulator:
    """Sums each unit's |gradient| of live weights over the sampled steps of an epoch."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.sums = {n: torch.zeros(m.mask.shape[0], dtype=torch.float64) for n, m in layers.items()}

    def add(self, step: int) -> None:
        """Add the current weight gradients (zero at masked weights) when ``step`` is a sampled one."""
        if step % GRAD_SAMPLE_EVERY:
            return
        for n, m in self.layers.items():
            g = m.weight.grad
            if g is not None:
                self.sums[n] += g.detach().abs().reshape(g.shape[0], -1).sum(dim=1).double()

    def reset(self) -> None:
        for s in self.sums.values():
            s.zero_()


def layer_stats(layers: dict[str, nn.Module], grads: GradAccumulator | None = None) -> dict[str, dict[str, Any]]:
    """Density, live connections, fan-in CV, empty in/out channels and gradient concentration per layer."""
    out = {}
    for n, m in layers.items():
        mask = m.mask > 0
        fan_in = mask.sum(dim=1)
        empty_out, empty_in = empty_channels(mask.cpu().numpy(), int(getattr(m, "groups", 1)))
        rec: dict[str, Any] = {
            "density": round(float(mask.float().mean()), 6),
            "live": int(mask.sum()),
            "fan_in_cv": round(cv(fan_in.cpu().numpy()), 6),
            "empty_out": empty_out,
            "empty_in": empty_in,
        }
        if grads is not None:
            c = grad_concentration(fan_in, grads.sums[n])
            rec["grad_concentration"] = None if c is None else round(c, 6)
        out[n] = rec
    return out


def live_connections(model: nn.Module, layers: dict[str, nn.Module]) -> int:
    """Live connections (mask entries) of the masked ``layers``; of every Conv2d / Linear when there are none.

    A dense model has no masked layer, yet every one of its connections is live: counting zero
    there (as a sum over masks would) misreports dense baselines.
    """
    if layers:
        return sum(int(m.mask.sum()) for m in layers.values())
    return sum(int(m.weight.shape[0] * m.weight.shape[1]) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))


def dense_layer_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``layer_stats``-shaped records of the plain (unmasked) Conv2d / Linear layers: every connection live."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, SPARSE_LAYERS):
            out[n] = {"density": 1.0, "live": int(m.weight.shape[0] * m.weight.shape[1]), "fan_in_cv": 0.0,
                      "empty_out": 0, "empty_in": 0, "dense": True}
    return out


def start_record(model: nn.Module, layers: dict[str, nn.Module], config: dict[str, Any]) -> dict[str, Any]:
    """The first record of ``metrics.jsonl``: the topology training starts from, and what ran it.

    Per-layer live counts and fan-in CV after the schedule set the initial topology (``layers``:
    masked layers; plain weight layers are listed as dense), the initialisation that was asked for
    (``init``, ``init_profile``), the torch thread counts and the library versions.
    """
    from ..rundir import versions

    return {
        "event": "start",
        "schedule": config.get("schedule"),
        "init": config.get("init"),
        "init_profile": config.get("init_profile"),
        "init_profile_params": config.get("init_profile_params") or {},
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": versions(),
        "live": live_connections(model, layers),
        "live_params": live_params(model),
        "layers": {**layer_stats(layers), **dense_layer_stats(model)},
    }
