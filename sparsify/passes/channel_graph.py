"""The channel graph: which tensor axes of a traced model must change size together.

Every axis of every tensor is a *space*: ``(node key, axis)`` for an activation, ``("@" + module,
axis)`` for a module's channel axes (0: the channels it writes, 1: the channels it reads), and
``("%" + target, axis)`` for a get_attr tensor. Spaces are the vertices of a networkx graph; an
edge means "same indexing". Connected components are *groups*. Which spaces an op ties, and how,
is the op's rule (``sparsify.passes.rules``): this module only stores what the rules say and
derives the groups. Keying module and parameter axes by their qualified name ties every call of one
module (weight sharing) and both graphs of a model that runs differently in training.

A group is either a *root* group, whose size is free to choose, or a *derived* group laid out
from others: a concat (parts at offsets) or a flatten (the row-major product of its parts).
``positions`` maps each channel of a root group to *every* place it appears in derived groups (a
group repeated in one concat appears once per copy), which is what channel-removing passes need.

A group is *frozen* (never resized or removed) when it touches the model's inputs or outputs, an
op no rule understands, or inconsistent shapes; a derived frozen group freezes its parts. It is
*whole* when compaction must keep every channel (a GroupNorm, LayerNorm or reduction mixes them)
but the depth multiplier may still resize it; ``multiple`` is the channel count it must stay a
multiple of (grouped convs, GroupNorm). A group is *free* when it is a root, not frozen, and some
layer writes it.

Sizes a graph computes at run time from tensor sizes (``n, c, h, w = x.shape; y.view(n, 2, c // 2,
h, w)``) follow a resize by themselves, but only the way the arithmetic says: a rule records each
such size (``size_from``, a ``SizeExpr``). A root group whose size is ``r * size(other group)``
*follows* that group (``follows``): the depth multiplier sizes it from the other, both stay whole
and a frozen one freezes the other. A group divided by k (``c // k``) stays a multiple of k, and
every computed size must agree with the channel graph for any resize (checked at random sizes with
exact arithmetic); one that does not freezes the groups it involves.
"""
from __future__ import annotations

import functools
import math
import operator
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from .rules import DEFAULT_RULES, CastLikeRule, LayerRule, Member, Registry, Role
from .rules.base import SizeExpr, beyond_forward
from .rules.layers import FunctionalConvRule, FunctionalLinearRule
from .trace import graphs, node_shape, untrained_layer, user_source_line

Space = tuple[str, int]  # (node key, axis)
TRAIN_PREFIX = "train/"


@dataclass
class Derivation:
    """How a derived group is laid out: ``kind`` is "concat" (parts are (group id, offset)) or
    "flatten" (parts are (group id, size at trace time) in axis order, row-major)."""

    kind: str
    parts: tuple[tuple[int, int], ...]


@dataclass
class ChannelGroup:
    """Tensor axes that move together."""

    id: int
    size: int
    spaces: list[Space]
    members: list[Member] = field(default_factory=list)
    frozen: bool = False
    reasons: list[str] = field(default_factory=list)
    derivation: Derivation | None = None
    whole: list[str] = field(default_factory=list)   # why compaction keeps every channel
    multiple: int = 1                                # the size must stay a multiple of this
    follows: tuple[int, Fraction, str] | None = None  # (group id, r, why): the size is r * that group's

    @property
    def is_root(self) -> bool:
        return self.derivation is None

    @property
    def producers(self) -> list[Member]:
        return self.roles(Role.OUT)

    def roles(self, *roles: Role) -> list[Member]:
        return [m for m in self.members if m.role in roles]


