"""The channel graph: which channel dimensions of a traced model must change together.

Every channel dimension in the graph is a *space*: the channel axis of a node's output tensor,
or one axis of a ``get_attr`` parameter, keyed ``(node_name, axis)``. Spaces are the vertices of
a networkx graph; an edge means "same channel indexing" (BN, activations, pooling, residual
add/mul, depthwise conv, functional batch_norm parameters). Connected components are *groups*.

A group is either a *root* group, whose size is free to choose (it is produced by convs or
linears), or a *derived* group, whose channels are laid out from other groups: a concat along
channels (parts at offsets) or a flatten into a linear layer (each channel becomes ``factor``
consecutive features). ``positions`` maps each channel of a root group to where it appears in
every derived group, which is what channel-removing passes need.

A group is *frozen* when it touches the model's inputs or outputs, an op the graph does not
understand, a grouped (non-depthwise) conv, or inconsistent shapes: frozen channels are never
resized or removed. Every coupling pattern has its own small handler below.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .trace import node_shape

Space = tuple[str, int]  # (fx node name, axis)


@dataclass(frozen=True)
class Member:
    """A layer that reads or writes the channels of a group.

    role: ``conv_out``/``conv_in``/``linear_out``/``linear_in`` (weight axes), ``depthwise``
    (in and out tied), ``bn`` (BatchNorm module), ``param`` (a get_attr tensor axis),
    ``fconv_out``/``fconv_in``/``flinear_out``/``flinear_in`` (functional layers with get_attr weights).
    """

    role: str
    node: str
    target: str  # module qualname or get_attr target
    axis: int = 0


@dataclass
class Derivation:
    """How a derived group is laid out: ``kind`` is "concat" (parts at offsets) or "flatten"."""

    kind: str
    parts: tuple[tuple[int, int], ...]  # concat: (group id, offset); flatten: ((group id, factor),)


@dataclass
class ChannelGroup:
    """Channel dimensions that move together."""

    id: int
    size: int
    spaces: list[Space]
    members: list[Member] = field(default_factory=list)
    frozen: bool = False
    reasons: list[str] = field(default_factory=list)
    derivation: Derivation | None = None

    @property
    def is_root(self) -> bool:
        return self.derivation is None

    def roles(self, *roles: str) -> list[Member]:
        return [m for m in self.members if m.role in roles]


# Ops whose output channel c depends on input channel c only (shared with compaction).
PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Softplus, nn.PReLU,
)
PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish,
    F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.softplus, torch.relu, torch.sigmoid, torch.tanh, torch.dropout, F.sigmoid, F.tanh,
    torch.nn.functional.relu_, torch.clamp, torch.clip,
}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "clamp", "clip", "detach", "float"}
BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                     torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
REDUCE_METHODS = {"mean", "sum", "amax"}
NEUTRAL_METHODS = {"size", "dim"}


def _channel_axis(shape: tuple[int, ...] | None) -> int | None:
    """The channel axis of an activation tensor: 1 for [N, C] and [N, C, H, W], else none."""
    if shape is not None and len(shape) in (2, 4):
        return 1
    return None


class ChannelGraph:
    """Channel coupling of a traced GraphModule whose nodes carry ``tensor_meta`` (see trace.py)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = nx.Graph()
        self._sizes: dict[Space, int] = {}
        self._members: dict[Space, list[Member]] = {}
        self._freeze: dict[Space, list[str]] = {}
        self._derive: dict[Space, tuple[str, list[tuple[Space, int]]]] = {}
        self.modules = dict(gm.named_modules())
        self.groups: dict[int, ChannelGroup] = {}
        self._group_of: dict[Space, int] = {}
        self._axes_of: dict[str, dict[int, int]] = {}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, gm: fx.GraphModule, example_input: torch.Tensor | None = None) -> "ChannelGraph":
        """Analyse ``gm``; with ``example_input``, shapes are propagated first where missing."""
        if example_input is not None:
            from .trace import ensure_shapes

            ensure_shapes(gm, example_input)
        cg = cls(gm)
        for node in gm.graph.nodes:
            cg._visit(node)
        cg._finish()
        return cg

    def _space(self, node: fx.Node, axis: int | None = None) -> Space | None:
        """The space of ``node``'s channel axis (or the given axis of a parameter)."""
        shape = node_shape(node)
        if shape is None:
            return None
        if axis is None:
            axis = _channel_axis(shape)
            if axis is None:
                return None
        key = (node.name, axis)
        if key not in self._sizes:
            self._sizes[key] = shape[axis]
            self.graph.add_node(key)
        return key

    def _same(self, a: Space | None, b: Space | None, why: str) -> None:
        if a is None or b is None:
            return
        if self._sizes[a] != self._sizes[b]:
            self._frozen(a, f"{why}: {self._sizes[a]} vs {self._sizes[b]} channels")
            self._frozen(b, f"{why}: {self._sizes[a]} vs {self._sizes[b]} channels")
            return
        self.graph.add_edge(a, b)

    def _frozen(self, s: Space | None, reason: str) -> None:
        if s is not None:
            self._freeze.setdefault(s, []).append(reason)

    def _member(self, s: Space | None, m: Member) -> None:
        if s is not None:
            self._members.setdefault(s, []).append(m)

    def _tensor_inputs(self, node: fx.Node) -> Iterator[fx.Node]:
        for a in node.all_input_nodes:
            if node_shape(a) is not None:
                yield a

    def _unknown(self, node: fx.Node, what: str) -> None:
        """Freeze every channel space that flows into or out of an op we do not understand."""
        reason = f"unknown op {what} at {node.name}"
        for a in self._tensor_inputs(node):
            self._frozen(self._space(a), reason)
        self._frozen(self._space(node), reason)

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._frozen(self._space(node), "model input")
        elif node.op == "output":
            for a in node.all_input_nodes:
                self._frozen(self._space(a), "model output")
        elif node.op == "get_attr":
            pass  # parameter spaces are created by the ops that use them
        elif node.op == "call_module":
            self._visit_module(node, self.modules[node.target])
        elif node.op == "call_function":
            self._visit_function(node)
        elif node.op == "call_method":
            self._visit_method(node)

    # ---- handlers, one per coupling pattern -----------------------------------------------
    def _visit_module(self, node: fx.Node, mod: nn.Module) -> None:
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(mod, nn.Conv2d):
            self._conv(node, x, mod.groups, mod.in_channels, mod.out_channels, node.target, functional=False)
        elif isinstance(mod, nn.Linear):
            self._linear(node, x, node.target, functional=False)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            s_in, s_out = self._space(x), self._space(node)
            self._same(s_in, s_out, "batch norm")
            self._member(s_out, Member("bn", node.name, node.target))
        elif isinstance(mod, PASS_MODULES):
            if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
                self._unknown(node, "PReLU with per-channel slopes")
            else:
                self._pass_through(node, x)
        elif isinstance(mod, nn.Flatten):
            self._flatten(node, x, mod.start_dim, mod.end_dim)
        else:
            self._unknown(node, type(mod).__name__)

    def _visit_function(self, node: fx.Node) -> None:
        fn = node.target
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if fn in PASS_FUNCTIONS:
            self._pass_through(node, x)
        elif fn in BINARY_FUNCTIONS:
            self._binary(node)
        elif fn in (torch.cat, torch.concat):
            self._cat(node)
        elif fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, x, start, end)
        elif fn is F.batch_norm:
            self._functional_bn(node, x)
        elif fn is F.conv2d:
            groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            w = self._arg(node, 1, "weight")
            shape = node_shape(w) if isinstance(w, fx.Node) else None
            if shape is None or w.op != "get_attr":
                self._unknown(node, "conv2d with a computed weight")
                return
            self._conv(node, x, groups, shape[1] * groups, shape[0], w.target, functional=True)
        elif fn is F.linear:
            self._linear(node, x, None, functional=True)
        elif fn in REDUCE_FUNCTIONS:
            self._reduce(node, x)
        elif fn is getattr or fn is operator.getitem and node_shape(node) is None:
            pass  # x.shape / size lookups carry no channels
        else:
            self._unknown(node, getattr(fn, "__name__", str(fn)))

    def _visit_method(self, node: fx.Node) -> None:
        name = node.target
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if name in PASS_METHODS:
            self._pass_through(node, x)
        elif name in BINARY_METHODS:
            self._binary(node)
        elif name in ("view", "reshape", "flatten"):
            self._reshape(node, x)
        elif name in REDUCE_METHODS:
            self._reduce(node, x)
        elif name in NEUTRAL_METHODS:
            pass
        else:
            self._unknown(node, f".{name}()")

    def _arg(self, node: fx.Node, i: int, name: str) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name)

    def _pass_through(self, node: fx.Node, x: fx.Node | None) -> None:
        """Activations, pooling, dropout: output channel c is input channel c."""
        if x is None:
            self._unknown(node, "pass-through without tensor input")
            return
        s_in, s_out = self._space(x), self._space(node)
        if (s_in is None) != (s_out is None):
            self._unknown(node, "rank-changing op")
            return
        self._same(s_in, s_out, str(node.target))

    def _reduce(self, node: fx.Node, x: fx.Node | None) -> None:
        """mean/sum over spatial axes keep the channel axis when it survives at axis 1."""
        shape_in, shape_out = node_shape(x) if x is not None else None, node_shape(node)
        if shape_in and shape_out and len(shape_in) == 4 and len(shape_out) in (2, 4) and shape_out[1] == shape_in[1]:
            self._same(self._space(x), self._space(node), str(node.target))
        else:
            self._unknown(node, f"reduction {node.target}")

    def _conv(self, node: fx.Node, x: fx.Node | None, groups: int, cin: int, cout: int, target: str,
              functional: bool) -> None:
        s_in, s_out = self._space(x) if x is not None else None, self._space(node)
        prefix = "fconv" if functional else "conv"
        if groups == 1:
            self._member(s_in, Member(f"{prefix}_in", node.name, target, 1))
            self._member(s_out, Member(f"{prefix}_out", node.name, target, 0))
        elif groups == cin == cout and not functional:
            self._same(s_in, s_out, "depthwise conv")
            self._member(s_out, Member("depthwise", node.name, target))
        else:
            self._frozen(s_in, f"grouped conv {target} (groups={groups})")
            self._frozen(s_out, f"grouped conv {target} (groups={groups})")
            self._member(s_in, Member(f"{prefix}_in", node.name, target, 1))
            self._member(s_out, Member(f"{prefix}_out", node.name, target, 0))
        if functional:
            self._functional_params(node, s_in, s_out, weight_index=1, bias_index=2)

    def _linear(self, node: fx.Node, x: fx.Node | None, target: str | None, functional: bool) -> None:
        shape = node_shape(x) if x is not None else None
        if shape is None or len(shape) != 2:
            self._unknown(node, "linear on a tensor that is not [N, features]")
            return
        s_in, s_out = self._space(x), self._space(node)
        if functional:
            w = self._arg(node, 1, "weight")
            if not isinstance(w, fx.Node) or w.op != "get_attr":
                self._unknown(node, "linear with a computed weight")
                return
            target = w.target
            self._functional_params(node, s_in, s_out, weight_index=1, bias_index=2)
        self._member(s_in, Member("flinear_in" if functional else "linear_in", node.name, target, 1))
        self._member(s_out, Member("flinear_out" if functional else "linear_out", node.name, target, 0))

    def _functional_params(self, node: fx.Node, s_in: Space | None, s_out: Space | None,
                           weight_index: int, bias_index: int) -> None:
        """get_attr weights of functional conv/linear: axis 0 follows the output, axis 1 the input."""
        w = self._arg(node, weight_index, "weight")
        b = self._arg(node, bias_index, "bias")
        if isinstance(w, fx.Node) and w.op == "get_attr":
            self._same(self._space(w, 0), s_out, "functional weight out")
            self._same(self._space(w, 1), s_in, "functional weight in")
        if isinstance(b, fx.Node) and b.op == "get_attr":
            self._same(self._space(b, 0), s_out, "functional bias")
            self._member(s_out, Member("param", b.name, b.target, 0))

    def _functional_bn(self, node: fx.Node, x: fx.Node | None) -> None:
        """F.batch_norm(x, running_mean, running_var, weight, bias): all per-channel, tied to x."""
        s_in, s_out = self._space(x) if x is not None else None, self._space(node)
        self._same(s_in, s_out, "functional batch norm")
        for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
            p = self._arg(node, i, name)
            if isinstance(p, fx.Node):
                if p.op == "get_attr":
                    ps = self._space(p, 0)
                    self._same(ps, s_out, "functional batch norm parameter")
                    self._member(s_out, Member("param", p.name, p.target, 0))
                else:
                    self._unknown(node, "batch_norm with computed statistics")

    def _binary(self, node: fx.Node) -> None:
        """Residual add / mul / sub / div: operands with a full channel axis share it with the output."""
        s_out = self._space(node)
        out_shape = node_shape(node)
        for a in node.args:
            if not isinstance(a, fx.Node):
                continue
            shape = node_shape(a)
            if shape is None:
                continue
            if a.op == "get_attr" and out_shape is not None and len(out_shape) >= len(shape):
                # a per-channel parameter broadcast against the activation, e.g. a [C,1,1] layer scale
                axis = 1 - (len(out_shape) - len(shape)) if s_out is not None else None
                if axis is not None and 0 <= axis < len(shape) and shape[axis] == out_shape[1] > 1:
                    self._same(self._space(a, axis), s_out, "per-channel parameter")
                    self._member(s_out, Member("param", a.name, a.target, axis))
                    continue
                if all(d == 1 for d in shape):
                    continue
                self._unknown(node, "parameter broadcast along a non-channel axis")
                continue
            if s_out is None:
                self._unknown(node, f"{node.target} without channel axis")
                return
            s_a = self._space(a)
            if s_a is not None and len(shape) == len(out_shape) and shape[1] == out_shape[1]:
                self._same(s_a, s_out, f"{getattr(node.target, '__name__', node.target)}")
            elif s_a is not None and shape[1] == 1:
                continue  # broadcast over channels: no coupling
            else:
                self._unknown(node, f"{getattr(node.target, '__name__', node.target)} with unaligned operands")
                return

    def _cat(self, node: fx.Node) -> None:
        """torch.cat along channels: a derived group whose parts sit at offsets."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = self._arg(node, 1, "dim") or 0
        shape = node_shape(node)
        if shape is None or not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            self._unknown(node, "cat")
            return
        dim = dim % len(shape)
        s_out = self._space(node)
        if dim == 1:
            parts, offset = [], 0
            for t in tensors:
                s = self._space(t)
                parts.append((s, offset))
                offset += self._sizes[s]
            self._derive[s_out] = ("concat", parts)
        elif dim >= 2:
            for t in tensors:
                self._same(self._space(t), s_out, "cat along a spatial axis")
        else:
            self._unknown(node, "cat along the batch axis")

    def _flatten(self, node: fx.Node, x: fx.Node | None, start: int, end: int) -> None:
        shape_in, shape_out = (node_shape(x) if x is not None else None), node_shape(node)
        if shape_in is None or shape_out is None:
            self._unknown(node, "flatten")
            return
        if len(shape_in) == 4 and len(shape_out) == 2 and start in (1, -3) and end in (-1, 3):
            factor = shape_in[2] * shape_in[3]
            self._derive[self._space(node)] = ("flatten", [(self._space(x), factor)])
        elif shape_in == shape_out:
            self._same(self._space(x), self._space(node), "flatten")
        else:
            self._unknown(node, "flatten")

    def _reshape(self, node: fx.Node, x: fx.Node | None) -> None:
        """``x.view(x.size(0), -1)`` is a flatten; any literal channel count is frozen, never guessed."""
        shape_in, shape_out = (node_shape(x) if x is not None else None), node_shape(node)
        sizes = [a for a in node.args[1:]]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        if node.target == "flatten":
            start = sizes[0] if sizes else 0
            self._flatten(node, x, start, sizes[1] if len(sizes) > 1 else -1)
            return
        flat = len(sizes) == 2 and isinstance(sizes[0], fx.Node) and sizes[1] == -1  # x.view(x.size(0), -1)
        if flat and shape_in and shape_out and len(shape_in) == 4 and len(shape_out) == 2:
            self._flatten(node, x, 1, -1)
        elif shape_in is not None and shape_in == shape_out and all(isinstance(s, fx.Node) for s in sizes):
            self._same(self._space(x), self._space(node), "reshape")  # x.view(x.shape) and the like
        else:
            self._unknown(node, f".{node.target}() with literal sizes")

    # ---- groups -------------------------------------------------------------------------
    def _finish(self) -> None:
        for gid, comp in enumerate(sorted(nx.connected_components(self.graph), key=lambda c: min(c))):
            spaces = sorted(comp)
            sizes = {self._sizes[s] for s in spaces}
            g = ChannelGroup(gid, max(sizes), spaces)
            for s in spaces:
                g.members.extend(self._members.get(s, []))
                g.reasons.extend(self._freeze.get(s, []))
                self._group_of[s] = gid
                self._axes_of.setdefault(s[0], {})[s[1]] = gid
            self.groups[gid] = g
        # derivations, expressed in group ids
        for s, (kind, parts) in self._derive.items():
            g = self.groups[self._group_of[s]]
            d = Derivation(kind, tuple((self._group_of[p], k) for p, k in parts))
            if g.derivation is not None and g.derivation != d:
                g.reasons.append("group laid out by two different concats/flattens")
            g.derivation = g.derivation or d
        # freezing: a frozen derived group freezes its parts, recursively
        for g in self.groups.values():
            g.frozen = bool(g.reasons)
        changed = True
        while changed:
            changed = False
            for g in self.groups.values():
                if g.frozen and g.derivation is not None:
                    for pid, _ in g.derivation.parts:
                        p = self.groups[pid]
                        if not p.frozen:
                            p.frozen = True
                            p.reasons.append(f"part of frozen group {g.id}")
                            changed = True

    def group_of(self, node: fx.Node | str, axis: int | None = None) -> ChannelGroup | None:
        """The group of ``node``'s channel axis (or the given axis), if it has one."""
        name = node if isinstance(node, str) else node.name
        axes = self._axes_of.get(name, {})
        if axis is None:
            axis = 1 if 1 in axes else next(iter(axes), None)
        gid = axes.get(axis)
        return None if gid is None else self.groups[gid]

    def root_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.is_root]

    def free_groups(self) -> list[ChannelGroup]:
        """Root groups whose channels may be resized or removed."""
        return [g for g in self.groups.values() if g.is_root and not g.frozen]

    def derived_size(self, gid: int, sizes: dict[int, int]) -> int:
        """The size of group ``gid`` when root groups take the sizes in ``sizes`` (others keep theirs)."""
        g = self.groups[gid]
        if g.derivation is None:
            return sizes.get(gid, g.size)
        if g.derivation.kind == "concat":
            return sum(self.derived_size(p, sizes) for p, _ in g.derivation.parts)
        (p, factor), = g.derivation.parts
        return self.derived_size(p, sizes) * factor

    def positions(self, gid: int) -> dict[int, np.ndarray]:
        """Where each channel of root group ``gid`` appears: ``{group id: int array [size, k]}``."""
        out: dict[int, np.ndarray] = {gid: np.arange(self.groups[gid].size)[:, None]}
        changed = True
        while changed:
            changed = False
            for g in self.groups.values():
                if g.derivation is None or g.id in out:
                    continue
                if g.derivation.kind == "concat":
                    # offsets are recorded at trace time sizes
                    for p, offset in g.derivation.parts:
                        if p in out:
                            out[g.id] = out[p] + offset
                            changed = True
                            break
                else:
                    (p, factor), = g.derivation.parts
                    if p in out:
                        idx = out[p]
                        out[g.id] = (idx[:, :, None] * factor + np.arange(factor)).reshape(idx.shape[0], -1)
                        changed = True
        return out

    def describe(self) -> list[dict[str, Any]]:
        """A JSON-able summary of the groups (for reports and debugging)."""
        return [
            {
                "id": g.id, "size": g.size, "frozen": g.frozen, "reasons": sorted(set(g.reasons)),
                "derived": None if g.derivation is None else {"kind": g.derivation.kind,
                                                              "parts": [list(p) for p in g.derivation.parts]},
                "members": [f"{m.role}:{m.target}" for m in g.members],
            }
            for g in self.groups.values()
        ]


def weight_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Conv2d and Linear module calls in graph order."""
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(mods[n.target], (nn.Conv2d, nn.Linear))]


def classifier_node(gm: fx.GraphModule) -> fx.Node | None:
    """The final classifier: the last conv/linear module call in graph order."""
    nodes = weight_nodes(gm)
    return nodes[-1] if nodes else None

