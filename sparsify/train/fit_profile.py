"""``sparsify fit-profile``: fit lognormal and power-law laws to the fan-in a dynamic run converged to.

The PSN paper finds that RigL converges to a characteristic fan-in distribution and that a new
run started at that equilibrium (a PSN lognormal profile) does better than ERK. The fits are
scale-free, like the profiles in ``sparsify.profiles``: lognormal ``sigma`` is the standard
deviation of log fan-in around each layer's own log-mean (pooled over layers), and the power-law
``exponent`` is the maximum-likelihood Pareto tail index of fan-in over each layer's smallest
non-zero fan-in. Kolmogorov-Smirnov distances say which law fits better. Closed forms, no scipy.
"""
from __future__ import annotations

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


def fit_profile(run_dir: str | Path) -> dict[str, Any]:
    """Fit the fan-in distribution of a (trained) run and build the transform command that starts there."""
    run = load_run(run_dir)
    layers = sparse_modules(run.model)
    if not layers:
        raise UsageError(f"{run_dir} has no sparse layers; fit-profile needs a run made by a sparse method")
    fan_ins = {n: m.fan_in().detach().cpu().numpy() for n, m in layers.items() if m.mask.shape[1] >= MIN_FAN_IN_MAX}
    fit = fit_fan_ins(fan_ins)
    live = sum(int(m.mask.sum()) for m in layers.values())
    density = live / sum(m.mask.numel() for m in layers.values())
    params = run.recipe.params or {}
    profile, pname, pval = (("lognormal", "sigma", fit["lognormal"]["sigma"]) if fit["best"] == "lognormal"
                            else ("power-law", "exponent", fit["power_law"]["exponent"]))
    args = ["sparsify", "transform", run.recipe.model, "--method", "psn", "--profile", profile,
            "--profile-param", f"{pname}={pval:.3g}", "--density", f"{params.get('density', density):.4g}"]
    if params.get("allocation", "uniform") != "uniform":
        args += ["--allocation", str(params["allocation"])]
    if params.get("include_linear"):
        args += ["--include-linear"]
    if params.get("include_classifier"):
        args += ["--include-classifier"]
    args += ["--seed", str(run.recipe.seed), "--out", f"{Path(run_dir).name}-psn"]
    fit["density"] = density
    fit["command"] = shlex.join(args)
    trained = (run.summary.get("train") or {}).get("config", {}).get("schedule")
    fit["trained_with"] = trained
    return fit
