"""Data counterfactuals, verified by retraining: stage=counterfactual and stage=brittleness.

counterfactual: for chosen targets and every method (the datamodels, each baseline, and
random), remove the method's top-k training examples for the target (the most positive
scores: the examples that raise its margin most) from fresh α-masks, retrain with the same
seeds with and without the removal (orchestrator.removal), and compare, per method and k:
  actual drop     mean over targets and masks of f_t(S_j) − f_t(S_j \\ R), with a two-level
                  bootstrap 95% interval (targets and masks resampled);
  predicted drop  mean of Σ_{i ∈ R ∩ S_j} score_t(i), what the method's scores say the removal
                  costs (in margin units for the datamodels; a baseline's scores are in its own
                  units, so for them the correlation is the comparable figure);
  correlation     Pearson's r between predicted and actual drops over the (target, k) cells;
  slope           the calibration slope: least squares through the origin of the actual on the
                  predicted drops over the (target, k) cells (1 = calibrated; a lasso's
                  shrinkage shows as a slope above 1).
  held-out slope  the slope after calibrating by retraining: each target's predicted drops
                  scaled by the slope fitted on the other targets' cells (leave one target
                  out), then the slope of the actual drops on those over every cell; `scale`
                  is the slope on all cells, the factor a user multiplies the method's scores
                  by for calibrated drops. A positive factor leaves every target's ranking,
                  and so LDS, unchanged.
The datamodels minus random difference of the actual drop is paired (same masks, same seeds).

brittleness: for targets that the models classify correctly (mean margin over the eval models
> 0), the datamodel's estimate of the smallest set whose removal flips the prediction: remove
training examples greedily by weight until the datamodel's expected margin over α-masks,
b + α Σ_{i ∉ R} w_i, drops below zero (the datamodels paper's support-set estimate); then
retrain fresh α-masks without that set (same seeds, paired with the masks as drawn) and count
the target flipped when the mean margin of the retrained models is below zero. Reported: the
fraction of targets flipped by removing at most k examples, predicted and verified, for k on
a grid.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from orchestrator import removal
from orchestrator.store import Layout

log = logging.getLogger(__name__)

RANDOM = "random"


class CounterfactualError(RuntimeError):
    """Inputs a removal stage cannot use (one line naming the setting or the missing output)."""


# ----------------------------------------------------------------------------- inputs

def datamodels(ctx, targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(weights [T, n], intercepts [T], directory) of the datamodels of all good train models;
    with `targets`, the rows of those targets only ([len(targets), n]), read one chunk at a
    time so that the driver never holds every target's weights."""
    from orchestrator import fit_stage
    plan = ctx.plan
    rel = fit_stage.full_dir(plan, ctx.ledger_index())
    try:
        if targets is None:
            W, b, _ = fit_stage.load_datamodels(plan.store, rel, plan.n_targets)
            return W, b, rel
        want = np.asarray(targets, np.int64)
        W, b = np.zeros((len(want), plan.n), np.float32), np.zeros(len(want), np.float32)
        for lo, hi, Wc, bc in fit_stage.iter_datamodels(plan.store, rel, plan.n_targets):
            sel = np.flatnonzero((want >= lo) & (want < hi))
            W[sel], b[sel] = Wc[want[sel] - lo], bc[want[sel] - lo]
    except FileNotFoundError as err:
        raise CounterfactualError(f"{plan.cfg.stage}: {err}") from None
    return W, b, rel


def method_scores(ctx, methods: list[str], W: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray | None]:
    """method -> scores of `targets` [len(targets), n] (most positive: most helpful to the
    target), None for random; W: the datamodels' weights of those targets. Only the target
    blocks of a scores file that hold them are read."""
    from orchestrator.baselines_stage import ScoresFile, expected_files
    from orchestrator.store import CorruptFile
    plan = ctx.plan
    files = expected_files(plan.cfg)
    want = np.asarray(targets, np.int64)
    out: dict[str, np.ndarray | None] = {}
    for name in methods:
        if name == RANDOM:
            out[name] = None
        elif name == "datamodels":
            out[name] = W
        else:
            rows = np.zeros((len(want), plan.n), np.float32)
            try:
                f = ScoresFile(plan.store, files[name])
                for lo, hi in f.ranges():
                    sel = np.flatnonzero((want >= lo) & (want < hi))
                    if len(sel):
                        rows[sel] = f.read(lo, hi)[:, want[sel] - lo].T
            except (FileNotFoundError, CorruptFile):
                raise CounterfactualError(f"{plan.cfg.stage}: baseline {name} has no scores at "
                                          f"{plan.store.where(files[name])}; run stage=baselines") from None
            out[name] = rows
    return out


