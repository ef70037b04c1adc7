"""Exact compaction: remove channels that cannot change the output, and fold eval-mode BatchNorm.

A channel goes when no layer reads it, or when it carries a constant (its filter is empty, or
everything it reads is constant) whose contribution can be removed exactly: zero, or folded into a
consumer's bias where that is exact (a linear layer, a conv without zero padding). Which channels
move together comes from the ChannelGraph alone, and everything op-specific (is a constant input
channel's output constant, does a weight read these channels, how to fold a constant, how to slice a
layer) from the op's rule (``sparsify.passes.rules``). Constant values are read from a forward pass,
which is exact because a structurally constant channel does not depend on the input. Groups that a
grouped conv, a GroupNorm/LayerNorm or a reduction reads are kept whole.

The result is checked against the original (the equivalence certificate): every node's output,
restricted to the channels kept, against the same node of the original, relative to the scale of
that node's inputs and output, on several random inputs; and every model output relative to its own
scale. An untrained net whose outputs are tiny (1e-13) is thus judged where its values are not.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassError
from .base import GraphPass, PassResult, owner_of
from .channel_graph import ChannelGraph, ChannelGroup
from .rules import Const, ConstancyEnv, LayerRule, Member, Registry, Role
from .rules.base import beyond_forward
from .trace import Interpreter, as_inputs, eval_graph_module, propagate_shapes

CERTIFICATE_TOLERANCE = 1e-5   # max abs error relative to the scale of a node's inputs and output
MAX_ROUNDS = 8                 # removing unread channels can make more channels unread upstream
CHANNEL_ALIGN = 8              # ORT's convolutions run slower on channel counts that are not a multiple of 8
                               # (measured: 63 or 47 channels slower than 64 or 48), so by default a group
                               # keeps a few dead channels rather than end on an unaligned count


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
    nodes_checked: int = 0

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
            "nodes_checked": self.nodes_checked,
        }


# --------------------------------------------------------------------------------------------
# Constancy: which channels carry the same number for every input


class _Constancy(Interpreter, ConstancyEnv):
    """Runs the graph; per node, which slices along one axis are input-independent (the op's rule
    decides), and their values."""

    def __init__(self, gm: fx.GraphModule, rules: Registry) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.rules = rules
        self.mods = dict(gm.named_modules())
        self.consts: dict[str, Const] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.op in ("call_module", "call_function", "call_method") and out.dim() >= 1:
            rule = self.rules.rule_for(n, self.mods)
            c = None
            if rule is not None and out.numel() > 0:
                try:
                    c = rule.constancy(self, n, self.mods.get(n.target) if n.op == "call_module" else None, out)
                except Exception:  # noqa: BLE001 - unsure means "not constant"
                    c = None
            if c is not None and 0 <= c.axis < out.dim() and c.flags.shape == (out.shape[c.axis],):
                self.consts[n.name] = Const(c.axis, c.flags.bool())
        return out

    # ConstancyEnv
    def const(self, a: Any) -> Const | None:
        return self.consts.get(a.name) if isinstance(a, fx.Node) else None

    def value(self, a: Any) -> Any:
        return self.env.get(a) if isinstance(a, fx.Node) else a

    def first(self, a: Any, axis: int) -> torch.Tensor | None:
        v = self.value(a)
        if not isinstance(v, torch.Tensor):
            return None
        return v.detach().movedim(axis, 0).reshape(v.shape[axis], -1)[:, 0].clone()


# --------------------------------------------------------------------------------------------
# Planning: which channels of which group go, and what they contribute to consumers


@dataclass
class _Consumer:
    """A layer reading a group's channels through a weight's input axis (role IN)."""

    member: Member
    obj: Any               # the module, or the get_attr weight of a functional layer
    node: fx.Node          # the call, whose first argument carries the channels
    read: torch.Tensor | None = None   # which input positions a live weight reads (None: all)

    def __post_init__(self) -> None:
        self.read = self.member.rule.read_mask(self.obj, self.member)

    def reads(self, pos: np.ndarray) -> bool:
        return True if self.read is None else bool(self.read[torch.as_tensor(pos, dtype=torch.long)].any())

    def fold(self, pos: np.ndarray, values: torch.Tensor) -> torch.Tensor | None:
        if self.member.functional:
            return None
        return self.member.rule.fold(self.obj, self.member, torch.as_tensor(pos, dtype=torch.long), values)


def getattr_path(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for target ``a.b.c``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_activation(key: str) -> bool:
    return not key.startswith(("@", "%")) and "#" not in key


def _plan_group(g: ChannelGroup, cg: ChannelGraph, const: _Constancy, consumers: dict[int, list[_Consumer]]
                ) -> tuple[dict[int, str], dict[int, dict[str, torch.Tensor]], dict[int, str]]:
    """For root group ``g``: removable channels with reasons, their bias contributions, and blocked ones."""
    positions = cg.positions(g.id)
    removable: dict[int, str] = {}
    deltas: dict[int, dict[str, torch.Tensor]] = {}
    blocked: dict[int, str] = {}
    for c in range(g.size):
        constant = True
        for gid, idx in positions.items():
            pos = torch.as_tensor(idx[c])
            for key, axis in cg.groups[gid].spaces:
                if not _is_activation(key):
                    continue
                k = const.consts.get(key)
                if k is None or k.axis != axis or not bool(k.flags[pos].all()):
                    constant = False
                    break
            if not constant:
                break
        readers = [(con, idx[c]) for gid, idx in positions.items() for con in consumers.get(gid, [])
                   if con.reads(idx[c])]
        if not readers:
            removable[c] = "unread"
            continue
        if not constant:
            continue
        contrib: dict[str, torch.Tensor] = {}
        reason = "constant 0"
        for con, pos in readers:
            src = con.node.args[0]
            v = const.first(src, _read_axis(con))
            v = v[torch.as_tensor(pos)] if v is not None else None
            if v is None:
                blocked[c] = f"constant read by {con.member.target} of unknown value"
                break
            if bool((v == 0).all()):
                continue
            d = con.fold(pos, v)
            if d is None:
                blocked[c] = (f"constant, read by {con.member.target} "
                              "(zero-padded, transposed or functional: not foldable)")
                break
            contrib[con.member.target] = contrib.get(con.member.target, 0) + d
            reason = "constant folded into the next layer's bias"
        else:
            removable[c] = reason
            deltas[c] = contrib
    return removable, deltas, blocked


def _read_axis(con: _Consumer) -> int:
    """The axis of the consumer's input that carries the channels it reads."""
    shape = con.node.args[0].meta.get("tensor_meta")
    rank = len(shape.shape) if hasattr(shape, "shape") else 2
    return rank - 1 if con.member.rule.kind == "linear" else 1


