"""Data counterfactuals, verified by retraining: stage=counterfactual and stage=brittleness.

counterfactual: for chosen targets and every method (the datamodels, each baseline, and
random), remove the method's top-k training examples for the target (the most positive
scores: the examples that raise its margin most) from fresh α-masks, retrain with the same
seeds with and without the removal (orchestrator.analyses.removal), and compare, per method and k:
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

import logging

import numpy as np

from orchestrator.analyses import removal
from orchestrator.analyses.common import AnalysisError, datamodels
from orchestrator.metrics.removal import bootstrap_mean, held_out_slope
from orchestrator.plots.analyses import plot_calibration, plot_drops
from orchestrator.plots.style import method_colors, method_order, sig
from orchestrator.settings.analyses import RANDOM, stage_ks
from orchestrator.storage.masks import mask_size
from orchestrator.storage.scores import expected_files, open_scores

log = logging.getLogger(__name__)


class CounterfactualError(AnalysisError):
    """Inputs a removal stage cannot use (one line naming the setting or the missing output)."""


# ----------------------------------------------------------------------------- inputs


def method_scores(ctx, methods: list[str], W: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray | None]:
    """method -> scores of `targets` [len(targets), n] (most positive: most helpful to the
    target), None for random; W: the datamodels' weights of those targets. Only the target
    blocks of a scores file that hold them are read."""
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
            f = open_scores(plan.store, files[name], plan.n, plan.n_targets, f"{plan.cfg.stage}: baseline {name}")
            for lo, hi in f.ranges():
                sel = np.flatnonzero((want >= lo) & (want < hi))
                if len(sel):
                    rows[sel] = f.read(lo, hi)[:, want[sel] - lo].T
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


def resolved_ks(ctx, section: str) -> list[int]:
    """The stage's k values (stage_ks), with one info line naming the shipped defaults left out."""
    cfg = ctx.plan.cfg
    size = mask_size(ctx.plan.n, float(cfg.masks.alpha))
    ks, dropped = stage_ks(cfg, section, size)
    if dropped:
        log.info("%s: the default %s.ks %s %s above the mask size %d (round(masks.alpha * n)) and left out; "
                 "using ks=%s", section, section, dropped, "is" if len(dropped) == 1 else "are", size, ks)
    return ks


# ----------------------------------------------------------------------------- counterfactual


def run(ctx) -> dict:
    """stage=counterfactual: remove each method's top-k examples from fresh masks and retrain
    with the same seeds with and without the removal; drops, calibration, the table."""
    from omegaconf import OmegaConf
    plan = ctx.plan
    cfg = plan.cfg
    c = OmegaConf.to_container(cfg.counterfactual, resolve=True)
    seed, n, alpha = int(cfg.exp.seed), plan.n, float(cfg.masks.alpha)
    methods = list(c["methods"] or ["datamodels"] + list(cfg.baselines.methods or []) + [RANDOM])
    targets = chosen_targets(c["targets"], int(c["n_targets"]), np.arange(plan.n_targets), seed)
    W, _, dm_dir = datamodels(ctx, targets)           # the chosen targets' rows only
    scores = method_scores(ctx, methods, W, targets)
    ks = resolved_ks(ctx, "counterfactual")
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
            mean, ci = bootstrap_mean(D, n_boot, seed)
            rows[name][str(k)] = {"actual": mean, "ci95": ci,
                                  "predicted": None if S is None else float(np.mean(P)),
                                  "targets": int(np.isfinite(D).any(1).sum())}
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
            mean, ci = bootstrap_mean(drops["datamodels"][k] - drops[RANDOM][k], n_boot, seed)
            vs_random[str(k)] = {"difference": mean, "ci95": ci}
    out = {"targets": targets.tolist(), "ks": ks, "masks": J, "methods": methods, "datamodels": dm_dir,
           "models": train_stats, "drop": rows, "fit": fit_line, "datamodels_minus_random": vs_random}
    out["table"] = ctx.artifacts.json("counterfactual", {**out, "cells": cells}, train_stats.get("dir"))
    names = method_order(methods)
    colors = method_colors(names)
    plots = {"counterfactual_drop": ctx.artifacts.local("counterfactual_drop.png"),
             "counterfactual_calibration": ctx.artifacts.local("counterfactual_calibration.png")}
    plot_drops(rows, ks, names, colors, plots["counterfactual_drop"], J)
    plot_calibration(cells, fit_line, names, colors, plots["counterfactual_calibration"])
    out["plots"] = {k: ctx.artifacts.plot(k, p) for k, p in plots.items()}
    out["files"] = [out["table"], *out["plots"].values()]
    out["headline"] = counterfactual_headline(out)
    metrics = {f"cf_drop_{m}_k{k}": r["actual"] for m in rows for k, r in rows[m].items()}
    metrics.update({f"cf_slope_{m}": f["slope"] for m, f in fit_line.items() if f["slope"] is not None})
    metrics.update({f"cf_corr_{m}": f["correlation"] for m, f in fit_line.items() if f["correlation"] is not None})
    ctx.tracker.log_metrics(metrics)
    for line in table_lines(out):
        log.info("%s", line)
    return out


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


def counterfactual_headline(out: dict) -> list[str]:
    """The closing block's lines: each method's actual drop at the largest k, and the
    calibration slopes (actual per unit of predicted drop)."""
    if not out["ks"]:
        return []
    k = str(max(out["ks"]))
    drops = ", ".join(f"{m} {sig(r[k]['actual'])}" for m, r in out["drop"].items() if k in r)
    lines = [f"margin drop after removing each method's top {k} (mean of {len(out['targets'])} targets × "
             f"{out['masks']} masks): {drops}"]
    slopes = ", ".join(f"{m} {sig(f['slope'])}" for m, f in out["fit"].items())
    if slopes:
        lines.append(f"calibration slope (actual / predicted drop): {slopes}")
    return lines


# ----------------------------------------------------------------------------- brittleness


