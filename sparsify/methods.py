"""The method registry: one config dataclass per transform method, bound to its pass class.

A method name becomes behaviour here only. ``METHODS`` maps each name to its config class; a
config holds the method's parameters, validates them in ``__post_init__`` (one-line UsageError
messages naming the CLI option), makes its pass (``make_pass``) and serialises to the dict that
``Recipe.params`` stores (``to_params``; ``from_params`` reads it back, so older runs replay).
``sparsify.api.transform``, the recipe replay (``sparsify.replay``), the CLI's ``--method`` and
the study specs all take the method from here.

To add a method: write its pass (a ``sparsify.passes.base.GraphPass``), a config class below
with ``name``, ``summary``, ``refused`` and its fields, and add it to ``METHODS``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import UsageError, check_setting_type

if TYPE_CHECKING:  # the passes (and torch) are imported when a config is made: `sparsify --help` needs neither
    import torch.fx as fx

    from .passes.base import GraphPass
    from .passes.rules import Registry


@dataclass
class MethodConfig:
    """A method's parameters (the base class; ``name`` and ``summary`` name and describe it).

    ``refused`` maps a transform option the method does not take (a keyword of
    ``sparsify.api.transform``) to the one-line message that refuses it; options the method neither
    takes nor refuses are ignored (``none`` ignores them all).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    refused: ClassVar[dict[str, str]] = {}
    masked: ClassVar[bool] = False      # masks connections (has a depth-multiplied equal-parameter twin)

    def make_pass(self, seed: int = 0, rules: Registry | None = None) -> GraphPass | None:
        """The pass that applies this method (None: trace only)."""
        return None

    def resolve(self, gm: fx.GraphModule, rules: Registry | None = None) -> "MethodConfig":
        """This config with the values left to the model (``None`` = auto) decided on traced ``gm``."""
        return self

    def to_params(self) -> dict[str, Any]:
        """The parameters as ``Recipe.params`` stores them (only those that apply)."""
        return {}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MethodConfig":
        """The config a recipe's ``params`` describe (keys of other methods, e.g. ``match``, ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class NoneConfig(MethodConfig):
    """Trace only: the dense graph, for reports and as a baseline."""

    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "trace only (the dense graph)"
    refused: ClassVar[dict[str, str]] = {
        "density": "--method none keeps the model as it is and takes no --density; choose sparse-random or psn",
        "alpha": "--method none keeps the model as it is and takes no --alpha; choose depth-multiplier",
        "profile": "--profile applies to --method psn only",
        "profile_params": "--profile-param applies to --method psn only",
        "divisor": "--divisor applies to --method depth-multiplier only, not none",
        "block": "--block applies to --method sparse-random and psn only, not none"}


@dataclass
class SparseRandomConfig(MethodConfig):
    """Random channel connections at ``density`` (the live fraction of each masked layer's connections)."""

    name: ClassVar[str] = "sparse-random"
    summary: ClassVar[str] = "random channel connections at --density"
    refused: ClassVar[dict[str, str]] = {
        "divisor": "--divisor applies to --method depth-multiplier only, not sparse-random",
        "alpha": "sparse-random takes --density, not --alpha",
        "profile": "--profile applies to --method psn only",
        "profile_params": "--profile-param applies to --method psn only (sparse-random gives every unit the same "
                          "fan-in)",
    }
    masked: ClassVar[bool] = True

    density: float | None = None
    allocation: str = "uniform"
    include_linear: bool | None = None      # None: masked only when the model has no conv to mask (the paper's choice)
    include_classifier: bool = False
    rescale_init: bool = True
    block: int = 1                           # output channels of a conv per shared fan-in (block sparsity)

    def __post_init__(self) -> None:
        from .passes.sparsity import check_allocation, check_block, check_density

        check_density(self.density)
        check_allocation(self.allocation)
        check_block(self.block)

    def _common(self) -> dict[str, Any]:
        return {"density": self.density, "allocation": self.allocation, "include_classifier": self.include_classifier,
                "rescale_init": self.rescale_init, **({"block": self.block} if self.block > 1 else {})}

    def to_params(self) -> dict[str, Any]:
        return {**self._common(), "include_linear": self.include_linear}

    def resolve(self, gm: fx.GraphModule, rules: Registry | None = None) -> "SparseRandomConfig":
        if self.include_linear is not None:
            return self
        from .passes.sparsity import eligible_layers

        convs, _ = eligible_layers(gm, include_linear=False, include_classifier=self.include_classifier, rules=rules)
        return dataclasses.replace(self, include_linear=not convs)

    def make_pass(self, seed: int = 0, rules: Registry | None = None) -> GraphPass:
        from .passes.sparsity import SparseRandomPass

        return SparseRandomPass(self.density, **self._pass_kwargs(seed, rules))

    def _pass_kwargs(self, seed: int, rules: Registry | None) -> dict[str, Any]:
        """The arguments every sparse pass takes besides its density."""
        return {"seed": seed, "allocation": self.allocation, "include_linear": bool(self.include_linear),
                "include_classifier": self.include_classifier, "rescale_init": self.rescale_init, "rules": rules,
                "block": self.block}


@dataclass
class PSNConfig(SparseRandomConfig):
    """Parametric sparse networks: each unit's fan-in drawn from a ``profile`` (``sparsify.profiles``)."""

    name: ClassVar[str] = "psn"
    summary: ClassVar[str] = "fan-in per unit from a --profile"
    refused: ClassVar[dict[str, str]] = {
        "divisor": "--divisor applies to --method depth-multiplier only, not psn",
        "alpha": "psn takes --density, not --alpha",
    }

    include_linear: bool | None = True
    profile: str = "lognormal"
    profile_params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .profiles import resolve_params

        super().__post_init__()
        if self.include_linear is None:
            self.include_linear = True
        self.profile_params = dict(self.profile_params or {})
        resolve_params(self.profile, self.profile_params)

    def to_params(self) -> dict[str, Any]:
        return {**self._common(), "profile": self.profile, "profile_params": dict(self.profile_params),
                "include_linear": self.include_linear}

    def resolve(self, gm: fx.GraphModule, rules: Registry | None = None) -> "PSNConfig":
        return self

    def make_pass(self, seed: int = 0, rules: Registry | None = None) -> GraphPass:
        from .passes.sparsity import PSNPass

        return PSNPass(self.density, profile=self.profile, profile_params=self.profile_params,
                       **self._pass_kwargs(seed, rules))


@dataclass
class DepthMultiplierConfig(MethodConfig):
    """Every free channel group scaled by ``alpha`` (rounded to a multiple of ``divisor`` when > 1)."""

    name: ClassVar[str] = "depth-multiplier"
    summary: ClassVar[str] = "thinner dense layers: every channel group times --alpha"
    refused: ClassVar[dict[str, str]] = {
        "density": "depth-multiplier takes --alpha, not --density/--profile",
        "profile": "depth-multiplier takes --alpha, not --density/--profile",
        "profile_params": "depth-multiplier takes --alpha, not --profile-param",
        "block": "--block applies to --method sparse-random and psn only: depth-multiplier keeps dense layers",
    }

    alpha: float | None = None
    divisor: int | None = None

    def __post_init__(self) -> None:
        from .passes.depth_multiplier import check_alpha, check_divisor

        self.divisor = check_divisor(self.divisor)
        check_alpha(self.alpha)

    def to_params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, **({"divisor": self.divisor} if self.divisor > 1 else {})}

    def make_pass(self, seed: int = 0, rules: Registry | None = None) -> GraphPass:
        from .passes.depth_multiplier import DepthMultiplierPass

        return DepthMultiplierPass(self.alpha, seed=seed, divisor=self.divisor, rules=rules)


