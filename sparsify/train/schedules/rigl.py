"""``rigl`` (Evci et al. 2020): drop by magnitude, grow by dense-gradient magnitude, every ΔT steps.

Every ``update_every`` steps (default 100, or fewer so that a short run makes at least 10 updates;
a run with fewer than 3 is noted), until ``stop_fraction`` (75%) of training, each layer drops the
fraction f(t) of its live connections with the smallest magnitude and grows as many where the
dense gradient (captured on that step only, averaged over ranks) is largest; new connections start
at zero. f(t) = f0/2 * (1 + cos(pi t / T_end)). Layer budgets are conserved exactly.

Initial topology: the run's masks, or budgets re-drawn ``uniform`` / ``erk``, optionally with a PSN
fan-in profile inside each layer (``init_profile``, parameters per layer with ``NAME@LAYER``); re-drawn layers get a fresh, seeded default
initialisation because their old weights exist only where the old mask was live.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...errors import TrainingError, UsageError
from ...profiles import fan_in_counts, random_mask
from ._allocation import layer_budgets
from ._topology import block_parts, fan_in_block, grow_largest, prune_smallest, random_mask_like, unit_scores
from .base import Change, Schedule, ScheduleParams, check, check_prune_rate, check_update_every, event_generator


def profile_fan_in(profile: str, n_units: int, fan_in_max: int, budget: int, params: dict[str, Any],
                   layer: str = "") -> list[int]:
    """Per-unit fan-in of a PSN profile from ``sparsify.profiles`` (TrainingError when it does not fit)."""
    if budget < n_units:  # every unit gets one connection at least: "a budget of 18 cannot be split over 32 units"
        raise TrainingError(f"--init-profile {profile} gives each of layer {layer}'s {n_units} output units at least "
                            f"one connection, but its budget is {budget}; use --init erk (it gives small layers "
                            f"more), or transform at a higher density")
    try:
        counts = fan_in_counts(profile, n_units, fan_in_max, budget, dict(params))
    except (ValueError, UsageError) as e:
        raise TrainingError(f"PSN profile {profile!r} with {params} does not fit layer {layer}: {e}") from None
    return [int(c) for c in counts]


def layer_profile_params(params: dict[str, Any], layer: str, layers: Any = None) -> dict[str, Any]:
    """The profile parameters of ``layer``: ``NAME=v`` for every layer, overridden by ``NAME@LAYER=v``.

    Per-layer values let a run start from each layer's own fitted equilibrium (``sparsify
    fit-profile`` reports a sigma per layer). With ``layers``, a key naming no layer is a TrainingError.
    """
    out = {k: v for k, v in params.items() if "@" not in k}
    for k, v in params.items():
        name, sep, target = k.partition("@")
        if sep and layers is not None and target not in layers:
            raise TrainingError(f"--init-profile-param {k} names no masked layer; layers: {', '.join(layers)}")
        if sep and target == layer:
            out[name] = v
    return out


def redraw_topology(schedule: Schedule) -> Change | None:
    """Re-draw masks from the configured allocation / profile; None when the run's masks are kept."""
    cfg = schedule.params
    if cfg.init == "run" and not cfg.init_profile:
        return None
    budgets = layer_budgets(schedule.layers, cfg.init)
    change = Change()
    for i, (n, m) in enumerate(schedule.layers.items()):
        g = event_generator(schedule.seed, 0, salt=1000 + i)
        out_units, in_units = m.mask.shape
        b = fan_in_block(m)
        if cfg.init_profile:
            # one fan-in per block of b output units (b = 1: per unit)
            rows = -(-out_units // b)
            params = layer_profile_params(cfg.init_profile_params or {}, n, schedule.layers)
            fan_in = profile_fan_in(cfg.init_profile, rows, in_units, round(budgets[n] * rows / out_units), params, n)
            # numpy's stream, seeded like the event generator: the same mask on every rank
            rng = np.random.default_rng((schedule.seed * 1_000_003 + 1000 + i) % (2**63 - 1))
            drawn = random_mask(rows, np.arange(in_units), sum(fan_in), rng, row_counts=np.asarray(fan_in))
            new = torch.from_numpy(np.repeat(drawn, b, axis=0)[:out_units]).to(m.mask.dtype)
        else:
            new = random_mask_like(m.mask, budgets[n], g, block=b)
        before = m.mask.clone()
        with torch.no_grad():
            torch.nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
            m.mask.copy_(new.to(m.mask.dtype))
        change.record(n, before, new)
    return change


INITS = ("run", "uniform", "erk")


@dataclass
class RigLParams(ScheduleParams):
    """``prune_rate``: the drop fraction f0 (default 0.3); ``update_every``: ΔT, steps between
    updates (default 100, less for a run too short for 10 updates: ``default_interval``); ``stop_fraction``: no updates after this fraction of training;
    ``init``: the initial layer budgets (the run's, ``uniform`` or ``erk``); ``init_profile`` /
    ``init_profile_params``: a PSN fan-in profile inside each layer (``NAME@LAYER`` per layer)."""

    prune_rate: float | None = None
    update_every: int | None = None
    stop_fraction: float = 0.75
    init: str = "run"
    init_profile: str | None = None
    init_profile_params: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_prune_rate(self.prune_rate)
        check_update_every(self.update_every)
        check(0 < self.stop_fraction <= 1, "--stop-fraction must be in (0, 1]")
        check(self.init in INITS, f"--init must be one of {', '.join(INITS)}")
        check(not self.init_profile_params or self.init_profile is not None,
              "--init-profile-param sets a parameter of --init-profile, which is not given; give --init-profile NAME")


DEFAULT_INTERVAL = 100  # ΔT of Evci et al. 2020 (sect. 4), for runs long enough to make MIN_UPDATES with it
MIN_UPDATES = 10        # updates before the stop point that the default interval leaves a short run


def default_interval(end: int) -> int:
    """ΔT when the user set none: 100, or less for a run whose stop point ``end`` (steps) leaves fewer than 10 updates.

    The paper's ΔT = 100 assumes tens of thousands of steps; like SET and sparse momentum (once
    per epoch), a short run still gets updates: at least ``MIN_UPDATES`` before ``end`` when
    ``end`` > 10, every step otherwise.
    """
    return max(1, min(DEFAULT_INTERVAL, (end - 1) // MIN_UPDATES))


class RigL(Schedule):
    """Rigging the Lottery: magnitude drop, gradient grow, cosine-decayed drop fraction."""

    name = "rigl"
    moves = True
    Params = RigLParams
    params: RigLParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop_fraction = 0.3 if self.params.prune_rate is None else float(self.params.prune_rate)
        self.end = int(self.params.stop_fraction * self.plan.total_steps)
        self.every = int(self.params.update_every or default_interval(self.end))

    def updates(self) -> int:
        """How many topology updates the run makes (at multiples of ``every`` before ``end``)."""
        return max(0, (self.end - 1) // self.every)

    def cadence(self) -> str:
        lower = ", or lower sparsify train --update-every" if self.every > 1 else ""
        return (f"one every {self.every} steps, before step {self.end} ({self.params.stop_fraction:g} of "
                f"{self.plan.total_steps}); train longer{lower}")

    def start(self) -> Change | None:
        return redraw_topology(self)

    def fraction(self, done: int) -> float:
        """Drop fraction after ``done`` steps."""
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * done / max(self.end, 1)))

    def _due(self, done: int) -> bool:
        return done % self.every == 0 and done < self.end

    def wants_dense_grad(self, step: int) -> bool:
        return self._due(step + 1)

    def after_step(self, done: int, grads: dict[str, torch.Tensor] | None) -> Change | None:
        if not self._due(done) or not grads:
            return None
        f = self.fraction(done)
        change = Change()
        for n, m in self.layers.items():
            g = self.reducer.mean_(grads[n].detach().clone())
            before, b = m.mask.clone(), fan_in_block(m)
            drop, grow = unit_scores(m, m.weight), unit_scores(m, g)
            for rows in block_parts(m.mask.shape[0], b):  # a short last block regrows what it lost
                mask = m.mask[rows]
                pruned = prune_smallest(mask, drop[rows], int(round(f * float(mask.sum()))), block=b)
                grow_largest(mask, grow[rows], pruned, block=b)
            change.record(n, before, m.mask)
        return change
