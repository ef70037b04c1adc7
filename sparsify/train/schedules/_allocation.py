"""Initial layer budgets for dynamic schedules: keep the run's, uniform, or Erdős–Rényi-kernel.

Budgets are counted in weights (a conv connection costs kH*kW) so that re-allocating keeps the
run's parameter count; each layer's budget is then rounded to whole mask entries. The ERK formula
itself is ``sparsify.profiles.allocate``'s, the one the transform uses.
"""
from __future__ import annotations

import torch.nn as nn

from ...profiles import LayerShape, allocate
from ._topology import unit_size


def layer_budgets(layers: dict[str, nn.Module], mode: str) -> dict[str, int]:
    """Live mask entries per layer for ``mode`` in {run, uniform, erk} at the run's total weight count."""
    if mode == "run":
        return {n: int(m.mask.sum()) for n, m in layers.items()}
    if mode not in ("uniform", "erk"):
        raise ValueError(f"unknown allocation {mode!r}")
    shapes = [LayerShape(n, int(m.mask.shape[0]), int(m.mask.shape[1]), unit_size(m),
                         kernel_size=tuple(int(k) for k in m.weight.shape[2:])) for n, m in layers.items()]
    live = sum(int(m.mask.sum()) * unit_size(m) for m in layers.values())
    return allocate(shapes, live / sum(s.weights for s in shapes), mode)
