"""Rules of layers with parameters: convolutions (1-D/2-D/3-D, transposed, grouped, depthwise with a
channel multiplier), linear layers, norms and per-channel PReLU, as modules and as functionals.

Weight layouts (PyTorch): Conv ``[Cout, Cin/g, *k]``, ConvTranspose ``[Cin, Cout/g, *k]``, Linear
``[out, in]``. A grouped conv (1 < g < Cin) keeps group g's outputs reading only group g's inputs,
so its channel groups stay multiples of g and compaction keeps them whole; a depthwise conv with a
channel multiplier m (g = Cin, Cout = m * Cin) writes output ``c * m + r`` from input ``c``, so its
output group is laid out from its input group (a flatten with a fixed inner axis of size m).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .base import Const, LayerRule, Role, Rule, SparseLayout


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional argument ``i`` or keyword ``name`` of a call."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with (masked for sparse layers), detached."""
    return (module.masked_weight() if hasattr(module, "masked_weight") else module.weight).detach()


def zero_padded(padding: Any, kernel: Any, padding_mode: str = "zeros") -> bool:
    """True when a conv pads with zeros, which makes a constant input non-uniform at the border."""
    if padding_mode != "zeros":
        return False
    if isinstance(padding, str):
        ks = (kernel,) if isinstance(kernel, int) else tuple(kernel)
        return padding == "same" and any(k > 1 for k in ks)
    pads = (padding,) if isinstance(padding, int) else tuple(padding)
    return any(p > 0 for p in pads)


def freeze_window(cg: Any, x: Any, node: fx.Node, why: str) -> None:
    """Freeze the axes a sliding window runs along (2 and up, a conv's spatial axes) in its input
    ``x`` and its output ``node``: their sizes come from the input's extent and the window, never
    from a channel count (a Linear over them keeps its features), and a channel axis moved there
    (``y.unsqueeze(1)``) is mixed along, not kept."""
    for a in (x, node):
        for k in range(2, len(cg.shape(a) or ())):
            cg.freeze(cg.space(a, k), why)


