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
from orchestrator.evaluate import sig
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


def default_ks(section: str) -> list[int]:
    """The shipped default of `<section>.ks` (orchestrator.schema)."""
    from orchestrator import schema
    conf = schema.CounterfactualConf() if section == "counterfactual" else schema.BrittlenessConf()
    return list(conf.ks)


def stage_ks(cfg, section: str, size: int) -> tuple[list[int], list[int]]:
    """(the k values the stage uses, the shipped defaults left out): a k above the mask size
    `size` cannot be removed from a mask. The shipped default grid (`<section>.ks` as the schema
    declares it) is cut to the mask size: its values above it are left out, and where none is
    left, the mask size itself is used. Values the user set are used as given (check_settings
    refuses an impossible one before any work)."""
    ks = sorted({int(k) for k in cfg[section].ks})
    if ks != sorted(set(default_ks(section))):
        return ks, []
    kept = [k for k in ks if k <= size]
    return kept or [size], [k for k in ks if k > size]


def check_settings(cfg, n: int, n_targets: int) -> None:
    """The removal stages' settings, before any Ray work: one line naming the setting. The
    shipped default ks are cut to the mask size (stage_ks); a k that the user set above it is
    refused."""
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
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError(f"{section}.ks: {k!r} must be a count of training examples from 1 to the "
                                  f"mask size {size} (round(masks.alpha * n)); e.g. {section}.ks=[10,20,50]")
        if not list(c.ks):
            raise ConfigError(f"{section}.ks is empty: give at least one count of training examples to remove, "
                              f"from 1 to the mask size {size}; e.g. {section}.ks=[10,20,50]")
        ks, _ = stage_ks(cfg, section, size)
        for k in ks:
            if k > size:
                raise ConfigError(f"{section}.ks: {k!r} must be a count of training examples from 1 to the "
                                  f"mask size {size} (round(masks.alpha * n)); e.g. {section}.ks=[10,20,50]")
        if section == "counterfactual":
            known = ["datamodels", RANDOM] + list(cfg.baselines.methods or [])
            for m in list(c.methods or []):
                if m not in known:
                    raise ConfigError(f"counterfactual.methods: {m!r} is not one of {known} "
                                      f"(a baseline must be in baselines.methods)")


def resolved_ks(ctx, section: str) -> list[int]:
    """The stage's k values (stage_ks), with one info line naming the shipped defaults left out."""
    from orchestrator.masks import mask_size
    cfg = ctx.plan.cfg
    size = mask_size(ctx.plan.n, float(cfg.masks.alpha))
    ks, dropped = stage_ks(cfg, section, size)
    if dropped:
        log.info("%s: the default %s.ks %s %s above the mask size %d (round(masks.alpha * n)) and left out; "
                 "using ks=%s", section, section, dropped, "is" if len(dropped) == 1 else "are", size, ks)
    return ks


def quick_precheck(plan) -> None:
    """Before anything is written (config.check_outputs), reading no ledger: the experiment
    has datamodels at all."""
    if not plan.store.list_dirs(Layout.DATAMODELS):
        _none_yet(plan)


def _none_yet(plan):
    models = "" if plan.store.list(Layout.LEDGER, ".parquet") else " (nor any trained models)"
    raise CounterfactualError(f"{plan.cfg.stage}: {plan.store.where()} has no datamodels yet{models}; "
                              f"run stage=all (or stage=fit) first")


def precheck(plan) -> None:
    """Before Ray starts: the datamodels (and scores) the stage needs exist."""
    from orchestrator import fit_stage
    index = plan.ledger.index()
    if not index.count("train"):
        _none_yet(plan)
    want = fit_stage.full_dir(plan, index)
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
            mean, ci = removal.bootstrap_mean(D, n_boot, seed)
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
    plot_drops(rows, ks, names, colors, plots["counterfactual_drop"], J)
    plot_calibration(cells, fit_line, names, colors, plots["counterfactual_calibration"])
    out["plots"] = {k: _store_plot(ctx, k, p) for k, p in plots.items()}
    out["files"] = [out["table"], *out["plots"].values()]
    out["headline"] = counterfactual_headline(out)
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


