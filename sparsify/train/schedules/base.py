"""The one interface every topology schedule implements.

The trainer calls, in order: ``start()`` once before the first step of a fresh run (a schedule
may reshape the initial masks there), then for every optimiser step ``wants_dense_grad(step)``
(should the dense gradient of the coming step be captured?) and ``after_step(done, grads)``, and
``after_epoch(epoch)`` at each epoch end. Each hook edits layer masks in place and returns a
``Change`` (per-layer connections pruned / grown) or None; the trainer then zeroes the weights and
optimiser state of every masked entry. Topology decisions only use statistics that are identical
on every distributed rank (weights, all-reduced gradients, seeded generators), so all ranks hold
the same masks. ``state_dict`` / ``load_state_dict`` make a resumed run bit-identical.

Each schedule owns its settings: ``Params``, a small dataclass that validates itself (UsageError
naming the CLI flag). The trainer's ``TrainConfig`` holds the shared settings and one ``Params``
of the chosen schedule; a schedule reads its own as ``self.params``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from ...errors import TrainingError, UsageError
from ..distributed import Reducer

if TYPE_CHECKING:
    from ..trainer import TrainConfig


def flag(name: str) -> str:
    """The CLI flag of a setting: ``prune_rate`` -> ``--prune-rate``; ``init_profile_params`` (a dict)
    is given one ``--init-profile-param NAME=VALUE`` at a time."""
    return "--init-profile-param" if name == "init_profile_params" else "--" + name.replace("_", "-")


def check(ok: bool, message: str) -> None:
    """UsageError(``message``) unless ``ok``: one line naming the flag and what it takes."""
    if not ok:
        raise UsageError(message)


@dataclass
class ScheduleParams:
    """A schedule's own settings (none for ``static``). Subclasses add fields, each a CLI flag of
    ``sparsify train`` (``prune_rate`` is ``--prune-rate``), and their checks in ``validate``.
    Giving one to a schedule that does not own it is refused (``TrainConfig.validate``).
    """

    def validate(self) -> None:
        """Raise UsageError, naming the flag, on a value that cannot work."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def check_prune_rate(value: float | None) -> None:
    check(value is None or 0 < value < 1, "--prune-rate must be in (0, 1)")


def check_update_every(value: int | None) -> None:
    check(value is None or value >= 1, "--update-every must be at least 1")


@dataclass(frozen=True)
class Plan:
    """How long training runs: the clock the schedules decay against."""

    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class Change:
    """Connections (mask entries) pruned and grown per layer by one topology update."""

    pruned: dict[str, int] = field(default_factory=dict)
    grown: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, pruned: int, grown: int) -> None:
        self.pruned[name] = self.pruned.get(name, 0) + pruned
        self.grown[name] = self.grown.get(name, 0) + grown

    def record(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        """Add the entries that went from live to dead and from dead to live between two masks: a
        connection pruned and grown again in the same update did not move (and keeps its weight)."""
        self.add(name, int(((before > 0) & (after == 0)).sum()), int(((before == 0) & (after > 0)).sum()))


FEW_UPDATES = 3  # fewer topology updates than this are noted (the run is nearly static training)


def event_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step): random choices need no saved state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))


class Schedule:
    """A topology schedule; subclasses override the hooks they need."""

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = True
    moves: ClassVar[bool] = False  # prunes and regrows connections (rigl, set, sparse-momentum)
    Params: ClassVar[type[ScheduleParams]] = ScheduleParams

    def __init__(self, layers: dict[str, nn.Module], plan: Plan, config: "TrainConfig", reducer: Reducer) -> None:
        self.layers = layers
        self.plan = plan
        self.config = config  # the shared settings (seed, optimizer, ...)
        self.params = config.params  # this schedule's own, a ``Params``
        if not isinstance(self.params, self.Params):
            raise TypeError(f"schedule {self.name!r} takes {self.Params.__name__}, got {type(self.params).__name__}")
        self.reducer = reducer
        self.seed = int(config.seed)

    def start(self) -> Change | None:
        """Adjust the initial masks of a fresh run (default: keep the run's masks)."""
        return None

    def wants_dense_grad(self, step: int) -> bool:
        """Whether the step with 0-based index ``step`` must capture dense gradients."""
        return False

    def after_step(self, done: int, grads: dict[str, torch.Tensor] | None) -> Change | None:
        """Called after optimiser step number ``done`` (1-based) with the captured dense gradients."""
        return None

    def after_epoch(self, epoch: int) -> Change | None:
        """Called after epoch ``epoch`` (1-based) has finished."""
        return None

    def updates(self) -> int | None:
        """How many topology updates the run makes; None for a schedule that makes none by design."""
        return None

    def cadence(self) -> str:
        """When the updates come and how to get more (the few-updates note's ending)."""
        return ""

    def notes(self) -> list[str]:
        """One-line remarks on how this schedule fits the run (too few topology updates); recorded as warnings."""
        n = self.updates()
        if n is None or n >= FEW_UPDATES:
            return []
        made = ("no topology update, so it trains like --schedule static" if n == 0 else
                f"only {n} topology update{'s' if n > 1 else ''}")
        return [f"{self.name} makes {made}: {self.cadence()}"]

    def check_masks(self) -> None:
        """TrainingError when this schedule cannot change the run's masks at all: one that moves
        connections (``moves``) on a run whose masked layers are all dense (density 1) has no
        missing connection to grow, and would train like ``static`` while reporting moves."""
        if self.moves and all(bool((m.mask > 0).all()) for m in self.layers.values()):
            raise TrainingError(f"every masked layer of this run has all its connections (its density, or each "
                                f"layer's fan-in rounded at it, is 1), so {self.name} has no missing connection to "
                                f"grow; train it with --schedule static, or transform at a lower density")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