def _flat_nodes(obj: Any) -> Iterator[fx.Node]:
    if isinstance(obj, fx.Node):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat_nodes(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat_nodes(o)


# What reading a tensor's metadata looks like in a graph: ``x.to(self.conv.weight.dtype)`` reads
# no value of the weight (and ties nothing to it); nor do x.type_as(w), x.to(w) (CastLikeRule).
_METADATA_ATTRS = frozenset({"dtype", "device", "shape", "ndim", "layout", "is_cuda", "requires_grad"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device", "is_floating_point", "is_contiguous"})


def _metadata_only(node: fx.Node) -> bool:
    """True when every user of ``node`` reads only its metadata (dtype, device, shape, ...)."""
    return bool(node.users) and all(
        (u.op == "call_function" and u.target is getattr and u.args[0] is node and u.args[1] in _METADATA_ATTRS)
        or (u.op == "call_method" and u.target in _METADATA_METHODS and u.args[0] is node)
        or (u.op == "call_method" and u.target in CastLikeRule.methods and u.args[0] is not node
            and node not in u.kwargs.values())
        for u in node.users)


def shared_parameters(gm: fx.GraphModule) -> dict[str, list[str]]:
    """The places of ``gm``'s graphs that use a parameter another place uses too (tied weights:
    ``b.weight = a.weight``; a module's weight also read by ``F.conv2d(x, self.a.weight)``), each
    mapped to the others (an attribute read directly is named so). A place is a called module (its
    parameters, its children's included) or a get_attr target; one module called twice is one place."""
    modules = dict(gm.named_modules())
    users: dict[int, set[str]] = {}
    for graph in graphs(gm):
        for node in graph.nodes:
            if node.op == "call_module":
                for p in modules[node.target].parameters():
                    users.setdefault(id(p), set()).add(node.target)
            elif node.op == "get_attr" and not _metadata_only(node):
                try:
                    value = gm.get_parameter(node.target)
                except AttributeError:
                    continue
                users.setdefault(id(value), set()).add(node.target)
    shared: dict[str, set[str]] = {}
    for places in users.values():
        for place in places if len(places) > 1 else ():
            shared.setdefault(place, set()).update(places - {place})
    return {place: sorted(o if o in modules else f"{o} (read directly)" for o in others)
            for place, others in shared.items()}


class ChannelGraph:
    """Channel coupling of a traced GraphModule whose nodes carry ``tensor_meta`` (see trace.py).

    Rules build it through the methods under "construction API"; passes read ``groups``,
    ``group_of``, ``free_groups``, ``positions`` and ``derived_size``.
    """

    def __init__(self, gm: fx.GraphModule, rules: Registry | None = None, keep_untrained: bool = False) -> None:
        self.gm = gm
        self.keep_untrained = keep_untrained  # freeze the channels of layers training cannot change
        self.rules = rules or DEFAULT_RULES
        self.graph = nx.Graph()
        self._sizes: dict[Space, int] = {}
        self._members: dict[Space, list[Member]] = {}
        self._freeze: dict[Space, list[str]] = {}
        self._whole: dict[Space, list[str]] = {}
        self._multiple: dict[Space, int] = {}
        self._derive: dict[Space, tuple[str, list[tuple[Space, int]]]] = {}
        self._computed: list[tuple[Space, SizeExpr, str]] = []
        self._member_keys: set[tuple[Role, str, int]] = set()
        self.modules = dict(gm.named_modules())
        self.groups: dict[int, ChannelGroup] = {}
        self._group_of: dict[Space, int] = {}
        self._key: dict[fx.Node, str] = {}
        self.nodes: dict[str, fx.Node] = {}       # node key -> node (both graphs)
        self.calls: dict[str, int] = {}           # module target -> number of call sites (eval graph)
        self._positions: dict[int, dict[int, np.ndarray]] = {}
        self.shared = shared_parameters(gm)        # place -> the other places that use its parameters

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, gm: fx.GraphModule, example_input: Any = None, rules: Registry | None = None,
              keep_untrained: bool = False) -> "ChannelGraph":
        """Analyse ``gm`` (both graphs of a ModeGraphModule); with ``example_input``, shapes are
        propagated first where missing. ``keep_untrained``: the channels of layers training cannot
        change (``trace.untrained_layer``: a frozen weight, called under no_grad) are frozen too, for
        passes that re-initialise or cut what training would have to recover (the depth multiplier)."""
        if example_input is not None:
            from .trace import ensure_shapes

            ensure_shapes(gm, example_input)
        cg = cls(gm, rules, keep_untrained)
        for i, graph in enumerate(graphs(gm)):
            for node in graph.nodes:
                key = node.name if i == 0 else TRAIN_PREFIX + node.name
                cg._key[node] = key
                cg.nodes[key] = node
                if i == 0 and node.op == "call_module":
                    cg.calls[node.target] = cg.calls.get(node.target, 0) + 1
        for graph in graphs(gm):
            for node in graph.nodes:
                cg._visit(node)
            cg._sizes_read_as_values(graph)
        cg._finish()
        return cg

    def _sizes_read_as_values(self, graph: fx.Graph) -> None:
        """Keep whole the axes whose size the forward computes with as a value (``y * (1 /
        math.sqrt(h.shape[1]))``, ``h / h.size(1)``): removing a channel changes that number and the
        output, so compaction cannot (the depth multiplier may resize them: a narrower model's code
        reads its own width). A size that only sizes a tensor (``view(n, c // 2, h, w)``) is the
        rules' (``size_expr``)."""
        weights: dict[tuple[str, int], list[Space]] = {}  # (layer, weight axis) -> the spaces it is a member of
        for space, members in self._members.items():
            for m in members:
                weights.setdefault((m.target, m.axis), []).append(space)

        def spaces_of(t: Any, k: int | None) -> list[Space]:
            """The existing spaces of axis ``k`` (every axis: None) of tensor ``t``; a parameter read
            directly (``self.mid.weight.shape[0]``) by the groups its layer is a member of."""
            shape = self.shape(t)
            if shape is None or (k is not None and not -len(shape) <= k < len(shape)):
                return []
            axes = range(len(shape)) if k is None else [k % len(shape)]
            if t.op == "get_attr":
                layer, _, name = t.target.rpartition(".")
                return [sp for a in axes for sp in weights.get((t.target, a), [])
                        + weights.get((layer, 0 if name == "bias" else a), [])]
            return [(self.key(t), a) for a in axes if (self.key(t), a) in self._sizes]

        for node in graph.nodes:
            read: list[tuple[fx.Node, list[Space]]] = []  # the size values a node gives, and their axes
            if node.op == "call_method" and node.target in ("size", "numel") and node.args:
                t, k = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                if node.target == "numel" or isinstance(k, int):
                    read.append((node, spaces_of(t, k if isinstance(k, int) else None)))
                else:  # x.size(): its items
                    read += [(u, spaces_of(t, u.args[1])) for u in node.users if _item(u)]
            elif node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
                read += [(u, spaces_of(node.args[0], u.args[1])) for u in node.users if _item(u)]
            for value, axes in read:
                if not axes:
                    continue
                where = _value_use(self, value)
                if where is not None:
                    for s in axes:
                        self.whole(s, f"its size is computed with as a value at {where}")

    def key(self, node: fx.Node | str) -> str:
        return node if isinstance(node, str) else self._key[node]

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.freeze_all(node, "model input")
        elif node.op == "output":
            for a in _flat_nodes(node.args):
                self.freeze_all(a, "model output")
        elif node.op == "get_attr" and node.target in self.shared:
            self.freeze_all(node, self._shared_reason(node.target))
        elif node.op in ("call_module", "call_function", "call_method"):
            module = self.modules.get(node.target) if node.op == "call_module" else None
            rule = self.rules.rule_for(node, self.modules)
            if rule is None:
                beyond = beyond_forward(module) if module is not None else None
                if beyond is not None:  # a layer kept whole for its hooks / parametrizations: say so
                    self.freeze_through(node, f"{node.target} kept whole because {beyond}")
                    return
                if node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, tuple):
                    # a namedtuple the forward returns its outputs in (its fields stay as they are)
                    outputs = all(u.op == "output" for u in node.users)
                    self.freeze_through(node, "model output" if outputs else f"packed into a {node.target.__name__}")
                    return
                self.unknown(node, _label(node, module))
                return
            try:
                rule.couple(self, node, module)
            except Exception as e:  # noqa: BLE001 - a rule that cannot read a node must not crash the analysis
                self.unknown(node, f"{_label(node, module)} ({type(e).__name__} in its rule)")
            reason = None
            if module is not None and node.target in self.shared:
                # resizing or compacting one user of a shared parameter would cut it for all of them
                reason = self._shared_reason(node.target)
            elif module is not None and self.keep_untrained:
                untrained = untrained_layer(node, module)
                reason = f"{node.target}: {untrained[0]}" if untrained is not None else None
            if reason is not None:
                for a in self.tensor_inputs(node):
                    self.freeze_all(a, reason)
                self.freeze_all(node, reason)

    def _shared_reason(self, place: str) -> str:
        # a module whose own weight the forward also reads (F.conv2d(x, self.c2.weight)) is one case
        own = [o.removesuffix(" (read directly)") for o in self.shared[place]
               if o.endswith(" (read directly)") and o.startswith(place + ".")]
        owner = [o for o in self.shared[place] if place.startswith(o + ".")]
        others = [o for o in self.shared[place] if o.removesuffix(" (read directly)") not in own and o not in owner]
        parts = ([f"{place}'s parameters are also read directly in forward ({', '.join(own)})"] if own else []) + \
            ([f"{place} is read directly in forward and by {', '.join(owner)}"] if owner else []) + \
            ([f"{place} shares its parameters with {', '.join(others)}"] if others else [])
        return "; ".join(parts)

    # ---- construction API (for rules) ---------------------------------------------------------
    def shape(self, a: Any) -> tuple[int, ...] | None:
        """The shape of ``a`` when it is a node producing one tensor."""
        return node_shape(a) if isinstance(a, fx.Node) else None

    def element_shapes(self, a: Any) -> list[tuple[int, ...] | None]:
        """Shapes of the tensors of a node producing a tuple/list (empty for other nodes)."""
        if not isinstance(a, fx.Node):
            return []
        meta = a.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):
            return [tuple(m.shape) if isinstance(m, TensorMetadata) else None for m in meta]
        return []

    def _new(self, key: Space, size: int) -> Space:
        if key not in self._sizes:
            self._sizes[key] = int(size)
            self.graph.add_node(key)
        return key

    def space(self, a: Any, axis: int) -> Space | None:
        """The space of axis ``axis`` (may be negative) of tensor node ``a``; None if not a tensor."""
        shape = self.shape(a)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        axis %= len(shape)
        if a.op == "get_attr":
            return self._new((f"%{a.target}", axis), shape[axis])
        return self._new((self.key(a), axis), shape[axis])

    def element_space(self, a: fx.Node, index: int, axis: int) -> Space | None:
        """Axis ``axis`` of element ``index`` of a tuple-producing node."""
        shapes = self.element_shapes(a)
        shape = shapes[index] if 0 <= index < len(shapes) else None
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        axis %= len(shapes[index])
        return self._new((f"{self.key(a)}#{index}", axis), shapes[index][axis])

    def spaces(self, a: Any) -> list[Space]:
        """Every axis of tensor node ``a`` (and of each element of a tuple node)."""
        shape = self.shape(a)
        if shape is not None:
            return [s for s in (self.space(a, i) for i in range(len(shape))) if s is not None]
        out = []
        for i, sh in enumerate(self.element_shapes(a)):
            if sh is not None:
                out += [s for s in (self.element_space(a, i, k) for k in range(len(sh))) if s is not None]
        return out

    def module_space(self, target: str, axis: int, size: int) -> Space:
        """Channel axis of module ``target`` (0: written, 1: read), shared by all its calls."""
        return self._new((f"@{target}", axis), size)

    def size(self, s: Space) -> int:
        return self._sizes[s]

    def tie(self, a: Space | None, b: Space | None, why: str) -> None:
        """``a`` and ``b`` index the same channels; sizes that differ freeze both instead."""
        if a is None or b is None or a == b:
            return
        if self._sizes[a] != self._sizes[b]:
            reason = f"{why}: {self._sizes[a]} vs {self._sizes[b]} channels"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return
        self.graph.add_edge(a, b)
        for s in (a, b):
            if s[0].startswith("%"):
                self._add_member(s, Member(Role.PARAM, s[0], s[0][1:], s[1]))

    def tie_axes(self, a: Any, b: Any, pairs: Any = None, why: str = "") -> None:
        """Tie axis i of ``a`` with axis j of ``b`` for (i, j) in ``pairs`` (default: every axis
        with the same index, when ranks agree)."""
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None:
            return
        if pairs is None:
            if len(sa) != len(sb):
                return
            pairs = [(i, i) for i in range(len(sa))]
        for i, j in pairs:
            self.tie(self.space(a, i), self.space(b, j), why)

    def freeze(self, s: Space | None, reason: str) -> None:
        if s is not None:
            self._freeze.setdefault(s, []).append(reason)

    def freeze_all(self, a: Any, reason: str) -> None:
        """Freeze every axis of a tensor (or tuple) node ``a``."""
        if isinstance(a, fx.Node):
            for s in self.spaces(a):
                self.freeze(s, reason)

    def whole(self, s: Space | None, reason: str) -> None:
        """Compaction keeps every channel of ``s``'s group; resizing it stays allowed."""
        if s is not None:
            self._whole.setdefault(s, []).append(reason)

    def multiple_of(self, s: Space | None, m: int) -> None:
        """``s``'s group must keep a size that is a multiple of ``m``."""
        if s is not None and m > 1:
            self._multiple[s] = math.lcm(self._multiple.get(s, 1), int(m))

    def _add_member(self, s: Space, m: Member) -> None:
        k = (m.role, m.target, m.axis)
        if k in self._member_keys:
            return
        self._member_keys.add(k)
        self._members.setdefault(s, []).append(m)

    def member(self, s: Space | None, role: Role, node: fx.Node, target: str, axis: int = 0,
               rule: Any = None, functional: bool = False) -> None:
        """Record that ``target`` plays ``role`` for the channels of ``s`` (once per target and role)."""
        if s is not None:
            self._add_member(s, Member(role, self.key(node), target, axis, rule, functional))

    def derive(self, s: Space | None, kind: str, parts: list[tuple[Space | None, int]]) -> None:
        """``s`` is laid out from ``parts``: "concat" (space, offset) or "flatten" (space, size)."""
        if s is None:
            return
        if any(p is None for p, _ in parts):
            self.freeze(s, f"{kind} of a part without channels")
            return
        self._derive[s] = (kind, parts)

    def size_expr(self, a: Any) -> SizeExpr | None:
        """The size argument ``a`` (an int, or a node computing one from tensor sizes: ``x.shape[1]``,
        ``x.size(1)``, ``c // 2``) as a SizeExpr (a SizeExpr as it is); None when it is computed some
        other way."""
        if isinstance(a, SizeExpr):
            return a
        if isinstance(a, int) and not isinstance(a, bool):
            return SizeExpr.const(a)
        if not isinstance(a, fx.Node) or a.op not in ("call_function", "call_method"):
            return None
        if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[1], int):
            dims = self.shape_exprs(a.args[0])
            return dims[a.args[1]] if dims is not None and -len(dims) <= a.args[1] < len(dims) else None
        if a.op == "call_method" and a.target == "size" and (len(a.args) > 1 or "dim" in a.kwargs):
            dims, d = self.shape_exprs(a.args[0], whole=True), a.args[1] if len(a.args) > 1 else a.kwargs["dim"]
            return dims[d] if dims is not None and isinstance(d, int) and -len(dims) <= d < len(dims) else None
        if a.op == "call_method" and a.target == "numel" and len(a.args) == 1:
            dims = self.shape_exprs(a.args[0], whole=True)
            return functools.reduce(lambda p, q: SizeExpr("*", p, q), dims) if dims else None
        ops = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "//"}
        if a.op == "call_function" and a.target in ops and len(a.args) == 2 and not a.kwargs:
            x, y = (self.size_expr(v) for v in a.args)
            if x is None or y is None or (ops[a.target] == "//" and (y.op != "const" or x.linear() is None)):
                return None  # a floor is exact only for r * size // k (the group is kept a multiple)
            return SizeExpr(ops[a.target], x, y)
        return None

    def shape_exprs(self, a: Any, whole: bool = False) -> list[SizeExpr] | None:
        """The sizes that node ``a`` = ``x.shape`` or ``x.size()`` holds, one SizeExpr per axis of x
        (``whole``: ``a`` is x itself, for ``x.size(k)``); None for other nodes."""
        if not isinstance(a, fx.Node):
            return None
        if whole:
            t = a
        elif a.op == "call_function" and a.target is getattr and a.args[1:] == ("shape",):
            t = a.args[0]
        elif a.op == "call_method" and a.target == "size" and len(a.args) == 1 and not a.kwargs:
            t = a.args[0]
        else:
            return None
        shape = self.shape(t)
        if shape is None:
            return None
        return [SizeExpr.size(self.space(t, k), f"{t.name}.shape[{k}]") for k in range(len(shape))]

    def size_from(self, s: Space | None, expr: SizeExpr | None, where: str) -> None:
        """Axis ``s`` has the size ``expr`` computes at run time (a size computed from tensor sizes, or
        a constant); None: computed in a way no SizeExpr describes, which freezes ``s``."""
        if s is None:
            return
        if expr is None:
            self.freeze(s, f"size computed in {where} in a way the channel graph cannot follow")
            return
        self._computed.append((s, expr, where))

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in _flat_nodes((node.args, node.kwargs)) if self.shape(a) is not None
                or self.element_shapes(a)]

    def unknown(self, node: fx.Node, what: str) -> None:
        """Freeze every axis that flows into or out of an op no rule understands."""
        self.freeze_through(node, f"unknown op {what} at {node.name}")

    def freeze_through(self, node: fx.Node, reason: str) -> None:
        """Freeze every axis that flows into or out of ``node``, for ``reason``."""
        for a in self.tensor_inputs(node):
            self.freeze_all(a, reason)
        self.freeze_all(node, reason)

    # ---- groups -----------------------------------------------------------------------------
    def _finish(self) -> None:
        for gid, comp in enumerate(sorted(nx.connected_components(self.graph), key=lambda c: min(c))):
            spaces = sorted(comp)
            sizes = {self._sizes[s] for s in spaces}
            g = ChannelGroup(gid, max(sizes), spaces)
            for s in spaces:
                g.members.extend(self._members.get(s, []))
                g.reasons.extend(self._freeze.get(s, []))
                g.whole.extend(self._whole.get(s, []))
                g.multiple = math.lcm(g.multiple, self._multiple.get(s, 1))
                self._group_of[s] = gid
            self.groups[gid] = g
        for s, (kind, parts) in self._derive.items():
            g = self.groups[self._group_of[s]]
            d = Derivation(kind, tuple((self._group_of[p], k) for p, k in parts))
            if g.derivation is not None and not self._same_layout(g.derivation, d):
                g.reasons.append(f"group laid out by two different {kind}s")
            g.derivation = g.derivation or d
        for g in self.groups.values():
            if g.derivation is not None and self._cyclic(g.id, set()):
                g.reasons.append("layout refers to itself")
                g.derivation = None
        self._computed_sizes()
        for g in self.groups.values():
            g.frozen = bool(g.reasons)
        # a frozen / whole / constrained derived group passes that on to its parts
        changed = True
        while changed:
            changed = False
            for g in self.groups.values():
                if g.derivation is None:
                    continue
                for i, (pid, _) in enumerate(g.derivation.parts):
                    p = self.groups[pid]
                    if g.frozen and not p.frozen:
                        p.frozen = True
                        p.reasons.append(f"part of frozen group {g.id}")
                        changed = True
                    if g.whole and not p.whole:
                        p.whole.append(f"part of group {g.id}: {g.whole[0]}")
                        changed = True
                    need = g.multiple
                    if g.derivation.kind == "flatten":
                        others = math.prod(k for j, (_, k) in enumerate(g.derivation.parts) if j != i)
                        need = g.multiple // math.gcd(g.multiple, others)
                    if p.multiple % need:
                        p.multiple = math.lcm(p.multiple, need)
                        changed = True
            for g in self.groups.values():  # a follower and its leader change together or not at all
                if g.follows is None:
                    continue
                lead, r, why = self.groups[g.follows[0]], g.follows[1], g.follows[2]
                if lead.frozen and not g.frozen:
                    g.frozen = True
                    g.reasons.append(f"sized by {why} from frozen group {lead.id}")
                    changed = True
                if g.frozen and not lead.frozen:
                    lead.frozen = True
                    lead.reasons.append(f"{why} sizes frozen group {g.id} from it")
                    changed = True
                need = g.multiple * r.denominator // math.gcd(g.multiple * r.denominator, r.numerator)
                if lead.multiple % need:  # r * size stays a whole multiple of the follower's own
                    lead.multiple = math.lcm(lead.multiple, need)
                    changed = True

    def _computed_sizes(self) -> None:
        """Resolve the sizes rules recorded with ``size_from``: a root group whose size is ``r *
        size(other group)`` follows that group; then every computed size must equal its axis's size
        for random sizes of the groups layers write (exact arithmetic, two draws), or the groups it
        involves are frozen."""
        for s, expr, where in self._computed:
            g, r = self.groups[self._group_of[s]], expr.ratio()
            if r is None or not g.is_root or g.follows is not None:
                continue
            lead = self.groups[self._group_of[r[0]]]
            if lead is g or self._depends_on(lead.id, g.id):
                continue
            why = f"{expr} in {where}"
            g.follows = (lead.id, r[1], why)
            g.whole.append(f"sized by {why} from group {lead.id}")
            lead.whole.append(f"{why} sizes group {g.id} from it")
        for s, expr, where in self._computed:
            for sp, q in expr.divisions():
                g = self.groups[self._group_of[sp]]
                g.multiple = math.lcm(g.multiple, q.denominator)
        rng = random.Random(0)
        bad: set[int] = set()
        for _ in range(2):
            sizes = {g.id: Fraction(rng.randrange(10**6, 10**7)) for g in self.groups.values()
                     if g.is_root and g.follows is None and g.producers}

            def size_of(sp: Space) -> Any:
                return self.derived_size(self._group_of[sp], sizes)

            bad.update(i for i, (s, expr, _) in enumerate(self._computed) if size_of(s) != expr.value(size_of))
        for i in sorted(bad):
            s, expr, where = self._computed[i]
            for sp in {s} | expr.spaces():
                self.groups[self._group_of[sp]].reasons.append(f"size {expr} in {where} would not match its "
                                                               f"axis after a resize")

    def _depends_on(self, gid: int, target: int) -> bool:
        """True when group ``gid``'s size is computed from ``target``'s (layouts and followers)."""
        g = self.groups[gid]
        if gid == target:
            return True
        parts = [p for p, _ in g.derivation.parts] if g.derivation is not None else []
        return any(self._depends_on(p, target) for p in parts + ([g.follows[0]] if g.follows else []))

    def _same_layout(self, a: Derivation, b: Derivation) -> bool:
        """Two layouts agree: same kind, and part by part the same group, or two groups no layer
        writes (spatial axes, e.g. of the eval and the training graph) of the same size."""
        if a.kind != b.kind or len(a.parts) != len(b.parts):
            return False
        for (pa, ka), (pb, kb) in zip(a.parts, b.parts):
            if ka != kb:
                return False
            if pa != pb and (self.groups[pa].producers or self.groups[pb].producers
                             or self.groups[pa].derivation or self.groups[pb].derivation):
                return False
        return True

    def _cyclic(self, gid: int, seen: set[int]) -> bool:
        if gid in seen:
            return True
        d = self.groups[gid].derivation
        return d is not None and any(self._cyclic(p, seen | {gid}) for p, _ in d.parts)

    def group_of(self, node: fx.Node | str, axis: int | None = None) -> ChannelGroup | None:
        """The group of ``node``'s axis ``axis`` (default 1, the channel axis of NC... tensors)."""
        key = self.key(node) if isinstance(node, fx.Node) else node
        if isinstance(node, fx.Node) and node.op == "get_attr":
            key = f"%{node.target}"
        elif isinstance(node, str) and node in self.nodes and self.nodes[node].op == "get_attr":
            key = f"%{self.nodes[node].target}"
        if axis is None:
            axis = 1 if (key, 1) in self._group_of else 0
        if axis < 0:
            n = self.nodes.get(key)
            shape = node_shape(n) if n is not None else None
            if shape is None:
                return None
            axis %= len(shape)
        gid = self._group_of.get((key, axis))
        return None if gid is None else self.groups[gid]

    def group_of_space(self, s: Space) -> ChannelGroup | None:
        gid = self._group_of.get(s)
        return None if gid is None else self.groups[gid]

    def root_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.is_root]

    def channel_groups(self) -> list[ChannelGroup]:
        """Root groups that some layer writes (the groups a pass may care about)."""
        return [g for g in self.groups.values() if g.is_root and g.producers]

    def free_groups(self) -> list[ChannelGroup]:
        """Root groups whose channels may be resized (and, unless ``whole``, removed); a group that
        ``follows`` another is sized from it instead."""
        return [g for g in self.channel_groups() if not g.frozen and g.follows is None]

    def derived_size(self, gid: int, sizes: dict[int, int]) -> int:
        """The size of group ``gid`` when root groups take the sizes in ``sizes`` (others keep theirs,
        or follow their leader's: ``floor(r * size)``, exact for Fraction sizes)."""
        g = self.groups[gid]
        if g.derivation is None:
            if gid in sizes or g.follows is None:
                return sizes.get(gid, g.size)
            lead, r, _ = g.follows
            v = self.derived_size(lead, sizes)
            return v * r if isinstance(v, Fraction) else v * r.numerator // r.denominator
        if g.derivation.kind == "concat":
            return sum(self.derived_size(p, sizes) for p, _ in g.derivation.parts)
        return math.prod(self.derived_size(p, sizes) for p, _ in g.derivation.parts)

    def positions(self, gid: int) -> dict[int, np.ndarray]:
        """Every place each channel of root group ``gid`` appears: ``{group id: int array [size, k]}``.

        ``k`` counts the copies: a channel of a group concatenated twice, or flattened with an
        H x W plane, appears k times in the derived group. Offsets and sizes are those at trace time.
        """
        if gid not in self._positions:
            memo: dict[int, np.ndarray | None] = {gid: np.arange(self.groups[gid].size)[:, None]}
            for g in self.groups.values():
                self._position_in(g.id, gid, memo)
            self._positions[gid] = {k: v for k, v in memo.items() if v is not None}
        return self._positions[gid]

    def _position_in(self, gid: int, root: int, memo: dict[int, np.ndarray | None]) -> np.ndarray | None:
        if gid in memo:
            return memo[gid]
        memo[gid] = None  # guards against cycles
        g = self.groups[gid]
        if g.derivation is None:
            return None
        pieces = []
        if g.derivation.kind == "concat":
            for p, offset in g.derivation.parts:
                sub = self._position_in(p, root, memo)
                if sub is not None:
                    pieces.append(sub + offset)
        else:
            sizes = [k for _, k in g.derivation.parts]
            flat = np.arange(math.prod(sizes)).reshape(sizes)
            for i, (p, k) in enumerate(g.derivation.parts):
                sub = self._position_in(p, root, memo)
                if sub is not None:
                    moved = np.moveaxis(flat, i, 0).reshape(k, -1)   # [channel of part i, its places]
                    pieces.append(moved[sub].reshape(sub.shape[0], -1))
        memo[gid] = np.concatenate(pieces, axis=1) if pieces else None
        return memo[gid]

    def describe(self) -> list[dict[str, Any]]:
        """A JSON-able summary of the groups that hold layers (for reports and debugging)."""
        return [
            {
                "id": g.id, "size": g.size, "frozen": g.frozen, "reasons": sorted(set(g.reasons)),
                "whole": sorted(set(g.whole)), "multiple": g.multiple,
                "follows": None if g.follows is None else {"group": g.follows[0], "ratio": str(g.follows[1])},
                "derived": None if g.derivation is None else {"kind": g.derivation.kind,
                                                              "parts": [list(p) for p in g.derivation.parts]},
                "members": [f"{m.role.value}:{m.target}" for m in g.members],
            }
            for g in self.groups.values() if g.members or g.derivation is not None
        ]


