"""CLI commands of the transform stage: ``transform``, ``inspect``, ``zoo``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ..errors import UsageError
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


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def render_report(report: dict[str, Any], title: str) -> Table:
    """The per-layer table of a model report (see sparsify.report.layer_report)."""
    t = Table(title=title, title_justify="left")
    for col, just in (("layer", "left"), ("type", "left"), ("in→out", "right"), ("k", "right"),
                      ("params", "right"), ("MACs", "right"), ("density", "right"),
                      ("fan-in min/mean/max", "right"), ("CV", "right"), ("empty in/out", "right")):
        t.add_column(col, justify=just)
    for l in report["layers"]:
        k = "x".join(map(str, l["kernel"])) if l["kernel"] else "-"
        name = l["name"] + (" (classifier)" if l["classifier"] else "")
        t.add_row(name, l["type"], f"{l['in']}→{l['out']}", k, _fmt(l["params"]), _fmt(l["macs"]),
                  f"{l['density']:.3f}", f"{l['fan_in_min']}/{l['fan_in_mean']:.1f}/{l['fan_in_max']}",
                  f"{l['fan_in_cv']:.2f}", f"{l['empty_in']}/{l['empty_out']}")
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


@app.command()
@handle_errors
def transform(
    model: str = typer.Argument(..., help="zoo:NAME, torchvision:NAME, path/to/model.py, or path/to/model.py:FACTORY"),
    method: str = typer.Option("sparse-random", "--method", "-m",
                               help="sparse-random | psn | depth-multiplier | none"),
    density: Optional[float] = typer.Option(None, help="Fraction of live connections in (0, 1] (sparse-random, psn)"),
    alpha: Optional[float] = typer.Option(None, help="Channel multiplier in (0, 1] (depth-multiplier)"),
    divisor: Optional[int] = typer.Option(None, help="Round each scaled channel count to a multiple of this, "
                                          "MobileNet's rule (depth-multiplier; default: ceil(alpha * n))"),
    match: Optional[Path] = typer.Option(None, help="depth-multiplier: choose alpha so that the live parameters "
                                         "equal this run directory's (see --count)"),
    count: Optional[str] = typer.Option(None, help="With --match: which live parameters to equalise, "
                                        "conv (conv layers only) or total"),
    profile: Optional[str] = typer.Option(None, help="psn fan-in profile: uniform, linear, exponential, power, "
                                          "logistic, gaussian, cosine, step, lognormal, power-law"),
    profile_param: Optional[List[str]] = typer.Option(None, "--profile-param", help="NAME=VALUE, repeatable (e.g. sigma=1.5)"),
    allocation: str = typer.Option("uniform", help="Density per layer: uniform or erk"),
    include_linear: Optional[bool] = typer.Option(None, "--include-linear/--no-include-linear",
                                                  help="Mask linear layers too (default: psn yes; sparse-random only for models without convs)"),
    include_classifier: bool = typer.Option(False, help="Also mask the final classifier"),
    rescale_init: bool = typer.Option(True, help="Scale each unit's initial weights to its live fan-in "
                                      "(Kaiming for the connections it really has); --no-rescale-init keeps the dense init"),
    seed: int = typer.Option(0, help="Seed of the initial weights and of the masks"),
    input_shape: Optional[str] = typer.Option(None, help="Example input shape, e.g. 1,3,32,32 (default: from the model file or zoo)"),
    model_args: Optional[str] = typer.Option(None, help="JSON keyword arguments for the model factory"),
    leaf: Optional[List[str]] = typer.Option(None, "--leaf", help="Module type to keep opaque when tracing, repeatable"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<model>-<method>-<param>)"),
    force: bool = typer.Option(False, help="Replace an existing non-empty output directory"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Rewrite a model into a sparse (or thinner) graph and save it as a replayable run directory."""
    from ..api import transform_to_dir

    path, result = transform_to_dir(
        model, method, out=out_dir, force=force, density=density, alpha=alpha, divisor=divisor, match=match,
        count=count, profile=profile,
        profile_params=_kv_args(profile_param), allocation=allocation, include_linear=include_linear,
        include_classifier=include_classifier, rescale_init=rescale_init, seed=seed,
        input_shape=parse_shape(input_shape),
        model_args=_json_arg(model_args, "--model-args"), leaf_modules=leaf or [],
    )
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
    out.print(f"[green]saved[/] {path}")


@app.command()
@handle_errors
def inspect(
    target: str = typer.Argument(..., help="A run directory, a model (zoo:NAME, model.py[:FACTORY]) or an .onnx file"),
    input_shape: Optional[str] = typer.Option(None, help="Input shape for a model file without one, e.g. 1,3,32,32"),
    model_args: Optional[str] = typer.Option(None, help="JSON keyword arguments for the model factory"),
    leaf: Optional[List[str]] = typer.Option(None, "--leaf", help="Module type to keep opaque when tracing"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Per-layer report: live parameters and MACs, density, fan-in, empty channels, totals vs dense."""
    from ..api import inspect as inspect_api

    report = inspect_api(target, input_shape=parse_shape(input_shape),
                         model_args=_json_arg(model_args, "--model-args"), leaf_modules=leaf or [])
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    if str(target).endswith(".onnx"):
        from ..runtime.onnx_inspect import render_onnx_report

        out.print(render_onnx_report(report))
        return
    out.print(render_report(report, f"{report.get('model', target)} · {report.get('method', 'dense')}"))
    print_totals(report)


@app.command()
@handle_errors
def zoo() -> None:
    """List the built-in models (use them as zoo:NAME)."""
    from .. import zoo as zoo_

    t = Table(title="sparsify zoo")
    for c in ("name", "input", "classes", "description"):
        t.add_column(c)
    for name in zoo_.names():
        e = zoo_.get(name)
        t.add_row(f"zoo:{name}", "x".join(map(str, e.input_shape)), str(e.num_classes), e.description)
    out.print(t)
