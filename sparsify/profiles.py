"""Fan-in profiles for Profiled Sparse Networks, and density allocation across layers.

A profile is a positive function on the unit interval. Unit ``u`` of ``n`` sits at
``x = (u + 0.5) / n`` and gets a fan-in proportional to ``f(x)``, scaled so that the layer's
budget is met exactly (largest-remainder rounding) with every fan-in in ``[1, fan_in_max]``.
``lognormal`` and ``power-law`` use the quantile functions of those distributions, so the fan-ins
of a layer are distributed lognormally / as a Pareto law.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

from .errors import UsageError

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Profile:
    """A named parametric family with its defaults."""

    name: str
    fn: Callable[..., np.ndarray]
    defaults: dict[str, float]
    doc: str


def _uniform(x: np.ndarray) -> np.ndarray:
    return np.ones_like(x)


def _linear(x: np.ndarray, slope: float) -> np.ndarray:
    return 1.0 + slope * x


def _exponential(x: np.ndarray, rate: float) -> np.ndarray:
    return np.exp(rate * x)


def _power(x: np.ndarray, p: float) -> np.ndarray:
    return x ** p


def _logistic(x: np.ndarray, k: float, x0: float, floor: float) -> np.ndarray:
    return floor + 1.0 / (1.0 + np.exp(-k * (x - x0)))


def _gaussian(x: np.ndarray, mu: float, width: float, floor: float) -> np.ndarray:
    return floor + np.exp(-((x - mu) ** 2) / (2 * width ** 2))


def _cosine(x: np.ndarray, amplitude: float, periods: float) -> np.ndarray:
    return 1.0 + amplitude * np.cos(2 * math.pi * periods * x)


def _step(x: np.ndarray, fraction: float, ratio: float) -> np.ndarray:
    return np.where(x < fraction, ratio, 1.0)


def _lognormal(x: np.ndarray, sigma: float) -> np.ndarray:
    z = np.array([_NORMAL.inv_cdf(float(v)) for v in x])
    return np.exp(sigma * z)


def _power_law(x: np.ndarray, exponent: float) -> np.ndarray:
    # Pareto quantile with tail index ``exponent``: heavier tail for smaller exponent.
    return (1.0 - x) ** (-1.0 / exponent)


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("uniform", _uniform, {}, "every unit gets the same fan-in"),
    Profile("linear", _linear, {"slope": 4.0}, "fan-in grows linearly: 1 + slope*x"),
    Profile("exponential", _exponential, {"rate": 3.0}, "fan-in grows as exp(rate*x)"),
    Profile("power", _power, {"p": 2.0}, "fan-in grows as x^p"),
    Profile("logistic", _logistic, {"k": 12.0, "x0": 0.5, "floor": 0.1}, "a sigmoid step of steepness k at x0"),
    Profile("gaussian", _gaussian, {"mu": 0.5, "width": 0.15, "floor": 0.1}, "a bump of hubs around mu"),
    Profile("cosine", _cosine, {"amplitude": 0.9, "periods": 1.0}, "periodic hubs: 1 + a*cos(2*pi*periods*x)"),
    Profile("step", _step, {"fraction": 0.1, "ratio": 10.0}, "the first fraction of units get ratio times the fan-in"),
    Profile("lognormal", _lognormal, {"sigma": 1.0}, "fan-ins distributed lognormally with shape sigma"),
    Profile("power-law", _power_law, {"exponent": 2.0}, "fan-ins distributed as a Pareto law with this tail exponent"),
)}


# Parameters that are scales or fractions: outside these ranges a profile is a different shape or none.
DOMAINS: dict[str, tuple[float, float, bool]] = {  # name: (low, high, low included)
    "sigma": (0.0, math.inf, True),
    "exponent": (0.0, math.inf, False),
    "width": (0.0, math.inf, False),
    "floor": (0.0, math.inf, True),
    "ratio": (0.0, math.inf, False),
    "fraction": (0.0, 1.0, False),
}


def profile_names() -> list[str]:
    return list(PROFILES)


def resolve_params(profile: str, params: dict[str, float] | None) -> dict[str, float]:
    """The profile's defaults overridden by ``params``; unknown names are a UsageError."""
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    p = PROFILES[profile]
    params = dict(params or {})
    unknown = set(params) - set(p.defaults)
    if unknown:
        allowed = ", ".join(p.defaults) or "none"
        raise UsageError(f"profile {profile!r} has no parameter {sorted(unknown)[0]!r} (parameters: {allowed})")
    bad = next((k for k, v in params.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)), None)
    if bad is not None:  # the API's {"sigma": "x"}; the CLI parses NAME=VALUE to numbers first
        raise UsageError(f"--profile-param {bad}={params[bad]!r}: {profile}'s {bad} must be a number")
    resolved = {**p.defaults, **{k: float(v) for k, v in params.items()}}
    for name, value in resolved.items():
        lo, hi, closed = DOMAINS.get(name, (-math.inf, math.inf, True))
        if not math.isfinite(value) or value < lo or (value == lo and not closed) or value > hi:
            bound = f">= {lo:g}" if closed else f"> {lo:g}"
            bound += f" and <= {hi:g}" if math.isfinite(hi) else ""
            raise UsageError(f"--profile-param {name}={value:g}: {profile}'s {name} must be {bound}")
    return resolved


