"""Rules of ops without weights: elementwise ops, dropout, pooling, broadcasting arithmetic,
concat/stack, flatten/reshape/permute, reductions, softmax-like ops, indexing, split, expand,
padding, interpolation, tensor creation.

Each rule ties the axes the op keeps (same indexing in and out), lays out the axes it builds from
others (concat, flatten) and freezes the axes whose meaning it fixes to a literal (a channel count
written in a ``view``, an index into channels, a split at given sizes): it stays right where a
rule that guessed would give wrong masks (unequal split, channel shuffle, slicing, chunked qkv).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from .base import Const, Rule, SizeExpr
from .layers import arg


def _norm(axis: int, rank: int) -> int:
    return axis % rank if rank else 0


def _dims(value: Any, rank: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [_norm(value, rank)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return sorted({_norm(v, rank) for v in value})
    return None


def _map_const(c: Const | None, mapping: dict[int, int]) -> Const | None:
    """Move a constancy along an axis mapping (in axis -> out axis)."""
    if c is None or c.axis not in mapping:
        return None
    return Const(mapping[c.axis], c.flags)


class ElementwiseRule(Rule):
    """Output element = f(input element): activations, casts, clones, identity. Every axis is tied."""

    name = "elementwise"
    reads_others = True  # further tensor arguments are operands (broadcast), not only metadata

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        tensors = cg.tensor_inputs(node)
        if len(tensors) > 1 and self.reads_others:
            BROADCAST.couple(cg, node, module)
            return
        if cg.shape(x) is None or cg.shape(x) != cg.shape(node):
            cg.unknown(node, self.name)
            return
        cg.tie_axes(x, node, None, self.name)

    def constancy(self, env, node, module, out):
        if self.reads_others and len([a for a in node.args
                                      if isinstance(a, fx.Node) and isinstance(env.value(a), torch.Tensor)]) > 1:
            return BROADCAST.constancy(env, node, module, out)
        return env.const(arg(node, 0, "input"))


class CastLikeRule(ElementwiseRule):
    """``x.type_as(y)``, ``x.to(y)``: x in y's dtype (and device); y's values and shape are not read,
    so y is not coupled to x (it was broadcast against x: a conv weight given as y coupled its
    axes with x's and the depth multiplier cut it twice)."""

    name = "cast"
    reads_others = False
    #: the tensor methods this rule covers; the channel graph reads them too (y's uses that read
    #: only its dtype and device)
    methods = ("type_as", "to")


class RandomLikeRule(ElementwiseRule):
    """Random tensors shaped like the input (randn_like, bernoulli_): tied, never constant."""

    name = "random"

    def constancy(self, env, node, module, out):
        return None


class ConstantLikeRule(ElementwiseRule):
    """zeros_like / ones_like / full_like: shaped like the input, constant everywhere."""

    name = "constant-like"

    def constancy(self, env, node, module, out):
        if out.dim() < 2:
            return None
        return Const(1, torch.ones(out.shape[1], dtype=torch.bool))


class DropoutRule(ElementwiseRule):
    """Dropout family: the identity in eval mode, random in training; channel c -> c either way.

    ``training`` is read from the call (functional) or the module's mode; ``default`` is the
    functional's own default (True for F.dropout, False for F.alpha_dropout)."""

    name = "dropout"

    def __init__(self, index: int = 2, keyword: str = "training", default: bool = True) -> None:
        self.index, self.keyword, self.default = index, keyword, default

    def constancy(self, env, node, module, out):
        training = module.training if module is not None else arg(node, self.index, self.keyword, self.default)
        return None if training else env.const(arg(node, 0, "input"))


class BroadcastRule(Rule):
    """Elementwise ops over several tensors (add, mul, where, ...): axes aligned from the right are
    tied where both sizes agree; a size-1 axis is broadcast and couples nothing."""

    name = "broadcast"

    def _operands(self, node):
        return [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]

    def couple(self, cg, node, module):
        out = cg.shape(node)
        operands = [a for a in self._operands(node) if cg.shape(a) is not None]
        if out is None:
            if operands or any(cg.element_shapes(a) for a in self._operands(node)):
                cg.unknown(node, _name(node))
            return
        for a in operands:
            sa = cg.shape(a)
            if len(sa) > len(out):
                cg.unknown(node, _name(node))
                return
            shift = len(out) - len(sa)
            for j, d in enumerate(sa):
                k = j + shift
                if d == out[k]:
                    cg.tie(cg.space(a, j), cg.space(node, k), _name(node))
                elif d != 1:
                    cg.unknown(node, f"{_name(node)} with unaligned operands")
                    return

    def constancy(self, env, node, module, out):
        """Constant where every operand is constant along the same axis (broadcast slices count)."""
        if out.dim() < 1:
            return None
        axis, flags = None, None
        for a in self._operands(node):
            v = env.value(a)
            if not isinstance(v, torch.Tensor):
                continue
            shift = out.dim() - v.dim()
            if a.op == "get_attr":
                continue  # checked below once the axis is known
            c = env.const(a)
            if c is None:
                return None
            k = c.axis + shift
            if axis is None:
                axis = k
                flags = torch.ones(out.shape[k], dtype=torch.bool)
            if k != axis:
                return None
            f = c.flags
            if f.shape[0] == flags.shape[0]:
                flags = flags & f
            elif f.shape[0] == 1:
                flags = flags & f[0]
            else:
                return None
        if axis is None:
            return None
        for a in self._operands(node):
            v = env.value(a)
            if isinstance(v, torch.Tensor) and a.op == "get_attr":
                aligned = (1,) * (out.dim() - v.dim()) + tuple(v.shape)
                if any(d > 1 for i, d in enumerate(aligned) if i != axis):
                    return Const(axis, torch.zeros_like(flags))
        return Const(axis, flags)


BROADCAST = BroadcastRule()


class CatRule(Rule):
    """torch.cat along ``dim``: that axis is laid out from the parts at their offsets (a part that
    appears twice is recorded twice); every other axis is tied across the parts."""

    name = "cat"

    def couple(self, cg, node, module):
        tensors = arg(node, 0, "tensors")
        out = cg.shape(node)
        if out is None or not isinstance(tensors, (list, tuple)) or not all(cg.shape(t) is not None for t in tensors):
            cg.unknown(node, "cat")
            return
        dim = _norm(arg(node, 1, "dim", 0), len(out))
        parts, offset = [], 0
        for t in tensors:
            st = cg.shape(t)
            if len(st) != len(out):
                cg.unknown(node, "cat of tensors of different ranks")
                return
            cg.tie_axes(t, node, [(k, k) for k in range(len(out)) if k != dim], "cat")
            parts.append((cg.space(t, dim), offset))
            offset += st[dim]
        cg.derive(cg.space(node, dim), "concat", parts)

    def constancy(self, env, node, module, out):
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)):
            return None
        dim = _norm(arg(node, 1, "dim", 0), out.dim())
        flags = [env.flags(t, dim) for t in tensors]  # a part with no constant channel contributes False
        if any(f is None for f in flags):
            return None
        return Const(dim, torch.cat(flags))


