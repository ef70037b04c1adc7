"""``sparsify fit-profile``: fit lognormal and power-law laws to the fan-in a dynamic run converged to.

The PSN paper finds that RigL converges to a characteristic fan-in distribution and that a new
run started at that equilibrium (a PSN lognormal profile) does better than ERK. The fits are
scale-free, like the profiles in ``sparsify.profiles``: lognormal ``sigma`` is the standard
deviation of log fan-in around the layer's log-mean, per layer (``layers[NAME]["sigma"]``, what
the printed command uses: layers differ) and pooled over layers (for the KS test), and the power-law
``exponent`` is the maximum-likelihood Pareto tail index of fan-in over each layer's smallest
non-zero fan-in. Kolmogorov-Smirnov distances say which law fits better. Closed forms, no scipy.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..nn import sparse_modules
from ..rundir import load_run

MIN_FAN_IN_MAX = 4  # layers whose units have fewer possible inputs carry no shape information


def _ks(sample: np.ndarray, cdf: Any) -> float:
    x = np.sort(sample)
    n = len(x)
    f = cdf(x)
    hi = np.arange(1, n + 1) / n
    lo = np.arange(0, n) / n
    return float(max(np.max(hi - f), np.max(f - lo)))


def fit_fan_ins(fan_ins: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fit both laws to per-layer fan-in arrays; zero fan-ins are counted, not fitted."""
    logs, ratios, per_layer = [], [], {}
    for name, f in fan_ins.items():
        f = np.asarray(f, dtype=np.float64)
        pos = f[f > 0]
        rec: dict[str, Any] = {"units": int(f.size), "empty": int((f == 0).sum()),
                               "mean": float(f.mean()) if f.size else 0.0,
                               "cv": float(f.std() / f.mean()) if f.size and f.mean() > 0 else 0.0}
        if pos.size >= 2:
            lg = np.log(pos)
            rec["sigma"] = float(lg.std())
            logs.append(lg - lg.mean())
            ratios.append(pos / pos.min())
        per_layer[name] = rec
    if not logs:
        raise UsageError("no sparse layer has enough units with live inputs to fit a fan-in distribution")
    z = np.concatenate(logs)
    if float(np.abs(z).max()) < 1e-9:  # was "exponent=inf" and a PSN command with sigma=6.66e-16
        raise UsageError("every unit of each sparse layer has the same fan-in, so there is no distribution to fit; "
                         "fit a run whose training moved connections (--schedule rigl, set or sparse-momentum)")
    sigma = float(z.std())
    x = np.concatenate(ratios)
    log_sum = float(np.log(x).sum())
    exponent = float(len(x) / log_sum) if log_sum > 0 else math.inf
    normal_cdf = np.vectorize(lambda v: 0.5 * (1.0 + math.erf(v / (sigma * math.sqrt(2.0))))) if sigma > 0 else None
    ks_lognormal = _ks(z, normal_cdf) if normal_cdf is not None else 1.0
    ks_power = _ks(x, lambda v: 1.0 - v ** (-exponent)) if math.isfinite(exponent) else 1.0
    return {
        "layers": per_layer,
        "lognormal": {"sigma": sigma, "ks": ks_lognormal},
        "power_law": {"exponent": exponent, "ks": ks_power},
        "best": "lognormal" if ks_lognormal <= ks_power else "power-law",
        "units": int(len(z)),
    }


def _train_options(config: dict[str, Any]) -> list[str]:
    """``sparsify train`` options for the trained run's settings that differ from the defaults
    (``TrainConfig.cli_args``: flags that exist, booleans as --X / --no-X), but for the ones the PSN
    experiment sets itself (schedule, init, profile, seed); the pilot schedule's own settings only
    when it was RigL too (an incremental pilot's ``--double-every``: train refuses it with RigL); the
    data folder too (mnist kept under a --data-dir of its own was not found without it)."""
    import dataclasses

    from .schedules import schedule_class
    from .trainer import TrainConfig

    carried = {f.name for f in dataclasses.fields(TrainConfig)} - {"params", "unused", "seed"}
    if config.get("schedule") == "rigl":
        carried |= set(schedule_class("rigl").Params.names()) - {"init", "init_profile", "init_profile_params"}
    # as a RigL config: its flags are those away from RigL's defaults (the command gives --schedule rigl)
    return TrainConfig.from_dict({k: v for k, v in config.items() if k in carried} | {"schedule": "rigl"}).cli_args()


