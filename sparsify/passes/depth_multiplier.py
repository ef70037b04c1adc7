"""Depth multiplier (MobileNets; Changpinyo et al. 2017 sect. 3.1): every free channel group of
size n becomes ceil(alpha * n), with freshly initialised weights; with a channel ``divisor`` d > 1,
``make_divisible(alpha * n, d)`` capped at n instead (MobileNetV2's rounding of scaled widths).

The channel graph decides what may change: groups tied to the model's input or output, to an op
it does not understand, or to a grouped conv keep their size. Concats and flattens follow their
parts. ``get_attr`` parameters are cut to the new size along their channel axes.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PassError, UsageError
from .base import GraphPass, PassResult, check_fraction, set_submodule
from .channel_graph import ChannelGraph


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