class StackRule(Rule):
    """torch.stack: a new axis at ``dim``; the parts' axes are tied to the shifted output axes."""

    name = "stack"

    def couple(self, cg, node, module):
        tensors = arg(node, 0, "tensors")
        out = cg.shape(node)
        if out is None or not isinstance(tensors, (list, tuple)):
            cg.unknown(node, "stack")
            return
        dim = _norm(arg(node, 1, "dim", 0), len(out))
        for t in tensors:
            st = cg.shape(t)
            if st is None or len(st) + 1 != len(out):
                cg.unknown(node, "stack")
                return
            cg.tie_axes(t, node, [(k, k if k < dim else k + 1) for k in range(len(st))], "stack")


def _flatten_flags(c: Const, sizes: list[int], start: int, out_axis: int | None = None) -> Const:
    """Constancy of input axes ``start..start+len(sizes)-1`` merged into one output axis (``out_axis``,
    default ``start``) when ``c.axis`` is one of the merged axes: each feature inherits its channel's flag."""
    idx = np.unravel_index(np.arange(math.prod(sizes)), sizes)[c.axis - start]
    return Const(start if out_axis is None else out_axis, c.flags[torch.as_tensor(idx)])


class FlattenRule(Rule):
    """torch.flatten / .flatten / nn.Flatten: axes ``start..end`` become one axis laid out row-major
    from them (a channel of [N, C, H, W] becomes H*W consecutive features)."""

    name = "flatten"

    def _range(self, node, module, rank):
        if module is not None:
            return _norm(module.start_dim, rank), _norm(module.end_dim, rank)
        default_start = 0
        start = arg(node, 1, "start_dim", default_start)
        end = arg(node, 2, "end_dim", -1)
        return _norm(start, rank), _norm(end, rank)

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx, so = cg.shape(x), cg.shape(node)
        if sx is None or so is None:
            cg.unknown(node, "flatten")
            return
        if not sx:
            return
        start, end = self._range(node, module, len(sx))
        if start > end:
            cg.unknown(node, "flatten")
            return
        pairs = [(k, k) for k in range(start)] + [(k, k - (end - start)) for k in range(end + 1, len(sx))]
        cg.tie_axes(x, node, pairs, "flatten")
        if start == end:
            cg.tie(cg.space(x, start), cg.space(node, start), "flatten")
            return
        cg.derive(cg.space(node, start), "flatten", [(cg.space(x, k), sx[k]) for k in range(start, end + 1)])

    def constancy(self, env, node, module, out):
        x = arg(node, 0, "input")
        c, v = env.const(x), env.value(x)
        if c is None or not isinstance(v, torch.Tensor):
            return None
        start, end = self._range(node, module, v.dim())
        if c.axis < start:
            return c
        if c.axis > end:
            return Const(c.axis - (end - start), c.flags)
        return _flatten_flags(c, list(v.shape[start:end + 1]), start)