def psn_command(run: Any, run_dir: str | Path, sigmas: dict[str, float], layer_names: list[str],
                density: float) -> str:
    """The PSN experiment from this run's equilibrium: a fresh run of the same model and budget, trained
    with RigL from ERK budgets and a lognormal fan-in profile with each layer's own sigma."""
    params = run.recipe.params or {}
    name = str(Path(run_dir).parent / f"{Path(run_dir).name}-psn")  # beside the run: runs/X -> runs/X-psn
    recipe = run.recipe
    t = ["sparsify", "transform", recipe.model, "--method", "sparse-random",
         "--density", f"{params.get('density', density):.4g}",
         # the run's own shape, tracing choices and budget rules: a model file without INPUT_SHAPE failed here
         "--input-shape", ";".join(",".join(str(d) for d in shape) for shape in recipe.shapes)]
    if recipe.model_args:
        t += ["--model-args", json.dumps(recipe.model_args)]
    for leaf in recipe.leaf_modules:
        t += ["--leaf", leaf]
    for module_type, rule in (recipe.rules or {}).items():
        if not rule.startswith("custom:"):  # custom Rule objects exist only in the user's Python
            t += ["--rule", f"{module_type}={rule}"]
    if params.get("allocation", "uniform") != "uniform":
        t += ["--allocation", str(params["allocation"])]
    if params.get("block", 1) != 1:
        t += ["--block", str(params["block"])]
    if params.get("include_linear"):
        t += ["--include-linear"]
    if params.get("include_classifier"):
        t += ["--include-classifier"]
    if params.get("rescale_init") is False:
        t += ["--no-rescale-init"]
    t += ["--seed", str(recipe.seed), "--out", name]
    trained = (run.summary.get("train") or {}).get("config") or {}
    r = ["sparsify", "train", name, "--schedule", "rigl", "--init", "erk", "--init-profile", "lognormal"]
    if any(n not in sigmas for n in layer_names):  # layers too small to fit take the mean of the others
        r += ["--init-profile-param", f"sigma={sum(sigmas.values()) / len(sigmas):.3g}"]
    for n in layer_names:
        if n in sigmas:
            r += ["--init-profile-param", f"sigma@{n}={sigmas[n]:.3g}"]
    r += _train_options(trained)
    if "seed" in trained:
        r += ["--seed", str(trained["seed"])]
    return f"{shlex.join(t)} && {shlex.join(r)}"


def fit_profile(run_dir: str | Path) -> dict[str, Any]:
    """Fit the fan-in distribution of a (trained) run and build the command that starts RigL there.

    Returns the per-layer statistics (``layers``: units, empty, mean, cv, sigma), the pooled fits
    (``lognormal``, ``power_law``, ``best``), ``sigma_per_layer``, and ``command``: the PSN
    experiment (PSN paper: RigL from ERK budgets with a lognormal profile matched to the equilibrium)
    as ``sparsify transform ... && sparsify train ... --schedule rigl --init erk --init-profile
    lognormal --init-profile-param sigma@LAYER=...``, with the trained run's data and settings.
    """
    run = load_run(run_dir)
    layers = sparse_modules(run.model)
    if not layers:
        raise UsageError(f"{run_dir} has no sparse layers; fit-profile needs a run made by a sparse method")
    fan_ins = {n: m.fan_in().detach().cpu().numpy() for n, m in layers.items() if m.mask.shape[1] >= MIN_FAN_IN_MAX}
    fit = fit_fan_ins(fan_ins)
    live = sum(int(m.mask.sum()) for m in layers.values())
    density = live / sum(m.mask.numel() for m in layers.values())
    sigmas = {n: rec["sigma"] for n, rec in fit["layers"].items() if "sigma" in rec}
    fit["density"] = density
    fit["sigma_per_layer"] = sigmas
    fit["command"] = psn_command(run, run_dir, sigmas, list(layers), density)
    trained = (run.summary.get("train") or {}).get("config", {}).get("schedule")
    fit["trained_with"] = trained
    return fit
