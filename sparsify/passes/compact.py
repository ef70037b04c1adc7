"""Exact compaction: remove channels that cannot change the output, and fold eval-mode BatchNorm.

(Compaction proper is added below once the ChannelGraph exists.)
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ..nn import SparseConv2d


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