def plot_drops(rows: dict, ks: list[int], names: list[str], colors: dict, path: str, masks: int | None = None) -> dict:
    """Each method's actual margin drop (95% CI) against k, log x ticked at the ks. A point
    that averages over fewer targets than the others (a target whose retrained models all
    failed has no drop) is tagged with its count, "n=7 targets"."""
    from orchestrator.evaluate import _place_tags, _plt, _save, count_log_axis
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.2, 4.8))
    counts = [rows[name][str(k)].get("targets") for name in names for k in ks]
    full = max([c for c in counts if c is not None], default=None)
    tags = []
    for i, name in enumerate(names):
        r = rows[name]
        x = np.array(ks, float) * (1 + 0.02 * (i - (len(names) - 1) / 2))     # a little apart
        y = np.array([r[str(k)]["actual"] for k in ks])
        lo = np.array([r[str(k)]["ci95"][0] for k in ks])
        hi = np.array([r[str(k)]["ci95"][1] for k in ks])
        err = np.nan_to_num(np.clip([y - lo, hi - y], 0, None))
        ax.errorbar(x, y, yerr=err, fmt="-o", color=colors[name], capsize=3, label=name)
        tags += [(xi, yi, f"n={r[str(k)]['targets']} targets", colors[name]) for xi, yi, k in zip(x, y, ks)
                 if r[str(k)].get("targets") is not None and r[str(k)]["targets"] < full]
    ax.axhline(0, color="gray", linewidth=1, linestyle="--")
    count_log_axis(ax, ks)
    if tags:
        _place_tags(ax, tags)
    ax.set_xlabel("k: training examples removed (the method's top k for the target)", fontsize=10)
    over = f"{full} targets" if full is not None else "targets"
    ax.set_ylabel(f"actual margin drop after retraining\n(mean over {over}" + (f" × {masks} masks" if masks else "")
                  + ", 95% CI)", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.set_title("Counterfactual: removing each method's top-k examples", fontsize=11)
    ax.grid(alpha=0.3)
    note = ("n=…: the targets a point averages\nover, fewer where every retrained\nmodel of a target failed"
            if tags else None)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method", title_fontsize=9)
    if note:
        ax.text(1.02, 0.0, note, transform=ax.transAxes, fontsize=8, va="bottom", ha="left", color="dimgray")
    return _save(fig, path)


def plot_calibration(cells: list[dict], fit_line: dict, names: list[str], colors: dict, path: str) -> dict:
    """Predicted against actual drop, one panel per method with scores (at most three
    panels a row), each titled with the correlation and the calibration slope in significant
    digits (a baseline's scores have their own units: its slope may be 0.0029 or 3700)."""
    from matplotlib.ticker import MaxNLocator

    from orchestrator.evaluate import _plt, _save
    plt = _plt()
    shown = [m for m in names if m in fit_line]
    cols = min(3, max(1, len(shown)))
    nrows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.9 * cols, 3.5 * nrows + 0.5), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes.flat, shown):
        p = np.array([c["predicted"] for c in cells if c["method"] == name], float)
        a = np.array([c["actual"] for c in cells if c["method"] == name], float)
        ax.scatter(p, a, s=14, color=colors[name], alpha=0.7)
        f = fit_line[name]
        if f["slope"] is not None and np.isfinite(p).any():
            xs = np.array([min(np.nanmin(p), 0), np.nanmax(p)])
            ax.plot(xs, f["slope"] * xs, color=colors[name], linewidth=1, label="fitted slope")
        if name == "datamodels":
            lim = [min(np.nanmin(p), np.nanmin(a), 0), max(np.nanmax(p), np.nanmax(a), 0)]
            ax.plot(lim, lim, color="gray", linestyle="--", linewidth=1, label="actual = predicted")
        ax.legend(fontsize=8, loc="best")
        held = f.get("held_out_slope")
        ax.set_title(f"{name}\nr = {sig(f['correlation'], 2)}, slope = {sig(f['slope'])}"
                     + (f" (held out: {sig(held)})" if held is not None else ""), fontsize=9.5)
        ax.set_xlabel("predicted drop (sum of scores removed)", fontsize=9)
        ax.set_ylabel("actual drop (retrained)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(labelsize=8.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("Predicted against actual margin drop, one point per (target, k); slope: actual per unit of "
                 "predicted drop\n(held out: the slope once each target is scaled by the other targets' fit)",
                 fontsize=10)
    return _save(fig, path)


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
    ks = resolved_ks(ctx, "brittleness")
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
    plots = {"brittleness": _store_plot(ctx, "brittleness", path)}
    out["plots"] = plots
    out["files"] = [out["table"], *plots.values()]
    k = str(max(ks))
    out["headline"] = [f"targets flipped by removing at most {k} training examples: {curve[k]['predicted']:.2f} "
                       f"predicted, {curve[k]['verified']:.2f} verified by retraining (of {len(targets)} correctly "
                       f"classified targets)"]
    ctx.tracker.log_metrics({**{f"brittle_predicted_k{k}": v["predicted"] for k, v in curve.items()},
                             **{f"brittle_verified_k{k}": v["verified"] for k, v in curve.items()}})
    for k, v in curve.items():
        log.info("brittleness: removing <= %s examples flips %.3f of targets (predicted), %.3f (verified)",
                 k, v["predicted"], v["verified"])
    return out


def plot_brittleness(curve: dict, ks: list[int], targets: int, masks: int, path: str) -> dict:
    """The fraction of the targets flipped by removing at most k examples against k (log x
    ticked at the ks), predicted and verified: two styles, so that equal curves both show."""
    from orchestrator.evaluate import _plt, _save, count_log_axis
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax.plot(ks, [curve[str(k)]["predicted"] for k in ks], "--o", color="tab:blue", markersize=9,
            markerfacecolor="none", linewidth=2, label="predicted by the datamodels (greedy by weight)")
    ax.plot(ks, [curve[str(k)]["verified"] for k in ks], "-s", color="tab:orange", markersize=5,
            label=f"verified: mean margin < 0 after retraining ({masks} masks)")
    count_log_axis(ax, ks)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k: training examples removed (at most)", fontsize=10)
    ax.set_ylabel(f"fraction of the {targets} correctly\nclassified targets flipped", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.set_title("Brittleness: targets flipped by removing at most k examples", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    return _save(fig, path)
