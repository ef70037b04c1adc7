"""The SparsifyError family: every failure a user can act on.

Library code raises these; the CLI prints ``str(error)`` as one line and exits with code 2.
A message says what went wrong, why, and what to do, in one sentence or two.
"""
from __future__ import annotations

import numbers
import os
from typing import Any


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


def not_applicable(given: list[str], to: str, instead: str) -> UsageError:
    """The error for options given where they would be ignored: ``--a, --b apply to TO; INSTEAD``."""
    return UsageError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to {to}; {instead}")


def name_list(names: list[str], shown: int = 3) -> str:
    """A few names for a one-line message: ``a, b, c and 4 more``."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


# The basic kinds a setting's annotation names, what each accepts, and how a message says it (a bool
# is no number here, an int is a float, numpy's scalars are numbers).
_KINDS = {"int": ((numbers.Integral,), "a whole number"), "float": ((numbers.Real,), "a number"),
          "bool": ((bool,), "true or false"), "str": ((str,), "a string"), "dict": ((dict,), "a table")}


def _annotation_parts(annotation: Any) -> set[str]:
    return {"dict" if t.startswith("dict") else t for t in (t.strip() for t in str(annotation).split("|"))}


def annotation_kind(annotation: Any) -> str | None:
    """The one basic kind a setting's annotation names: "float" of "float | None", "dict" of
    "dict[str, float]"; None when it names another type, or several."""
    kinds = _annotation_parts(annotation) - {"None"}
    return next(iter(kinds)) if len(kinds) == 1 and kinds <= set(_KINDS) else None


def is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` is of basic kind ``kind`` (a key of ``_KINDS``); a bool is of no other kind."""
    if isinstance(value, bool) and kind != "bool":
        return False
    return isinstance(value, _KINDS[kind][0])


def check_setting_type(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the plain Python value setting ``name``'s annotation ("int | None", "float")
    says (a numpy scalar becomes an int or float, which JSON records take; a path object given to a
    string setting, ``data=Path("imgs")``, its string); UsageError when it is not of that kind (the
    API's ``epochs="2"`` raised a TypeError deep in the checks, ``include_linear="false"`` read as
    true). Annotations of other kinds (dicts, classes) pass the value as it is. The message names
    the CLI flag, shows a long value (an array) in one short line, and for ``data`` says what it takes."""
    kind = annotation_kind(annotation)
    if kind in (None, "dict") or (value is None and "None" in _annotation_parts(annotation)):
        return value
    if kind == "str" and isinstance(value, os.PathLike):  # a data folder or file as a Path
        value = os.fspath(value)
    if not is_kind(value, kind):
        shown = " ".join(repr(value).split())  # an array's repr spans lines
        got = shown if len(shown) <= 60 else f"an object of type {type(value).__name__} ({shown[:40]}...)"
        data = ("; give a data set name, an image folder or an .npz file (arrays: np.savez(path, x=..., y=...))"
                if name == "data" else "")
        raise UsageError(f"--{name.replace('_', '-')} must be {_KINDS[kind][1]}, got {got}{data}")
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)