# --------------------------------------------------------------------------------------------
# Surgery


def _slice_attr(gm: fx.GraphModule, target: str, axis: int, keep: torch.Tensor) -> None:
    from .rules import set_tensor

    parent, leaf = owner_of(gm, target)
    t = getattr(parent, leaf)
    set_tensor(parent, leaf, t.detach().index_select(axis, keep).clone())


def _count(gm: nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def _layer_shapes(gm: fx.GraphModule, rules: Registry) -> dict[str, list[int]]:
    shapes = {}
    for name, m in gm.named_modules():
        rule = rules.rule_for_module(m)
        if isinstance(rule, LayerRule) and rule.has_weight:
            d = rule.describe(m)
            shapes[name] = [d["in"], d["out"]]
    return shapes


def _aligned(chans: list[int], size: int, align: int) -> list[int]:
    """The channels to remove so that the group keeps a multiple of ``align`` (or all) channels."""
    if align <= 1:
        return chans
    keep = size - len(chans)
    keep_aligned = min(size, -(-keep // align) * align)
    return chans[:size - keep_aligned]


def _round(gm: fx.GraphModule, example: tuple[torch.Tensor, ...], report: CompactionReport, first: bool,
           align: int, rules: Registry, kept: dict[tuple[str, int], np.ndarray]) -> bool:
    """One analysis + surgery round; True when something was removed. ``report.kept`` is this round's.

    ``kept`` maps each activation axis to the original indices it still holds (for the certificate).
    """
    propagate_shapes(gm, example, rewritten=True)  # channel counts changed in the previous round
    cg = ChannelGraph.build(gm, rules=rules)
    const = _Constancy(gm, rules)
    with torch.no_grad():
        const.run(*(x[:1] for x in example))
    mods = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    consumers: dict[int, list[_Consumer]] = {}
    for gid, g in cg.groups.items():
        for m in g.roles(Role.IN):
            obj = getattr_path(gm, m.target) if m.functional else mods[m.target]
            consumers.setdefault(gid, []).append(_Consumer(m, obj, nodes[m.node]))
    if first:
        report.channels_total = sum(g.size for g in cg.channel_groups())

    report.kept = []
    removed_roots: dict[int, list[int]] = {}
    bias_delta: dict[str, torch.Tensor] = {}
    for g in cg.channel_groups():
        removable, deltas, blocked = _plan_group(g, cg, const, consumers)
        producers = sorted({m.target for m in g.producers})
        shared = sorted({m.target for gid in cg.positions(g.id) for m in cg.groups[gid].members
                         if not m.functional and cg.calls.get(m.target, 0) > 1})
        for c, why in sorted(blocked.items()):
            report.kept.append({"group": g.id, "layers": producers, "channels": 1, "reason": why})
        if not removable:
            continue
        whole = next((w for gid in cg.positions(g.id) for w in cg.groups[gid].whole), None)
        why_not = (f"frozen: {sorted(set(g.reasons))[0]}" if g.frozen else
                   f"kept whole: {whole}" if whole else
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
    report.kept = _merged(report.kept)
    if not removed_roots:
        return False

    # Positions removed in every group, root or derived (every copy in a concat, flatten expansion).
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
        done: set[tuple[str, Role]] = set()
        for gid, rem in removed_pos.items():
            g = cg.groups[gid]
            keep_np = np.array([i for i in range(g.size) if i not in rem], dtype=np.int64)
            keep = torch.as_tensor(keep_np)
            for m in g.members:
                if m.role is Role.PARAM or m.functional or (m.target, m.role) in done:
                    continue
                done.add((m.target, m.role))
                m.rule.slice(mods[m.target], m, keep)
            for key, axis in g.spaces:
                if key.startswith("%") and (key, axis) not in done:
                    done.add((key, axis))  # type: ignore[arg-type]
                    _slice_attr(gm, key[1:], axis, keep)
                if _is_activation(key) or key.startswith("%"):
                    prev = kept.get((key, axis))
                    kept[(key, axis)] = keep_np if prev is None else prev[keep_np]
    return True


def _merged(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the same group, layers and reason as one, their channels summed (a layer with six
    channels kept for one reason printed six lines)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        key = (r["group"], tuple(r["layers"]), r["reason"])
        if key in out:
            out[key]["channels"] += r["channels"]
        else:
            out[key] = dict(r)
    return list(out.values())


def _outputs(y: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple/list, dict, nested), in pytree order."""
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


def _scale(*ts: Any) -> float:
    """The largest magnitude among the floating-point tensors of ``ts`` (0.0 without any)."""
    return max([_abs_max(t) for t in ts if isinstance(t, torch.Tensor) and t.numel() and t.is_floating_point()]
               or [0.0])


def _abs_max(t: torch.Tensor) -> float:
    """max |t| in one pass without an |t| temporary (compaction certifies 224x224 models node by node)."""
    lo, hi = torch.aminmax(t.detach())
    return max(-float(lo), float(hi))


class _Lockstep:
    """Runs two GraphModules with the same graph structure node by node, freeing values as fx does."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.interp = Interpreter(gm, garbage_collect_values=True)
        self.nodes = list(gm.graph.nodes)

    def start(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.interp.env = {}
        self.interp.args_iter = iter(inputs)

    def step(self, i: int) -> Any:
        n = self.nodes[i]
        self.interp.env[n] = self.interp.run_node(n)
        return self.interp.env[n]

    def free(self, i: int) -> None:
        for dead in self.interp.user_to_last_uses.get(self.nodes[i], []):
            self.interp.env.pop(dead, None)


def certify(original: nn.Module, compacted: nn.Module, example: Any, trials: int = 3,
            tolerance: float = CERTIFICATE_TOLERANCE,
            kept: dict[tuple[str, int], np.ndarray] | None = None) -> tuple[float, float]:
    """Check ``compacted`` against ``original`` on ``example`` and random inputs at growing scales.

    Per node (when both are GraphModules of the same graph): the original's output, restricted to
    the channels ``kept`` (activation axis -> original indices), against the compacted output,
    relative to the largest magnitude among that node's inputs and output; then per model output
    relative to that output's scale. Returns (max abs error over outputs, max output scale);
    PassError naming the node or output that differs beyond ``tolerance``.
    """
    gen = torch.Generator().manual_seed(1234)
    inputs = as_inputs(example)
    worst, scale = 0.0, 0.0
    lockstep = (isinstance(original, fx.GraphModule) and isinstance(compacted, fx.GraphModule)
                and [n.name for n in original.graph.nodes] == [n.name for n in compacted.graph.nodes])
    with torch.no_grad():
        for i in range(trials):
            xs = inputs if i == 0 else tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) * (1 + i)
                                              if x.is_floating_point() else x for x in inputs)
            if lockstep:
                ref, got = (_outputs(y) for y in _certify_nodes(original, compacted, xs, tolerance, kept))
            else:
                # each on its own copy: a forward may change its input in place (x.sub_(mean))
                ref, got = _outputs(original(*(x.clone() for x in xs))), _outputs(compacted(*(x.clone() for x in xs)))
            if len(ref) != len(got):
                raise PassError(f"compaction changed the number of outputs from {len(ref)} to {len(got)}; please report it")
            for k, (r, o) in enumerate(zip(ref, got)):
                if r.shape != o.shape:
                    raise PassError(f"compaction changed an output shape from {tuple(r.shape)} to {tuple(o.shape)}; "
                                    "please report it")
                if not r.is_floating_point():
                    continue
                err = float((r - o).abs().max()) if r.numel() else 0.0
                s = _scale(r)
                worst, scale = max(worst, err), max(scale, s)
                if not lockstep and not err <= tolerance * max(s, 1e-12):
                    raise PassError(f"compaction is not exact: output {k} differs by {err:.3g} (output scale {s:.3g}); "
                                    "export with --no-compact and please report it")
    return worst, scale


def _certify_nodes(original: fx.GraphModule, compacted: fx.GraphModule, xs: tuple[torch.Tensor, ...],
                   tolerance: float, kept: dict[tuple[str, int], np.ndarray] | None) -> tuple[Any, Any]:
    """Node by node; without ``kept`` (which channels remain) only nodes of unchanged shape are
    compared. Returns both graphs' outputs."""
    outs: tuple[Any, Any] = (None, None)
    scales: dict[fx.Node, float] = {}  # each original node's output scale, computed once
    a, b = _Lockstep(original), _Lockstep(compacted)
    a.start(tuple(x.clone() for x in xs))  # each on its own copy: a forward may change its input in place
    b.start(tuple(x.clone() for x in xs))
    for i, n in enumerate(a.nodes):
        ref, got = a.step(i), b.step(i)
        if n.op == "output":
            outs = (ref, got)
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            scales[n] = _scale(ref)
        if isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.is_floating_point():
            r = ref
            key = f"%{n.target}" if n.op == "get_attr" else n.name
            for axis in range(ref.dim()):
                idx = (kept or {}).get((key, axis))
                if idx is not None:
                    r = r.index_select(axis, torch.as_tensor(idx, dtype=torch.long))
            if r.shape != got.shape and kept is None:
                r = None
            elif r.shape != got.shape:
                raise PassError(f"compaction left node {n.name} with shape {tuple(got.shape)} instead of "
                                f"{tuple(r.shape)}; export with --no-compact and please report it")
            if r is not None and r.numel():
                err = _abs_max(r - got)
                s = max([scales[n]] + [scales.get(p, 0.0) for p in n.all_input_nodes])
                if not err <= tolerance * max(s, 1e-30):
                    raise PassError(f"compaction is not exact at node {n.name}: differs by {err:.3g} (scale of its "
                                    f"inputs and output {s:.3g}); export with --no-compact and please report it")
        a.free(i)
        b.free(i)
    return outs


class CompactPass(GraphPass):
    """Remove dead channels, exactly; certificate-checked. ``report``: a CompactionReport.

    ``example`` is a tensor, or a tuple with one tensor per model input. Each channel group keeps a
    multiple of ``align`` channels (1: remove every dead channel). The result is the eval graph only
    (a model that runs differently in training is compacted for inference), in eval mode.
    """

    name = "compact"

    def __init__(self, align: int = CHANNEL_ALIGN, rules: Registry | None = None) -> None:
        from .rules import DEFAULT_RULES

        self.align, self.rules = align, rules or DEFAULT_RULES

    def requires(self, gm: nn.Module, example: Any) -> None:
        if not isinstance(gm, fx.GraphModule):
            raise PassError(f"compact needs a torch.fx GraphModule, got {type(gm).__name__}; trace the model first")

    def call(self, gm: fx.GraphModule, example_input: Any) -> PassResult:
        rules, align = self.rules, self.align
        original = eval_graph_module(gm).eval()  # gm is this pass's own copy (GraphPass.__call__)
        work = copy.deepcopy(original)
        example = tuple(x.detach() for x in as_inputs(example_input))
        example = tuple(x.expand(2, *x.shape[1:]).clone() if x.dim() and x.shape[0] < 2 else x for x in example)
        report = CompactionReport(params_before=_count(work))
        before = _layer_shapes(work, rules)
        kept: dict[tuple[str, int], np.ndarray] = {}
        try:
            while report.rounds < MAX_ROUNDS and _round(work, example, report, first=report.rounds == 0,
                                                        align=align, rules=rules, kept=kept):
                report.rounds += 1
        except PassError:
            raise
        except Exception as e:
            raise PassError(f"compaction failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "export with --no-compact and please report it") from None
        after = _layer_shapes(work, rules)
        report.layers = {k: {"before": v, "after": after[k]} for k, v in before.items() if after.get(k) != v}
        report.params_after = _count(work)
        work.recompile()
        report.max_error, report.output_scale = certify(original, work, example, kept=kept)
        report.nodes_checked = len(work.graph.nodes)
        return PassResult(work, report=report)

    def ensures(self, original: nn.Module, result: PassResult, example: Any) -> None:
        """The certificate ``call`` computed is the promise (``certify`` raises on a difference)."""


def compact(gm: fx.GraphModule, example_input: Any, align: int = CHANNEL_ALIGN,
            rules: Registry | None = None) -> tuple[fx.GraphModule, CompactionReport]:
    """``CompactPass(align, rules)`` as a function: the compacted copy and its CompactionReport."""
    result = CompactPass(align, rules)(gm, example_input)
    return result.model, result.report


# --------------------------------------------------------------------------------------------
# BatchNorm folding



def _module_uses(gm: fx.GraphModule) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    return uses


def _foldable_conv(m: nn.Module | None) -> bool:
    """A conv (1-D/2-D/3-D, not transposed) computing the built-in forward: scaling its filters and
    shifting its bias is exact (a leaf with its own forward, e.g. weight standardisation, is not)."""
    from .rules import DEFAULT_RULES
    from .rules.layers import ConvLeafRule, ConvRule

    rule = DEFAULT_RULES.rule_for_module(m) if m is not None else None
    return (isinstance(rule, ConvRule) and not isinstance(rule, ConvLeafRule) and not rule.transposed
            and beyond_forward(m) is None)


class FoldBatchNormPass(GraphPass):
    """Fold every eval-mode BatchNorm1d/2d/3d that directly follows a conv into that conv's weight and bias.

    Exact up to float rounding, and mask-preserving: scaling an output channel's filter keeps its zero
    kernels zero. A conv whose output feeds anything besides the BN, a module called more than once,
    a leaf conv with its own forward, and a conv or BN with hooks or parametrizations (a hook on
    the BN would be dropped with it, one on the conv would see the folded output) are left alone.
    ``report``: the names of the BN modules folded.
    """

    name = "fold-bn"

    def requires(self, gm: nn.Module, example: Any) -> None:
        if not isinstance(gm, fx.GraphModule):
            raise PassError(f"fold-bn needs a torch.fx GraphModule, got {type(gm).__name__}; trace the model first")

    def call(self, gm: fx.GraphModule, example: Any) -> PassResult:
        modules = dict(gm.named_modules())
        uses = _module_uses(gm)
        folded: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or type(modules.get(node.target)) not in (nn.BatchNorm1d, nn.BatchNorm2d,
                                                                                   nn.BatchNorm3d):
                continue
            bn = modules[node.target]
            src = node.args[0] if node.args else None
            if (bn.training or not bn.track_running_stats or bn.running_mean is None or len(node.args) != 1
                    or beyond_forward(bn) is not None
                    or not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                    or not _foldable_conv(modules.get(src.target))
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
        return PassResult(gm, report=folded)

    def ensures(self, original: nn.Module, result: PassResult, example: Any) -> None:
        """Folding is exact by construction; the graph must still be well formed."""
        result.model.graph.lint()


def fold_batchnorm(gm: fx.GraphModule, inplace: bool = False) -> tuple[fx.GraphModule, list[str]]:
    """``FoldBatchNormPass`` as a function: the folded graph (a copy unless ``inplace``) and the BNs folded."""
    fold = FoldBatchNormPass()
    result = fold.call(gm, None) if inplace else fold(gm, None)
    return result.model, result.report


@torch.no_grad()
def _fold_into_conv(conv: nn.Module, bn: nn.Module) -> None:
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    conv.weight.mul_(scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)).to(conv.weight.dtype))
    bias = conv.bias.detach() * scale + shift if conv.bias is not None else shift
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    if hasattr(conv, "apply_mask_"):
        conv.apply_mask_()


def _delete_submodule(gm: fx.GraphModule, target: str) -> None:
    parent, leaf = owner_of(gm, target)
    delattr(parent, leaf)
