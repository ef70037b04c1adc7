"""Depth multiplier (MobileNets; Changpinyo et al. 2017 sect. 3.1): every free channel group of
size n becomes ceil(alpha * n), with freshly initialised weights; with a channel ``divisor`` d > 1,
``make_divisible(alpha * n, d)`` capped at n instead (MobileNetV2's rounding of scaled widths).

The channel graph decides what may change: groups tied to the model's input or output or to an op
no rule understands keep their size; a group that a grouped conv or a GroupNorm reads stays a
multiple of its group count (each group's width is scaled). Concats and flattens follow their parts;
a group whose size the model computes from another's (``x.view(n, 2, c // 2, h, w)``, ``c`` from
``x.shape``) follows that one, which stays a multiple of what the arithmetic divides by.
Each layer is rebuilt by its own rule (same type and forward, new channel counts); ``get_attr``
tensors keep the entries of the channels that remain.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassError, UsageError, name_list
from .base import GraphPass, PassResult, check_fraction, owner_of, set_submodule
from .channel_graph import ChannelGraph, classifier_node
from .outside import functional_layers, functional_note, ruleless_leaves
from .rules import LayerRule, Registry
from .rules.layers import ConvRule
from .trace import graphs


def check_alpha(alpha: float | None) -> float:
    return check_fraction(alpha, "--alpha", "0.5")


def make_divisible(width: float, divisor: int = 8) -> int:
    """``width`` rounded to the nearest multiple of ``divisor``, at least ``divisor`` and not below 90% of ``width``.

    The rule MobileNetV2 and EfficientNet use for scaled channel counts (Sandler et al. 2018; the
    reference implementations' ``_make_divisible``): ORT's and other runtimes' convs run fastest
    on channel counts that fill whole SIMD vectors.
    """
    out = max(divisor, int(width + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * width else out


def check_divisor(divisor: int | None) -> int:
    """The channel divisor of the depth multiplier: a positive integer (1: plain ceil(alpha * n))."""
    if divisor is None:
        return 1
    if isinstance(divisor, bool) or int(divisor) != divisor or divisor < 1:
        raise UsageError(f"--divisor {divisor} is not a positive integer; give e.g. --divisor 8")
    return int(divisor)


def scaled_size(n: int, alpha: float, divisor: int = 1, multiple: int = 1) -> int:
    """The depth-multiplied size of a group of ``n`` channels: ceil(alpha * n), or with ``divisor`` > 1
    ``make_divisible(alpha * n, divisor)`` capped at ``n`` (the multiplier never widens a group);
    then rounded up to a multiple of ``multiple`` (the group count of a grouped conv or GroupNorm
    reading the group), at least one multiple and at most ``n``."""
    size = math.ceil(alpha * n) if divisor == 1 else min(n, make_divisible(alpha * n, divisor))
    if multiple > 1:
        size = min(n, multiple * max(1, math.ceil(size / multiple)))
    return size


def _returned_layers(cg: ChannelGraph) -> str | None:
    """Why nothing resizes when the model returns every layer's channels (intermediate features
    beside the logits): the layers whose outputs it returns, and what to do; None when a group is
    frozen for another reason."""
    groups = [g for g in cg.channel_groups() if g.producers]
    if not groups or any(set(g.reasons) - {"model output", "model input"} for g in groups):
        return None
    returned = sorted({m.target for g in groups if "model output" in g.reasons for m in g.producers})
    if not returned:
        return None
    return (f"the model returns the outputs of {name_list(returned, 4)}, and a returned tensor keeps its channel count, so every "
            f"layer's width is fixed; return only the final output (e.g. the logits) to resize the layers, or use "
            f"--method sparse-random or psn, which keep every channel count")


def _what_freezes(gm: fx.GraphModule, rules: Registry | None) -> str:
    """The layers no channel group reaches, and how to let them resize: convs run as functions (a
    Conv2d subclass standardising its weight), leaf types without a rule; "" when there are none."""
    leaves = ruleless_leaves(gm, rules)
    said = [f"{', '.join(leaves)} {'is a leaf' if len(leaves) == 1 else 'are leaves'} without a rule, whose "
            f"channels stay as they are; add --rule {leaves[0]}=conv (or linear, elementwise, frozen)"] if leaves else []
    note = functional_note({"functional": functional_layers(gm, rules)}, goal="resizable")
    return "; ".join(said + ([note] if note else []))


class DepthMultiplierPass(GraphPass):
    """Scale every free channel group by ``alpha`` (rounded up, or to a multiple of ``divisor``;
    always to a multiple of its group count)."""

    name = "depth-multiplier"

    def __init__(self, alpha: float, seed: int = 0, divisor: int = 1, rules: Registry | None = None) -> None:
        self.alpha = check_alpha(alpha)
        self.seed = seed
        self.divisor = check_divisor(divisor)
        self.rules = rules

    def requires(self, gm: fx.GraphModule, example: Any) -> None:
        cg = ChannelGraph.build(gm, example, self.rules, keep_untrained=True)
        if not cg.free_groups():
            reasons = sorted({r for g in cg.channel_groups() for r in g.reasons},
                             key=lambda r: (r in ("model input", "model output"), r))
            why = f" ({reasons[0]}{' and more' if len(reasons) > 1 else ''})" if reasons else ""
            blockers = _what_freezes(gm, self.rules) or _returned_layers(cg)
            raise PassError("depth-multiplier: no channel group can be resized: " + blockers if blockers else
                            f"depth-multiplier: no channel group can be resized (all are frozen{why}); "
                            "see `sparsify inspect`")

    def call(self, gm: fx.GraphModule, example: Any) -> PassResult:
        cg = ChannelGraph.build(gm, example, self.rules, keep_untrained=True)
        sizes = group_sizes(cg, self.alpha, self.divisor)
        new_size = _new_size(cg, sizes)
        result = PassResult(gm)
        torch.manual_seed(self.seed)
        for target, m, node, rule in _layer_calls(gm, cg):
            new = rule.resize(m, node, new_size)
            if new is not None:
                set_submodule(gm, target, new)
                result.layers[target] = {"kind": type(m).__name__, "before": _dims(m), "after": _dims(new)}
        self._cut_parameters(gm, cg, sizes)
        self._resize_args(gm, cg, new_size)
        if self.divisor > 1:
            plain, rounded = sum(group_sizes(cg, self.alpha, 1).values()), sum(sizes.values())
            if rounded > 1.15 * plain:  # --alpha 0.5 --divisor 64: 0.86x of dense MACs
                result.notes.append(f"--divisor {self.divisor} rounds the resized channel groups to {rounded:,} "
                                    f"channels where alpha {self.alpha:g} alone gives {plain:,}: a smaller --divisor "
                                    "follows alpha more closely")
        for g in cg.channel_groups():
            if g.frozen:
                result.notes.append(f"group of {g.size} channels kept ({sorted(set(g.reasons))[0]})")
            elif g.multiple > 1 and g.id in sizes:
                # every reader that sets the multiple (its least common multiple), not just the first
                readers = sorted(set(g.whole))
                why = "; ".join(readers[:3]) + (f"; {len(readers) - 3} more" if len(readers) > 3 else "")
                result.notes.append(f"group of {g.size} channels scaled to {sizes[g.id]}, a multiple of {g.multiple} "
                                    f"({why or 'grouped layer'})")
            elif g.follows is not None:
                lead, _, why = g.follows
                result.notes.append(f"group of {g.size} channels scaled to {cg.derived_size(g.id, sizes)} "
                                    f"(sized by {why} from group {lead})")
        return result

    @staticmethod
    def _resize_args(gm: fx.GraphModule, cg: ChannelGraph, new_size: Callable[[Any, int], int]) -> None:
        """Rewrite the channel counts that calls hold as constants (``Rule.resize_args``)."""
        mods = dict(gm.named_modules())
        changed = False
        for graph in graphs(gm):
            for node in graph.nodes:
                if node.op not in ("call_function", "call_method"):
                    continue
                rule = cg.rules.rule_for(node, mods)
                new = rule.resize_args(node, new_size) if rule is not None else None
                if new is not None:
                    node.args, node.kwargs = new
                    changed = True
        if changed:
            gm.recompile()

    @staticmethod
    def _cut_parameters(gm: fx.GraphModule, cg: ChannelGraph, sizes: dict[int, int]) -> None:
        """Cut get_attr tensors to the channels that remain (the first ``new size`` of each root group,
        at every position they take in derived groups)."""
        def roots(gid: int) -> set[int]:
            d = cg.groups[gid].derivation
            return {gid} if d is None else set().union(*(roots(p) for p, _ in d.parts))

        def keep_of(gid: int) -> np.ndarray:
            if cg.groups[gid].derivation is None:
                return np.arange(cg.derived_size(gid, sizes))
            return np.sort(np.concatenate([cg.positions(r)[gid][:cg.derived_size(r, sizes)].ravel()
                                           for r in roots(gid)]))

        targets = {n.target for graph in graphs(gm) for n in graph.nodes if n.op == "get_attr"}
        for target in sorted(targets):
            t = _get(gm, target)
            if not isinstance(t, torch.Tensor):
                continue
            cut = t.detach()
            changed = False
            for axis in range(t.dim()):
                g = cg.group_of_space((f"%{target}", axis))
                if g is None or cg.derived_size(g.id, sizes) == t.shape[axis]:
                    continue
                keep = keep_of(g.id)
                cut = cut.index_select(axis, torch.as_tensor(keep, dtype=torch.long))
                changed = True
            if changed:
                owner, attr = owner_of(gm, target)
                if isinstance(t, torch.nn.Parameter):
                    setattr(owner, attr, torch.nn.Parameter(cut.clone(), requires_grad=t.requires_grad))
                else:
                    owner.register_buffer(attr, cut.clone())


def group_sizes(cg: ChannelGraph, alpha: float, divisor: int = 1) -> dict[int, int]:
    """The depth-multiplied size of every free channel group of ``cg`` (``scaled_size``), by group id."""
    return {g.id: scaled_size(g.size, alpha, divisor, g.multiple) for g in cg.free_groups()}


def _new_size(cg: ChannelGraph, sizes: dict[int, int]) -> Callable[[Any, int], int]:
    """``size(node_or_arg, axis)``: the channel count of that axis once the root groups have ``sizes``."""
    def new_size(a: Any, axis: int) -> int:
        g = cg.group_of(a, axis) if isinstance(a, fx.Node) else None
        if g is None:
            raise PassError(f"depth-multiplier: no channel group for {getattr(a, 'name', a)}")
        return cg.derived_size(g.id, sizes)

    return new_size


def _layer_calls(gm: fx.GraphModule, cg: ChannelGraph) -> Iterator[tuple[str, nn.Module, fx.Node, LayerRule]]:
    """(target, module, first call node, rule) of every module a layer rule resizes, once each."""
    mods = dict(gm.named_modules())
    done: set[str] = set()
    for graph in graphs(gm):
        for node in graph.nodes:
            if node.op != "call_module" or node.target in done:
                continue
            done.add(node.target)
            rule = cg.rules.rule_for_module(mods[node.target])
            if isinstance(rule, LayerRule):
                yield node.target, mods[node.target], node, rule


COUNTS = ("conv", "total")


class DepthCounter:
    """Parameter counts of the depth-multiplied graph at any alpha, read off the channel groups.

    The channel graph is built once; ``counts(alpha)`` sizes every group as ``DepthMultiplierPass``
    does (``group_sizes``) and adds up the parameter shapes each layer's rule would give
    (``LayerRule.resize_plan``), so searching alpha rewrites no model. Counts (units: parameters):
    ``total`` (every parameter), ``no_classifier`` (without the last weight layer's), and ``conv``
    (weights and biases of conv layers). ``sizes(alpha)`` is the group sizes: two alphas with equal
    sizes give the same model. Raises PassError where the pass would.
    """

    def __init__(self, gm: fx.GraphModule, example: Any, divisor: int = 1, rules: Registry | None = None) -> None:
        self.cg = ChannelGraph.build(gm, example, rules, keep_untrained=True)
        self.divisor = check_divisor(divisor)
        self.free = [(g.id, g.size) for g in self.cg.free_groups()]
        clf = classifier_node(gm, rules)
        self.layers = [(m, node, rule, isinstance(rule, ConvRule), clf is not None and target == clf.target)
                       for target, m, node, rule in _layer_calls(gm, self.cg)]
        owned = {id(p) for m, *_ in self.layers for p in m.parameters(recurse=False)}
        self.cut: list[tuple[tuple[int, ...], list[int | None]]] = []  # get_attr parameters, group per axis
        for target in sorted({n.target for graph in graphs(gm) for n in graph.nodes if n.op == "get_attr"}):
            t = _get(gm, target)
            if isinstance(t, nn.Parameter) and id(t) not in owned:
                owned.add(id(t))
                groups = [self.cg.group_of_space((f"%{target}", axis)) for axis in range(t.dim())]
                self.cut.append((tuple(t.shape), [g.id if g is not None else None for g in groups]))
        self.other = sum(p.numel() for p in gm.parameters() if id(p) not in owned)

    def sizes(self, alpha: float) -> dict[int, int]:
        """The size of every free channel group at ``alpha``."""
        return group_sizes(self.cg, alpha, self.divisor)

    def counts(self, alpha: float) -> dict[str, int]:
        """Parameter counts of the model ``DepthMultiplierPass(alpha, divisor=divisor)`` makes."""
        sizes = self.sizes(alpha)
        new_size = _new_size(self.cg, sizes)
        total = conv = clf = 0
        for m, node, rule, is_conv, is_clf in self.layers:
            plan = rule.resize_plan(m, node, new_size)
            shapes = plan[1] if plan is not None else {}
            n = sum(math.prod(shapes.get(name, p.shape)) for name, p in m.named_parameters(recurse=False))
            total += n
            conv += n if is_conv else 0
            clf += n if is_clf else 0
        for shape, groups in self.cut:
            total += math.prod(self.cg.derived_size(g, sizes) if g is not None else d for d, g in zip(shape, groups))
        total += self.other
        return {"total": total, "no_classifier": total - clf, "conv": conv}


def match_alpha(count_at: Callable[[float], tuple[int, Hashable]], target: int) -> tuple[float, int]:
    """The alpha whose count is nearest ``target``; returns (alpha, count).

    ``count_at(alpha)`` gives the count and a key that is equal for alphas making the same model
    (the group sizes). The count never falls as alpha grows, so bisection finds the two steps that
    bracket ``target``; the nearer wins (the larger on a tie). The alpha returned is the shortest
    decimal that makes the same model, so a recipe reads ``0.852``, not ``0.85217391304``.
    """
    smallest = 1e-9
    n_hi, _ = count_at(1.0)
    n_lo, _ = count_at(smallest)
    if n_hi <= target:
        best = 1.0
    elif n_lo >= target:
        best = smallest
    else:
        lo, hi = smallest, 1.0
        for _ in range(80):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if count_at(mid)[0] < target:
                lo = mid
            else:
                hi = mid
        n_lo, n_hi = count_at(lo)[0], count_at(hi)[0]
        best = lo if abs(n_lo - target) < abs(n_hi - target) else hi
    n, key = count_at(best)
    for digits in range(1, 17):
        short = float(f"{best:.{digits}g}")
        # best may sit at an edge of its step (bisection ends on one): the decimals either side too
        ulp = 10.0 ** (math.floor(math.log10(best)) - digits + 1)
        for cand in (short, float(f"{short + ulp:.{digits}g}"), float(f"{short - ulp:.{digits}g}")):
            if 0 < cand <= 1 and count_at(cand)[1] == key:
                return cand, n
    return best, n


def match_depth(gm: fx.GraphModule, example: Any, target: int, count: str, divisor: int = 1,
                rules: Registry | None = None) -> tuple[float, int]:
    """Depth multiplier alpha whose ``count`` ("conv" or "total") of parameters is nearest ``target``.

    Counted from the channel groups of the traced dense graph ``gm`` (``DepthCounter``), without
    transforming: the result is within one step of the count (one channel of the widest group) of
    ``target``, the nearest achievable. Returns (alpha, predicted count).
    """
    counter = DepthCounter(gm, example, divisor, rules)

    def count_at(a: float) -> tuple[int, tuple[int, ...]]:
        return counter.counts(a)[count], tuple(sorted(counter.sizes(a).items()))

    return match_alpha(count_at, target)


def _get(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _dims(m: Any) -> list[int]:
    for a, b in (("out_channels", "in_channels"), ("out_features", "in_features")):
        if hasattr(m, a):
            return [getattr(m, a), getattr(m, b)]
    for a in ("num_features", "num_channels", "num_parameters"):
        if hasattr(m, a):
            return [getattr(m, a)]
    if hasattr(m, "normalized_shape"):
        return list(m.normalized_shape)
    return []


__all__ = ["COUNTS", "DepthCounter", "DepthMultiplierPass", "check_alpha", "check_divisor", "group_sizes",
           "make_divisible", "match_alpha", "match_depth", "scaled_size"]
