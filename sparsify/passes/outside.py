"""Layers outside the masks: convolutions and linear maps the eval graph runs as functions
(``F.conv2d(x, self.c3.weight * self.m3)``) or calls as dense frozen leaves (a weight_norm
parametrization, hooks). They stay dense; the report counts their MACs and the passes name them
when they are why nothing can change."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from .rules import DEFAULT_RULES, LayerRule, Registry
from .rules.base import beyond_forward
from .rules.layers import FunctionalConvRule, FunctionalLinearRule
from .trace import eval_mode, node_shape


def functional_calls(gm: fx.GraphModule, rules: Registry | None = None) -> list[tuple[fx.Node, Any]]:
    """The graph's calls of functions the rule registry names convolutions or linear maps
    (``FunctionalConvRule``, ``FunctionalLinearRule``), each with its rule, in graph order; shapes
    need not be recorded."""
    rules = rules or DEFAULT_RULES
    calls = []
    for node in gm.graph.nodes:
        rule = rules.rule_for_function(node.target) if node.op == "call_function" else None
        if isinstance(rule, (FunctionalConvRule, FunctionalLinearRule)):
            calls.append((node, rule))
    return calls


def functional_layers(gm: fx.GraphModule, rules: Registry | None = None) -> list[dict[str, Any]]:
    """Convolutions and linear maps the eval graph runs as functions (``F.conv2d(x, self.c3.weight *
    self.m3)``, ``self.c2.forward(x)``, ``F.linear``), not as module calls: their weight (the nearest
    parameter it is computed from, else the node computing it), its shape and dense MACs at batch 1
    (shapes recorded). Masks never cover
    them; the totals count them so the ratios to dense stay true. Which functions are convolutions
    and linear maps is the rule registry's (``FunctionalConvRule``, ``FunctionalLinearRule``)."""
    found = []
    for node, rule in functional_calls(gm, rules):
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        x = node.args[0] if node.args else node.kwargs.get("input")
        ws, out = node_shape(w) if isinstance(w, fx.Node) else None, node_shape(node)
        xs = node_shape(x) if isinstance(x, fx.Node) else None
        if ws is None or out is None:
            continue
        spatial = _positions(out, xs, linear=isinstance(rule, FunctionalLinearRule),
                             transposed=not isinstance(rule, FunctionalLinearRule) and rule.transposed)
        # a computed weight (self.c3.weight * self.m3, a standardised weight) by the parameter it is computed from
        source = _first_get_attr(w) or w
        entry = {"node": node.name, "op": node.target.__name__,
                 "weight": source.target if source.op == "get_attr" else source.name, "shape": list(ws),
                 "macs": math.prod(ws) * spatial}
        # a layer subclass whose own forward calls the function on its weight (a "same"-padding
        # Conv2d): kept whole as a leaf with its rule, it goes sparse (trace marks these)
        if "layer_subclass" in source.meta:
            entry["layer_type"], entry["rule"] = source.meta["layer_subclass"]
        found.append(entry)
    return found


def dense_leaves(gm: fx.GraphModule, rules: Registry | None = None) -> list[dict[str, Any]]:
    """Convs and linears the eval graph calls as dense frozen leaves because an instance computes more
    than its type's forward (``rules.base.beyond_forward``: a weight_norm / spectral_norm
    parametrization, hooks): entries like ``functional_layers``' (MACs at batch 1, dense) with
    ``leaf``: why. Masks never cover them; the totals count their MACs."""
    rules = rules or DEFAULT_RULES
    mods = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = mods[node.target]
        why = beyond_forward(m) if rules.rule_for_module(m) is None else None
        base = rules.rule_for_type(type(m)) if why else None
        out = node_shape(node)
        if not (isinstance(base, LayerRule) and base.has_weight) or out is None:
            continue
        # a parametrized weight is computed on access: in eval mode, without side effects (spectral_norm's
        # power iteration updates its vectors in training mode)
        with eval_mode(m):
            weight, d = getattr(m, "weight", None), base.describe(m)
        if not isinstance(weight, torch.Tensor):
            continue
        ws, x = tuple(weight.shape), node.args[0] if node.args else None
        spatial = _positions(out, node_shape(x) if isinstance(x, fx.Node) else None, linear=len(ws) == 2,
                             transposed=bool(getattr(m, "transposed", False)))
        found.append({"node": node.name, "op": type(m).__name__, "weight": f"{node.target}.weight", "shape": list(ws),
                      "macs": math.prod(ws) * spatial, "leaf": why,
                      **{k: d[k] for k in ("in", "out", "kernel", "groups")}})
    return found


def _positions(out: Any, xs: Any, linear: bool, transposed: bool) -> int:
    """Output positions each weight entry of a dense conv / linear is applied at, per sample: a
    linear map's leading axes but the batch, a transposed conv's input pixels, a conv's output pixels."""
    if linear:
        return math.prod(out[1:-1]) if len(out) > 2 else 1
    if transposed:
        return math.prod(xs[2:]) if xs is not None else 0
    return math.prod(out[2:])


def _first_get_attr(node: fx.Node) -> fx.Node | None:
    """The nearest module tensor (get_attr) that ``node`` is computed from, breadth first; None if none."""
    queue, seen = [node], {node}
    while queue:
        n = queue.pop(0)
        if n.op == "get_attr":
            return n
        if n.op in ("call_module", "placeholder"):  # an activation: the weight is not computed from it
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return None


def functional_note(report: dict[str, Any], goal: str = "sparse") -> str | None:
    """A one-line note naming the weights the forward runs as functions (``functional_layers``), which
    stay dense, and how to make such a layer ``goal`` (sparse, resized); None when there are none."""
    found = [f for f in report.get("functional") or [] if not f.get("leaf")]  # leaves have notes of their own
    if not found:
        return None
    names = list(dict.fromkeys(f"{f['weight']} ({f['op']})" for f in found))
    subclasses = dict.fromkeys((f["layer_type"], f["rule"]) for f in found if f.get("layer_type"))
    advice = "; ".join([f"keep {t} whole with --leaf {t} --rule {t}={r}" for t, r in subclasses]
                       + (["call the module (self.layer(x))"] if any(not f.get("layer_type") for f in found) else []))
    return (f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} run as functions in "
            f"forward, not as module calls, and stay dense (counted in the MACs); to make such a layer {goal}, "
            f"{advice}")


def ruleless_leaves(gm: fx.GraphModule, rules: Registry | None = None) -> list[str]:
    """Type names of the leaf modules with weights of their own that no rule covers (``--leaf T``
    without ``--rule T=...``, and not a built-in layer type): their channels are frozen."""
    rules = rules or DEFAULT_RULES
    mods = dict(gm.named_modules())
    found: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = mods[node.target]
            if (rules.rule_for_module(m) is None and beyond_forward(m) is None
                    and isinstance(getattr(m, "weight", None), torch.Tensor)):
                found[type(m).__name__] = None
    return list(found)