def _label(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def weight_nodes(gm: fx.GraphModule, rules: Registry | None = None, all_graphs: bool = False) -> list[fx.Node]:
    """Calls of modules with weights (convs, linears) in graph order: the eval graph, and with
    ``all_graphs`` the training graph's calls of modules the eval graph does not call."""
    rules = rules or DEFAULT_RULES
    mods = dict(gm.named_modules())
    out: list[fx.Node] = []
    for i, graph in enumerate(graphs(gm) if all_graphs else [gm.graph]):
        seen = {n.target for n in out}
        for n in graph.nodes:
            if n.op != "call_module" or (i > 0 and n.target in seen):
                continue
            rule = rules.rule_for_module(mods[n.target])
            if isinstance(rule, LayerRule) and rule.has_weight:
                out.append(n)
                if i > 0:
                    seen.add(n.target)
    return out


def _item(node: fx.Node) -> bool:
    """``node`` picks one size of a shape: ``x.shape[1]``, ``x.size()[k]``."""
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)


# Ops that compute with a size as a value when a tensor is among their operands.
_VALUE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
                    operator.mod, operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
                    torch.pow, torch.clamp, torch.full_like, torch.fill}
_VALUE_METHODS = {"add", "sub", "mul", "div", "true_divide", "pow", "add_", "sub_", "mul_", "div_", "pow_", "clamp",
                  "clamp_", "fill_", "new_full", "rsub", "__rsub__", "__rtruediv__", "__rpow__"}


