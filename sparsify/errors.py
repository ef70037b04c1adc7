"""The SparsifyError family: every failure a user can act on.

Library code raises these; the CLI prints ``str(error)`` as one line and exits with code 2.
A message says what went wrong, why, and what to do, in one sentence or two.
"""
from __future__ import annotations


class SparsifyError(Exception):
    """Base class of every user-facing error."""


class UsageError(SparsifyError):
    """A bad argument value (density outside (0, 1], unknown method, ...)."""


class ModelLoadError(SparsifyError):
    """A model file or zoo name that cannot be turned into an nn.Module."""


class TraceError(SparsifyError):
    """torch.fx could not trace the model."""


class PassError(SparsifyError):
    """A graph pass could not establish its contract."""


class RunDirError(SparsifyError):
    """A run directory that is missing, not a run directory, or already exists."""


class DataError(SparsifyError):
    """A data set that is unknown, missing or corrupt."""


class TrainingError(SparsifyError):
    """Training cannot go on (NaN loss, schedule that does not fit the run, ...)."""


class DivergenceError(TrainingError):
    """Training diverged: a non-finite loss, or a loss far above the one training started from.

    ``epoch`` (and ``step`` within it, when known) is where it was detected, ``good_epochs`` how many
    epochs completed before it (their metrics and checkpoint are kept), ``lr`` the base learning rate
    that was used.
    """

    def __init__(self, what: str, *, epoch: int, good_epochs: int, lr: float, advice: str | None = None,
                 step: int | None = None) -> None:
        super().__init__(f"training diverged: {what}; {advice or f'retry with a lower learning rate (--lr {lr / 10:g})'}")
        self.what, self.epoch, self.good_epochs, self.lr, self.step = what, epoch, good_epochs, lr, step


class ExportError(SparsifyError):
    """A model that cannot be compacted or exported, or whose export does not verify."""


class RuntimeBackendError(SparsifyError):
    """ONNX Runtime, the native kernel, or an ONNX file that cannot be run."""


def name_list(names: list[str], shown: int = 3) -> str:
    """A few names for a one-line message: ``a, b, c and 4 more``."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")