def chosen_targets(targets: list, count: int, pool: np.ndarray, seed: int) -> np.ndarray:
    """The targets asked for, or `count` drawn (seeded) from `pool`, in increasing order."""
    if targets:
        return np.asarray(sorted(int(t) for t in targets), np.int64)
    rng = np.random.default_rng([seed, 0xC0F])
    return np.sort(rng.choice(pool, size=min(int(count), len(pool)), replace=False)).astype(np.int64)


def top_order(scores: np.ndarray | None, n: int, seed: int, target: int) -> np.ndarray:
    """Training ids by decreasing score (ties by id); for random, a seeded permutation."""
    if scores is None:
        return np.random.default_rng([seed, 0x5A, int(target)]).permutation(n)
    return np.argsort(-scores, kind="stable")


def check_settings(cfg, n: int, n_targets: int) -> None:
    """The removal stages' settings, before any Ray work: one line naming the setting."""
    from orchestrator.config import ConfigError
    from orchestrator.masks import mask_size
    size = mask_size(n, float(cfg.masks.alpha))
    for section in ("counterfactual", "brittleness"):
        if cfg.stage != section:
            continue
        c = cfg[section]
        for t in list(c.targets or []):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n_targets:
                raise ConfigError(f"{section}.targets: {t!r} is not a target id; this task has targets "
                                  f"0..{n_targets - 1}")
        for k in list(c.ks):
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= size:
                raise ConfigError(f"{section}.ks: {k!r} must be a count of training examples from 1 to the "
                                  f"mask size {size} (round(masks.alpha * n)); e.g. {section}.ks=[10,20,50]")
        if section == "counterfactual":
            known = ["datamodels", RANDOM] + list(cfg.baselines.methods or [])
            for m in list(c.methods or []):
                if m not in known:
                    raise ConfigError(f"counterfactual.methods: {m!r} is not one of {known} "
                                      f"(a baseline must be in baselines.methods)")


def precheck(plan) -> None:
    """Before Ray starts: the datamodels (and scores) the stage needs exist."""
    from orchestrator import fit_stage
    want = fit_stage.full_dir(plan, plan.ledger.index())
    if not plan.store.list(want, ".parquet"):
        raise CounterfactualError(f"{plan.cfg.stage}: {plan.store.where()} has no datamodels for these fit settings "
                                  f"({want}); run stage=all (or stage=fit) first")


def _write_json(ctx, name: str, obj: dict, keep_in: str | None = None) -> str:
    """<name>.json at the experiment's top (the last run's), and a copy in `keep_in` (a removal
    experiment's directory, whose results it holds), so that every settings' table is kept."""
    rel = f"{name}.json"
    text = json.dumps(obj, indent=1, default=float)
    ctx.plan.store.write_bytes(rel, text.encode())
    if keep_in:
        ctx.plan.store.write_bytes(f"{keep_in}/{rel}", text.encode())
    path = os.path.join(ctx.scratch, rel)
    with open(path, "w") as f:
        f.write(text)
    ctx.tracker.log_artifact(path)
    return rel


def _store_plot(ctx, name: str, path: str) -> str:
    with open(path, "rb") as f:
        ctx.plan.store.write_bytes(Layout.plot(name), f.read())
    ctx.tracker.log_artifact(path, "plots")
    return Layout.plot(name)


# ----------------------------------------------------------------------------- counterfactual

