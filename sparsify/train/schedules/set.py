"""``set`` (Mocanu et al. 2018, Sparse Evolutionary Training): magnitude prune, random regrowth.

After every epoch (or every ``update_every`` steps when given) each layer removes the fraction
zeta (default 0.3) of its live connections closest to zero and regrows as many at random places
(new weights start at zero). Layer budgets are conserved exactly; random choices come from a
generator seeded by (seed, step), identical on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._topology import block_parts, fan_in_block, grow_random, prune_smallest, unit_scores
from .base import Change, Schedule, ScheduleParams, check_prune_rate, check_update_every, event_generator


@dataclass
class SETParams(ScheduleParams):
    """``prune_rate``: zeta, the fraction of each layer's live connections replaced per update
    (default 0.3, Mocanu et al. 2018); ``update_every``: steps between updates (default: once per epoch)."""

    prune_rate: float | None = None
    update_every: int | None = None

    def validate(self) -> None:
        check_prune_rate(self.prune_rate)
        check_update_every(self.update_every)


class SET(Schedule):
    """Sparse Evolutionary Training."""

    name = "set"
    moves = True
    Params = SETParams
    params: SETParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.zeta = 0.3 if self.params.prune_rate is None else float(self.params.prune_rate)
        self.every = self.params.update_every

    def updates(self) -> int:
        """How many updates the run makes: at every ``update_every``-th step before the last, else
        after every epoch but the last."""
        if self.every:
            return (self.plan.total_steps - 1) // self.every
        return self.plan.epochs - 1

    def cadence(self) -> str:
        if self.every:
            lower = ", or lower sparsify train --update-every" if self.every > 1 else ""
            return f"one every {self.every} steps of {self.plan.total_steps}; train longer{lower}"
        return "one after every epoch but the last; train more epochs, or give sparsify train --update-every (steps)"

    def _evolve(self, step: int) -> Change:
        change = Change()
        g = event_generator(self.seed, step, salt=17)
        for n, m in self.layers.items():
            before, b = m.mask.clone(), fan_in_block(m)
            score = unit_scores(m, m.weight)
            for rows in block_parts(m.mask.shape[0], b):  # a short last block regrows what it lost
                mask = m.mask[rows]
                pruned = prune_smallest(mask, score[rows], int(round(self.zeta * float(mask.sum()))), block=b)
                # Regrow among entries that were dead before this update, so a pruned weight is not revived.
                grown = grow_random(mask, pruned, g, within=(before[rows] == 0).to(m.mask.dtype), block=b)
                if grown < pruned:  # a nearly dense layer: fall back to any dead entry
                    grow_random(mask, pruned - grown, g, block=b)
            change.record(n, before, m.mask)
        return change

    def after_step(self, done: int, grads: dict[str, torch.Tensor] | None) -> Change | None:
        if self.every and done % self.every == 0 and done < self.plan.total_steps:
            return self._evolve(done)
        return None

    def after_epoch(self, epoch: int) -> Change | None:
        if self.every or epoch >= self.plan.epochs:
            return None
        return self._evolve(epoch * self.plan.steps_per_epoch)
