"""CLI commands of the transform stage: ``transform``, ``inspect``, ``zoo``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..errors import UsageError
from ..methods import method_help
from ._common import app, err, handle_errors, out, parse_shape


def _json_arg(text: Optional[str], flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} is not valid JSON ({e.msg}); write e.g. {flag} '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object such as '{{\"num_classes\": 10}}'")
    return value


def _kv_args(items: Optional[List[str]]) -> dict[str, float]:
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise UsageError(f"--profile-param {item!r} is not NAME=NUMBER; write e.g. --profile-param sigma=1.5")
    return params


def _rule_args(items: Optional[List[str]]) -> dict[str, str] | None:
    from ..passes.rules import rule_names

    rules = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or value.strip() not in rule_names():
            raise UsageError(f"--rule {item!r} is not TYPE=RULE with RULE one of {', '.join(rule_names())}; "
                             "write e.g. --rule SameConv=conv")
        rules[key.strip()] = value.strip()
    return rules or None


def _fmt(n: float) -> str:
    """Three significant digits with a k/M/G suffix: 57, 885k, 24.6k, 1.57M."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1)):
        if abs(n) >= div or unit == "":
            v = n / div
            digits = 0 if abs(v) >= 100 or (unit == "" and float(v).is_integer()) else 1 if abs(v) >= 10 else 2
            return f"{v:.{digits}f}{unit}"
    return str(n)


def _op(layer: dict[str, Any]) -> str:
    """``conv 3x3``, ``dw 3x3`` (depthwise), ``group 3x3`` (grouped) or ``linear``."""
    if not layer["kernel"]:
        return "linear"
    groups = layer.get("groups", 1)
    kind = "conv" if groups == 1 else "dw" if groups == layer["in"] else "group"
    return f"{kind} {'x'.join(map(str, layer['kernel']))}"


def render_report(report: dict[str, Any], title: str, width: int | None = None) -> Table:
    """The per-layer table of a model report (see sparsify.report.layer_report), readable in 80 columns.

    Layer names are the one column that gives way (folded onto a second line) to fit ``width``
    (default: the terminal's); ``--json`` has every field (fan-in min/max, dense counts, ...).
    """
    headers = ("op", "in→out", "params", "MACs", "density", "fan-in", "CV", "empty")
    rows = []
    for l in report["layers"]:
        rows.append([l["name"] + ("*" if l["classifier"] else ""), _op(l), f"{l['in']}→{l['out']}", _fmt(l["params"]),
                     _fmt(l["macs"]), f"{l['density']:.3f}", f"{l['fan_in_mean']:.{0 if l['fan_in_mean'] >= 100 else 1}f}", f"{l['fan_in_cv']:.2f}",
                     f"{l['empty_in']}/{l['empty_out']}"])
    # layers the forward runs as functions (F.conv2d(x, w)) or as dense frozen leaves (a weight_norm
    # parametrization): dense, counted in the totals' MACs
    outside = report.get("functional") or []
    for f in outside:
        shape = f["shape"]
        name = f["weight"].removesuffix(".weight") + ("^" if f.get("leaf") else "()")
        op, io = (_op(f), f"{f['in']}→{f['out']}") if f.get("leaf") else (f["op"], f"{shape[1]}→{shape[0]}")
        rows.append([name, op, io, "-", _fmt(f["macs"]), "1.000", "-", "-", "-"])
    others = sum(max([len(h)] + [len(r[i + 1]) for r in rows]) + 1 for i, h in enumerate(headers))
    longest = max([len("layer")] + [len(r[0]) for r in rows])
    room = max(8, (width or out.size.width) - others - 1)
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0),
              pad_edge=False, collapse_padding=True,
              caption="*: classifier; fan-in: mean live inputs per unit; empty: channels in/out"
              + ("; (): runs as a function, dense" if any(not f.get("leaf") for f in outside) else "")
              + ("; ^: kept dense (parametrized weight or hooks)" if any(f.get("leaf") for f in outside) else ""),
              caption_justify="left")
    t.add_column("layer", overflow="fold", max_width=min(longest, room))
    for col in headers:
        t.add_column(col, justify="left" if col == "op" else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    return t


def print_totals(report: dict[str, Any]) -> None:
    tot, ratios = report["totals"], report.get("ratios") or {}

    def r(key: str) -> str:
        return f"  ({ratios[key]:.3f}x of dense)" if ratios.get(key) else ""

    out.print(f"params      {tot['params']:>12,}{r('params')}")
    out.print(f"  w/o clf   {tot['params_no_classifier']:>12,}{r('params_no_classifier')}")
    out.print(f"MACs        {tot['macs']:>12,}{r('macs')}")
    out.print(f"  w/o clf   {tot['macs_no_classifier']:>12,}{r('macs_no_classifier')}")
    out.print(f"sparse layers {tot['sparse_layers']}/{tot['weight_layers']}, "
              f"empty channels in/out {tot['empty_in']}/{tot['empty_out']}")


# The transform options, declared once: `sparsify transform` and `sparsify run` take the same ones.
# The method's names and the checks of its parameters come from sparsify.methods.
MODEL = typer.Argument(..., help="zoo:NAME, torchvision:NAME, path/to/model.py, or path/to/model.py:FACTORY")
METHOD = typer.Option("sparse-random", "--method", "-m", help=method_help())
ALPHA = typer.Option(None, help="Channel multiplier in (0, 1] (depth-multiplier)")
DIVISOR = typer.Option(None, help="Round each scaled channel count to a multiple of this, "
                       "MobileNet's rule (depth-multiplier; default: ceil(alpha * n))")
MATCH = typer.Option(None, help="depth-multiplier: choose alpha so that the live parameters "
                     "equal this run directory's (see --count)")
COUNT = typer.Option(None, help="With --match: which live parameters to equalise, conv (conv layers only) or total")
PROFILE = typer.Option(None, help="psn fan-in profile: uniform, linear, exponential, power, "
                       "logistic, gaussian, cosine, step, lognormal, power-law")
PROFILE_PARAM = typer.Option(None, "--profile-param", help="NAME=VALUE, repeatable (e.g. sigma=1.5)")
ALLOCATION = typer.Option("uniform", help="Density per layer: uniform or erk")
BLOCK = typer.Option(None, "--block", help="Output channels of a conv that share one random fan-in (block "
                     "sparsity, Elsen et al. 2020; sparse-random and psn; default 1). 4 lets the native kernel feed "
                     "four FMAs from each loaded input vector: 1x1 and strided 3x3 convs run about 1.5-2x faster at "
                     "the same density. Convs too sparse for blocks (every input read by some block) keep 1")
INCLUDE_LINEAR = typer.Option(None, "--include-linear/--no-include-linear",
                              help="Mask linear layers too (default: psn yes; sparse-random only for models without convs)")
INCLUDE_CLASSIFIER = typer.Option(False, help="Also mask the final classifier")
RESCALE_INIT = typer.Option(None, "--rescale-init/--no-rescale-init",
                            help="Scale each unit's initial weights to its live fan-in (Kaiming "
                                 "for the connections it really has). Default: on, off with --weights")
WEIGHTS = typer.Option(None, "--weights", help="Start from these trained weights: a state dict "
                       "in .pt/.pth (torch.save) or .safetensors; the masks apply to them")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,32,32; \"S1;S2\" for a model "
                           "with several inputs (default: from the model file or zoo)")
