"""The contract of an op rule, the roles a layer plays in a channel group, and the registry.

One rule per op kind says everything the passes need to know about that op (issue 9, "one rule per
op"): how its channels couple (``couple``, used by the ChannelGraph), whether a constant input
channel gives a constant output channel (``constancy``, used by compaction), and for layers with
weights how to slice them (compaction), resize them (depth multiplier), mask them (the sparse
passes) and count them (reports). A rule added for an op is therefore used by every pass at once.

The registry finds the rule of a ``call_module`` by the module's type: the exact type, or a
subclass that does not override ``forward`` (it computes the same function). A subclass with its
own ``forward`` (a ``--leaf`` such as a conv with dynamic "same" padding) gets no built-in rule: it
is left dense and its channels are frozen, unless the user registers a rule for it (``rules=``).
``call_function`` nodes are found by the function (or its qualified name, for libraries that are
not imported here), ``call_method`` nodes by the method name.
"""
from __future__ import annotations

import copy
import enum
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from ..channel_graph import ChannelGraph


class Role(enum.Enum):
    """What a layer does with the channels of a group."""

    OUT = "out"                  # writes them: one weight slice per channel (conv/linear output)
    IN = "in"                    # reads them through a weight axis (conv/linear input)
    CHANNELWISE = "channelwise"  # per-channel parameters, channel c -> channel c (norms, depthwise conv)
    PARAM = "param"              # a get_attr tensor's axis follows the group


@dataclass(frozen=True)
class Member:
    """A layer (module or get_attr weight) that reads, writes or scales a group's channels.

    ``node`` is the key of the (first) call; ``target`` the module's qualified name or the get_attr
    target; ``axis`` the weight axis along the group; ``rule`` the op rule that slices it.
    """

    role: Role
    node: str
    target: str
    axis: int = 0
    rule: Any = field(default=None, compare=False, repr=False)
    functional: bool = False     # a get_attr weight of F.conv*/F.linear, not a module


@dataclass
class Const:
    """Per-channel constancy of a tensor along one axis: ``flags[c]`` is True when slice c is the
    same number for every input."""

    axis: int
    flags: torch.Tensor


class SizeExpr:
    """A size that a traced graph computes at run time: int constants, the size of a tensor axis
    (a space) and ``+ - * //`` of them (``x.shape[1] // 2``; ``getattr(x, "shape")[1]``, ``x.size(1)``).

    ``value(size_of)`` evaluates it for the sizes ``size_of(space)`` gives; with Fraction sizes
    ``//`` divides exactly (see ``ChannelGraph``'s check). ``ratio()`` is (space, r) when the
    expression is ``r * size(space)`` with r > 0, else None. The channel graph accepts ``//`` only
    by a constant of such a term (``c // 2``), whose group it keeps a multiple of the divisor.
    """

    _OPS: dict[str, Callable[[Any, Any], Any]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}

    def __init__(self, op: str, *args: Any, text: str = "") -> None:
        self.op, self.args, self.text = op, args, text

    @classmethod
    def const(cls, v: int) -> "SizeExpr":
        return cls("const", int(v), text=str(int(v)))

    @classmethod
    def size(cls, s: tuple[str, int], text: str) -> "SizeExpr":
        return cls("size", s, text=text)

    def value(self, size_of: Callable[[tuple[str, int]], Any]) -> Any:
        if self.op == "const":
            return self.args[0]
        if self.op == "size":
            return size_of(self.args[0])
        a, b = (e.value(size_of) for e in self.args)
        if self.op == "//":
            return Fraction(a) / b if isinstance(a, Fraction) or isinstance(b, Fraction) else a // b
        return self._OPS[self.op](a, b)

    def spaces(self) -> set[tuple[str, int]]:
        if self.op == "size":
            return {self.args[0]}
        return set().union(*(e.spaces() for e in self.args)) if self.op != "const" else set()

    def ratio(self) -> tuple[tuple[str, int], Fraction] | None:
        r = self.linear()
        return r if r is not None and r[0] is not None and r[1] > 0 else None

    def linear(self) -> tuple[tuple[str, int] | None, Fraction] | None:
        """(space, r) when the expression is ``r * size(space)``, (None, r) when it is the constant r."""
        if self.op == "const":
            return None, Fraction(self.args[0])
        if self.op == "size":
            return self.args[0], Fraction(1)
        a, b = self.args[0].linear(), self.args[1].linear()
        if a is None or b is None:
            return None
        if self.op == "*" and (a[0] is None or b[0] is None):
            return a[0] or b[0], a[1] * b[1]
        if self.op == "//" and b[0] is None and b[1]:
            return a[0], a[1] / b[1]
        if self.op in "+-" and a[0] is None and b[0] is None:
            return None, self._OPS[self.op](a[1], b[1])
        return None

    def divisions(self) -> list[tuple[tuple[str, int], Fraction]]:
        """(space, r) of every ``r * size(space)`` that a ``//`` divides: the floor is exact (and
        ``//`` is the division ``value`` computes with Fractions) when size(space) * r is whole."""
        if self.op in ("const", "size"):
            return []
        out = [d for e in self.args for d in e.divisions()]
        r = self.linear() if self.op == "//" else None
        return out + ([r] if r is not None and r[0] is not None else [])

    def __str__(self) -> str:
        if self.op in ("const", "size"):
            return self.text
        a, b = (str(e) if e.op in ("const", "size") else f"({e})" for e in self.args)
        return f"{a} {self.op} {b}"