def _index(t: torch.Tensor, axis: int, keep: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(axis, keep.to(t.device)).clone()


def set_tensor(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``mod``, keeping its kind and requires_grad."""
    old = getattr(mod, name, None)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def slice_tensors(mod: nn.Module, names: tuple[str, ...], axis: int, keep: torch.Tensor) -> None:
    for name in names:
        t = getattr(mod, name, None)
        if isinstance(t, torch.Tensor):
            set_tensor(mod, name, _index(t, axis, keep))


def rebuilt(module: nn.Module, attrs: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """A copy of ``module`` (same type, same forward) with ``attrs`` set, tensors ``shapes`` replaced
    by new ones of those shapes, and its own ``reset_parameters`` run (fresh initialisation)."""
    new = copy.deepcopy(module)
    for k, v in attrs.items():
        setattr(new, k, v)
    for name, shape in shapes.items():
        t = getattr(new, name, None)
        if isinstance(t, torch.Tensor):
            set_tensor(new, name, torch.empty(shape, dtype=t.dtype, device=t.device))
    if hasattr(new, "reset_parameters"):
        new.reset_parameters()
    return new


def dense_entries(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Live mask entries: the mask of a sparse layer, the nonzero kernel blocks of a dense one."""
    if hasattr(module, "mask") and hasattr(module, "masked_weight"):
        return module.mask.bool()
    w = weight.detach()
    return w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1) if w.dim() > 2 else w.ne(0)


def _group_rows(cout: int, cin: int, groups: int) -> torch.Tensor:
    """[cout, cin/g] -> the input channel each weight column reads, per output channel."""
    cin_g = cin // groups
    return (torch.arange(cout) // max(cout // groups, 1))[:, None] * cin_g + torch.arange(cin_g)[None, :]


# --------------------------------------------------------------------------------------------
# Convolutions


class ConvRule(LayerRule):
    """nn.Conv1d/2d/3d: writes ``Cout`` channels from ``Cin`` (see the module docstring for groups)."""

    name = "conv"
    kind = "conv"
    transposed = False

    # -- geometry (overridden by the transposed rule) --
    def io(self, m: nn.Module) -> tuple[int, int, int]:
        return m.in_channels, m.out_channels, m.groups

    def weight_axes(self) -> tuple[int, int]:
        """(axis of the output channels, axis of the input channels) in the weight."""
        return (1, 0) if self.transposed else (0, 1)

    def couple(self, cg, node, m):
        x = arg(node, 0, "input")
        t = node.target
        cin, cout, g = self.io(m)
        s_in, s_out = cg.space(x, 1), cg.space(node, 1)
        cg.tie(cg.space(x, 0), cg.space(node, 0), "batch")
        w_in, w_out = cg.module_space(t, 1, cin), cg.module_space(t, 0, cout)
        cg.tie(s_in, w_in, f"{t} input")
        cg.tie(s_out, w_out, f"{t} output")
        freeze_window(cg, x, node, f"{t} slides along it")
        self.couple_weights(cg, node, t, w_in, w_out, cin, cout, g)

    def couple_weights(self, cg, node, t, w_in, w_out, cin, cout, g, functional=False):
        if g == 1:
            cg.member(w_in, Role.IN, node, t, self.weight_axes()[1], self, functional)
            cg.member(w_out, Role.OUT, node, t, self.weight_axes()[0], self, functional)
        elif g == cin == cout:
            cg.tie(w_in, w_out, f"depthwise conv {t}")
            cg.member(w_out, Role.CHANNELWISE, node, t, 0, self, functional)
        elif g == cin and cout % cin == 0 and not self.transposed:
            mult = cg.module_space(t, 2, cout // cin)
            cg.freeze(mult, f"channel multiplier of depthwise conv {t}")
            cg.derive(w_out, "flatten", [(w_in, cin), (mult, cout // cin)])
            cg.member(w_in, Role.IN, node, t, self.weight_axes()[1], self, functional)
            cg.member(w_out, Role.OUT, node, t, self.weight_axes()[0], self, functional)
        else:
            why = f"grouped conv {t} (groups={g})"
            for s in (w_in, w_out):
                cg.multiple_of(s, g)
                cg.whole(s, why)
            cg.member(w_in, Role.IN, node, t, self.weight_axes()[1], self, functional)
            cg.member(w_out, Role.OUT, node, t, self.weight_axes()[0], self, functional)

    # -- constancy --
    def padded(self, m: nn.Module) -> bool:
        return zero_padded(m.padding, m.kernel_size, m.padding_mode)

    def constancy(self, env, node, m, out):
        x = arg(node, 0, "input")
        fin = env.flags(x, 1)
        if fin is None:
            return None
        return Const(1, self._constant(effective_weight(m), self.io(m), self.padded(m), fin, env.first(x, 1)))

    def _constant(self, w, io, padded, fin, val):
        cin, cout, g = io
        if self.transposed:
            # output o reads input i when w[i, o % (cout/g)] is live and i is in o's group
            live = w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1)        # [cin, cout/g]
            cout_g, cin_g = cout // g, cin // g
            L = torch.zeros(cout, cin, dtype=torch.bool)
            for b in range(g):
                L[b * cout_g:(b + 1) * cout_g, b * cin_g:(b + 1) * cin_g] = live[b * cin_g:(b + 1) * cin_g].T
            usable = fin & (val == 0)
            return ~(L & ~usable[None, :]).any(1)
        live = w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1)            # [cout, cin/g]
        idx = _group_rows(cout, cin, g)
        usable = fin[idx] & ((val[idx] == 0) if padded else torch.ones_like(live))
        return ~(live & ~usable).any(1)

    # -- compaction --
    def read_mask(self, m, member):
        w = m if isinstance(m, torch.Tensor) else effective_weight(m)
        cin, cout, g = self._io_of(m, w)
        if self.transposed:
            return w.reshape(w.shape[0], -1).ne(0).any(1)
        live = w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1)          # [cout, cin/g]
        cout_g = cout // g
        return torch.cat([live[b * cout_g:(b + 1) * cout_g].any(0) for b in range(g)])

    def _io_of(self, m, w):
        if isinstance(m, torch.Tensor):  # a functional weight: assume groups = 1
            return (w.shape[0], w.shape[1], 1) if self.transposed else (w.shape[1], w.shape[0], 1)
        return self.io(m)

    def fold(self, m, member, positions, values):
        if isinstance(m, torch.Tensor) or self.transposed or self.io(m)[2] != 1 or self.padded(m):
            return None
        w = effective_weight(m)[:, positions.long()]
        return w.flatten(2).sum(-1) @ values.to(w.dtype)

    def slice(self, m, member, keep):
        n = len(keep)
        cin, cout, g = self.io(m)
        ax_out, ax_in = self.weight_axes()
        if member.role is Role.CHANNELWISE:       # depthwise: both sides
            slice_tensors(m, ("weight",), 0, keep)
            slice_tensors(m, ("bias",), 0, keep)
            slice_tensors(m, ("mask",), 0, keep)
            m.in_channels = m.out_channels = m.groups = n
            return
        if g not in (1, cin):
            raise ValueError(f"grouped conv with groups={g} is kept whole, not sliced")
        if member.role is Role.OUT:
            slice_tensors(m, ("weight",), ax_out if g == 1 else 0, keep)
            slice_tensors(m, ("bias",), 0, keep)
            slice_tensors(m, ("mask",), 0, keep)
            m.out_channels = n
        elif member.role is Role.IN:
            if g == 1:
                slice_tensors(m, ("weight",), ax_in, keep)
                slice_tensors(m, ("mask",), 1, keep)
            m.in_channels = n
            if g == cin:                            # depthwise with a channel multiplier
                m.groups = n

    # -- depth multiplier --
    def resize_plan(self, m, node, size):
        cin_old, cout_old, g = self.io(m)
        cin, cout = size(arg(node, 0, "input"), 1), size(node, 1)
        if (cin, cout) == (cin_old, cout_old):
            return None
        if g == cin_old:                            # depthwise (with or without multiplier)
            g = cin
        k = tuple(m.weight.shape[2:])
        shape = (cin, cout // g, *k) if self.transposed else (cout, cin // g, *k)
        return {"in_channels": cin, "out_channels": cout, "groups": g}, {"weight": shape, "bias": (cout,)}

    # -- sparse passes --
    def sparse(self, m):
        from ...nn import SPARSE_CONV_FOR

        if self.transposed:
            return f"{type(m).__name__} stays dense (transposed convs are not masked)"
        base = next((b for b in type(m).__mro__ if b in SPARSE_CONV_FOR), None)
        if base is None:
            return f"{type(m).__name__} stays dense (no masked version)"
        cin, cout, g = self.io(m)
        if g > 1 and cin // g == 1:
            return "depthwise conv kept dense"
        if m.padding_mode != "zeros":
            return f"padding mode {m.padding_mode} kept dense"
        return SparseLayout(cout, cin // g, math.prod(m.kernel_size), True)

    def make_sparse(self, m, mask):
        from ...nn import SPARSE_CONV_FOR

        base = next(b for b in type(m).__mro__ if b in SPARSE_CONV_FOR)
        return SPARSE_CONV_FOR[base].from_dense(m, mask)

    def describe(self, m):
        cin, cout, g = self.io(m)
        w = effective_weight(m)
        if self.transposed:
            live = w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1)    # [cin, cout/g]
            cin_g, cout_g = cin // g, cout // g
            entries = torch.cat([live[b * cin_g:(b + 1) * cin_g].T for b in range(g)], 0)  # [cout, cin/g]
        else:
            entries = dense_entries(m, w)
        return {"in": cin, "out": cout, "kernel": list(m.kernel_size), "groups": g, "entries": entries,
                "kernel_size": math.prod(m.kernel_size), "spatial": "in" if self.transposed else "out"}


class ConvTransposeRule(ConvRule):
    """nn.ConvTranspose1d/2d/3d: weight ``[Cin, Cout/g, *k]``; a constant input channel gives a
    non-uniform output where kernels overlap, so only zero constants are removed, never folded."""

    name = "conv-transpose"
    transposed = True

    def padded(self, m):
        return True


# --------------------------------------------------------------------------------------------
# Linear


class LinearRule(LayerRule):
    """nn.Linear on ``[..., in]``: the last axis is read and written; leading axes pass through."""

    name = "linear"
    kind = "linear"

    def couple(self, cg, node, m):
        x = arg(node, 0, "input")
        sx, so = cg.shape(x), cg.shape(node)
        if sx is None or so is None or len(sx) != len(so):
            cg.unknown(node, "linear")
            return
        cg.tie_axes(x, node, [(i, i) for i in range(len(sx) - 1)], "linear leading axes")
        t = node.target
        w_in, w_out = cg.module_space(t, 1, m.in_features), cg.module_space(t, 0, m.out_features)
        cg.tie(cg.space(x, -1), w_in, f"{t} input")
        cg.tie(cg.space(node, -1), w_out, f"{t} output")
        cg.member(w_in, Role.IN, node, t, 1, self)
        cg.member(w_out, Role.OUT, node, t, 0, self)

    def constancy(self, env, node, m, out):
        fin = env.flags(arg(node, 0, "input"), -1)
        if fin is None:
            return None
        live = effective_weight(m).ne(0)
        return Const(out.dim() - 1, ~(live & ~fin[None, :]).any(1))

    def read_mask(self, m, member):
        w = m if isinstance(m, torch.Tensor) else effective_weight(m)
        return w.ne(0).any(0)

    def fold(self, m, member, positions, values):
        if isinstance(m, torch.Tensor):
            return None
        w = effective_weight(m)[:, positions.long()]
        return w @ values.to(w.dtype)

    def slice(self, m, member, keep):
        n = len(keep)
        if member.role is Role.OUT:
            slice_tensors(m, ("weight", "bias", "mask"), 0, keep)
            m.out_features = n
        elif member.role is Role.IN:
            slice_tensors(m, ("weight", "mask"), 1, keep)
            m.in_features = n

    def resize_plan(self, m, node, size):
        fin, fout = size(arg(node, 0, "input"), -1), size(node, -1)
        if (fin, fout) == (m.in_features, m.out_features):
            return None
        return {"in_features": fin, "out_features": fout}, {"weight": (fout, fin), "bias": (fout,)}

    def sparse(self, m):
        from ...nn import SparseLinear

        if not isinstance(m, nn.Linear) or isinstance(m, SparseLinear):
            return f"{type(m).__name__} stays dense"
        return SparseLayout(m.out_features, m.in_features, 1, False)

    def make_sparse(self, m, mask):
        from ...nn import SparseLinear

        return SparseLinear.from_dense(m, mask)

    def describe(self, m):
        return {"in": m.in_features, "out": m.out_features, "kernel": None, "groups": 1,
                "entries": dense_entries(m, effective_weight(m)), "kernel_size": 1, "spatial": "tokens"}


# --------------------------------------------------------------------------------------------
# Norms and per-channel parameters


class ChannelwiseRule(LayerRule):
    """A module that keeps its input's shape and scales channel c (axis ``axis``) by its own
    per-channel tensors ``tensors`` only (BatchNorm, InstanceNorm, per-channel PReLU)."""

    has_weight = False
    kind = "norm"
    tensors: tuple[str, ...] = ("weight", "bias", "running_mean", "running_var")
    count_attr = "num_features"
    axis = 1
    mixes = ""          # non-empty: channels are normalised together, compaction keeps them whole

    def channels(self, m):
        return getattr(m, self.count_attr)

    def couple(self, cg, node, m):
        x = arg(node, 0, "input")
        shape = cg.shape(node)
        if shape is None or cg.shape(x) != shape or not -len(shape) <= self.axis < len(shape):
            cg.unknown(node, type(m).__name__)
            return
        cg.tie_axes(x, node, None, type(m).__name__)
        s = cg.module_space(node.target, 0, self.channels(m))
        cg.tie(cg.space(node, self.axis), s, f"{node.target} channels")
        cg.member(s, Role.CHANNELWISE, node, node.target, 0, self)
        self.constrain(cg, s, m)

    def constrain(self, cg, s, m):
        if self.mixes:
            cg.whole(s, f"{type(m).__name__} {self.mixes}")

    def constancy(self, env, node, m, out):
        if self.mixes or m.training:
            return None
        c = env.const(arg(node, 0, "input"))
        return c if c is not None and c.axis == self.axis % out.dim() else None

    def slice(self, m, member, keep):
        slice_tensors(m, self.tensors, 0, keep)
        setattr(m, self.count_attr, len(keep))

    def resize_plan(self, m, node, size):
        c = size(node, self.axis)
        if c == self.channels(m):
            return None
        return {self.count_attr: c}, {t: (c,) for t in self.tensors}

    def resize(self, m, node, size):
        new = super().resize(m, node, size)
        if new is not None and hasattr(new, "reset_running_stats"):
            new.reset_running_stats()
        return new


class BatchNormRule(ChannelwiseRule):
    name = "batch-norm"


class GroupNormRule(ChannelwiseRule):
    """nn.GroupNorm: statistics over groups of C/G channels, so its channels stay a multiple of G
    and compaction keeps them (removing one changes its group's mean); depth multiplier resizes it."""

    name = "group-norm"
    tensors = ("weight", "bias")
    count_attr = "num_channels"
    mixes = "normalises groups of channels together"

    def constrain(self, cg, s, m):
        super().constrain(cg, s, m)
        cg.multiple_of(s, m.num_groups)


class LayerNormRule(ChannelwiseRule):
    """nn.LayerNorm over the last axis (tokens ``[N, T, C]``, channels-last ``[N, H, W, C]``);
    over several axes it freezes them."""

    name = "layer-norm"
    tensors = ("weight", "bias")
    axis = -1
    mixes = "normalises over these channels"

    def channels(self, m):
        return m.normalized_shape[0]

    def couple(self, cg, node, m):
        if len(m.normalized_shape) != 1:
            x = arg(node, 0, "input")
            cg.tie_axes(x, node, None, "layer norm")
            shape = cg.shape(node) or ()
            for a in range(len(shape) - len(m.normalized_shape), len(shape)):
                cg.freeze(cg.space(node, a), f"LayerNorm over {len(m.normalized_shape)} axes at {node.name}")
            return
        super().couple(cg, node, m)

    def slice(self, m, member, keep):
        slice_tensors(m, self.tensors, 0, keep)
        m.normalized_shape = (len(keep),)

    def resize_plan(self, m, node, size):
        # every normalised axis (couple froze them when there are several, so those keep their sizes;
        # a plan of the last axis alone rebuilt LayerNorm([C, H, W]) as LayerNorm((W,)), even at alpha 1)
        shape = tuple(size(node, a) for a in range(-len(m.normalized_shape), 0))
        if shape == tuple(m.normalized_shape):
            return None
        return {"normalized_shape": shape}, {t: shape for t in self.tensors}


class PReLURule(ChannelwiseRule):
    """nn.PReLU: one slope (elementwise) or one per channel of axis 1."""

    name = "prelu"
    kind = "activation"
    tensors = ("weight",)
    count_attr = "num_parameters"

    def couple(self, cg, node, m):
        if m.num_parameters == 1:
            cg.tie_axes(arg(node, 0, "input"), node, None, "prelu")
            return
        super().couple(cg, node, m)

    def constancy(self, env, node, m, out):
        c = env.const(arg(node, 0, "input"))
        return c if c is not None and (m.num_parameters == 1 or c.axis == 1) else None

    def resize_plan(self, m, node, size):
        if m.num_parameters == 1:
            return None
        return super().resize_plan(m, node, size)


# --------------------------------------------------------------------------------------------
# Functional layers whose parameters are get_attr tensors


def _get_attr(a: Any) -> bool:
    return isinstance(a, fx.Node) and a.op == "get_attr"


class FunctionalConvRule(Rule):
    """F.conv1d/2d/3d (and transposed) with get_attr weights: the weight's axes join the groups."""

    name = "functional conv"

    def __init__(self, transposed: bool = False) -> None:
        self.layer = ConvTransposeRule() if transposed else ConvRule()
        self.transposed = transposed

    def couple(self, cg, node, module):
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        groups = arg(node, 7 if self.transposed else 6, "groups", 1)
        ws = cg.shape(w)
        if not _get_attr(w) or ws is None or not isinstance(groups, int):
            cg.unknown(node, "conv with a computed weight")
            return
        ax_out, ax_in = self.layer.weight_axes()
        cin = ws[ax_in] * (groups if not self.transposed else 1)
        cout = ws[ax_out] * (groups if self.transposed else 1)
        cg.tie(cg.space(x, 0), cg.space(node, 0), "batch")
        if groups != 1:
            cg.unknown(node, f"functional conv with groups={groups}")
            return
        w_in, w_out = cg.space(w, ax_in), cg.space(w, ax_out)
        cg.tie(cg.space(x, 1), w_in, "functional conv input")
        cg.tie(cg.space(node, 1), w_out, "functional conv output")
        freeze_window(cg, x, node, f"conv at {node.name} slides along it")
        if _get_attr(b):
            cg.tie(cg.space(b, 0), w_out, "functional conv bias")
        elif isinstance(b, fx.Node):
            cg.unknown(node, "conv with a computed bias")
            return
        self.layer.couple_weights(cg, node, w.target, w_in, w_out, cin, cout, 1, functional=True)

    def constancy(self, env, node, module, out):
        x, w = arg(node, 0, "input"), arg(node, 1, "weight")
        fin = env.flags(x, 1)
        weight = env.value(w)
        if fin is None or not isinstance(weight, torch.Tensor):
            return None
        pad = arg(node, 4, "padding", 0)
        padded = True if self.transposed else zero_padded(pad, tuple(weight.shape[2:]))
        io = (weight.shape[0], weight.shape[1], 1) if self.transposed else (weight.shape[1], weight.shape[0], 1)
        return Const(1, self.layer._constant(weight.detach(), io, padded, fin, env.first(x, 1)))


class FunctionalLinearRule(Rule):
    """F.linear(x, weight, bias) with get_attr tensors."""

    name = "functional linear"

    def __init__(self) -> None:
        self.layer = LinearRule()

    def couple(self, cg, node, module):
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        sx, so = cg.shape(x), cg.shape(node)
        computed_bias = isinstance(b, fx.Node) and not _get_attr(b)
        if not _get_attr(w) or sx is None or so is None or len(sx) != len(so) or computed_bias:
            cg.unknown(node, "linear with a computed weight")
            return
        cg.tie_axes(x, node, [(i, i) for i in range(len(sx) - 1)], "linear leading axes")
        w_in, w_out = cg.space(w, 1), cg.space(w, 0)
        cg.tie(cg.space(x, -1), w_in, "functional linear input")
        cg.tie(cg.space(node, -1), w_out, "functional linear output")
        if _get_attr(b):
            cg.tie(cg.space(b, 0), w_out, "functional linear bias")
        cg.member(w_in, Role.IN, node, w.target, 1, self.layer, True)
        cg.member(w_out, Role.OUT, node, w.target, 0, self.layer, True)

    def constancy(self, env, node, module, out):
        fin = env.flags(arg(node, 0, "input"), -1)
        w = env.value(arg(node, 1, "weight"))
        if fin is None or not isinstance(w, torch.Tensor):
            return None
        return Const(out.dim() - 1, ~(w.detach().ne(0) & ~fin[None, :]).any(1))


class FunctionalNormRule(Rule):
    """F.batch_norm / F.instance_norm / F.layer_norm / F.group_norm with get_attr parameters."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"functional {kind}"
        # (index, keyword) of the per-channel tensors
        self.params = {"batch_norm": ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
                       "instance_norm": ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
                       "layer_norm": ((2, "weight"), (3, "bias")),
                       "group_norm": ((2, "weight"), (3, "bias"))}[kind]

    def _axis(self, node):
        return -1 if self.kind == "layer_norm" else 1

    def couple(self, cg, node, module):
        x = arg(node, 0, "input")
        if cg.shape(x) != cg.shape(node) or cg.shape(node) is None:
            cg.unknown(node, self.name)
            return
        cg.tie_axes(x, node, None, self.name)
        if self.kind == "layer_norm":
            shape = arg(node, 1, "normalized_shape")
            if not isinstance(shape, (list, tuple)) or len(shape) != 1:
                for a in range(1, len(cg.shape(node))):
                    cg.freeze(cg.space(node, a), f"layer_norm over several axes at {node.name}")
                return
        s = cg.space(node, self._axis(node))
        for i, name in self.params:
            p = arg(node, i, name)
            if _get_attr(p):
                cg.tie(cg.space(p, 0), s, f"{self.name} parameter")
            elif isinstance(p, fx.Node):
                cg.unknown(node, f"{self.kind} with computed statistics")
                return
        if self.kind in ("layer_norm", "group_norm"):
            cg.whole(s, f"{self.kind} normalises channels together")
        if self.kind == "group_norm":
            g = arg(node, 1, "num_groups")
            if isinstance(g, int):
                cg.multiple_of(s, g)
            else:
                cg.freeze(s, "group_norm with a computed group count")

    def resize_args(self, node, size):
        if self.kind != "layer_norm":
            return None
        shape = arg(node, 1, "normalized_shape")
        c = size(node, -1)
        if not isinstance(shape, (list, tuple)) or len(shape) != 1 or shape[0] == c:
            return None
        new = type(shape)([c])
        if len(node.args) > 1:
            return (node.args[0], new, *node.args[2:]), dict(node.kwargs)
        return tuple(node.args), {**node.kwargs, "normalized_shape": new}

    def constancy(self, env, node, module, out):
        if self.kind != "batch_norm" or arg(node, 5, "training", False):
            return None
        c = env.const(arg(node, 0, "input"))
        return c if c is not None and c.axis == 1 else None


# --------------------------------------------------------------------------------------------
# Rules a user can name for a leaf module (``--rule TYPE=NAME``)


class ConvLeafRule(ConvRule):
    """A leaf subclass of a conv whose own ``forward`` computes a convolution over ``self.weight``
    (e.g. with dynamic "same" padding): its channels couple, compact and resize like a conv's and
    it is masked in place (``MaskedLeaf``), always keeping its own forward. Constants are not
    propagated or folded through it (its padding is its own)."""

    name = "conv (leaf)"

    def module_problem(self, m):
        if isinstance(m, nn.modules.conv._ConvNd):
            return None
        return (f"{type(m).__name__} is not a subclass of nn.Conv1d/2d/3d, whose in_channels, kernel_size, "
                f"groups, ... the rule reads; derive it from one (class {type(m).__name__}(nn.Conv2d), "
                "overriding forward)")

    def constancy(self, env, node, m, out):
        return None

    def fold(self, m, member, positions, values):
        return None

    def sparse(self, m):
        cin, cout, g = self.io(m)
        if g > 1 and cin // g == 1:
            return "depthwise conv kept dense"
        return SparseLayout(cout, cin // g, math.prod(m.weight.shape[2:]), True)

    def make_sparse(self, m, mask):
        from ...nn import masked_leaf

        return masked_leaf(m, mask)


class LinearLeafRule(LinearRule):
    """A leaf whose ``forward`` computes a linear map over ``self.weight`` on the last axis; masked
    in place like a conv leaf."""

    name = "linear (leaf)"

    def module_problem(self, m):
        if isinstance(m, nn.Linear):
            return None
        return (f"{type(m).__name__} is not a subclass of nn.Linear, whose in_features and out_features the "
                f"rule reads; derive it from nn.Linear (overriding forward)")

    def constancy(self, env, node, m, out):
        return None

    def fold(self, m, member, positions, values):
        return None

    def sparse(self, m):
        return SparseLayout(m.out_features, m.in_features, 1, False)

    def make_sparse(self, m, mask):
        from ...nn import masked_leaf

        return masked_leaf(m, mask)
