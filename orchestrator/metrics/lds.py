"""The Linear Datamodeling Score: LDS(τ, x) = Spearman correlation, over eval masks S_j,
between the predicted output Σ_{i∈S_j} τ(x)_i + b_x and the actual margin averaged over the
mask's replicas; the mean over targets with a bootstrap 95% interval, and the MSE of the
predicted margins where a method predicts margins (datamodels). Arrays in, numbers out.
"""
from __future__ import annotations

import numpy as np


def rank_columns(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(a, axis=0)


def lds_per_target(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation per column of pred/actual [e, T]; NaN where a column is constant."""
    rp = rank_columns(pred)
    ra = rank_columns(actual)
    rp = rp - rp.mean(0)
    ra = ra - ra.mean(0)
    denom = np.sqrt((rp ** 2).sum(0) * (ra ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rp * ra).sum(0) / denom, np.nan)


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def score_method(X: np.ndarray, Y: np.ndarray, weights: np.ndarray, intercept, n_boot: int,
                 seed: int) -> tuple[dict, np.ndarray]:
    """LDS (and MSE if an intercept is given) of weights [T, n] on eval masks X [e, n]."""
    return score_blocks(X, Y, [(0, Y.shape[1], weights, intercept)], intercept is not None, n_boot, seed)


def score_blocks(X: np.ndarray, Y: np.ndarray, blocks, with_intercept: bool, n_boot: int,
                 seed: int) -> tuple[dict, np.ndarray]:
    """score_method over target blocks: `blocks` yields (a, b, weights [b - a, n], intercept
    [b - a] or None) covering targets 0..T-1 in order, so that one block of a method's
    weights is held at a time. The figures are score_method's on the whole array."""
    Xf = X.astype(np.float32)
    T = Y.shape[1]
    per_target = np.full(T, np.nan)
    sq, covered = 0.0, 0
    for a, b, weights, intercept in blocks:
        if a != covered:
            raise ValueError(f"target blocks out of order: [{a}, {b}) after {covered}")
        pred = Xf @ np.asarray(weights, np.float32).T
        if with_intercept:
            pred = pred + np.asarray(intercept, np.float32)[None, :]
            sq += float(np.sum((pred - Y[:, a:b]) ** 2, dtype=np.float64))
        per_target[a:b] = lds_per_target(pred, Y[:, a:b])
        covered = b
    if covered != T:
        raise ValueError(f"target blocks cover {covered} of {T} targets")
    lo, hi = bootstrap_ci(per_target, n_boot, seed)
    out = {"mean": float(np.nanmean(per_target)), "ci95": [lo, hi],
           "median": float(np.nanmedian(per_target)), "targets": int(np.isfinite(per_target).sum())}
    if with_intercept:
        out["mse"] = sq / Y.size
        out["margin_var"] = float(np.mean(Y.var(0)))
    return out, per_target
