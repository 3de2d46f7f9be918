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


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_lds(results: dict, per_target: dict, path: str) -> None:
    """Bar chart of LDS per method (95% CI) and the histogram of per-target LDS."""
    plt = _plt()
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    means = [results[k]["mean"] for k in names]
    err = np.array([[results[k]["mean"] - results[k]["ci95"][0], results[k]["ci95"][1] - results[k]["mean"]]
                    for k in names]).T
    axes[0].bar(names, means, yerr=err, capsize=4, color="tab:blue")
    axes[0].set_ylabel("LDS (mean over targets, 95% CI)")
    axes[0].set_title("Linear Datamodeling Score")
    axes[0].tick_params(axis="x", rotation=30)
    for k in names:
        v = per_target[k]
        axes[1].hist(v[np.isfinite(v)], bins=30, alpha=0.5, label=k)
    axes[1].set_xlabel("LDS per target")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lds_vs_compute(results: dict, curve: dict, path: str) -> None:
    """LDS against compute seconds, log x (the TRAK paper's Figure 1 format)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if r.get("seconds"):
            ax.errorbar([r["seconds"]], [r["mean"]],
                        yerr=[[r["mean"] - r["ci95"][0]], [r["ci95"][1] - r["mean"]]], fmt="o", capsize=3, label=name)
    if curve:
        ms = sorted(curve)
        ax.plot([curve[m]["seconds"] for m in ms], [curve[m]["mean"] for m in ms], "-", color="gray", alpha=0.6,
                label="datamodels (prefixes)")
    ax.set_xscale("log")
    ax.set_xlabel("compute (seconds, this machine)")
    ax.set_ylabel("LDS")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lds_vs_models(curve: dict, path: str) -> None:
    plt = _plt()
    ms = sorted(curve)
    fig, ax = plt.subplots(figsize=(6, 4))
    mean = [curve[m]["mean"] for m in ms]
    lo = [curve[m]["ci95"][0] for m in ms]
    hi = [curve[m]["ci95"][1] for m in ms]
    ax.plot(ms, mean, "o-")
    ax.fill_between(ms, lo, hi, alpha=0.3)
    ax.set_xscale("log")
    ax.set_xlabel("train models used to fit the datamodels")
    ax.set_ylabel("LDS")
    ax.set_title("Datamodels: LDS against number of models")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_top_examples(weights: dict, images, target_images, targets, path: str, top: int = 5) -> None:
    """For a few targets: the target image, then per method the `top` most positive and most
    negative training images by score."""
    if images is None:
        return
    plt = _plt()
    methods = list(weights)
    rows = len(targets) * len(methods)
    fig, axes = plt.subplots(rows, 1 + 2 * top, figsize=(1.3 * (1 + 2 * top), 1.4 * rows), squeeze=False)

    def show(ax, img):
        img = np.asarray(img)
        if img.shape[0] in (1, 3):
            img = img.transpose(1, 2, 0)
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 or img.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])

    r = 0
    for t in targets:
        for name in methods:
            w = weights[name][t]
            order = np.argsort(w)
            show(axes[r, 0], target_images[t])
            axes[r, 0].set_ylabel(f"t{t}\n{name}", fontsize=7)
            for j, i in enumerate(order[::-1][:top]):
                show(axes[r, 1 + j], images[i])
                axes[r, 1 + j].set_title(f"+{w[i]:.2g}", fontsize=6)
            for j, i in enumerate(order[:top]):
                show(axes[r, 1 + top + j], images[i])
                axes[r, 1 + top + j].set_title(f"{w[i]:.2g}", fontsize=6)
            r += 1
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(plan, tracker, datamodels_dir: str, prefix_dirs: dict | None = None, compute: dict | None = None) -> dict:
    """LDS of the datamodels, of each datamodels prefix and of every configured baseline.
    Plots are drawn in a local scratch directory, then written to the store and MLflow."""
    import tempfile

    from orchestrator.baselines_stage import BaselinesError, expected_files, read_scores
    from orchestrator.fit_stage import fit_seconds, load_datamodels
    from orchestrator.store import CorruptFile, Layout
    cfg, store = plan.cfg, plan.store
    compute = compute or {}
    X, Y, counts = eval_set(plan.ledger, plan.n, plan.n_targets)
    if len(X) < 3:
        raise LedgerError(f"only {len(X)} eval masks in the ledger; LDS needs more (masks.n_eval)")
    W, b, _ = load_datamodels(store, datamodels_dir, plan.n_targets)
    n_boot, seed = int(cfg.eval.bootstrap), int(cfg.eval.bootstrap_seed)
    results, per_target, weights = {}, {}, {"datamodels": W}
    results["datamodels"], per_target["datamodels"] = score_method(X, Y, W, b, n_boot, seed)
    results["datamodels"]["seconds"] = compute.get("datamodels")

    curve = {}
    for m, d in sorted((prefix_dirs or {}).items()):
        Wm, bm, _ = load_datamodels(store, d, plan.n_targets)
        curve[int(m)], _ = score_method(X, Y, Wm, bm, n_boot, seed)
        curve[int(m)]["seconds"] = compute.get("per_model", 0.0) * int(m) + fit_seconds(store, d)
    if curve and compute.get("models"):
        curve[int(compute["models"])] = dict(results["datamodels"])

    for name, rel in sorted(expected_files(cfg).items()):
        try:
            S, meta = read_scores(store, rel)
        except (FileNotFoundError, CorruptFile) as err:
            raise BaselinesError(f"evaluate: baseline {name} has no valid scores at {store.where(rel)} "
                                 f"({type(err).__name__}); run stage=baselines") from None
        if S.shape != (plan.n, plan.n_targets):
            raise BaselinesError(f"evaluate: {store.where(rel)} has shape {S.shape}, expected "
                                 f"({plan.n}, {plan.n_targets}); run stage=baselines")
        results[name], per_target[name] = score_method(X, Y, S.T, None, n_boot, seed)
        results[name].update(seconds=meta.get("seconds"), params=meta.get("params"),
                             checkpoints=meta.get("checkpoints"))
        weights[name] = S.T

    scratch = tempfile.mkdtemp(prefix="datamodels-plots-")
    plots = {"lds": os.path.join(scratch, "lds.png"), "lds_vs_compute": os.path.join(scratch, "lds_vs_compute.png")}
    plot_lds(results, per_target, plots["lds"])
    plot_lds_vs_compute(results, curve, plots["lds_vs_compute"])
    if len(curve) > 1:
        plots["lds_vs_models"] = os.path.join(scratch, "lds_vs_models.png")
        plot_lds_vs_models(curve, plots["lds_vs_models"])
    try:
        x_tr, _, x_tg, _, _ = plan.task.arrays()
    except (AttributeError, TypeError, ValueError):
        x_tr = x_tg = None
    if x_tr is not None and int(cfg.eval.get("show_targets") or 0) > 0:
        k = min(int(cfg.eval.show_targets), plan.n_targets)
        plots["top_examples"] = os.path.join(scratch, "top_examples.png")
        plot_top_examples(weights, x_tr, x_tg, list(range(k)), plots["top_examples"])
    npz = os.path.join(scratch, "lds_per_target.npz")
    np.savez(npz, **per_target)
    stored = {}
    for name, path in plots.items():
        with open(path, "rb") as f:
            store.write_bytes(Layout.plot(name), f.read())
        stored[name] = Layout.plot(name)
    with open(npz, "rb") as f:
        store.write_bytes(Layout.LDS_PER_TARGET, f.read())

    method_metrics = {}
    for name, r in results.items():
        metrics = {"lds": r["mean"], "lds_ci_lo": r["ci95"][0], "lds_ci_hi": r["ci95"][1]}
        if r.get("seconds") is not None:
            metrics["compute_seconds"] = r["seconds"]
        if "mse" in r:
            metrics["mse"] = r["mse"]
        method_metrics[name] = metrics
        tracker.log_metrics({f"lds_{name}": r["mean"]})
    for m, r in sorted(curve.items()):
        tracker.log_metrics({"lds_datamodels_curve": r["mean"]}, step=m)
    for path in plots.values():
        tracker.log_artifact(path)
    return {"lds": results, "lds_curve": {str(m): r for m, r in curve.items()}, "method_metrics": method_metrics,
            "eval_masks": int(len(X)), "replicas_mean": float(counts.mean()), "plots": stored,
            "scratch": scratch}