def counterfactual_stage(ctx) -> dict:
    from omegaconf import OmegaConf
    plan = ctx.plan
    cfg = plan.cfg
    c = OmegaConf.to_container(cfg.counterfactual, resolve=True)
    seed, n, alpha = int(cfg.exp.seed), plan.n, float(cfg.masks.alpha)
    methods = list(c["methods"] or ["datamodels"] + list(cfg.baselines.methods or []) + [RANDOM])
    targets = chosen_targets(c["targets"], int(c["n_targets"]), np.arange(plan.n_targets), seed)
    W, _, dm_dir = datamodels(ctx, targets)           # the chosen targets' rows only
    scores = method_scores(ctx, methods, W, targets)
    ks = sorted(int(k) for k in c["ks"])
    rem = removal.Removals("counterfactual", int(c["masks"]))
    cell: dict[tuple[str, int, int], int] = {}          # (method, target, k) -> removal index
    for name in methods:
        S = scores[name]
        for ti, t in enumerate(targets):
            order = top_order(None if S is None else S[ti], n, seed, int(t))
            for k in ks:
                cell[name, int(t), k] = rem.add(order[:k])
    log.info("counterfactual: %d targets x %d methods x %d k: %d removal sets x %d masks (+ the masks as drawn)",
             len(targets), len(methods), len(ks), len(rem.removed) - 1, rem.base)
    margins, train_stats = removal.train(ctx, rem)
    X = rem.base_masks(seed, n, alpha).astype(np.float32)     # [J, n]
    J = rem.base
    n_boot = int(cfg.eval.bootstrap)
    rows: dict = {}
    drops: dict = {}        # method -> k -> [targets, masks] actual drops
    cells = []
    for name in methods:
        rows[name], drops[name] = {}, {}
        S = scores[name]
        for k in ks:
            D = np.empty((len(targets), J))
            P = np.full((len(targets), J), np.nan)
            for ti, t in enumerate(targets):
                r = cell[name, int(t), k]
                D[ti] = margins[0, :, t] - margins[r, :, t]
                if S is not None:
                    R = rem.removed[r]
                    P[ti] = X[:, R] @ S[ti, R]
                cells.append({"method": name, "target": int(t), "k": k, "removed": int(len(rem.removed[r])),
                              "actual": float(np.nanmean(D[ti])), "actual_sd": float(np.nanstd(D[ti])),
                              "predicted": None if S is None else float(np.mean(P[ti]))})
            mean, ci = removal.bootstrap_mean(D, n_boot, seed)
            rows[name][str(k)] = {"actual": mean, "ci95": ci,
                                  "predicted": None if S is None else float(np.mean(P))}
            drops[name][k] = D
    fit_line = {}
    for name in methods:
        if scores[name] is None:
            continue
        mine = [c_ for c_ in cells if c_["method"] == name]
        p = np.array([c_["predicted"] for c_ in mine])
        a = np.array([c_["actual"] for c_ in mine])
        held = held_out_slope(p, a, np.array([c_["target"] for c_ in mine]))
        fit_line[name] = {"correlation": float(np.corrcoef(p, a)[0, 1]) if len(p) > 2 and p.std() > 0 else None,
                          "slope": held["scale"], **held}
    vs_random = {}
    if "datamodels" in methods and RANDOM in methods:
        for k in ks:
            mean, ci = removal.bootstrap_mean(drops["datamodels"][k] - drops[RANDOM][k], n_boot, seed)
            vs_random[str(k)] = {"difference": mean, "ci95": ci}
    out = {"targets": targets.tolist(), "ks": ks, "masks": J, "methods": methods, "datamodels": dm_dir,
           "models": train_stats, "drop": rows, "fit": fit_line, "datamodels_minus_random": vs_random}
    out["table"] = _write_json(ctx, "counterfactual", {**out, "cells": cells}, train_stats.get("dir"))
    from orchestrator.evaluate import method_colors, method_order
    names = method_order(methods)
    colors = method_colors(names)
    plots = {"counterfactual_drop": os.path.join(ctx.scratch, "counterfactual_drop.png"),
             "counterfactual_calibration": os.path.join(ctx.scratch, "counterfactual_calibration.png")}
    plot_drops(rows, ks, names, colors, plots["counterfactual_drop"])
    plot_calibration(cells, fit_line, names, colors, plots["counterfactual_calibration"])
    out["plots"] = {k: _store_plot(ctx, k, p) for k, p in plots.items()}
    metrics = {f"cf_drop_{m}_k{k}": r["actual"] for m in rows for k, r in rows[m].items()}
    metrics.update({f"cf_slope_{m}": f["slope"] for m, f in fit_line.items() if f["slope"] is not None})
    metrics.update({f"cf_corr_{m}": f["correlation"] for m, f in fit_line.items() if f["correlation"] is not None})
    ctx.tracker.log_metrics(metrics)
    for line in table_lines(out):
        log.info("%s", line)
    return out


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