def _value_use(cg: "ChannelGraph", value: fx.Node) -> str | None:
    """Where a size ``value`` (or a number computed from it: ``1 / math.sqrt(c)``) meets a tensor in
    arithmetic, as a node name with its source line; None when it only sizes tensors."""
    seen, stack = set(), [value]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            tensors = cg.tensor_inputs(u)
            arithmetic = (u.op == "call_function" and u.target in _VALUE_FUNCTIONS) or \
                (u.op == "call_method" and u.target in _VALUE_METHODS)
            if tensors and arithmetic:
                line = user_source_line(u)
                return u.name + (f" ({line})" if line else "")
            if not tensors and u.op in ("call_function", "call_method"):
                stack.append(u)  # arithmetic on numbers: follow the result
    return None


def classifier_node(gm: fx.GraphModule, rules: Registry | None = None) -> fx.Node | None:
    """The final classifier: the last weight-layer call in the eval graph; None when the last layer
    with parameters is one no rule covers (a pruned or parametrized Linear, kept whole as a leaf) or
    a conv / linear run as a function (``F.conv2d(x, self.head.weight)``): the layer before it is
    not the classifier."""
    rules = rules or DEFAULT_RULES
    nodes = weight_nodes(gm, rules)
    if not nodes:
        return None
    mods = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    later = [n for n in gm.graph.nodes if order[n] > order[nodes[-1]] and (
        (n.op == "call_module" and beyond_forward(mods[n.target]) is not None
         and any(True for _ in mods[n.target].parameters()))
        or (n.op == "call_function"
            and isinstance(rules.rule_for_function(n.target), (FunctionalConvRule, FunctionalLinearRule))))]
    return None if later else nodes[-1]
