"""Evaluation: the Linear Datamodeling Score of every method on the held-out eval masks.

LDS(τ, x) = Spearman correlation, over eval masks S_j, between the predicted output
Σ_{i∈S_j} τ(x)_i + b_x and the actual margin averaged over the mask's replicas. Reported as
the mean over targets with a bootstrap 95% interval (resampling targets), plus the mean
squared error of the predicted margins where a method predicts margins (datamodels).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from orchestrator.ledger import Ledger, LedgerError
from workers import bits

log = logging.getLogger(__name__)


def eval_set(ledger: Ledger, n: int, n_targets: int):
    """(masks bool [e, n], replica-averaged margins float32 [e, T], replicas per mask [e])."""
    data = ledger.load("eval", n=n, n_targets=n_targets)
    ids, start, counts = np.unique(data.model_id, return_index=True, return_counts=True)
    sums = np.add.reduceat(data.margins.astype(np.float64), start, axis=0)
    Y = (sums / counts[:, None]).astype(np.float32)
    X = bits.unpack(data.packed[start], n)
    # every replica of a mask must carry the same mask
    first = np.repeat(start, counts)
    if not np.array_equal(data.packed, data.packed[first]):
        raise LedgerError("eval masks differ between replicas of one model id: the ledger mixes experiments")
    return X, Y, counts


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


def score_method(X: np.ndarray, Y: np.ndarray, weights: np.ndarray, intercept, n_boot: int, seed: int) -> dict:
    """LDS (and MSE if an intercept is given) of weights [T, n] on eval masks X [e, n]."""
    pred = X.astype(np.float32) @ weights.T.astype(np.float32)
    if intercept is not None:
        pred = pred + np.asarray(intercept, np.float32)[None, :]
    per_target = lds_per_target(pred, Y)
    lo, hi = bootstrap_ci(per_target, n_boot, seed)
    out = {"mean": float(np.nanmean(per_target)), "ci95": [lo, hi],
           "median": float(np.nanmedian(per_target)), "targets": int(np.isfinite(per_target).sum())}
    if intercept is not None:
        out["mse"] = float(np.mean((pred - Y) ** 2))
        out["margin_var"] = float(np.mean(Y.var(0)))
    return out, per_target


def plot_lds(results: dict, per_target: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    means = [results[k]["mean"] for k in names]
    err = np.array([[results[k]["mean"] - results[k]["ci95"][0], results[k]["ci95"][1] - results[k]["mean"]]
                    for k in names]).T
    axes[0].bar(names, means, yerr=err, capsize=4, color="tab:blue")
    axes[0].set_ylabel("LDS (mean over targets, 95% CI)")
    axes[0].set_title("Linear Datamodeling Score")
    for k in names:
        v = per_target[k]
        axes[1].hist(v[np.isfinite(v)], bins=30, alpha=0.6, label=k)
    axes[1].set_xlabel("LDS per target")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(plan, tracker, datamodels_dir: str) -> dict:
    from orchestrator.fit_stage import load_datamodels
    cfg = plan.cfg
    X, Y, counts = eval_set(Ledger(plan.ledger_path), plan.n, plan.n_targets)
    if len(X) < 3:
        raise LedgerError(f"only {len(X)} eval masks in the ledger; LDS needs more (masks.n_eval)")
    W, b, _ = load_datamodels(datamodels_dir, plan.n_targets)
    n_boot, seed = int(cfg.eval.bootstrap), int(cfg.eval.bootstrap_seed)
    results, per_target = {}, {}
    results["datamodels"], per_target["datamodels"] = score_method(X, Y, W, b, n_boot, seed)
    plot = os.path.join(plan.exp_dir, "lds.png")
    plot_lds(results, per_target, plot)
    np.save(os.path.join(plan.exp_dir, "lds_per_target.npy"), per_target["datamodels"])
    for name, r in results.items():
        tracker.log_metrics({f"lds_{name}": r["mean"], f"lds_{name}_ci_lo": r["ci95"][0],
                             f"lds_{name}_ci_hi": r["ci95"][1]})
        if "mse" in r:
            tracker.log_metrics({f"mse_{name}": r["mse"]})
    tracker.log_artifact(plot)
    return {"lds": results, "eval_masks": int(len(X)), "replicas_mean": float(counts.mean()), "plot": plot}


def write_summary(path: str, summary: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=float)
    os.replace(tmp, path)