def table_lines(out: dict) -> list[str]:
    """The counterfactual table as the terminal shows it: a line per method and k."""
    lines = [f"{'method':<14}{'k':>5}  {'actual drop':>12}  {'95% CI':<18}{'predicted':>10}"]
    for name, by_k in out["drop"].items():
        for k, r in by_k.items():
            pred = "-" if r["predicted"] is None else f"{r['predicted']:.3f}"
            lines.append(f"{name:<14}{k:>5}  {r['actual']:>12.3f}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                         f"{'':<2}{pred:>10}")
    for name, f in out["fit"].items():
        corr = "-" if f["correlation"] is None else f"{f['correlation']:.3f}"
        slope = "-" if f["slope"] is None else f"{f['slope']:.4g}"
        held = f.get("held_out_slope")
        cal = "" if held is None else f"; scaled by {f['scale']:.4g} (fitted on the other targets): slope {held:.3f}"
        lines.append(f"{name:<14} predicted vs actual: r = {corr}, calibration slope = {slope}{cal}")
    for k, d in out["datamodels_minus_random"].items():
        lines.append(f"datamodels − random, k={k}: {d['difference']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]")
    return lines


def plot_drops(rows: dict, ks: list[int], names: list[str], colors: dict, path: str) -> None:
    from orchestrator.evaluate import _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, name in enumerate(names):
        r = rows[name]
        x = np.array(ks, float) * (1 + 0.02 * (i - len(names) / 2))     # a little apart
        y = np.array([r[str(k)]["actual"] for k in ks])
        lo = np.array([r[str(k)]["ci95"][0] for k in ks])
        hi = np.array([r[str(k)]["ci95"][1] for k in ks])
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="-o", color=colors[name], capsize=3, label=name)
    ax.axhline(0, color="gray", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k: training examples removed (the method's top k for the target)", fontsize=10)
    ax.set_ylabel("actual margin drop after retraining\n(mean over targets and masks, 95% CI)", fontsize=10)
    ax.set_title("Counterfactual: removing each method's top-k examples", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    _save(fig, path)


def plot_calibration(cells: list[dict], fit_line: dict, names: list[str], colors: dict, path: str) -> None:
    from orchestrator.evaluate import _plt, _save
    plt = _plt()
    shown = [m for m in names if m in fit_line]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.6 * max(1, len(shown)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], shown):
        p = np.array([c["predicted"] for c in cells if c["method"] == name])
        a = np.array([c["actual"] for c in cells if c["method"] == name])
        ax.scatter(p, a, s=14, color=colors[name], alpha=0.7)
        lim = [min(p.min(), a.min(), 0), max(p.max(), a.max(), 0)]
        if name == "datamodels":
            ax.plot(lim, lim, color="gray", linestyle="--", linewidth=1, label="actual = predicted")
            ax.legend(fontsize=8, loc="upper left")
        f = fit_line[name]
        corr = "-" if f["correlation"] is None else f"{f['correlation']:.2f}"
        slope = "-" if f["slope"] is None else f"{f['slope']:.2f}"
        ax.set_title(f"{name}\nr = {corr}, slope = {slope}", fontsize=10)
        ax.set_xlabel("predicted drop (sum of scores removed)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("actual drop (retrained)", fontsize=9)
    fig.suptitle("Predicted against actual margin drop, one point per (target, k)", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- brittleness

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


def brittleness_stage(ctx) -> dict:
    from omegaconf import OmegaConf

    from orchestrator.evaluate import eval_set
    plan = ctx.plan
    cfg = plan.cfg
    c = OmegaConf.to_container(cfg.brittleness, resolve=True)
    seed, alpha = int(cfg.exp.seed), float(cfg.masks.alpha)
    ks = sorted(int(k) for k in c["ks"])
    _, Y, _ = eval_set(plan.ledger, plan.n, plan.n_targets)
    correct = np.flatnonzero(Y.mean(0) > 0)
    if c["targets"]:
        wrong = [t for t in c["targets"] if t not in set(correct.tolist())]
        if wrong:
            log.warning("brittleness: targets %s are not classified correctly on average; left out", wrong[:10])
    targets = chosen_targets([t for t in c["targets"] if t in set(correct.tolist())] if c["targets"] else [],
                             int(c["n_targets"]), correct, seed)
    if not len(targets):
        raise CounterfactualError("brittleness: no target is classified correctly on average by the eval models")
    W, b, dm_dir = datamodels(ctx, targets)           # the chosen targets' rows only
    kstar, order = support_sizes(W, b, alpha, max(ks))
    rem = removal.Removals("brittleness", int(c["masks"]))
    r_of = {int(t): rem.add(order[i, :kstar[i]]) for i, t in enumerate(targets) if 1 <= kstar[i] <= max(ks)}
    log.info("brittleness: %d of %d targets have a predicted flipping set of at most %d examples; "
             "retraining %d masks without each", len(r_of), len(targets), max(ks), rem.base)
    margins, train_stats = removal.train(ctx, rem)
    base = margins[0][:, targets]                                 # [J, targets]
    flipped = np.zeros(len(targets), bool)
    after = np.full(len(targets), np.nan)
    model_flips = np.full(len(targets), np.nan)
    for i, t in enumerate(targets):
        if int(t) in r_of:
            m = margins[r_of[int(t)], :, t]
            after[i] = float(np.nanmean(m))
            flipped[i] = after[i] < 0
            model_flips[i] = float(np.nanmean(m < 0))
    curve = {str(k): {"predicted": float(np.mean((kstar >= 1) & (kstar <= k))),
                      "verified": float(np.mean((kstar >= 1) & (kstar <= k) & flipped))} for k in ks}
    per_target = [{"target": int(t), "k_star": int(kstar[i]) if kstar[i] <= max(ks) else None,
                   "margin_before": float(np.nanmean(base[:, i])), "margin_after": None if np.isnan(after[i])
                   else float(after[i]), "flipped": bool(flipped[i]),
                   "models_flipped": None if np.isnan(model_flips[i]) else float(model_flips[i])}
                  for i, t in enumerate(targets)]
    out = {"targets": int(len(targets)), "candidates": int(len(correct)), "ks": ks, "masks": rem.base,
           "datamodels": dm_dir, "models": train_stats, "fraction_flipped": curve,
           "verified_of_predicted": float(flipped.sum() / max(len(r_of), 1)) if r_of else None}
    out["table"] = _write_json(ctx, "brittleness", {**out, "per_target": per_target}, train_stats.get("dir"))
    path = os.path.join(ctx.scratch, "brittleness.png")
    plot_brittleness(curve, ks, len(targets), rem.base, path)
    out["plots"] = {"brittleness": _store_plot(ctx, "brittleness", path)}
    ctx.tracker.log_metrics({**{f"brittle_predicted_k{k}": v["predicted"] for k, v in curve.items()},
                             **{f"brittle_verified_k{k}": v["verified"] for k, v in curve.items()}})
    for k, v in curve.items():
        log.info("brittleness: removing <= %s examples flips %.3f of targets (predicted), %.3f (verified)",
                 k, v["predicted"], v["verified"])
    return out


def plot_brittleness(curve: dict, ks: list[int], targets: int, masks: int, path: str) -> None:
    from orchestrator.evaluate import _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    ax.plot(ks, [curve[str(k)]["predicted"] for k in ks], "-o", color="tab:blue",
            label="predicted by the datamodels (greedy by weight)")
    ax.plot(ks, [curve[str(k)]["verified"] for k in ks], "-s", color="tab:orange",
            label=f"verified: mean margin < 0 after retraining ({masks} masks)")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(0, 1)
    ax.set_xlabel("k: training examples removed", fontsize=10)
    ax.set_ylabel(f"fraction of {targets} correctly\nclassified targets flipped", fontsize=10)
    ax.set_title("Brittleness: targets flipped by removing at most k examples", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    _save(fig, path)
