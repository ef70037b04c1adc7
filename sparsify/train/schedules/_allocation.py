"""Initial layer budgets for dynamic schedules: keep the run's, uniform, or Erdős–Rényi-kernel.

Budgets are counted in weights (a conv connection costs kH*kW) so that re-allocating keeps the
run's parameter count; each layer's budget is then rounded to whole mask entries.
"""
from __future__ import annotations

import math

import torch.nn as nn

from ._topology import unit_size


def _weights(m: nn.Module) -> int:
    return int(m.mask.numel()) * unit_size(m)


def layer_budgets(layers: dict[str, nn.Module], mode: str) -> dict[str, int]:
    """Live mask entries per layer for ``mode`` in {run, uniform, erk} at the run's total weight count."""
    if mode == "run":
        return {n: int(m.mask.sum()) for n, m in layers.items()}
    budget = sum(int(m.mask.sum()) * unit_size(m) for m in layers.values())
    if mode == "uniform":
        raw = {n: 1.0 for n in layers}
    elif mode == "erk":
        # ERK (Evci et al. 2020): density proportional to sum(shape) / prod(shape).
        raw = {n: sum(m.weight.shape) / math.prod(m.weight.shape) for n, m in layers.items()}
    else:
        raise ValueError(f"unknown allocation {mode!r}")
    dense: set[str] = set()
    while True:
        free = budget - sum(_weights(layers[n]) for n in dense)
        scale = free / max(sum(raw[n] * _weights(layers[n]) for n in layers if n not in dense), 1e-12)
        over = {n for n in layers if n not in dense and raw[n] * scale > 1.0}
        if not over:
            break
        dense |= over
    out = {}
    for n, m in layers.items():
        d = 1.0 if n in dense else raw[n] * scale
        out[n] = max(1, min(int(m.mask.numel()), int(round(d * m.mask.numel()))))
    return out
