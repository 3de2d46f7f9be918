"""Statistics of removal experiments: the bootstrap mean of margin drops, the calibration
slope left on held-out targets, and the smallest support that flips a datamodel's sign.
"""
from __future__ import annotations

import numpy as np


def bootstrap_mean(D: np.ndarray, n_boot: int, seed: int) -> tuple[float, list[float]]:
    """Mean of D [targets, masks] (NaN ignored) and its 95% interval, resampling targets and
    masks independently (two-level bootstrap: both vary between repeats of the experiment)."""
    mean = float(np.nanmean(D))
    if D.size < 2:
        return mean, [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    ti = rng.integers(0, D.shape[0], size=(n_boot, D.shape[0]))
    ji = rng.integers(0, D.shape[1], size=(n_boot, D.shape[1]))
    means = np.nanmean(D[ti[:, :, None], ji[:, None, :]].reshape(n_boot, -1), axis=1)
    lo, hi = np.nanpercentile(means, [2.5, 97.5])
    return mean, [float(lo), float(hi)]


def held_out_slope(p: np.ndarray, a: np.ndarray, target: np.ndarray) -> dict:
    """Calibration by retraining, cross-validated over targets: {"scale": the through-origin
    slope of actual `a` on predicted `p` over all cells, "held_out_slope": the slope of `a` on
    p scaled, for each target's cells, by the slope of the other targets' cells}. None where a
    slope is undefined (fewer than two targets, or no predicted drop)."""
    scale = float(p @ a / (p @ p)) if p @ p > 0 else None
    if len(np.unique(target)) < 2 or scale is None:
        return {"scale": scale, "held_out_slope": None}
    q = np.empty_like(p)
    for t in np.unique(target):
        rest = target != t
        pr = p[rest]
        c = pr @ a[rest] / (pr @ pr) if pr @ pr > 0 else np.nan
        q[~rest] = c * p[~rest]
    ok = np.isfinite(q)
    qq = q[ok] @ q[ok]
    return {"scale": scale, "held_out_slope": float(q[ok] @ a[ok] / qq) if qq > 0 else None}


def support_sizes(W: np.ndarray, b: np.ndarray, alpha: float, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(k* per target, the greedy order [T, k_max]): the fewest examples, taken by decreasing
    weight, whose removal brings the datamodel's expected margin over α-masks,
    b + α Σ_{i ∉ R} w_i, below zero; k* = 0 where it is not above zero to begin with and
    k_max + 1 where k_max examples do not suffice."""
    order = np.argsort(-W, axis=1, kind="stable")[:, :k_max]
    top = np.take_along_axis(W, order, axis=1)
    expected = b + alpha * W.sum(1)
    remaining = expected[:, None] - alpha * np.cumsum(np.maximum(top, 0), axis=1)
    below = remaining < 0
    k = np.where(below.any(1), below.argmax(1) + 1, k_max + 1)
    k[expected <= 0] = 0
    return k, order