METHODS: dict[str, type[MethodConfig]] = {c.name: c for c in (SparseRandomConfig, PSNConfig, DepthMultiplierConfig,
                                                              NoneConfig)}


def method_class(method: str) -> type[MethodConfig]:
    """The config class of ``method``; UsageError naming the choices for an unknown one."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def make_config(method: str, **options: Any) -> MethodConfig:
    """The config of ``method`` from transform options (``density``, ``alpha``, ``profile``, ...).

    Options given (not None) that the method refuses raise its one-line UsageError; those it does
    not take are ignored; the config validates the rest.
    """
    cls = method_class(method)
    given = {k: v for k, v in options.items() if v is not None}
    check_refused(method, given)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # the API's include_linear="false" read as true; numpy scalars become the numbers recipes record
    return cls(**{k: check_setting_type(k, v, fields[k].type) for k, v in given.items() if k in fields})


def check_refused(method: str, options: dict[str, Any]) -> None:
    """UsageError (the method's one line) for the first option given (not None) that ``method`` refuses."""
    cls = method_class(method)
    for option, message in cls.refused.items():
        if options.get(option) not in (None, {}):  # {}: no --profile-param given
            raise UsageError(message)


def config_from_params(method: str, params: dict[str, Any]) -> MethodConfig:
    """The config a recipe records (``Recipe.method`` and ``Recipe.params``)."""
    return method_class(method).from_params(params)


def method_help(sep: str = " | ") -> str:
    """The method names for help texts, e.g. ``sparse-random | psn | depth-multiplier | none``."""
    return sep.join(METHODS)


__all__ = ["METHODS", "MethodConfig", "NoneConfig", "SparseRandomConfig", "PSNConfig", "DepthMultiplierConfig",
           "method_class", "make_config", "check_refused", "config_from_params", "method_help"]