def profile_weights(profile: str, n_units: int, params: dict[str, float] | None = None) -> np.ndarray:
    """Positive relative fan-ins of ``n_units`` units placed at the midpoints of [0, 1]."""
    args = resolve_params(profile, params)
    x = (np.arange(n_units) + 0.5) / n_units
    try:
        with np.errstate(all="raise"):
            w = np.asarray(PROFILES[profile].fn(x, **args), dtype=np.float64)
    except (ArithmeticError, ValueError):
        w = np.full(n_units, np.nan)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UsageError(f"profile {profile!r} with {args} is not positive and finite on [0, 1]; change its parameters")
    return np.maximum(w, 1e-12)


def scale_to_budget(weights: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    """Integers proportional to ``weights`` with sum exactly ``budget``, each in [lo, hi].

    Finds the scale s with sum(clip(s*w, lo, hi)) == budget by bisection, then rounds by largest
    remainder among the units not at a bound.
    """
    n = len(weights)
    if not n * lo <= budget <= n * hi:
        raise UsageError(f"a budget of {budget} cannot be split over {n} units with fan-in in [{lo}, {hi}]")
    w = np.asarray(weights, dtype=np.float64)
    a, b = 0.0, hi / w.min() + 1.0
    for _ in range(200):
        s = (a + b) / 2
        if np.clip(s * w, lo, hi).sum() < budget:
            a = s
        else:
            b = s
    real = np.clip(b * w, lo, hi)
    counts = np.floor(real).astype(np.int64)
    counts = np.clip(counts, lo, hi)
    missing = budget - int(counts.sum())
    remainder = real - counts
    order = np.argsort(-remainder, kind="stable")
    i = 0
    while missing > 0:
        u = order[i % n]
        if counts[u] < hi:
            counts[u] += 1
            missing -= 1
        i += 1
    while missing < 0:  # only if flooring overshot because of the lower bound
        u = order[::-1][i % n]
        if counts[u] > lo:
            counts[u] -= 1
            missing += 1
        i += 1
    return counts


def fan_in_counts(profile: str, n_units: int, fan_in_max: int, budget: int,
                  params: dict[str, float] | None = None) -> np.ndarray:
    """Per-unit fan-ins from ``profile`` summing exactly to ``budget``, each in [1, fan_in_max]."""
    return scale_to_budget(profile_weights(profile, n_units, params), budget, 1, fan_in_max)


def cv(values: Sequence[float] | np.ndarray) -> float:
    """Coefficient of variation (population std / mean); 0 for an empty or all-zero input."""
    v = np.asarray(values, dtype=np.float64)
    m = v.mean() if v.size else 0.0
    return float(v.std() / m) if m > 0 else 0.0


def random_mask(n_out: int, allowed: np.ndarray, live: int, rng: np.random.Generator,
                row_counts: np.ndarray | None = None) -> np.ndarray:
    """A 0/1 mask [n_out, n_in] with exactly ``live`` entries in the ``allowed`` input columns.

    The one mask-from-fan-in-counts draw: the transform's sparse-random and psn passes and the
    dynamic schedules' ``--init-profile`` use it.

    Every output row and every allowed column gets at least one entry (coverage first, drawn from
    random permutations), the rest uniformly at random; with ``row_counts`` each row ``u`` gets
    exactly ``row_counts[u]`` entries and columns not yet read are preferred.
    """
    n_in_total = int(allowed.max()) + 1 if allowed.size else 0
    mask = np.zeros((n_out, max(n_in_total, 1)), dtype=bool)
    m = len(allowed)
    if row_counts is None:
        cover = max(n_out, m)
        rows, cols = rng.permutation(n_out), rng.permutation(allowed)
        for t in range(min(cover, live)):
            mask[rows[t % n_out], cols[t % m]] = True
        rest = live - int(mask.sum())
        if rest > 0:
            free = np.flatnonzero(~mask[:, allowed].ravel())
            pick = rng.choice(free, size=rest, replace=False)
            r, c = np.divmod(pick, m)
            mask[r, allowed[c]] = True
        return mask
    # Vectorised: every column first takes one slot of a random row (rows have counts[u] slots),
    # then each row fills up with its lowest random keys; covered entries get key -1.
    counts = np.asarray(row_counts, dtype=np.int64)
    allowed = np.sort(allowed)
    slots = np.repeat(np.arange(n_out), counts)
    rng.shuffle(slots)
    cover = min(m, len(slots))
    keys = rng.random((n_out, m))
    keys[slots[:cover], rng.permutation(m)[:cover]] = -1.0
    order = np.argsort(keys, axis=1, kind="stable")
    take = np.arange(m)[None, :] < counts[:, None]
    mask[np.repeat(np.arange(n_out), counts), allowed[order[take]]] = True
    return mask


def empty_channels(entries: np.ndarray, groups: int = 1) -> tuple[int, int]:
    """``(empty_out, empty_in)`` of a 0/1 mask ``[n_out, n_in per group]``: outputs with fan-in 0,
    and inputs no output reads (input channel ``g*n_in + j`` is read only by group ``g``'s outputs)."""
    e = np.asarray(entries) != 0
    fan_out = e.reshape(groups, e.shape[0] // groups, e.shape[1]).sum(axis=1)
    return int((e.sum(axis=1) == 0).sum()), int((fan_out == 0).sum())


@dataclass(frozen=True)
class LayerShape:
    """What allocation needs of a layer: mask entries and the params each entry carries.

    ``kernel_size`` is a conv's spatial kernel (e.g. ``(3, 3)``, ``(1, 1)``); ``()`` for a linear
    layer. Left ``None`` it is read off ``kernel``: 1 is a linear layer, a square number k*k a
    k x k conv (give it explicitly for a 1x1 or a non-square conv).
    """

    name: str
    n_out: int
    n_in: int          # per group
    kernel: int = 1    # kh*kw for a conv (each mask entry carries that many weights)
    min_live: int = 1  # the layer cannot go below this many live mask entries
    kernel_size: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kernel_size is None:
            k = math.isqrt(self.kernel)
            if self.kernel != 1 and k * k != self.kernel:
                raise ValueError(f"{self.name}: kernel {self.kernel} is not square; give kernel_size")
            object.__setattr__(self, "kernel_size", () if self.kernel == 1 else (k, k))
        elif math.prod(self.kernel_size) != self.kernel:
            raise ValueError(f"{self.name}: kernel_size {self.kernel_size} does not hold {self.kernel} weights")

    @property
    def entries(self) -> int:
        return self.n_out * self.n_in

    @property
    def weights(self) -> int:
        return self.entries * self.kernel


def erk_weight(layer: LayerShape) -> float:
    """The Erdős–Rényi-Kernel density factor of a layer: sum(shape) / prod(shape).

    Evci et al. 2020 ("Rigging the Lottery", sect. 3): a conv's density scales with
    (n_in + n_out + k_h + k_w) / (n_in * n_out * k_h * k_w); a fully connected layer's as in
    Erdős–Rényi (Mocanu et al. 2018), (n_in + n_out) / (n_in * n_out), with no kernel terms.
    """
    shape = (layer.n_out, layer.n_in, *layer.kernel_size)
    return sum(shape) / math.prod(shape)


def allocate(layers: Sequence[LayerShape], density: float, mode: str = "uniform") -> dict[str, int]:
    """Live mask entries per layer so that live weights total ``density`` of all weights.

    ``uniform``: every layer at ``density``. ``erk`` (Evci et al. 2020, sect. 3): layer density
    ``eps * erk_weight(layer)``, with ``eps`` chosen so the live weights total ``density``; a
    layer the formula puts above 1 is made dense and ``eps`` is solved again over the rest.
    Each layer rounds to the nearest mask entry within [min_live, entries]. Raises UsageError
    for another ``mode``. The one ERK of the project: the transform's sparsity passes and the
    dynamic schedules' ``--init erk`` both call it.
    """
    if mode == "uniform":
        return {l.name: min(l.entries, max(l.min_live, round(density * l.entries))) for l in layers}
    if mode != "erk":
        raise UsageError(f"unknown allocation {mode!r}; choose uniform or erk")
    target = density * sum(l.weights for l in layers)
    raw = {l.name: erk_weight(l) for l in layers}
    dense: set[str] = set()
    while True:
        free_params = sum(l.weights for l in layers if l.name not in dense)
        budget = target - sum(l.weights for l in layers if l.name in dense)
        denom = sum(raw[l.name] * l.weights for l in layers if l.name not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [l.name for l in layers if l.name not in dense and eps * raw[l.name] > 1.0]
        if not over or free_params == 0:
            break
        dense.update(over)
    out = {}
    for l in layers:
        d = 1.0 if l.name in dense else eps * raw[l.name]
        out[l.name] = min(l.entries, max(l.min_live, round(d * l.entries)))
    return out
