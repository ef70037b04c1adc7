"""``sparse-momentum`` (Dettmers & Zettlemoyer 2019, Algorithm 1).

After every epoch: (a) each layer's share of the regrowth is its mean momentum magnitude over live
weights, sum-normalised across layers; (b) each layer prunes a fraction p_i of its live
connections with the smallest magnitude; (c) each layer regrows its share where the momentum of
missing connections is largest (new weights start at zero). p follows a cosine decay that reaches
zero at the last epoch. Edge cases of the paper: a layer that cannot take its share passes the
excess on equally to the others, and a layer that is nearly dense but still growing prunes
p_i = min(p, sparsity_i).

The momentum is an exponentially smoothed *dense* gradient (gradient w.r.t. the effective weight,
so missing connections have one too), kept by the schedule because the optimiser's own buffers
are exactly zero at masked weights. Shares are counted in weights, so conv connections (kxk
weights each) and linear weights trade at their true parameter cost; the integer remainder is
carried to the next update, keeping the total number of live weights constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._topology import fan_in_block, grow_largest, prune_smallest, unit_scores, unit_size
from .base import Change, Schedule, ScheduleParams, check_prune_rate


def distribute(total: int, shares: list[float], capacity: list[int], quantum: list[int]) -> tuple[list[int], int]:
    """Split ``total`` weights into per-layer entry counts by ``shares``, respecting capacities.

    A layer whose share exceeds its capacity is filled and the excess is spread equally over the
    layers that still have room (the paper's first edge case). Returns (entries per layer,
    weights left over because of the integer quanta).
    """
    n = len(shares)
    alloc = [0] * n
    want = [total * s for s in shares]
    open_ = [i for i in range(n) if capacity[i] > 0]
    for _ in range(n + 1):
        excess = 0.0
        for i in list(open_):
            units = min(capacity[i], int(want[i] // quantum[i]))
            if units >= capacity[i]:
                excess += want[i] - capacity[i] * quantum[i]
                want[i] = capacity[i] * quantum[i]
                open_.remove(i)
            alloc[i] = units
        if excess <= 0 or not open_:
            break
        for i in open_:
            want[i] += excess / len(open_)
    left = total - sum(a * q for a, q in zip(alloc, quantum))
    # Largest remainders first, so rounding never favours a layer by its position.
    order = sorted(range(n), key=lambda i: (-(want[i] - alloc[i] * quantum[i]), i))
    for i in order:
        while left >= quantum[i] and alloc[i] < capacity[i] and want[i] - alloc[i] * quantum[i] > 0:
            alloc[i] += 1
            left -= quantum[i]
    for i in sorted(range(n), key=lambda i: quantum[i]):
        while left >= quantum[i] and alloc[i] < capacity[i]:
            alloc[i] += 1
            left -= quantum[i]
    return alloc, left


@dataclass
class SparseMomentumParams(ScheduleParams):
    """``prune_rate``: the initial prune rate p (default 0.5, Dettmers & Zettlemoyer 2019, sect. 3):
    after epoch e of E, p * (1 + cos(pi * e / E)) / 2 of each layer's live connections are pruned
    (so 0.375 after the first of 3 epochs), down to 0 at the last. The momentum that scores layers
    and regrowth is the optimiser's: ``--momentum`` smooths it (0 leaves the last batch's gradient)."""

    prune_rate: float | None = None

    def validate(self) -> None:
        check_prune_rate(self.prune_rate)


class SparseMomentum(Schedule):
    """Prune by magnitude, redistribute by mean momentum, regrow by momentum, once per epoch."""

    name = "sparse-momentum"
    moves = True
    Params = SparseMomentumParams
    params: SparseMomentumParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prune_rate = 0.5 if self.params.prune_rate is None else float(self.params.prune_rate)
        self.beta = float(self.config.momentum) if self.config.optimizer == "sgd" else 0.9
        self.momentum = {n: torch.zeros_like(m.weight) for n, m in self.layers.items()}
        self.carry = 0

    def rate(self, epoch: int) -> float:
        """The pruning rate applied after epoch ``epoch``: cosine decay to zero at the last epoch."""
        return self.prune_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / self.plan.epochs))

    def updates(self) -> int:
        """One update after every epoch but the last (its prune rate has decayed to 0 there)."""
        return sum(self.rate(e) > 0 for e in range(1, self.plan.epochs))

    def cadence(self) -> str:
        return "one after every epoch but the last; train more epochs"

    def wants_dense_grad(self, step: int) -> bool:
        return True

    def after_step(self, done: int, grads: dict[str, torch.Tensor] | None) -> Change | None:
        if grads:
            for n, g in grads.items():
                torch.add(g, self.momentum[n], alpha=self.beta, out=self.momentum[n])  # M = beta*M + g, one pass
        return None

    def after_epoch(self, epoch: int) -> Change | None:
        p = self.rate(epoch)
        if epoch >= self.plan.epochs or p <= 0:
            return None
        names = list(self.layers)
        for n in names:
            self.reducer.mean_(self.momentum[n])
        # (a) mean momentum magnitude of live weights, per layer.
        mean_mom = []
        for n in names:
            m = self.layers[n]
            live = m.weight_mask() > 0
            mean_mom.append(float(self.momentum[n].abs()[live].mean()) if bool(live.any()) else 0.0)
        total = sum(mean_mom)
        shares = [v / total for v in mean_mom] if total > 0 else [1.0 / len(names)] * len(names)
        # (b) prune the smallest magnitudes.
        change = Change()
        before = {n: self.layers[n].mask.clone() for n in names}
        removed = 0
        for i, n in enumerate(names):
            m = self.layers[n]
            live = int(m.mask.sum())
            sparsity = 1.0 - live / m.mask.numel()
            p_i = min(p, sparsity) if shares[i] > 1.0 / len(names) else p
            k = prune_smallest(m.mask, unit_scores(m, m.weight), int(round(p_i * live)), block=fan_in_block(m))
            removed += k * unit_size(m)
        # (c) regrow where the momentum of missing connections is largest. A layer with shared fan-ins
        # grows whole blocks: its capacity and allocation count blocks of fan_in_block entries (they
        # counted entries against a block's weights, so a layer of blocks of 4 regrew a quarter of
        # its share and the network lost weights every epoch).
        blocks = [fan_in_block(self.layers[n]) for n in names]
        capacity = [int((self.layers[n].mask == 0).sum()) // b for n, b in zip(names, blocks)]
        quanta = [unit_size(self.layers[n]) * b for n, b in zip(names, blocks)]
        budget = removed + self.carry  # below 0 when a layer grew a partial block more than its share
        alloc, left = distribute(max(budget, 0), shares, capacity, quanta)
        self.carry = left + min(budget, 0)
        for i, n in enumerate(names):
            m = self.layers[n]
            grown = grow_largest(m.mask, unit_scores(m, self.momentum[n]), alloc[i] * blocks[i], block=blocks[i])
            # what a layer of blocks could not place exactly (a last block of fewer rows) is carried
            self.carry += alloc[i] * quanta[i] - grown * unit_size(m)
            change.record(n, before[n], m.mask)
        return change

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": {n: t.clone() for n, t in self.momentum.items()}, "carry": self.carry}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, t in state["momentum"].items():
            self.momentum[n].copy_(t)
        self.carry = int(state["carry"])
