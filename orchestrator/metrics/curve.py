"""The LDS-against-models curve and its forecast: LDS(m) = a / sqrt(1 + d·m^(-c)), fitted by
least squares to the points measured so far (rounds of training, or prefixes of one ledger).

Why this form: a datamodel fit on m models predicts the true linear response plus an
estimation error whose variance falls as a power of m (d·m^(-c), relative to the response's);
its correlation with the true response is then 1/sqrt(1 + d·m^(-c)), and the LDS is that times
a, the LDS of the exact linear response (the limit as m grows). On the embedded default's
curve it forecast the LDS at 4,000 models from the rounds up to 1,000 within 0.01, where the
plain power law a - b·m^(-c) was 0.026-0.032 too high (bench/RESULTS.md, issue 28).

Its interval comes from a bootstrap over targets: the targets are resampled, each round's
mean LDS recomputed over the same resample, and the curve refitted. Arrays in, numbers out.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

C_BOUNDS = (0.05, 3.0)     # the exponent c: from almost flat gains to a fast saturation


def fit_curve(models, lds) -> tuple[float, float, float] | None:
    """(a, d, c) of LDS(m) = a / sqrt(1 + d·m^(-c)) through the points (models, lds), or None
    with fewer than 3 points or no fit. With exactly 3 points the curve goes through them."""
    from scipy.optimize import curve_fit
    m = np.asarray(models, np.float64)
    y = np.asarray(lds, np.float64)
    ok = np.isfinite(y) & (m > 0)
    m, y = m[ok], y[ok]
    if len(m) < 3:
        return None
    scale = float(m.min())
    x = m / scale                     # d is then about (a / LDS)^2 - 1 at the first point

    def f(x, a, d, c):
        return a / np.sqrt(1.0 + d * np.power(x, -c))

    best = None
    for c0 in (0.5, 1.0, 1.5):        # a few starts: least squares in c has local minima
        a0 = min(1.0, float(y.max()) + 0.05)
        first = max(float(y[np.argmin(x)]), 1e-3)
        d0 = max((a0 / first) ** 2 - 1.0, 1e-3)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, _ = curve_fit(f, x, y, p0=(a0, d0, c0), bounds=((1e-6, 0.0, C_BOUNDS[0]), (1.0, 1e6, C_BOUNDS[1])),
                                 maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        err = float(np.sum((f(x, *p) - y) ** 2))
        if best is None or err < best[0]:
            best = (err, p)
    if best is None:
        return None
    a, d, c = (float(v) for v in best[1])
    return a, d * scale ** c, c       # back to m itself: d·(m/scale)^(-c) = (d·scale^c)·m^(-c)


def curve_at(params: tuple[float, float, float], m) -> np.ndarray:
    a, d, c = params
    return a / np.sqrt(1.0 + d * np.power(np.asarray(m, np.float64), -c))


def models_for(params: tuple[float, float, float], lds: float) -> float:
    """The models at which the curve reaches `lds` (inf when its limit a is not above it)."""
    a, d, c = params
    if a <= lds:
        return math.inf
    if lds <= 0:
        return 0.0
    return float((d / ((a / lds) ** 2 - 1.0)) ** (1.0 / c))


def gain_per_doubling(m0: float, lds0: float, m1: float, lds1: float) -> float:
    """The LDS gained from m0 to m1 models, per doubling of the models."""
    return (lds1 - lds0) / max(math.log2(m1 / m0), 1e-12)


def forecast(models, per_target, at=(), target: float | None = None, n_boot: int = 200,
             seed: int = 0) -> dict | None:
    """The curve through the rounds so far and what it says: the LDS expected at each count in
    `at`, and the models expected to reach `target`, each with a 95% bootstrap interval over
    targets. models: [R] counts; per_target: [R, T] each round's LDS per target (NaN where a
    target's LDS is undefined). None with fewer than 3 rounds."""
    P = np.asarray(per_target, np.float64)
    means = np.nanmean(P, axis=1)
    params = fit_curve(models, means)
    if params is None:
        return None
    out: dict = {"from_models": [int(m) for m in models], "curve": {"a": params[0], "d": params[1], "c": params[2]},
                 "lds_at": {}, "models_for": None}
    rng = np.random.default_rng(seed)
    T = P.shape[1]
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, T, size=T)
        p = fit_curve(models, np.nanmean(P[:, pick], axis=1))
        if p is not None:
            boots.append(p)

    def interval(values) -> list[float]:
        v = np.asarray([x for x in values if np.isfinite(x)])
        if len(v) < max(10, n_boot // 4):
            return [float("nan"), float("nan")]
        lo, hi = np.percentile(v, [2.5, 97.5])
        return [float(lo), float(hi)]

    for m in at:
        out["lds_at"][str(int(m))] = {"mean": float(curve_at(params, m)),
                                      "ci95": interval([float(curve_at(p, m)) for p in boots])}
    if target is not None:
        need = models_for(params, target)
        ci = interval([models_for(p, target) for p in boots])
        # a resample whose curve never reaches the target makes the interval open above
        reach = np.mean([math.isfinite(models_for(p, target)) for p in boots]) if boots else 0.0
        out["models_for"] = {"lds": float(target), "models": need, "ci95": ci, "share_reaching": float(reach)}
    out["limit"] = {"mean": params[0], "ci95": interval([p[0] for p in boots])}
    return out