class Rule:
    """How one kind of op couples channels and propagates constancy. Subclasses override what applies.

    ``couple`` must either express every channel dependency of the op (tie, derive, members) or
    freeze the spaces it does not understand: a rule that forgets a dependency gives wrong masks.
    ``constancy`` returns ``None`` when unsure (the channel is then treated as input-dependent).
    """

    name = "op"

    def couple(self, cg: "ChannelGraph", node: fx.Node, module: nn.Module | None) -> None:
        cg.unknown(node, self.name)

    def constancy(self, env: "ConstancyEnv", node: fx.Node, module: nn.Module | None,
                  out: torch.Tensor) -> Const | None:
        return None

    def resize_args(self, node: fx.Node, size: Callable[[Any, int], int]) -> "tuple[tuple, dict] | None":
        """The call's new (args, kwargs) where they hold a channel count as a constant (F.layer_norm's
        ``normalized_shape``), for the counts ``size(node_or_arg, axis)`` gives; None when nothing
        changes (depth multiplier)."""
        return None

    def module_problem(self, module: nn.Module) -> str | None:
        """Why this rule cannot describe ``module`` (a user's rule for a module type whose geometry it
        cannot read), as a one-line message; None when it can."""
        return None


class LayerRule(Rule):
    """A module with a weight: it also slices, resizes, masks and reports itself."""

    kind = "layer"          # "conv" | "linear" | "norm" | ... (reports)
    has_weight = True       # counted as a weight layer (reports, classifier)

    def slice(self, module: nn.Module, member: Member, keep: torch.Tensor) -> None:
        """Keep only channels ``keep`` along the member's axis, in place (compaction)."""
        raise NotImplementedError(f"{type(self).__name__} cannot slice {type(module).__name__}")

    def read_mask(self, module: nn.Module, member: Member) -> torch.Tensor | None:
        """Role IN: which input channels a live weight reads, a bool tensor over the group's
        positions (None: assume every channel is read). ``module`` may be a functional layer's weight."""
        return None

    def fold(self, module: nn.Module, member: Member, positions: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor | None:
        """The bias change that replaces constant inputs ``values`` at ``positions`` exactly, or None."""
        return None

    def resize_plan(self, module: nn.Module, node: fx.Node,
                    size: Callable[[Any, int], int]) -> "tuple[dict[str, Any], dict[str, tuple[int, ...]]] | None":
        """How the depth multiplier resizes this layer: (attributes to set, new shapes of its tensors)
        for the channel counts ``size(node_or_arg, axis)`` gives, or None when they are unchanged.
        ``resize`` builds from it; ``DepthCounter`` counts parameters from it without building."""
        return None

    def resize(self, module: nn.Module, node: fx.Node, size: Callable[[Any, int], int]) -> nn.Module | None:
        """A freshly initialised module with the channel counts ``size(node_or_arg, axis)`` gives, or
        None when they are unchanged (depth multiplier)."""
        plan = self.resize_plan(module, node, size)
        if plan is None:
            return None
        from .layers import rebuilt

        return rebuilt(module, *plan)

    def sparse(self, module: nn.Module) -> "SparseLayout | str":
        """How to mask this layer, or why it stays dense."""
        return f"{type(module).__name__} stays dense"

    def make_sparse(self, module: nn.Module, mask: torch.Tensor) -> nn.Module:
        raise NotImplementedError

    def describe(self, module: nn.Module) -> dict[str, Any]:
        """``in``, ``out``, ``kernel`` (list or None), ``groups``, the live-entry mask [out, in/groups],
        and ``macs_per_entry(in_shape, out_shape)`` for reports."""
        raise NotImplementedError


@dataclass
class SparseLayout:
    """A maskable layer: ``n_out`` x ``n_in`` (per group) mask entries of ``kernel`` weights each."""

    n_out: int
    n_in: int
    kernel: int
    is_conv: bool


class ConstancyEnv:
    """What a rule's ``constancy`` can ask about the values flowing into a node (see compaction)."""

    def const(self, arg: Any) -> Const | None:
        raise NotImplementedError

    def value(self, arg: Any) -> Any:
        raise NotImplementedError

    def first(self, arg: Any, axis: int) -> torch.Tensor | None:
        """The value of each slice along ``axis`` of a constant tensor (its first element)."""
        raise NotImplementedError

    def flags(self, arg: Any, axis: int) -> torch.Tensor | None:
        """Per-slice constancy of ``arg`` along ``axis``: its own if known along that axis, else all
        False (a layer with an empty filter still writes a constant); None when ``arg`` is no tensor."""
        v = self.value(arg)
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        axis %= v.dim()
        c = self.const(arg)
        if c is not None and c.axis == axis:
            return c.flags
        return torch.zeros(v.shape[axis], dtype=torch.bool)


def _overrides_compute(cls: type, base: type) -> bool:
    """True when a class between ``cls`` and ``base`` defines its own forward (or conv forward)."""
    for c in cls.__mro__:
        if c is base:
            return False
        if any(name in vars(c) for name in ("forward", "_conv_forward")):
            return True
    return False


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def type_names(t: type) -> tuple[str, str]:
    """The names a module type is given by (``--leaf``, ``--rule``, rule keys): ``SameConv`` and
    its qualified ``models.blocks.SameConv``."""
    return t.__name__, f"{t.__module__}.{t.__qualname__}"


def beyond_forward(m: nn.Module) -> str | None:
    """Why ``m`` computes more than its type's forward, or None: a parametrized weight
    (``parametrizations.weight_norm`` / ``spectral_norm``) or hooks (the older ``weight_norm`` /
    ``spectral_norm`` / ``torch.nn.utils.prune`` recompute the weight in a forward pre-hook; a
    forward hook may change the output). A pass that replaced or resized such a module would drop
    what they do, so it stays a leaf without a built-in rule: dense, its channels frozen."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(m):
        return f"its {', '.join(sorted(m.parametrizations.keys()))} is parametrized"
    hooks = [h for h in _HOOKS if getattr(m, h, None)]
    if hooks:
        return "it has " + " and ".join(h.strip("_").replace("_", " ") for h in hooks)
    return None


_HOOK_TABLES = _HOOKS + ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def carry_hooks(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` with ``source``'s forward / backward hooks (copies of its hook tables): for a pass
    that swaps a module for an equivalent one of another type (``DensifyPass``), which would
    otherwise drop them. Returns ``target``."""
    for table in _HOOK_TABLES:
        if hasattr(source, table):
            setattr(target, table, copy.copy(getattr(source, table)))
    target._is_full_backward_hook = getattr(source, "_is_full_backward_hook", None)
    return target


class Registry:
    """Rules by module type, function and method name; ``extend`` overlays user rules."""

    def __init__(self) -> None:
        self.modules: dict[type, Rule] = {}
        self.functions: dict[Any, Rule] = {}
        self.function_names: dict[str, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self.user_modules: dict[str, Rule] = {}   # user rules by type name or qualified name

    def copy(self) -> "Registry":
        r = Registry()
        r.modules, r.functions = dict(self.modules), dict(self.functions)
        r.function_names, r.methods = dict(self.function_names), dict(self.methods)
        r.user_modules = dict(self.user_modules)
        return r

    def module(self, types: type | Iterable[type], rule: Rule) -> Rule:
        for t in (types,) if isinstance(types, type) else types:
            self.modules[t] = rule
        return rule

    def function(self, fns: Iterable[Any], rule: Rule) -> Rule:
        for f in fns:
            if isinstance(f, str):
                self.function_names[f] = rule
            else:
                self.functions[f] = rule
        return rule

    def method(self, names: Iterable[str], rule: Rule) -> Rule:
        for n in names:
            self.methods[n] = rule
        return rule

    def rule_for_module(self, m: nn.Module) -> Rule | None:
        t = getattr(type(m), "_leaf_type", type(m))  # a masked leaf is ruled as the leaf it masks
        for key in type_names(t):
            if key in self.user_modules:
                rule = self.user_modules[key]
                problem = rule.module_problem(m)
                if problem is not None:
                    from ...errors import UsageError

                    raise UsageError(f"--rule {key}={rule.name.split()[0]}: {problem}")
                return rule
        if beyond_forward(m) is not None:
            return None
        return self.rule_for_type(t)

    def rule_for_type(self, t: type) -> Rule | None:
        """The built-in rule of module type ``t`` (or of the base class whose computation it keeps),
        regardless of user rules and of what an instance adds (hooks, parametrizations)."""
        if t in self.modules:
            return self.modules[t]
        for base in t.__mro__[1:]:
            if base in self.modules and not _overrides_compute(t, base):
                return self.modules[base]
        return None

    def rule_for_function(self, fn: Any) -> Rule | None:
        try:
            if fn in self.functions:
                return self.functions[fn]
        except TypeError:  # unhashable target
            return None
        name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', ''))}"
        return self.function_names.get(name)

    def rule_for_method(self, name: str) -> Rule | None:
        return self.methods.get(name)

    def rule_for(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> Rule | None:
        if node.op == "call_module":
            return self.rule_for_module(modules[node.target])
        if node.op == "call_function":
            return self.rule_for_function(node.target)
        if node.op == "call_method":
            return self.rule_for_method(node.target)
        return None

    def known_base(self, t: type) -> type | None:
        """The registered layer type that ``t`` subclasses (with its own forward), if any."""
        for base in t.__mro__[1:]:
            if base in self.modules and isinstance(self.modules[base], LayerRule):
                return base
        return None