def _reshape_groups(sin: tuple[int, ...], sout: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes of equal size products (size-1 axes alone)."""
    groups, i, j = [], 0, 0
    while i < len(sin) or j < len(sout):
        if i < len(sin) and sin[i] == 1 and (j >= len(sout) or sout[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(sout) and sout[j] == 1 and (i >= len(sin) or sin[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(sin) or j >= len(sout):
            return None
        a, b = [i], [j]
        pa, pb = sin[i], sout[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(sin):
                    return None
                pa *= sin[i]
                a.append(i)
                i += 1
            else:
                if j >= len(sout):
                    return None
                pb *= sout[j]
                b.append(j)
                j += 1
        groups.append((a, b))
    return groups


class ReshapeRule(Rule):
    """view / reshape (and view_as / reshape_as, sized from the other tensor): axes kept 1:1 are
    tied, runs of axes merged into one are a flatten; an axis
    split into several or given as a literal size is frozen, never guessed, except a split whose
    sizes are literals but one computed from tensor sizes or -1 (channel shuffle ``x.view(n, 2,
    c // 2, h, w)``, heads ``x.view(n, t, heads, c // heads)``): the computed part follows the size
    it is computed from. Every size computed from tensor sizes is recorded (``size_from``): the
    channel graph resizes the groups it ties together, or freezes them where it cannot follow."""

    name = "reshape"

    def _sizes(self, cg, node, rank):
        """The size given for each output axis: an int, a SizeExpr (computed from tensor sizes), or
        None (computed some other way); None when the sizes do not name each axis."""
        if node.op == "call_function":
            given = [arg(node, 1, "shape")]
        else:
            given = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
        sizes = _given_sizes(cg, given)  # x.view(n, c, h, w), x.view((n, -1)), x.view(y.shape)
        if len(sizes) != rank or any(v is None for v in sizes):
            return None
        return [v if isinstance(v, int) else cg.size_expr(v) for v in sizes]

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx, so = cg.shape(x), cg.shape(node)
        groups = _reshape_groups(sx, so) if sx is not None and so is not None else None
        if groups is None:
            cg.unknown(node, f".{node.target}()" if node.op == "call_method" else "reshape")
            return
        where = f"{node.target}() at {node.name}" if node.op == "call_method" else f"reshape at {node.name}"
        if node.op == "call_method" and node.target in ("view_as", "reshape_as"):
            # x.view_as(y) is x.view(y.shape): every size computed from y, whose axes the result keeps
            cg.tie_axes(node, node.args[1], None, where)
            sizes, literal = None, [False] * len(so)
        else:
            sizes = self._sizes(cg, node, len(so))
            literal = [sizes is None or (isinstance(v, int) and v not in (-1, 1)) for v in (sizes or so)]
        for a, b in groups:
            if not a or not b:
                continue
            inferred = [j for j in b if not literal[j]]
            if len(a) == 1 and len(b) > 1 and sizes is not None and len(inferred) == 1 and sx[a[0]] > 1:
                # one axis split into literal sizes and one computed or inferred: the latter follows
                k, rest = inferred[0], math.prod(sizes[j] for j in b if j != inferred[0])
                for j in b:
                    if j != k:
                        cg.size_from(cg.space(node, j), SizeExpr.const(sizes[j]), where)
                if sizes[k] == -1:
                    src = SizeExpr.size(cg.space(x, a[0]), f"{x.name}.shape[{a[0]}]")
                    cg.size_from(cg.space(node, k), SizeExpr("//", src, SizeExpr.const(rest)), where)
                elif sizes[k] is not None:
                    cg.size_from(cg.space(x, a[0]), SizeExpr("*", SizeExpr.const(rest), sizes[k]), where)
                else:
                    cg.size_from(cg.space(x, a[0]), None, where)
            elif any(literal[j] for j in b) and (len(a) > 1 or len(b) > 1 or sx[a[0]] > 1):
                reason = f"literal size in {where}"
                for i in a:
                    cg.freeze(cg.space(x, i), reason)
                for j in b:
                    cg.freeze(cg.space(node, j), reason)
            elif len(a) == 1 and len(b) == 1:
                cg.tie(cg.space(x, a[0]), cg.space(node, b[0]), "reshape")
            elif len(b) == 1:
                cg.derive(cg.space(node, b[0]), "flatten", [(cg.space(x, i), sx[i]) for i in a])
            else:
                reason = f"{where} splits an axis"
                for i in a:
                    cg.freeze(cg.space(x, i), reason)
                for j in b:
                    cg.freeze(cg.space(node, j), reason)
        for j, v in enumerate(sizes or []):
            if not isinstance(v, int):
                cg.size_from(cg.space(node, j), v, where)

    def constancy(self, env, node, module, out):
        x = arg(node, 0, "input")
        c, v = env.const(x), env.value(x)
        if c is None or not isinstance(v, torch.Tensor):
            return None
        groups = _reshape_groups(tuple(v.shape), tuple(out.shape))
        for a, b in groups or []:
            if c.axis in a and len(b) == 1:
                if len(a) == 1:
                    return Const(b[0], c.flags)
                return _flatten_flags(c, [v.shape[i] for i in a], a[0], b[0])
        return None


class PermuteRule(Rule):
    """permute / transpose / swapaxes / movedim: output axis k is input axis perm[k]."""

    name = "permute"

    def perm(self, node, rank):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name == "permute":
            dims = list(node.args[1:]) if node.op == "call_method" else arg(node, 1, "dims")
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            return [_norm(d, rank) for d in dims]
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = _norm(arg(node, 1, "dim0"), rank), _norm(arg(node, 2, "dim1"), rank)
            p = list(range(rank))
            p[a], p[b] = p[b], p[a]
            return p
        if name in ("movedim", "moveaxis"):
            src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            p = [None] * rank
            for s, d in zip(src, dst):
                p[_norm(d, rank)] = _norm(s, rank)
            rest = iter(i for i in range(rank) if i not in [_norm(s, rank) for s in src])
            return [q if q is not None else next(rest) for q in p]
        if name == "t":
            return [1, 0] if rank == 2 else list(range(rank))
        return None

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx = cg.shape(x)
        p = self.perm(node, len(sx)) if sx is not None else None
        if p is None or len(p) != len(sx) or any(not isinstance(i, int) for i in p):
            cg.unknown(node, "permute")
            return
        cg.tie_axes(x, node, [(p[k], k) for k in range(len(p))], "permute")

    def constancy(self, env, node, module, out):
        x = arg(node, 0, "input")
        v = env.value(x)
        if not isinstance(v, torch.Tensor):
            return None
        p = self.perm(node, v.dim())
        return _map_const(env.const(x), {p[k]: k for k in range(len(p))}) if p else None


class SqueezeRule(Rule):
    """squeeze / unsqueeze: the axes that stay are tied in order."""

    name = "squeeze"

    def mapping(self, node, sin, sout):
        keep_in = list(range(len(sin)))
        keep_out = list(range(len(sout)))
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        d = arg(node, 1, "dim")
        if name == "unsqueeze":
            keep_out.remove(_norm(d, len(sout)))
        else:
            dims = _dims(d, len(sin)) if d is not None else [i for i, s in enumerate(sin) if s == 1]
            keep_in = [i for i in keep_in if not (i in dims and sin[i] == 1)]
        if len(keep_in) != len(keep_out):
            return None
        return dict(zip(keep_in, keep_out))

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx, so = cg.shape(x), cg.shape(node)
        m = self.mapping(node, sx, so) if sx is not None and so is not None else None
        if m is None:
            cg.unknown(node, "squeeze")
            return
        cg.tie_axes(x, node, list(m.items()), "squeeze")

    def constancy(self, env, node, module, out):
        x = arg(node, 0, "input")
        v = env.value(x)
        if not isinstance(v, torch.Tensor):
            return None
        m = self.mapping(node, tuple(v.shape), tuple(out.shape))
        return _map_const(env.const(x), m) if m else None


class ReduceRule(Rule):
    """mean / sum / amax / ... over ``dim``: kept axes are tied; a reduced channel axis is *whole*
    (removing a channel would change the result) but may still be resized."""

    name = "reduce"

    def _dims(self, node, rank):
        return _dims(arg(node, 1, "dim"), rank)

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx, so = cg.shape(x), cg.shape(node)
        if sx is None:
            cg.unknown(node, _name(node))
            return
        dims = self._dims(node, len(sx))
        if dims is None:
            dims = list(range(len(sx)))
        keepdim = bool(arg(node, 2, "keepdim", False))
        kept = [i for i in range(len(sx)) if i not in dims]
        if so is None:
            return
        mapping = {i: i for i in kept} if keepdim else {i: k for k, i in enumerate(kept)}
        if len(mapping) > len(so):
            cg.unknown(node, _name(node))
            return
        cg.tie_axes(x, node, list(mapping.items()), _name(node))
        for d in dims:
            cg.whole(cg.space(x, d), f"{_name(node)} over axis {d} at {node.name}")

    def constancy(self, env, node, module, out):
        x = arg(node, 0, "input")
        v, c = env.value(x), env.const(x)
        if c is None or not isinstance(v, torch.Tensor):
            return None
        dims = self._dims(node, v.dim())
        if dims is None or c.axis in dims:
            return None
        keepdim = bool(arg(node, 2, "keepdim", False))
        kept = [i for i in range(v.dim()) if i not in dims]
        return _map_const(c, {i: i for i in kept} if keepdim else {i: k for k, i in enumerate(kept)})


class AlongDimRule(Rule):
    """softmax / log_softmax / normalize / cumsum along ``dim``: every axis tied, ``dim`` kept whole."""

    name = "along-dim"

    def __init__(self, index: int = 1, default: int | None = None) -> None:
        self.index, self.default = index, default

    def _dim(self, node, module, rank):
        d = getattr(module, "dim", None) if module is not None else arg(node, self.index, "dim", self.default)
        return _norm(d, rank) if isinstance(d, int) else None

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx = cg.shape(x)
        if sx is None or sx != cg.shape(node):
            cg.unknown(node, _name(node))
            return
        cg.tie_axes(x, node, None, _name(node))
        d = self._dim(node, module, len(sx))
        if d is None:
            cg.freeze_all(node, f"{_name(node)} without a dim at {node.name}")
        else:
            cg.whole(cg.space(node, d), f"{_name(node)} along axis {d} at {node.name}")

    def constancy(self, env, node, module, out):
        c = env.const(arg(node, 0, "input"))
        d = self._dim(node, module, out.dim())
        return c if c is not None and d is not None and c.axis != d else None


class GetitemRule(Rule):
    """``x[i]`` of a tuple node (one element) or indexing of a tensor: full slices keep an axis, an
    int index drops it, ``None`` adds one; a partial slice or int index into an axis freezes it
    (the indices name channels)."""

    name = "getitem"

    def couple(self, cg, node, module):
        src, index = node.args[0], node.args[1]
        if not isinstance(src, fx.Node):
            return
        if cg.element_shapes(src):
            if isinstance(index, int):
                shapes = cg.element_shapes(src)
                if 0 <= index < len(shapes) and shapes[index] is not None:
                    for k in range(len(shapes[index])):
                        cg.tie(cg.element_space(src, index, k), cg.space(node, k), "tuple element")
                return
            cg.unknown(node, "getitem of a tuple")
            return
        sx, so = cg.shape(src), cg.shape(node)
        if sx is None:
            return  # sizes and other Python values
        plan = self.plan(index, len(sx))
        if plan is None or so is None:
            cg.unknown(node, "indexing")
            return
        # x[:, :1] only as a shape template (torch.empty_like(x[:, :1, :1, :1]) in stochastic depth)
        # reads no channel: the source keeps its freedom
        template = bool(node.users) and all(_shape_only(u) for u in node.users)
        for i, (kind, j) in plan.items():
            if kind == "keep":
                cg.tie(cg.space(src, i), cg.space(node, j), "indexing")
            else:
                if not template:
                    cg.freeze(cg.space(src, i), f"{kind} at {node.name}")
                if j is not None:
                    cg.freeze(cg.space(node, j), f"{kind} at {node.name}")

    @staticmethod
    def plan(index: Any, rank: int) -> dict[int, tuple[str, int | None]] | None:
        """For each input axis: ("keep", out axis), ("slicing channels", out axis) or ("index", None)."""
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
            return None
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        if sum(1 for i in items if i is Ellipsis) > 1 or n_real > rank:
            return None
        expanded: list[Any] = []
        for i in items:
            if i is Ellipsis:
                expanded += [slice(None)] * (rank - n_real)
            else:
                expanded.append(i)
        expanded += [slice(None)] * (rank - sum(1 for i in expanded if i is not None))
        out: dict[int, tuple[str, int | None]] = {}
        i_in = i_out = 0
        for it in expanded:
            if it is None:
                i_out += 1
                continue
            if isinstance(it, slice):
                full = it.start in (None, 0) and it.stop is None and it.step in (None, 1)
                out[i_in] = ("keep" if full else "slicing", i_out)
                i_in, i_out = i_in + 1, i_out + 1
            elif isinstance(it, int):
                out[i_in] = ("indexing one position", None)
                i_in += 1
            else:
                return None
        return out

    def constancy(self, env, node, module, out):
        src, index = node.args[0], node.args[1]
        v = env.value(src)
        if not isinstance(v, torch.Tensor):
            return None
        plan = self.plan(index, v.dim())
        if plan is None:
            return None
        return _map_const(env.const(src), {i: j for i, (k, j) in plan.items() if k == "keep"})


class SplitRule(Rule):
    """split / chunk / unbind / tensor_split: the split axis is frozen (equal or not, a split at
    given places fixes which channels go where); the other axes of every piece are tied to the input."""

    name = "split"

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx = cg.shape(x)
        shapes = cg.element_shapes(node)
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if sx is None or not shapes:
            cg.unknown(node, name)
            return
        if name == "unbind":
            dim = _norm(arg(node, 1, "dim", 0), len(sx))
        else:
            dim = _norm(arg(node, 2, "dim", 0), len(sx))
        cg.freeze(cg.space(x, dim), f"{name} along axis {dim} at {node.name}")
        for i, sh in enumerate(shapes):
            if sh is None:
                continue
            for k in range(len(sx)):
                if name == "unbind":
                    if k != dim:
                        cg.tie(cg.space(x, k), cg.element_space(node, i, k if k < dim else k - 1), name)
                elif k == dim:
                    cg.freeze(cg.element_space(node, i, k), f"{name} along axis {dim} at {node.name}")
                else:
                    cg.tie(cg.space(x, k), cg.element_space(node, i, k), name)


class ExpandRule(Rule):
    """expand / expand_as / broadcast_to: axes that keep their size are tied, broadcast axes are
    new; ``expand_as(y)`` also ties the result to ``y`` (it must keep y's sizes)."""

    name = "expand"

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx, so = cg.shape(x), cg.shape(node)
        if sx is None or so is None or len(sx) > len(so):
            cg.unknown(node, "expand")
            return
        shift = len(so) - len(sx)
        for j, d in enumerate(sx):
            if d == so[j + shift]:
                cg.tie(cg.space(x, j), cg.space(node, j + shift), "expand")
        name = node.target if node.op == "call_method" else ""
        if name == "expand_as":
            cg.tie_axes(node, node.args[1], None, "expand_as")
            return
        # A broadcast axis gets the size the call gives it: ``g.expand(-1, 32, -1, -1) + x`` fits x
        # only while x has 32 channels (recorded like any computed size: followed or frozen).
        sizes = _given_sizes(cg, node.args[1:] if node.op == "call_method" else node.args[1:2])
        if len(sizes) != len(so):
            return
        for k, v in enumerate(sizes):
            if k < shift or sx[k - shift] != so[k]:
                cg.size_from(cg.space(node, k), cg.size_expr(v), f"expand at {node.name}")

    def constancy(self, env, node, module, out):
        x = arg(node, 0, "input")
        v, c = env.value(x), env.const(x)
        if c is None or not isinstance(v, torch.Tensor):
            return None
        shift = out.dim() - v.dim()
        if v.shape[c.axis] != out.shape[c.axis + shift]:
            return None
        return Const(c.axis + shift, c.flags)


class RepeatRule(Rule):
    """x.repeat(*sizes): axes repeated once are tied, axes tiled more than once are frozen."""

    name = "repeat"

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx, so = cg.shape(x), cg.shape(node)
        reps = list(node.args[1:])
        if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
            reps = list(reps[0])
        if sx is None or so is None or len(reps) != len(so) or len(sx) > len(so):
            cg.unknown(node, "repeat")
            return
        shift = len(so) - len(sx)
        for j in range(len(sx)):
            if reps[j + shift] == 1:
                cg.tie(cg.space(x, j), cg.space(node, j + shift), "repeat")
            else:
                cg.freeze(cg.space(x, j), f"repeat at {node.name}")
                cg.freeze(cg.space(node, j + shift), f"repeat at {node.name}")


def _given_sizes(cg, args: Sequence[Any]) -> list[Any]:
    """A call's size arguments, one per axis: varargs ``(n, c, h, w)``, one list / tuple, or one
    ``x.shape`` / ``x.size()`` node (its sizes as SizeExprs); entries are ints, size nodes or
    SizeExprs (``ChannelGraph.size_expr`` reads each)."""
    args = list(args)
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if len(args) == 1 and isinstance(args[0], fx.Node) and cg.shape_exprs(args[0]) is not None:
        return cg.shape_exprs(args[0])  # torch.zeros(x.shape), g.expand(x.size())
    return args


class CreationRule(Rule):
    """torch.zeros / ones / empty / full / rand / randn / arange, new_*: sizes given by the call, so
    every axis of the result is frozen (a literal channel count cannot follow a resize). A size
    computed from tensor sizes is recorded too (``size_from``): the groups it reads freeze with it
    (``x.new_zeros(n, 32 - x.shape[1], h, w)`` concatenated to ``x`` pads it to 32 channels, which
    a resize of ``x`` would break)."""

    name = "creation"
    _SIZED = {"zeros", "ones", "empty", "rand", "randn", "full", "new_zeros", "new_ones", "new_empty", "new_full"}

    def couple(self, cg, node, module):
        cg.freeze_all(node, f"tensor created with given sizes at {node.name}")
        shape, sizes = cg.shape(node), self.sizes(cg, node)
        if shape is None or sizes is None or len(sizes) != len(shape):
            return
        for k, v in enumerate(sizes):
            cg.size_from(cg.space(node, k), cg.size_expr(v), f"{_name(node)} at {node.name}")

    def sizes(self, cg, node) -> list[Any] | None:
        """The size the call gives each axis (ints, size nodes or SizeExprs); None when unknown."""
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        args = list(node.args[1:] if node.op == "call_method" else node.args)
        if name == "arange":
            return args[:1] if len(args) == 1 else None
        if name not in self._SIZED:
            return None
        if "size" in node.kwargs:
            args = [node.kwargs["size"]]
        elif name in ("full", "new_full"):
            args = args[:1]
        return _given_sizes(cg, args)


class PadRule(Rule):
    """F.pad: the last len(pad)/2 axes are padded, the others are tied; a padded axis is frozen in
    and out (whichever it is: the channel axis may sit anywhere after a permute or unsqueeze, and a
    spatial one is a conv's, frozen anyway). A constant channel stays constant unless padded with
    another value."""

    name = "pad"

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        pad = arg(node, 1, "pad")
        sx, so = cg.shape(x), cg.shape(node)
        if sx is None or so is None or not isinstance(pad, (list, tuple)) or len(sx) != len(so):
            cg.unknown(node, "pad")
            return
        n = len(pad) // 2
        for k in range(len(sx)):
            if k >= len(sx) - n:
                if sx[k] != so[k] or any(p != 0 for p in pad[2 * (len(sx) - 1 - k):2 * (len(sx) - k)]):
                    cg.freeze(cg.space(x, k), f"pad of axis {k} at {node.name}")
                    cg.freeze(cg.space(node, k), f"pad of axis {k} at {node.name}")
                    continue
            cg.tie(cg.space(x, k), cg.space(node, k), "pad")

    def constancy(self, env, node, module, out):
        x = arg(node, 0, "input")
        c = env.const(x)
        if c is None:
            return None
        mode = arg(node, 2, "mode", "constant")
        value = arg(node, 3, "value", None) or 0.0
        if mode != "constant":
            return c
        return Const(c.axis, c.flags & (env.first(x, c.axis) == value))


_WINDOW_PARAMS = {  # a pooling kind's parameters after the input, in order (module attributes of the same names)
    "max": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "avg": ("kernel_size", "stride", "padding", "ceil_mode"),
    "lp": ("norm_type", "kernel_size", "stride", "ceil_mode"),
    "adaptive": ("output_size",),
    "resample": ("size", "scale_factor"),
    "unpool": (),
}


def _per_axis(value: Any, n: int) -> list[Any] | None:
    """A pooling parameter for each of ``n`` window axes (one value broadcast), None if it names another count."""
    if isinstance(value, (list, tuple)):
        return list(value) * n if len(value) == 1 else list(value) if len(value) == n else None
    return [value] * n


class ChannelKeepingRule(Rule):
    """Pooling, interpolation, unpooling (``kind``: a key of ``_WINDOW_PARAMS``): batch and channel
    axes (0, 1) are tied. Along each window axis (2 and up) the input is mixed, so compaction keeps
    it whole, and the output has the size the op computes from it: the same axis (a window of 1,
    ``output_size`` None), ``size // k`` (a window of k at stride k, no padding or dilation),
    a given size (adaptive pooling, ``interpolate(size=...)``, literal or from ``x.shape``),
    ``size * s`` (an integer scale factor). The channel graph follows these like any computed size
    (a channel axis pooled after ``unsqueeze(1)`` resizes with its pooled copy, or is frozen where a
    resize would not fit); any other size freezes the axis in the input and the output.
    ``avg`` marks average pooling, whose counted zero padding changes a constant channel;
    ``constant`` False: a constant input channel gives no constant output (unpooling, LP)."""

    name = "pool"

    def __init__(self, kind: str = "max", avg: bool = False, constant: bool = True) -> None:
        self.kind, self.avg, self.constant_keeps = kind, avg, constant

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        sx = cg.shape(x)
        if sx is None or len(sx) < 2:
            cg.unknown(node, _name(node))
            return
        if cg.shape(node) is not None:
            outs = [(cg.shape(node), lambda k: cg.space(node, k))]
        else:  # return_indices: (values, indices)
            outs = [(sh, lambda k, i=i: cg.element_space(node, i, k)) for i, sh in enumerate(cg.element_shapes(node))]
        if not outs or any(sh is None or len(sh) != len(sx) for sh, _ in outs):
            cg.unknown(node, _name(node))
            return
        for _, space in outs:
            cg.tie(cg.space(x, 0), space(0), _name(node))
            cg.tie(cg.space(x, 1), space(1), _name(node))
        indices = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
        if indices is not None and cg.shape(indices) is not None:  # max_unpool's indices
            cg.tie_axes(indices, node, [(0, 0), (1, 1)], _name(node))
            for k in range(2, len(cg.shape(indices))):
                cg.freeze(cg.space(indices, k), f"{_name(node)} indices at {node.name}")
        where = f"{_name(node)} at {node.name}"
        for k, size in zip(range(2, len(sx)), self.window_sizes(cg, node, module, x, len(sx) - 2)):
            if size == "same":
                for _, space in outs:
                    cg.tie(cg.space(x, k), space(k), _name(node))
                continue
            cg.whole(cg.space(x, k), f"{_name(node)} along axis {k} at {node.name}")
            if size is None:
                cg.freeze(cg.space(x, k), f"{_name(node)} along axis {k} at {node.name}")
            for _, space in outs:
                cg.size_from(space(k), size, where)

    def window_sizes(self, cg, node, module, x, n) -> list[SizeExpr | str | None]:
        """For each of the ``n`` window axes: "same", the output size as a SizeExpr of the input's,
        or None (a size the channel graph does not follow)."""
        names = _WINDOW_PARAMS[self.kind]
        p = ({k: getattr(module, k, None) for k in names} if module is not None
             else {k: arg(node, i + 1, k) for i, k in enumerate(names)})
        src = [SizeExpr.size(cg.space(x, 2 + i), f"{x.name}.shape[{2 + i}]") for i in range(n)]
        if self.kind in ("max", "avg", "lp"):
            kernel = _per_axis(p["kernel_size"], n)
            stride = kernel if p["stride"] in (None, (), []) else _per_axis(p["stride"], n)
            pad, dil = _per_axis(p.get("padding") or 0, n), _per_axis(p.get("dilation") or 1, n)
            if None in (kernel, stride, pad, dil) or p["ceil_mode"]:
                return [None] * n
            return [None if not (isinstance(k, int) and k == s and q == 0 and d == 1)
                    else "same" if k == 1 else SizeExpr("//", e, SizeExpr.const(k))
                    for e, k, s, q, d in zip(src, kernel, stride, pad, dil)]
        if self.kind == "adaptive":
            sizes = _per_axis(p["output_size"], n)
            return [None] * n if sizes is None else ["same" if o is None else cg.size_expr(o) for o in sizes]
        if self.kind == "resample":
            if p["size"] is not None:
                sizes = _per_axis(p["size"], n)
                return [None] * n if sizes is None else [cg.size_expr(o) for o in sizes]
            scales = _per_axis(p["scale_factor"], n)
            return [None] * n if scales is None else [
                "same" if f == 1 else SizeExpr("*", e, SizeExpr.const(int(f)))
                if isinstance(f, (int, float)) and float(f).is_integer() and f > 0 else None
                for e, f in zip(src, scales)]
        return [None] * n

    def constancy(self, env, node, module, out):
        if not self.constant_keeps:
            return None
        c = env.const(arg(node, 0, "input"))
        if c is None or c.axis != 1:
            return None
        if self.avg:
            if module is not None:
                pad, incl = getattr(module, "padding", 0), getattr(module, "count_include_pad", True)
                divisor = getattr(module, "divisor_override", None)
            else:
                pad, incl = arg(node, 3, "padding", 0), arg(node, 5, "count_include_pad", True)
                divisor = arg(node, 6, "divisor_override", None)
            if divisor is not None:
                return None
            pads = (pad,) if isinstance(pad, int) else tuple(pad)
            if incl and any(p > 0 for p in pads):
                return Const(1, c.flags & (env.first(arg(node, 0, "input"), 1) == 0))
        return c


class StochasticDepthRule(Rule):
    """torchvision.ops.stochastic_depth(x, p, mode, training): drops whole samples (or the whole
    batch) in training, the identity in eval; channel c -> channel c."""

    name = "stochastic_depth"

    def couple(self, cg, node, module):
        ElementwiseRule().couple(cg, node, module)

    def constancy(self, env, node, module, out):
        return None if arg(node, 3, "training", True) else env.const(arg(node, 0, "input"))


class NeutralRule(Rule):
    """size / dim / numel and other ops on Python values: no tensor, no channels."""

    name = "neutral"

    def couple(self, cg, node, module):
        if cg.shape(node) is not None or cg.element_shapes(node):
            cg.unknown(node, _name(node))


class UnknownRule(Rule):
    """Explicitly not understood: every axis in and out is frozen (the safe default)."""

    name = "frozen"

    def couple(self, cg, node, module):
        cg.unknown(node, _name(node, module))


class ItemAssignRule(Rule):
    """``x[index] = y`` (``operator.setitem``, traced in place as eager PyTorch runs it): the index is
    fixed in the code, so the channels of x and y keep their count. Every axis in and out is frozen,
    with a reason that names the assignment and its source line (it read "unknown op setitem")."""

    name = "item assignment"

    def couple(self, cg, node, module):
        from ..trace import user_source_line

        where = user_source_line(node)
        cg.freeze_through(node, f"item assignment at {node.name}{f' ({where})' if where else ''}: "
                                "the channels it writes keep their count")


_SHAPE_FUNCTIONS = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
                    torch.randn_like, torch.randint_like}
_SHAPE_METHODS = {"size", "dim", "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "numel"}


def _shape_only(user: fx.Node) -> bool:
    """True when ``user`` reads only the shape, dtype or device of its input, never its values."""
    if user.op == "call_function":
        if user.target in _SHAPE_FUNCTIONS:
            return True
        return user.target is getattr and len(user.args) > 1 and user.args[1] in ("shape", "dtype", "device", "ndim")
    return user.op == "call_method" and user.target in _SHAPE_METHODS


def _name(node: fx.Node, module: Any = None) -> str:
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    t = node.target
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))
