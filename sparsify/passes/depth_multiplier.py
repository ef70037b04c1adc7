"""Depth multiplier (MobileNets; Changpinyo et al. 2017 sect. 3.1): every free channel group of
size n becomes ceil(alpha * n), with freshly initialised weights; with a channel ``divisor`` d > 1,
``make_divisible(alpha * n, d)`` capped at n instead (MobileNetV2's rounding of scaled widths).

The channel graph decides what may change: groups tied to the model's input or output, to an op
it does not understand, or to a grouped conv keep their size. Concats and flattens follow their
parts. ``get_attr`` parameters are cut to the new size along their channel axes.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassError, UsageError
from .base import GraphPass, PassResult, check_fraction, set_submodule
from .channel_graph import ChannelGraph, classifier_node


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


def scaled_size(n: int, alpha: float, divisor: int = 1) -> int:
    """The depth-multiplied size of a group of ``n`` channels: ceil(alpha * n), or with ``divisor`` > 1
    ``make_divisible(alpha * n, divisor)`` capped at ``n`` (the multiplier never widens a group)."""
    if divisor == 1:
        return math.ceil(alpha * n)
    return min(n, make_divisible(alpha * n, divisor))


class DepthMultiplierPass(GraphPass):
    """Scale every free channel group by ``alpha`` (rounded up, or to a multiple of ``divisor``)."""

    name = "depth-multiplier"

    def __init__(self, alpha: float, seed: int = 0, divisor: int = 1) -> None:
        self.alpha = check_alpha(alpha)
        self.seed = seed
        self.divisor = check_divisor(divisor)

    def requires(self, gm: fx.GraphModule, example: torch.Tensor) -> None:
        cg = ChannelGraph.build(gm, example)
        if not cg.free_groups():
            raise PassError("depth-multiplier: no channel group can be resized (all are frozen); see `sparsify inspect`")

    def call(self, gm: fx.GraphModule, example: torch.Tensor) -> PassResult:
        cg = ChannelGraph.build(gm, example)
        sizes = {g.id: scaled_size(g.size, self.alpha, self.divisor) for g in cg.free_groups()}

        def new_size(node: fx.Node) -> int:
            g = cg.group_of(node)
            if g is None:
                raise PassError(f"depth-multiplier: no channel group for {node.name}")
            return cg.derived_size(g.id, sizes)

        mods = dict(gm.named_modules())
        result = PassResult(gm)
        torch.manual_seed(self.seed)
        done: set[str] = set()
        for node in gm.graph.nodes:
            if node.op != "call_module" or node.target in done:
                continue
            m = mods[node.target]
            x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            new: nn.Module | None = None
            if isinstance(m, nn.Conv2d):
                cin, cout = new_size(x), new_size(node)
                if (cin, cout) != (m.in_channels, m.out_channels):
                    groups = cin if m.groups == m.in_channels == m.out_channels else m.groups
                    new = type(m)(cin, cout, m.kernel_size, stride=m.stride, padding=m.padding,
                                  dilation=m.dilation, groups=groups, bias=m.bias is not None,
                                  padding_mode=m.padding_mode)
            elif isinstance(m, nn.Linear):
                fin, fout = new_size(x), new_size(node)
                if (fin, fout) != (m.in_features, m.out_features):
                    new = type(m)(fin, fout, bias=m.bias is not None)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = new_size(node)
                if c != m.num_features:
                    new = type(m)(c, eps=m.eps, momentum=m.momentum, affine=m.affine,
                                  track_running_stats=m.track_running_stats)
            if new is not None:
                set_submodule(gm, node.target, new)
                result.layers[node.target] = {"kind": type(m).__name__, "before": _dims(m), "after": _dims(new)}
            done.add(node.target)
        self._cut_parameters(gm, cg, sizes)
        frozen = [g for g in cg.root_groups() if g.frozen]
        result.notes += [f"group of {g.size} channels kept ({sorted(set(g.reasons))[0]})" for g in frozen]
        return result

    @staticmethod
    def _cut_parameters(gm: fx.GraphModule, cg: ChannelGraph, sizes: dict[int, int]) -> None:
        """Cut get_attr tensors to the new sizes of the groups their axes belong to."""
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            t = gm.get_parameter(node.target) if _is_param(gm, node.target) else gm.get_buffer(node.target)
            index = []
            for axis in range(t.dim()):
                g = cg.group_of(node.name, axis)
                index.append(slice(0, cg.derived_size(g.id, sizes)) if g is not None else slice(None))
            cut = t.detach()[tuple(index)].clone()
            owner_name, _, attr = node.target.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if isinstance(t, nn.Parameter):
                setattr(owner, attr, nn.Parameter(cut, requires_grad=t.requires_grad))
            else:
                owner.register_buffer(attr, cut)

    def ensures(self, original: fx.GraphModule, result: PassResult, example: torch.Tensor) -> None:
        super().ensures(original, result, example)


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _dims(m: nn.Module) -> list[int]:
    if isinstance(m, nn.Conv2d):
        return [m.out_channels, m.in_channels]
    if isinstance(m, nn.Linear):
        return [m.out_features, m.in_features]
    return [getattr(m, "num_features", 0)]


COUNTS = ("conv", "total")


class DepthCounter:
    """Parameter counts of the depth-multiplied graph at any alpha, read off the channel groups.

    The channel graph is built once; ``counts(alpha)`` then sizes every group as
    ``DepthMultiplierPass`` would (``scaled_size``) and adds up each layer's parameters, so
    searching alpha needs no rewrite of the model (issue 13). Counts (units: parameters):
    ``total`` (every parameter), ``no_classifier`` (without the last conv/linear layer's), and
    ``conv`` (weights and biases of Conv2d layers). ``sizes(alpha)`` is the group sizes themselves:
    two alphas with equal sizes give the same model. Raises PassError where the pass would.
    """

    def __init__(self, gm: fx.GraphModule, example: torch.Tensor, divisor: int = 1) -> None:
        self.cg = ChannelGraph.build(gm, example)
        self.divisor = check_divisor(divisor)
        self.free = [(g.id, g.size) for g in self.cg.free_groups()]
        mods = dict(gm.named_modules())
        clf = classifier_node(gm)

        def gid(node: object) -> int:
            g = self.cg.group_of(node) if isinstance(node, fx.Node) else None
            if g is None:
                raise PassError(f"depth-multiplier: no channel group for {getattr(node, 'name', node)}")
            return g.id

        self.layers: list[tuple[str, nn.Module, int | None, int, bool]] = []  # kind, module, in, out, classifier
        owned: set[int] = set()
        done: set[str] = set()
        for node in gm.graph.nodes:
            if node.op != "call_module" or node.target in done:
                continue
            done.add(node.target)
            m = mods[node.target]
            x = node.args[0] if node.args else None
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
                self.layers.append((kind, m, gid(x), gid(node), node is clf))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                self.layers.append(("bn", m, None, gid(node), False))
            else:
                continue
            owned |= {id(p) for p in m.parameters(recurse=False)}
        self.cut: list[tuple[tuple[int, ...], list[int | None]]] = []  # get_attr parameters cut along groups
        for node in gm.graph.nodes:
            if node.op == "get_attr" and _is_param(gm, node.target):
                p = gm.get_parameter(node.target)
                if id(p) in owned:
                    continue
                owned.add(id(p))
                groups = [self.cg.group_of(node.name, axis) for axis in range(p.dim())]
                self.cut.append((tuple(p.shape), [g.id if g is not None else None for g in groups]))
        self.other = sum(p.numel() for p in gm.parameters() if id(p) not in owned)

    def sizes(self, alpha: float) -> dict[int, int]:
        """The size of every free channel group at ``alpha``."""
        return {g: scaled_size(n, alpha, self.divisor) for g, n in self.free}

    def counts(self, alpha: float) -> dict[str, int]:
        """Parameter counts of the model ``DepthMultiplierPass(alpha, divisor=divisor)`` makes."""
        sizes = self.sizes(alpha)

        def size(g: int) -> int:
            return self.cg.derived_size(g, sizes)

        total = conv = clf = 0
        for kind, m, gin, gout, is_clf in self.layers:
            cout = size(gout)
            if kind == "bn":
                n = 2 * cout if m.affine else 0
            elif kind == "conv":
                cin = size(gin)
                groups = cin if m.groups == m.in_channels == m.out_channels else m.groups
                n = cout * (cin // groups) * math.prod(m.kernel_size) + (cout if m.bias is not None else 0)
                conv += n
            else:
                n = cout * size(gin) + (cout if m.bias is not None else 0)
            total += n
            clf += n if is_clf else 0
        for shape, groups in self.cut:
            total += math.prod(size(g) if g is not None else d for d, g in zip(shape, groups))
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
        if 0 < short <= 1 and count_at(short)[1] == key:
            return short, n
    return best, n
