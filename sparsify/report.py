"""Honest counting: parameters and multiply-adds of live connections only, per layer and in total,
with and without the classifier (as the papers report them)."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.fx as fx

from .nn import SPARSE_LAYERS
from .passes.channel_graph import classifier_node, weight_nodes
from .passes.outside import dense_leaves, functional_layers
from .passes.rules import DEFAULT_RULES, Registry
from .passes.trace import ensure_shapes, graphs, node_shape
from .profiles import cv, empty_channels


def layer_report(gm: fx.GraphModule, input_shape: Any, rules: Registry | None = None) -> dict[str, Any]:
    """Per weight layer of the eval graph: shape, live params and MACs at ``input_shape`` (batch 1;
    one shape, or a list of shapes for a model with several inputs), density, fan-in, empty channels.

    Totals count what runs in eval mode: parameters of layers only a training graph uses (auxiliary
    heads) are reported as ``train_only_params``, not in ``params``.
    """
    rules = rules or DEFAULT_RULES
    shapes = input_shapes(input_shape)
    batch1 = [(1,) + tuple(s)[1:] for s in shapes]
    ensure_shapes(gm, tuple(torch.zeros(s) for s in batch1))  # MACs per sample use spatial sizes only
    mods = dict(gm.named_modules())
    clf = classifier_node(gm, rules)
    layers = []
    counted: list[int] = []       # each layer's parameters not counted by an earlier layer (tied weights)
    tensors_seen: set[int] = set()
    by_name: dict[str, dict[str, Any]] = {}

    def positions(node: fx.Node, how: str) -> int:
        """Output positions one weight entry is applied at, per sample."""
        out_shape = node_shape(node) or ()
        in_node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        in_shape = (node_shape(in_node) if in_node is not None else None) or ()
        if how == "out":
            return math.prod(out_shape[2:]) if len(out_shape) > 2 else 1
        if how == "in":
            return math.prod(in_shape[2:]) if len(in_shape) > 2 else 1
        return math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1  # linear: every leading axis but the batch

    for node in weight_nodes(gm, rules):
        m = mods[node.target]
        d = rules.rule_for_module(m).describe(m)
        entries = d["entries"]
        k = d["kernel_size"]
        spatial = positions(node, d["spatial"])
        if node.target in by_name:  # a module called again: its parameters once, its MACs every call
            layer = by_name[node.target]
            layer["macs"] += int(entries.sum()) * k * spatial
            layer["dense_macs"] += m.weight.numel() * spatial
            layer["calls"] += 1
            continue
        bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
        live = int(entries.sum())
        fan = entries.sum(dim=1).float()
        g = d["groups"]
        empty_out, empty_in = empty_channels(entries.detach().cpu().numpy(), g)
        b = getattr(m, "bias", None)
        counted.append((live * k if id(m.weight) not in tensors_seen else 0) +
                       (bias if b is not None and id(b) not in tensors_seen else 0))
        tensors_seen.update(id(t) for t in (m.weight, b) if t is not None)
        layers.append({
            "name": node.target,
            "type": type(m).__name__,
            "in": d["in"],
            "out": d["out"],
            "kernel": d["kernel"],
            "groups": g,
            "params": live * k + bias,
            "dense_params": m.weight.numel() + bias,
            "macs": live * k * spatial,
            "dense_macs": m.weight.numel() * spatial,
            "density": live / entries.numel(),
            "fan_in_min": int(fan.min()), "fan_in_mean": float(fan.mean()), "fan_in_max": int(fan.max()),
            "fan_in_cv": cv(fan.numpy()),
            "empty_out": empty_out,
            "empty_in": empty_in,
            "classifier": node is clf,
            "sparse": isinstance(m, SPARSE_LAYERS),
            "calls": 1,
        })
        by_name[node.target] = layers[-1]
    functional = functional_layers(gm, rules) + dense_leaves(gm, rules)
    weight_names = {l["name"] + ".weight" for l in layers} | {l["name"] + ".bias" for l in layers}
    eval_params = _params_used(gm, gm.graph)
    train_params = set().union(*(_params_used(gm, g) for g in graphs(gm)[1:]))
    other = sum(p.numel() for n, p in gm.named_parameters()
                if n not in weight_names and (n in eval_params or n not in train_params))
    train_only = sum(p.numel() for n, p in gm.named_parameters() if n in train_params and n not in eval_params)
    clf_params = sum(c for l, c in zip(layers, counted) if l["classifier"])
    total_params = sum(counted) + other
    totals = {
        "params": total_params,
        "params_no_classifier": total_params - clf_params,
        "macs": sum(l["macs"] for l in layers) + sum(f["macs"] for f in functional),
        "macs_no_classifier": sum(l["macs"] for l in layers if not l["classifier"]) + sum(f["macs"] for f in functional),
        "dense_params": sum(l["dense_params"] - l["params"] + c for l, c in zip(layers, counted)) + other,
        # every weight of every layer live: what "x of dense" divides by (with_ratios)
        "dense_macs": sum(l["dense_macs"] for l in layers) + sum(f["macs"] for f in functional),
        "dense_macs_no_classifier": sum(l["dense_macs"] for l in layers if not l["classifier"])
        + sum(f["macs"] for f in functional),
        "weight_layers": len(layers),
        "sparse_layers": sum(l["sparse"] for l in layers),
        "empty_out": sum(l["empty_out"] for l in layers),
        "empty_in": sum(l["empty_in"] for l in layers),
    }
    totals["dense_params_no_classifier"] = totals["dense_params"] - sum(
        l["dense_params"] - l["params"] + c for l, c in zip(layers, counted) if l["classifier"])
    if train_only:
        totals["train_only_params"] = train_only
    report = {"input_shape": list(batch1[0]), "layers": layers, "totals": totals}
    if functional:
        report["functional"] = functional
    if len(batch1) > 1:
        report["input_shapes"] = [list(s) for s in batch1]
    return report


def _params_used(gm: fx.GraphModule, graph: fx.Graph) -> set[str]:
    """Qualified names of the parameters a graph reads (its modules' and its get_attr tensors)."""
    names: set[str] = set()
    for n in graph.nodes:
        if n.op == "call_module":
            names |= {f"{n.target}.{p}" for p, _ in gm.get_submodule(n.target).named_parameters()}
        elif n.op == "get_attr":
            names.add(n.target)
    return names


def input_shapes(input_shape: Any) -> list[tuple[int, ...]]:
    """One shape ``(1, 3, 32, 32)`` or several ``[(1, 3, 32, 32), (1, 3, 32, 32)]`` as a list of shapes.

    Raises UsageError for anything else: a string ("1,3,32,32", the CLI's spelling), dimensions that
    are not positive whole numbers."""
    from .errors import UsageError

    def items(s: Any) -> tuple[Any, ...]:  # a list, tuple, torch.Size or array; not a string
        try:
            return () if isinstance(s, (str, bytes)) else tuple(s)
        except TypeError:
            return ()

    def dims(s: Any) -> tuple[int, ...]:
        out = items(s)
        if not out or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in out):
            raise UsageError(f"input shape {input_shape!r} is not a shape of positive whole numbers; give e.g. "
                             f"(1, 3, 32, 32), or a list of such shapes for a model with several inputs")
        return tuple(int(d) for d in out)

    shapes = items(input_shape)
    if shapes and items(shapes[0]):
        return [dims(s) for s in shapes]
    return [dims(input_shape)]


def with_ratios(report: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """Add ratios of the totals to those of the dense ``original`` model: every weight of its layers
    counted (``dense_*`` totals), so a user's weights with zeroed filters do not shrink the
    denominator (a density-1 model read 1.55x of dense). Reports of older runs without them divide by
    the original's live counts."""
    ratios = {}
    for key in ("params", "params_no_classifier", "macs", "macs_no_classifier"):
        o = original["totals"].get(f"dense_{key}", original["totals"].get(key)) or 0
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
