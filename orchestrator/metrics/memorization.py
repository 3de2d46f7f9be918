"""Memorization from the subset models, and how well a ranking finds planted label errors.

Memorization of training example i (Feldman & Zhang's estimator, from the α-subset models the
ledger already holds): the mean of a model's value on i itself (its margin, or whether it gets
i right) over the models trained with i, minus the same mean over the models trained without
it. Its 95% interval comes from a bootstrap over models: each resample reweights the models by
multinomial counts, and the two means are recomputed from the reweighted sums, so one resample
costs four [B, m] × [m, n] products instead of a Python loop.

With masks of exactly α·n examples, a model that holds i holds one fewer of the others, so the
estimate is biased by about −Σ_j w_ij / (n − 1) where w_ij is j's effect on i's value: small
for n in the hundreds and up, and the same for every example to first order.

Detection: the AUC of a score for the planted errors (Mann-Whitney, ties counted half) and the
fraction of them found in the top q of the examples inspected in the score's order (ties by
id, lowest first), with intervals from a bootstrap over examples stratified by the truth.
Arrays in, numbers out.
"""
from __future__ import annotations

import warnings

import numpy as np

_BLOCK = 256     # example columns per bootstrap product


def memorization(X: np.ndarray, V: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per training example: mean of V over the models whose mask holds it, minus the mean over
    the models whose mask does not. X: bool [m, n] masks; V: [m, n] each model's value on each
    training example. Returns {"value": [n], "ci95": [n, 2], "in_models": [n], "out_models": [n]};
    NaN where an example is in every model or in none."""
    X = np.asarray(X, bool)
    V = np.asarray(V, np.float64)
    if X.shape != V.shape or X.ndim != 2:
        raise ValueError(f"masks {X.shape} and values {V.shape} must both be [models, examples]")
    m, n = X.shape
    inside = X.sum(0).astype(np.float64)
    outside = m - inside
    value = _difference((V * X).sum(0), inside, (V * ~X).sum(0), outside)
    ci = np.full((n, 2), np.nan)
    if n_boot > 0 and m > 1:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(np.float64)   # [B, m]
        for a in range(0, n, _BLOCK):
            b = min(n, a + _BLOCK)
            Xi = X[:, a:b].astype(np.float64)
            Vb = V[:, a:b]
            boots = _difference(counts @ (Vb * Xi), counts @ Xi, counts @ (Vb * (1.0 - Xi)), counts @ (1.0 - Xi))
            with warnings.catch_warnings():      # an example in every resampled model: all-NaN column
                warnings.simplefilter("ignore", RuntimeWarning)
                ci[a:b] = np.nanpercentile(boots, [2.5, 97.5], axis=0).T
    return {"value": value, "ci95": ci, "in_models": inside.astype(np.int64), "out_models": outside.astype(np.int64)}


def _difference(in_sum, in_count, out_sum, out_count) -> np.ndarray:
    """(in_sum / in_count) − (out_sum / out_count), sums already taken over the models; NaN
    where a count is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.asarray(in_sum / in_count - out_sum / out_count, np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


def order(scores: np.ndarray) -> np.ndarray:
    """Example ids from the highest score to the lowest; ties by id, lowest first; NaN last."""
    s = np.asarray(scores, np.float64)
    key = np.where(np.isfinite(s), -s, np.inf)
    return np.lexsort((np.arange(len(s)), key))


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """P(score of a random planted error > score of a random clean example), ties counted half
    (the Mann-Whitney statistic from average ranks); NaN without both kinds. NaN scores rank lowest."""
    from scipy.stats import rankdata
    s = np.asarray(scores, np.float64)
    t = np.asarray(truth, bool)
    pos, neg = int(t.sum()), int((~t).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    s = np.where(np.isfinite(s), s, -np.inf)
    r = rankdata(s)
    return float((r[t].sum() - pos * (pos + 1) / 2) / (pos * neg))


def found_curve(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """found[k] = the fraction of planted errors among the first k examples inspected in the
    score's order, k = 0..n."""
    t = np.asarray(truth, bool)[order(scores)]
    total = max(int(t.sum()), 1)
    return np.concatenate([[0.0], np.cumsum(t) / total])


def found_at(scores: np.ndarray, truth: np.ndarray, fractions) -> dict[float, float]:
    """The fraction of planted errors found in the top q of the examples, per q in fractions."""
    curve = found_curve(scores, truth)
    n = len(curve) - 1
    return {float(q): float(curve[int(round(q * n))]) for q in fractions}


def detection(scores: np.ndarray, truth: np.ndarray, fractions=(0.05, 0.1, 0.2), n_boot: int = 1000,
              seed: int = 0) -> dict:
    """AUC and found-at-q with 95% intervals from a bootstrap over examples, stratified by the
    truth (each resample keeps the number of planted errors)."""
    s = np.asarray(scores, np.float64)
    t = np.asarray(truth, bool)
    found = found_at(s, t, fractions)
    out: dict = {"auc": auc(s, t), "found": found}
    pos, neg = np.flatnonzero(t), np.flatnonzero(~t)
    if n_boot <= 0 or len(pos) == 0 or len(neg) == 0:
        out["auc_ci95"] = [float("nan")] * 2
        out["found_ci95"] = {q: [float("nan")] * 2 for q in found}
        return out
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    founds: dict[float, list[float]] = {q: [] for q in found}
    for _ in range(n_boot):
        pick = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        aucs.append(auc(s[pick], t[pick]))
        for q, v in found_at(s[pick], t[pick], list(founds)).items():
            founds[q].append(v)
    out["auc_ci95"] = [float(v) for v in np.nanpercentile(aucs, [2.5, 97.5])]
    out["found_ci95"] = {q: [float(v) for v in np.percentile(founds[q], [2.5, 97.5])] for q in founds}
    return out