MODEL_ARGS = typer.Option(None, "--model-args", help="JSON keyword arguments for the model factory")
LEAF = typer.Option(None, "--leaf", help="Module type to keep opaque when tracing, repeatable")
RULE = typer.Option(None, "--rule", help="TYPE=RULE: how a leaf module type treats "
                    "channels (conv, linear, elementwise, frozen), repeatable")


def transform_options(*, method: str, density: Optional[float], alpha: Optional[float], divisor: Optional[int],
                      match: Optional[Path], count: Optional[str], profile: Optional[str],
                      profile_param: Optional[List[str]], allocation: str, block: Optional[int],
                      include_linear: Optional[bool],
                      include_classifier: bool, rescale_init: Optional[bool], weights: Optional[Path], seed: int,
                      input_shape: Optional[str], model_args: Optional[str], leaf: Optional[List[str]],
                      rule: Optional[List[str]]) -> dict[str, Any]:
    """The keyword arguments of ``sparsify.api.transform`` from the transform options' values."""
    return dict(method=method, density=density, alpha=alpha, divisor=divisor, match=match, count=count,
                profile=profile, profile_params=_kv_args(profile_param), allocation=allocation, block=block,
                include_linear=include_linear, include_classifier=include_classifier, rescale_init=rescale_init,
                seed=seed, weights=weights, input_shape=parse_shape(input_shape),
                model_args=_json_arg(model_args, "--model-args"), leaf_modules=leaf or [], rules=_rule_args(rule))


