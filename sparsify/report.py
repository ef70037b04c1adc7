"""Honest counting: parameters and multiply-adds of live connections only, per layer and in total,
with and without the classifier (as the papers report them)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .nn import SPARSE_LAYERS
from .passes.channel_graph import classifier_node, weight_nodes
from .passes.trace import ensure_shapes, node_shape
from .profiles import cv


def _entry_mask(m: nn.Module) -> torch.Tensor:
    """Live mask entries [out, in/groups]: the mask of a sparse layer, nonzero blocks of a dense one."""
    if isinstance(m, SPARSE_LAYERS):
        return m.mask.bool()
    w = m.weight.detach()
    return w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(-1) if w.dim() > 2 else w.ne(0)


def layer_report(gm: fx.GraphModule, input_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """Per weight layer: shape, live params and MACs at ``input_shape`` (batch 1), density, fan-in, empty channels."""
    shape = (1,) + tuple(input_shape)[1:]
    ensure_shapes(gm, torch.zeros(shape))  # MACs per sample use spatial sizes only: any batch will do
    mods = dict(gm.named_modules())
    clf = classifier_node(gm)
    layers, seen = [], set()
    for node in weight_nodes(gm):
        if node.target in seen:
            continue
        seen.add(node.target)
        m = mods[node.target]
        entries = _entry_mask(m)
        out_shape = node_shape(node) or ()
        is_conv = isinstance(m, nn.Conv2d)
        k = m.kernel_size[0] * m.kernel_size[1] if is_conv else 1
        spatial = out_shape[2] * out_shape[3] if is_conv and len(out_shape) == 4 else 1
        bias = m.bias.numel() if m.bias is not None else 0
        live = int(entries.sum())
        fan = entries.sum(dim=1).float()
        if is_conv and m.groups > 1:
            # input channel c of group g is read by the outputs of group g only
            per = m.out_channels // m.groups
            cols = torch.stack([entries[g * per:(g + 1) * per].any(0) for g in range(m.groups)])
            empty_in = int((~cols).sum())
        else:
            empty_in = int((~entries.any(0)).sum())
        layers.append({
            "name": node.target,
            "type": type(m).__name__,
            "in": m.in_channels if is_conv else m.in_features,
            "out": m.out_channels if is_conv else m.out_features,
            "kernel": list(m.kernel_size) if is_conv else None,
            "groups": m.groups if is_conv else 1,
            "params": live * k + bias,
            "dense_params": m.weight.numel() + bias,
            "macs": live * k * spatial,
            "dense_macs": m.weight.numel() * spatial,
            "density": live / entries.numel(),
            "fan_in_min": int(fan.min()), "fan_in_mean": float(fan.mean()), "fan_in_max": int(fan.max()),
            "fan_in_cv": cv(fan.numpy()),
            "empty_out": int((fan == 0).sum()),
            "empty_in": empty_in,
            "classifier": node is clf,
            "sparse": isinstance(m, SPARSE_LAYERS),
        })
    weight_names = {l["name"] + ".weight" for l in layers} | {l["name"] + ".bias" for l in layers}
    other = sum(p.numel() for n, p in gm.named_parameters() if n not in weight_names)
    clf_params = sum(l["params"] for l in layers if l["classifier"])
    total_params = sum(l["params"] for l in layers) + other
    totals = {
        "params": total_params,
        "params_no_classifier": total_params - clf_params,
        "macs": sum(l["macs"] for l in layers),
        "macs_no_classifier": sum(l["macs"] for l in layers if not l["classifier"]),
        "dense_params": sum(l["dense_params"] for l in layers) + other,
        "weight_layers": len(layers),
        "sparse_layers": sum(l["sparse"] for l in layers),
        "empty_out": sum(l["empty_out"] for l in layers),
        "empty_in": sum(l["empty_in"] for l in layers),
    }
    return {"input_shape": list(shape), "layers": layers, "totals": totals}


def with_ratios(report: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """Add ratios of the totals to those of the dense ``original`` report."""
    ratios = {}
    for key in ("params", "params_no_classifier", "macs", "macs_no_classifier"):
        o = original["totals"].get(key) or 0
        ratios[key] = report["totals"][key] / o if o else None
    return {**report, "original_totals": original["totals"], "ratios": ratios}


def param_counts(report: dict[str, Any]) -> dict[str, int]:
    """The counts a study compares, from a ``layer_report``: live parameters ``total``, without the
    classifier (``no_classifier``), of conv layers only (``conv``: weights and biases, Changpinyo et
    al.'s "convolutional parameters"), and multiply-adds per sample (``macs``)."""
    tot = report["totals"]
    return {"total": int(tot["params"]), "no_classifier": int(tot["params_no_classifier"]),
            "conv": int(sum(l["params"] for l in report["layers"] if l.get("kernel"))),
            "macs": int(tot["macs"])}
