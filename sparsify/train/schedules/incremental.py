"""``incremental`` (Changpinyo et al. 2017, sect. 3.2.1 and 5.3): start sparse, double every T steps.

The run's masks are the target topology. Training starts with a random subset of each layer's
target connections at ``start_density`` (a fraction of all possible connections; default: an
eighth of each layer's target) and doubles every layer's live connections every ``double_every``
steps until the target is reached (default: the doublings spread over the first half of training;
a run too short to reach its masks with training after the last doubling is refused). Existing
connections keep what they learned, so channels that already carry features are reused in new
contexts; an added connection enters "untrained", with the initial value the run gave it.
(Starting added connections at zero deadlocks: when the sparse start leaves a path disconnected,
every weight on a newly opened path is zero and none gets a gradient. On digits that kept the
network at chance.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import TrainingError
from ._topology import fan_in_block, grow_random
from .base import Change, Schedule, ScheduleParams, check, event_generator


@dataclass
class IncrementalParams(ScheduleParams):
    """``start_density``: the density training starts at (default: 1/8 of each layer's live
    connections); ``double_every``: steps between doublings (default: the doublings spread over
    the first half of training)."""

    start_density: float | None = None
    double_every: int | None = None

    def validate(self) -> None:
        check(self.start_density is None or 0 < self.start_density <= 1, "--start-density must be in (0, 1]")
        check(self.double_every is None or self.double_every >= 1, "--double-every must be at least 1")


class Incremental(Schedule):
    """Densify towards the run's topology by doubling the live connections on a fixed period."""

    name = "incremental"
    Params = IncrementalParams
    params: IncrementalParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the run's masks; a resumed run's target, start weights and period come from load_state_dict
        # (the layers hold the checkpoint's half-densified masks by then)
        self.target = {n: (m.mask > 0).to(m.mask.dtype).clone() for n, m in self.layers.items()}
        self.initial = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self.every = 0  # set by start() or load_state_dict

    def _start_counts(self) -> dict[str, int]:
        s = self.params.start_density
        counts = {}
        for n, m in self.layers.items():
            target = int(self.target[n].sum())
            if s is None:
                counts[n] = max(1, math.ceil(target / 8))  # three doublings reach the target (round() could need four)
                continue
            c = max(1, int(round(s * m.mask.numel())))
            if c > target:
                raise TrainingError(
                    f"incremental start density {s:g} is above layer {n}'s density {target / m.mask.numel():.4g} "
                    f"in this run; choose --start-density below the run's density"
                )
            counts[n] = c
        return counts

    def start(self) -> Change | None:
        """Keep a random subset of each layer's target (whole blocks of a block-sparse conv), and
        fix the period: TrainingError when the run is too short to double up to its masks."""
        change, counts = Change(), self._start_counts()
        for i, (n, m) in enumerate(self.layers.items()):
            keep = torch.zeros_like(m.mask)
            grow_random(keep, counts[n], event_generator(self.seed, 0, salt=2000 + i),
                        within=self.target[n], block=fan_in_block(m))
            change.record(n, m.mask, keep)
            m.mask.copy_(keep)
        # from what was kept (block rounding can keep a little less than asked)
        doublings = max((math.ceil(math.log2(float(self.target[n].sum()) / max(float(m.mask.sum()), 1.0)))
                         for n, m in self.layers.items()), default=0)
        total = self.plan.total_steps
        self.every = int(self.params.double_every or max(1, total // max(2 * doublings, 1)))
        room = (total - 1) // self.every  # doublings with training after them (none at the last step)
        if doublings and room < doublings:
            # named as sparsify train's flags: `sparsify run` has no --double-every / --start-density
            fix = (f"train longer, or give sparsify train --double-every {(total - 1) // doublings} or less"
                   if total > doublings else "train longer, or start denser (sparsify train --start-density)")
            every = f"every {self.every} steps" if self.every > 1 else "every step"
            raise TrainingError(f"incremental needs {doublings} doublings to reach the run's density and this run "
                                f"trains {total} steps: room for {room} doubling{'s' if room != 1 else ''}, one "
                                f"{every} with training after each; {fix}")
        return change

    def after_step(self, done: int, grads: dict[str, torch.Tensor] | None) -> Change | None:
        if done % self.every != 0 or done >= self.plan.total_steps:  # none after the last step: never trained
            return None
        change = Change()
        g = event_generator(self.seed, done, salt=31)
        last = done + self.every >= self.plan.total_steps  # the run's last doubling
        for n, m in self.layers.items():
            live, target = int(m.mask.sum()), int(self.target[n].sum())
            if live < target:
                before = m.mask.clone()
                if last or target - live <= live:  # the rest of the target, exactly (blocks round each doubling)
                    m.mask.copy_(self.target[n])
                else:
                    grow_random(m.mask, live, g, within=self.target[n], block=fan_in_block(m))
                change.record(n, before, m.mask)
                added = (m.mask > 0) & (before == 0)
                added = added.reshape(added.shape + (1,) * (m.weight.dim() - 2)).expand_as(m.weight)
                with torch.no_grad():
                    m.weight[added] = self.initial[n][added]
        return change if change.grown else None

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "target": {n: t.clone() for n, t in self.target.items()},
                "initial": {n: t.clone() for n, t in self.initial.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.every = int(state["every"])
        for n, t in state["target"].items():
            self.target[n].copy_(t)
        for n, t in state["initial"].items():
            self.initial[n].copy_(t)
