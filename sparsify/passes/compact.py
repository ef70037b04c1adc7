"""Exact compaction: remove channels that cannot change the output, and fold eval-mode BatchNorm.

A channel goes when no layer reads it, or when it carries a constant (its filter is empty, or
everything it reads is constant) whose contribution can be removed exactly: zero, or folded into a
consumer's bias where that is exact (a linear layer, a conv without zero padding). Which channels
move together (BN, residual add, concat, depthwise conv, flatten->linear) comes from the
ChannelGraph alone; this module adds only a per-channel *constancy* analysis (is this channel the
same number for every input?) and the surgery. Constant values are read from a forward pass, which
is exact because a structurally constant channel does not depend on the input. The result is
checked against the original on random inputs (the equivalence certificate) and rejected otherwise.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PassError
from ..nn import SparseConv2d, SparseLinear
from .channel_graph import (
    BINARY_FUNCTIONS, BINARY_METHODS, PASS_FUNCTIONS, PASS_METHODS, PASS_MODULES, REDUCE_FUNCTIONS,
    REDUCE_METHODS, ChannelGraph, ChannelGroup,
)
from .trace import propagate_shapes

CERTIFICATE_TOLERANCE = 1e-5   # max abs error relative to the output scale
MAX_ROUNDS = 8                 # removing unread channels can make more channels unread upstream
CHANNEL_ALIGN = 8              # ORT's convolutions run slower on channel counts that are not a multiple of 8
                               # (measured: 63 or 47 channels slower than 64 or 48), so by default a group
                               # keeps a few dead channels rather than end on an unaligned count
CONSUMER_ROLES = ("conv_in", "linear_in", "fconv_in", "flinear_in")


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class CompactionReport:
    """What compaction removed and kept, and the equivalence certificate."""

    removed: list[dict[str, Any]] = field(default_factory=list)  # {"group", "layers", "channels", "reason"}
    kept: list[dict[str, Any]] = field(default_factory=list)     # removable-looking channels kept, and why
    layers: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # target -> {"before", "after"}
    params_before: int = 0
    params_after: int = 0
    channels_total: int = 0
    rounds: int = 0
    max_error: float = 0.0
    output_scale: float = 0.0

    @property
    def channels_removed(self) -> int:
        """Channels removed over all channel groups."""
        return sum(r["channels"] for r in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": self.removed, "kept": self.kept, "layers": self.layers,
            "params_before": self.params_before, "params_after": self.params_after,
            "channels_total": self.channels_total, "channels_removed": self.channels_removed,
            "rounds": self.rounds, "max_error": self.max_error, "output_scale": self.output_scale,
        }


# --------------------------------------------------------------------------------------------
# Constancy: which channels carry the same number for every input


# The channel graph's per-channel ops, less average pooling: with zero padding it turns a constant
# map into a non-uniform one at the border, which constant propagation must not assume away.
_ELEMENTWISE_MODULES = tuple(m for m in PASS_MODULES if m is not nn.AvgPool2d)
_ELEMENTWISE_FUNCTIONS = PASS_FUNCTIONS - {F.avg_pool2d}


def _effective_weight(mod: nn.Module) -> torch.Tensor:
    return (mod.masked_weight() if isinstance(mod, (SparseConv2d, SparseLinear)) else mod.weight).detach()


def _zero_padded(padding: Any, kernel: tuple[int, ...], padding_mode: str = "zeros") -> bool:
    """True when a conv pads with zeros, which makes a constant input non-uniform at the border."""
    if padding_mode != "zeros":
        return False
    if isinstance(padding, str):
        return padding == "same" and any(k > 1 for k in kernel)
    pads = (padding,) if isinstance(padding, int) else tuple(padding)
    return any(p > 0 for p in pads)


def _conv_constant(w: torch.Tensor, groups: int, padded: bool, fin: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Output channels of a conv that are constant: every live input constant (and zero when padded)."""
    live = w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1)
    cout, cin_g = live.shape
    idx = (torch.arange(cout) // (cout // groups))[:, None] * cin_g + torch.arange(cin_g)[None, :]
    usable = fin[idx] & ((val[idx] == 0) if padded else torch.ones_like(live))
    return ~(live & ~usable).any(1)


class _Constancy(fx.Interpreter):
    """Runs the graph, recording per channel whether it is input-independent, and its value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.mods = dict(gm.named_modules())
        self.flags: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dim() in (2, 4) and n.op != "get_attr" and out.shape[0] > 0:
            channels = out.shape[1]
            flags = self._flags(n, out)
            if flags is None or flags.shape != (channels,):
                flags = torch.zeros(channels, dtype=torch.bool)
            self.flags[n.name] = flags
            self.values[n.name] = out[0].reshape(channels, -1)[:, 0].detach().clone()
        return out

    def _in(self, a: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        if isinstance(a, fx.Node) and a.name in self.flags:
            return self.flags[a.name], self.values[a.name]
        return None

    def _flags(self, n: fx.Node, out: torch.Tensor) -> torch.Tensor | None:
        x = n.args[0] if n.args else None
        got = self._in(x)
        if n.op == "call_module":
            mod = self.mods[n.target]
            if got is None:
                return None
            fin, val = got
            if isinstance(mod, nn.Conv2d):
                padded = _zero_padded(mod.padding, mod.kernel_size, mod.padding_mode)
                return _conv_constant(_effective_weight(mod), mod.groups, padded, fin, val)
            if isinstance(mod, nn.Linear) and out.dim() == 2:
                live = _effective_weight(mod).ne(0)
                return ~(live & ~fin[None, :]).any(1)
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                return None if mod.training else fin
            if isinstance(mod, _ELEMENTWISE_MODULES):
                return fin
            if isinstance(mod, nn.AvgPool2d):
                pads = _zero_padded(mod.padding, (2,)) and mod.count_include_pad
                return fin & (val == 0) if pads else fin
            if isinstance(mod, nn.Flatten):
                return self._reshaped(fin, out, n)
            return None
        if n.op == "call_function":
            fn = n.target
            if fn in BINARY_FUNCTIONS:
                return self._binary(n, out)
            if fn in (torch.cat, torch.concat):
                return self._cat(n)
            if got is None:
                return None
            fin, val = got
            if fn in _ELEMENTWISE_FUNCTIONS:
                return fin
            if fn is F.avg_pool2d:
                pad = n.args[3] if len(n.args) > 3 else n.kwargs.get("padding", 0)
                incl = n.args[5] if len(n.args) > 5 else n.kwargs.get("count_include_pad", True)
                return fin & (val == 0) if _zero_padded(pad, (2,)) and incl else fin
            if fn is torch.flatten:
                return self._reshaped(fin, out, n)
            if fn is F.batch_norm:
                training = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", False)
                return None if training else fin
            if fn in REDUCE_FUNCTIONS:
                return self._reduced(fin, n, out)
            return None
        if n.op == "call_method":
            name = n.target
            if name in BINARY_METHODS:
                return self._binary(n, out)
            if got is None:
                return None
            fin, val = got
            if name in PASS_METHODS:
                return fin
            if name in ("view", "reshape", "flatten"):
                return self._reshaped(fin, out, n)
            if name in REDUCE_METHODS:
                return self._reduced(fin, n, out)
        return None

    def _reshaped(self, fin: torch.Tensor, out: torch.Tensor, n: fx.Node) -> torch.Tensor | None:
        """Flatten [N, C, H, W] -> [N, C*H*W]: each feature inherits its channel's flag."""
        x = n.args[0]
        shape = tuple(self.env[x].shape) if x in self.env else None
        if shape is None:
            return None
        if tuple(out.shape) == shape:
            return fin
        if len(shape) == 4 and out.dim() == 2 and out.shape[1] == shape[1] * shape[2] * shape[3]:
            return fin.repeat_interleave(shape[2] * shape[3])
        return None

    def _reduced(self, fin: torch.Tensor, n: fx.Node, out: torch.Tensor) -> torch.Tensor | None:
        """Spatial mean/sum/max keep a constant channel constant."""
        x = n.args[0]
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None or x not in self.env:
            return None
        rank = self.env[x].dim()
        dims = {d % rank for d in ((dims,) if isinstance(dims, int) else dims)}
        return fin if 0 not in dims and 1 not in dims and out.shape[1] == fin.shape[0] else None

    def _binary(self, n: fx.Node, out: torch.Tensor) -> torch.Tensor | None:
        """Elementwise arithmetic: constant where every operand is constant (per channel or broadcast)."""
        if out.dim() not in (2, 4):
            return None
        flags = torch.ones(out.shape[1], dtype=torch.bool)
        for a in n.args:
            if not isinstance(a, fx.Node):
                continue
            if a.op == "get_attr":
                t = self.env[a]
                if not isinstance(t, torch.Tensor) or t.dim() > out.dim():
                    return None
                aligned = (1,) * (out.dim() - t.dim()) + tuple(t.shape)
                if any(d > 1 for i, d in enumerate(aligned) if i != 1):
                    return torch.zeros_like(flags)
                continue
            got = self._in(a)
            if got is None:
                if isinstance(self.env.get(a), torch.Tensor):
                    return None
                continue  # a size or scalar computed in the graph
            fin = got[0]
            if fin.shape[0] == flags.shape[0]:
                flags &= fin
            elif fin.shape[0] == 1:
                flags &= fin[0]
            else:
                return None
            if self.env[a].dim() != out.dim():
                return None
        return flags

    def _cat(self, n: fx.Node) -> torch.Tensor | None:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        parts = [self._in(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [None]
        if dim not in (1, -3) or any(p is None for p in parts):
            return None
        return torch.cat([p[0] for p in parts])


# --------------------------------------------------------------------------------------------
# Planning: which channels of which group go, and what they contribute to consumers


@dataclass
class _Consumer:
    """A layer reading a group's channels through its weight's input axis."""

    target: str          # module qualname, or the get_attr target of a functional weight
    node: fx.Node
    weight: torch.Tensor  # effective (masked) weight
    kind: str            # "conv" | "linear"
    foldable: bool       # a nonzero constant input can be folded into its bias exactly


def _consumer(gm: fx.GraphModule, mods: dict[str, nn.Module], nodes: dict[str, fx.Node], role: str,
              node_name: str, target: str) -> _Consumer:
    node = nodes[node_name]
    if role in ("conv_in", "linear_in"):
        mod = mods[target]
        conv = isinstance(mod, nn.Conv2d)
        foldable = not conv or (mod.groups == 1 and not _zero_padded(mod.padding, mod.kernel_size, mod.padding_mode))
        return _Consumer(target, node, _effective_weight(mod), "conv" if conv else "linear", foldable)
    weight = getattr_path(gm, target)
    return _Consumer(target, node, weight.detach(), "conv" if role == "fconv_in" else "linear", False)


def getattr_path(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for target ``a.b.c``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _reads(c: _Consumer, pos: np.ndarray) -> bool:
    w = c.weight
    cols = w[:, torch.as_tensor(pos)]
    return bool(cols.ne(0).any())


def _plan_group(g: ChannelGroup, cg: ChannelGraph, const: _Constancy, consumers: dict[int, list[_Consumer]],
                nodes: dict[str, fx.Node]) -> tuple[dict[int, str], dict[int, dict[str, torch.Tensor]], dict[int, str]]:
    """For root group ``g``: removable channels with reasons, their bias contributions, and blocked ones."""
    positions = cg.positions(g.id)
    removable: dict[int, str] = {}
    deltas: dict[int, dict[str, torch.Tensor]] = {}
    blocked: dict[int, str] = {}
    for c in range(g.size):
        constant = True
        for gid, idx in positions.items():
            pos = torch.as_tensor(idx[c])
            for name, _axis in cg.groups[gid].spaces:
                if nodes[name].op == "get_attr":
                    continue
                flags = const.flags.get(name)
                if flags is None or not bool(flags[pos].all()):
                    constant = False
                    break
            if not constant:
                break
        readers = [(con, idx[c]) for gid, idx in positions.items() for con in consumers.get(gid, [])
                   if _reads(con, idx[c])]
        if not readers:
            removable[c] = "unread"
            continue
        if not constant:
            continue
        contrib: dict[str, torch.Tensor] = {}
        reason = "constant 0"
        for con, pos in readers:
            src = con.node.args[0]
            v = const.values[src.name][torch.as_tensor(pos)].to(con.weight.dtype)
            if bool((v == 0).all()):
                continue
            if not con.foldable:
                blocked[c] = f"constant {float(v.flatten()[0]):.4g} read by {con.target} (zero-padded or functional)"
                break
            w = con.weight[:, torch.as_tensor(pos)]
            d = (w.flatten(2).sum(-1) @ v) if con.kind == "conv" else (w @ v)
            contrib[con.target] = contrib.get(con.target, 0) + d
            reason = "constant folded into the next layer's bias"
        else:
            removable[c] = reason
            deltas[c] = contrib
    return removable, deltas, blocked


# --------------------------------------------------------------------------------------------
# Surgery


def _index(t: torch.Tensor, axis: int, keep: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(axis, keep).clone()


def _set(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    if isinstance(getattr(mod, name, None), nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=getattr(mod, name).requires_grad))
    else:
        setattr(mod, name, value)


def _slice_member(mod: nn.Module, role: str, keep: torch.Tensor) -> None:
    """Keep only channels ``keep`` of a module along the axis its role in the group names."""
    n = len(keep)
    if role in ("conv_out", "linear_out", "depthwise"):
        _set(mod, "weight", _index(mod.weight, 0, keep))
        if mod.bias is not None:
            _set(mod, "bias", _index(mod.bias, 0, keep))
        if hasattr(mod, "mask"):
            mod.mask = _index(mod.mask, 0, keep)
        if isinstance(mod, nn.Conv2d):
            mod.out_channels = n
            if role == "depthwise":
                mod.in_channels = mod.groups = n
        else:
            mod.out_features = n
    elif role in ("conv_in", "linear_in"):
        _set(mod, "weight", _index(mod.weight, 1, keep))
        if hasattr(mod, "mask"):
            mod.mask = _index(mod.mask, 1, keep)
        if isinstance(mod, nn.Conv2d):
            mod.in_channels = n
        else:
            mod.in_features = n
    elif role == "bn":
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(mod, name, None) is not None:
                _set(mod, name, _index(getattr(mod, name), 0, keep))
        mod.num_features = n


def _slice_attr(gm: fx.GraphModule, target: str, axis: int, keep: torch.Tensor) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    _set(parent, leaf, _index(getattr(parent, leaf), axis, keep))


def _count(gm: nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def _layer_shapes(gm: fx.GraphModule) -> dict[str, list[int]]:
    shapes = {}
    for name, m in gm.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            shapes[name] = [m.in_features, m.out_features]
    return shapes


def _aligned(chans: list[int], size: int, align: int) -> list[int]:
    """The channels to remove so that the group keeps a multiple of ``align`` (or all) channels."""
    if align <= 1:
        return chans
    keep = size - len(chans)
    keep_aligned = min(size, -(-keep // align) * align)
    return chans[:size - keep_aligned]


def _round(gm: fx.GraphModule, example: torch.Tensor, report: CompactionReport, first: bool,
           align: int = CHANNEL_ALIGN) -> bool:
    """One analysis + surgery round; True when something was removed. ``report.kept`` is this round's."""
    propagate_shapes(gm, example)  # channel counts changed in the previous round
    cg = ChannelGraph.build(gm)
    const = _Constancy(gm)
    with torch.no_grad():
        const.run(example[:1])
    mods = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    consumers = {gid: [_consumer(gm, mods, nodes, m.role, m.node, m.target) for m in g.roles(*CONSUMER_ROLES)]
                 for gid, g in cg.groups.items()}
    if first:
        report.channels_total = sum(g.size for g in cg.root_groups())

    report.kept = []
    removed_roots: dict[int, list[int]] = {}
    bias_delta: dict[str, torch.Tensor] = {}
    for g in cg.root_groups():
        removable, deltas, blocked = _plan_group(g, cg, const, consumers, nodes)
        producers = sorted({m.target for m in g.roles("conv_out", "linear_out", "fconv_out", "flinear_out")})
        shared = sorted({m.target for m in g.members if m.target in calls and calls[m.target] > 1})
        for c, why in sorted(blocked.items()):
            report.kept.append({"group": g.id, "layers": producers, "channels": 1, "reason": why})
        if not removable:
            continue
        why_not = (f"frozen: {sorted(set(g.reasons))[0]}" if g.frozen else
                   f"module called more than once: {shared[0]}" if shared else None)
        if why_not and not any(consumers.get(gid) for gid in cg.positions(g.id)):
            continue  # nothing reads the group inside the model (e.g. the output): nothing to report
        if why_not:
            report.kept.append({"group": g.id, "layers": producers, "channels": len(removable), "reason": why_not})
            continue
        chans = sorted(removable)
        aligned = _aligned(chans, g.size, align)
        if len(aligned) < len(chans):
            report.kept.append({"group": g.id, "layers": producers, "channels": len(chans) - len(aligned),
                                "reason": f"kept so that {g.size - len(aligned)} channels remain, a multiple of "
                                          f"{align} (ORT's Conv is slower on unaligned channel counts)"})
            chans = aligned
        if len(chans) == g.size:  # keep one channel: empty tensors are not worth the edge cases
            report.kept.append({"group": g.id, "layers": producers, "channels": 1,
                                "reason": "last channel of the group kept so the tensor stays non-empty"})
            chans = chans[1:]
        if not chans:
            continue
        removed_roots[g.id] = chans
        for c in chans:
            for target, d in deltas.get(c, {}).items():
                bias_delta[target] = bias_delta.get(target, 0) + d
        for why in sorted({removable[c] for c in chans}):
            report.removed.append({"group": g.id, "layers": producers,
                                   "channels": sum(removable[c] == why for c in chans), "reason": why})
    if not removed_roots:
        return False

    # Positions removed in every group, root or derived (concat offsets, flatten expansion).
    removed_pos: dict[int, set[int]] = {}
    for gid, chans in removed_roots.items():
        for other, idx in cg.positions(gid).items():
            removed_pos.setdefault(other, set()).update(int(p) for c in chans for p in idx[c])
    with torch.no_grad():
        for target, d in bias_delta.items():
            mod = mods[target]
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype))
            mod.bias.add_(d)
        done: set[tuple[str, int]] = set()
        for gid, rem in removed_pos.items():
            g = cg.groups[gid]
            keep = torch.tensor([i for i in range(g.size) if i not in rem], dtype=torch.long)
            for m in g.members:
                if m.role in ("conv_out", "conv_in", "linear_out", "linear_in", "depthwise", "bn"):
                    axis = 1 if m.role.endswith("_in") else 0
                    if (m.target, axis) not in done:
                        done.add((m.target, axis))
                        _slice_member(mods[m.target], m.role, keep)
            for name, axis in g.spaces:
                node = nodes[name]
                if node.op == "get_attr" and (node.target, axis) not in done:
                    done.add((node.target, axis))
                    _slice_attr(gm, node.target, axis, keep)
    return True


def _outputs(y: Any) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _outputs(v)]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _outputs(v)]
    return []


def certify(original: nn.Module, compacted: nn.Module, example: torch.Tensor, trials: int = 3,
            tolerance: float = CERTIFICATE_TOLERANCE) -> tuple[float, float]:
    """Max abs output difference and output scale on random inputs; PassError above tolerance."""
    gen = torch.Generator().manual_seed(1234)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for i in range(trials):
            x = example if i == 0 else torch.randn(example.shape, generator=gen, dtype=example.dtype) * (1 + i)
            ref, got = _outputs(original(x)), _outputs(compacted(x))
            for r, o in zip(ref, got):
                if r.shape != o.shape:
                    raise PassError(f"compaction changed an output shape from {tuple(r.shape)} to {tuple(o.shape)}; "
                                    "please report it")
                worst = max(worst, float((r - o).abs().max()) if r.numel() else 0.0)
                scale = max(scale, float(r.abs().max()) if r.numel() else 0.0)
    if not worst <= tolerance * max(scale, 1e-12):
        raise PassError(f"compaction is not exact: outputs differ by {worst:.3g} (output scale {scale:.3g}); "
                        "export with --no-compact and please report it")
    return worst, scale


def compact(gm: fx.GraphModule, example_input: torch.Tensor,
            align: int = CHANNEL_ALIGN) -> tuple[fx.GraphModule, CompactionReport]:
    """Remove dead channels of ``gm`` (a copy; ``gm`` is untouched), exactly; certificate-checked.

    Each channel group keeps a multiple of ``align`` channels (1: remove every dead channel).

    The model must be in eval mode semantics for BatchNorm (it is put in eval mode here).
    """
    if not isinstance(gm, fx.GraphModule):
        raise PassError(f"compact needs a torch.fx GraphModule, got {type(gm).__name__}; trace the model first")
    original = gm
    work = copy.deepcopy(gm).eval()
    example = example_input.detach()
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).clone()
    report = CompactionReport(params_before=_count(work))
    before = _layer_shapes(work)
    try:
        while report.rounds < MAX_ROUNDS and _round(work, example, report, first=report.rounds == 0,
                                                                align=align):
            report.rounds += 1
    except PassError:
        raise
    except Exception as e:
        raise PassError(f"compaction failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "export with --no-compact and please report it") from None
    after = _layer_shapes(work)
    report.layers = {k: {"before": v, "after": after[k]} for k, v in before.items() if after.get(k) != v}
    report.params_after = _count(work)
    work.recompile()
    was_training = original.training
    original.eval()
    try:
        report.max_error, report.output_scale = certify(original, work, example)
    finally:
        original.train(was_training)
    return work, report


# --------------------------------------------------------------------------------------------
# BatchNorm folding


def _module_uses(gm: fx.GraphModule) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    return uses


def fold_batchnorm(gm: fx.GraphModule, inplace: bool = False) -> tuple[fx.GraphModule, list[str]]:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that conv's weight and bias.

    Exact up to float rounding, and mask-preserving: scaling an output channel's filter keeps its zero
    kernels zero. A conv whose output feeds anything besides the BN, or a module called more than
    once, is left alone. Returns the graph and the names of the BN modules folded.
    """
    if not inplace:
        gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    uses = _module_uses(gm)
    folded: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        if (bn.training or not bn.track_running_stats or bn.running_mean is None or len(node.args) != 1
                or not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or not isinstance(modules.get(src.target), nn.Conv2d)
                or uses.get(src.target, 0) != 1 or uses.get(node.target, 0) != 1):
            continue
        conv = modules[src.target]
        _fold_into_conv(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(node.target)
    if folded:
        for name in folded:
            _delete_submodule(gm, name)
        gm.graph.lint()
        gm.recompile()
    return gm, folded


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    bias = conv.bias.detach() * scale + shift if conv.bias is not None else shift
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    if isinstance(conv, SparseConv2d):
        conv.apply_mask_()


def _delete_submodule(gm: fx.GraphModule, target: str) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    delattr(parent, leaf)