@app.command()
@handle_errors
def transform(
    model: str = MODEL,
    method: str = METHOD,
    density: Optional[float] = typer.Option(None, help="Fraction of live connections in (0, 1] (sparse-random, psn)"),
    alpha: Optional[float] = ALPHA,
    divisor: Optional[int] = DIVISOR,
    match: Optional[Path] = MATCH,
    count: Optional[str] = COUNT,
    profile: Optional[str] = PROFILE,
    profile_param: Optional[List[str]] = PROFILE_PARAM,
    allocation: str = ALLOCATION,
    block: Optional[int] = BLOCK,
    include_linear: Optional[bool] = INCLUDE_LINEAR,
    include_classifier: bool = INCLUDE_CLASSIFIER,
    rescale_init: Optional[bool] = RESCALE_INIT,
    weights: Optional[Path] = WEIGHTS,
    seed: int = typer.Option(0, help="Seed of the initial weights and of the masks"),
    input_shape: Optional[str] = INPUT_SHAPE,
    model_args: Optional[str] = MODEL_ARGS,
    leaf: Optional[List[str]] = LEAF,
    rule: Optional[List[str]] = RULE,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<model>-<method>-<param>)"),
    force: bool = typer.Option(False, help="Replace an existing run directory at --out (a folder without recipe.json is never replaced)"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Rewrite a model into a sparse (or thinner) graph and save it as a replayable run directory."""
    from ..api import transform_to_dir

    options = transform_options(
        method=method, density=density, alpha=alpha, divisor=divisor, match=match, count=count, profile=profile,
        profile_param=profile_param, allocation=allocation, block=block, include_linear=include_linear,
        include_classifier=include_classifier, rescale_init=rescale_init, weights=weights, seed=seed,
        input_shape=input_shape, model_args=model_args, leaf=leaf, rule=rule)
    path, result = transform_to_dir(model, out=out_dir, force=force, **options)
    if as_json:
        out.print_json(json.dumps({"run_dir": str(path), **result.summary}))
        return
    out.print(render_report(result.summary, f"{result.recipe.model} · {method} · {json.dumps(result.recipe.params)}"))
    print_totals(result.summary)
    for note in result.summary.get("notes", []):
        err.print(f"note: {note}", highlight=False)
    matched = result.recipe.params.get("match")
    if matched:
        out.print(f"alpha {result.recipe.params['alpha']:g}: {matched['achieved']:,} live {matched['count']} "
                  f"parameters (target {matched['target']:,} from {matched['run']})", highlight=False)
    out.print(f"[green]saved[/] {escape(str(path))}", markup=True)


@app.command()
@handle_errors
def inspect(
    target: str = typer.Argument(..., help="A run directory, a model (zoo:NAME, model.py[:FACTORY]) or an .onnx file"),
    input_shape: Optional[str] = typer.Option(None, help="Input shape for a model file without one, e.g. 1,3,32,32"),
    model_args: Optional[str] = typer.Option(None, help="JSON keyword arguments for the model factory"),
    leaf: Optional[List[str]] = typer.Option(None, "--leaf", help="Module type to keep opaque when tracing"),
    rule: Optional[List[str]] = typer.Option(None, "--rule", help="TYPE=RULE for a leaf module type, repeatable"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Per-layer report: live parameters and MACs, density, fan-in, empty channels, totals vs dense."""
    from ..api import inspect as inspect_api

    report = inspect_api(target, input_shape=parse_shape(input_shape),
                         model_args=_json_arg(model_args, "--model-args"), leaf_modules=leaf or [],
                         rules=_rule_args(rule))
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    if str(target).endswith(".onnx"):
        from ..runtime.onnx_inspect import render_onnx_report

        out.print(render_onnx_report(report, width=out.size.width))
        return
    out.print(render_report(report, f"{report.get('model', target)} · {report.get('method', 'dense')}"))
    print_totals(report)
    groups = report.get("channel_groups") or []
    free = sum(1 for g in groups if not g["frozen"])
    if groups:
        out.print(f"channel groups: {len(groups)} ({free} resizable)")
    for g in groups:
        layers = ", ".join(g["layers"][:3]) + (" ..." if len(g["layers"]) > 3 else "")
        if g["frozen"]:
            out.print(f"  frozen  {g['size']:>5} ch  {layers}: {g['frozen'][0]}", highlight=False)
        elif g["whole"] or g["multiple"] > 1:
            why = g["whole"][0] if g["whole"] else f"multiple of {g['multiple']}"
            out.print(f"  whole   {g['size']:>5} ch  {layers}: {why}", highlight=False)


@app.command()
@handle_errors
def zoo(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON (instead of the table)."),
) -> None:
    """List the built-in models (use them as zoo:NAME)."""
    from .. import zoo as zoo_

    entries = [(name, zoo_.get(name)) for name in zoo_.names()]
    if as_json:
        out.print_json(json.dumps([{"model": f"zoo:{name}", "input_shape": list(e.input_shape),
                                    "num_classes": e.num_classes, "description": e.description}
                                   for name, e in entries]))
        return
    t = Table(title="sparsify zoo")
    for c in ("name", "input", "classes", "description"):
        t.add_column(c)
    for name, e in entries:
        t.add_row(f"zoo:{name}", "x".join(map(str, e.input_shape)), str(e.num_classes), e.description)
    out.print(t)
