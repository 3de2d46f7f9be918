"""stage=compare: the datamodels of another recipe on the same training set and targets:
per-target cosine similarity, top-k overlap, the most-disagreeing targets.
"""
from __future__ import annotations

import logging

import numpy as np

from orchestrator.analyses.common import (
    check_datamodels,
    datamodels,
    label,
    no_more_weights,
    other_datamodels,
    other_experiment,
    short,
    task_images,
)
from orchestrator.metrics.geometry import cosine_rows, positive_top, top_overlap
from orchestrator.plots.analyses import plot_rows
from orchestrator.settings.schema import CompareConf, make_conf

log = logging.getLogger(__name__)


def compare_stage(ctx, settings: dict) -> dict:
    """Per-target cosine similarity of this experiment's datamodels and compare.other's, its
    distribution, the overlap of their top examples, and the targets where they disagree most
    (lowest cosine) drawn with both datamodels' top examples: compare.json, compare.png."""
    conf = make_conf(CompareConf, settings, "compare")
    plan = ctx.plan
    WB, where_b = other_datamodels(conf.other, plan)
    WA, _, dm_dir = datamodels(ctx)
    cos = cosine_rows(WA, WB)
    overlap = top_overlap(WA, WB, conf.top)
    ok = np.isfinite(cos)
    v = cos[ok]
    worst = np.flatnonzero(ok)[np.argsort(v, kind="stable")][:conf.show]
    dist = ({"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
             **{f"q{q:02d}": float(np.percentile(v, q)) for q in (0, 5, 25, 75, 95, 100)}} if len(v) else {})
    where_a = f"{plan.store.where()}/{dm_dir}"
    out = {"this": where_a, "other": where_b, "targets": int(len(cos)),
           "undefined": int((~ok).sum()), "cosine": dist, f"top{conf.top}_overlap": float(overlap.mean()),
           "disagree_most": [{"target": int(t), "cosine": float(cos[t]), "top_overlap": float(overlap[t])}
                             for t in worst]}
    out["table"] = ctx.artifacts.json("compare", {**out, "per_target": {"cosine": [None if not np.isfinite(c) else
                                                                                   float(c) for c in cos],
                                                                        "top_overlap": overlap.tolist()}})
    imgs = task_images(plan, "compare", needed=False)
    plots = {}
    if imgs is not None and len(worst):
        x_tr, y_tr, x_tg, y_tg, names = imgs
        rows = []
        for t in worst:
            for tag, W in (("this", WA), ("other", WB)):
                cells: list = [(x_tg[t], f"target #{t} ({label(names, y_tg[t])})\ncos {cos[t]:.3f}", "black")]
                top = [int(i) for i in positive_top(W[t:t + 1], conf.top)[0] if i >= 0]
                for j, i in enumerate(top):
                    cells.append((x_tr[i], f"+{j + 1} {label(names, y_tr[i])}\nw={W[t, i]:+.3g}",
                                  "darkgreen" if int(y_tr[i]) == int(y_tg[t]) else "black"))
                rows.append((tag, cells + no_more_weights(len(top), conf.top)))
        path = ctx.artifacts.local("compare.png")
        plot_rows(rows, f"Targets where the two experiments' datamodels disagree most (lowest cosine): the "
                        f"training examples of each one's {conf.top} largest positive weights (+k, weight w; zero "
                        f"weights are not shown; green: the target's class).\nthis: {short(where_a)}\nother: "
                        f"{short(where_b)}",
                  path)
        plots["compare"] = ctx.artifacts.plot("compare", path)
    out["plots"] = plots
    out["files"] = [out["table"], *plots.values()]
    out["headline"] = ([f"cosine of the two datamodels per target: mean {dist['mean']:.3f}, median "
                        f"{dist['median']:.3f} over {len(v)} targets; top-{conf.top} overlap "
                        f"{float(overlap.mean()):.3f}; other: {where_b}"] if dist else
                       [f"no target has a non-zero datamodel in both experiments; other: {where_b}"])
    if dist:
        ctx.tracker.log_metrics({"compare_cosine_mean": dist["mean"], "compare_cosine_median": dist["median"]})
        log.info("compare: cosine of the datamodels per target: mean %.3f, median %.3f, 5%% %.3f",
                 dist["mean"], dist["median"], dist["q05"])
    return out


def run(ctx) -> dict:
    """stage=compare, with its config section's settings."""
    from omegaconf import OmegaConf
    return compare_stage(ctx, OmegaConf.to_container(ctx.plan.cfg.compare, resolve=True))


def check(plan) -> None:
    """Before anything is written: this experiment's datamodels, and compare.other's."""
    check_datamodels(plan)
    other_experiment(plan.cfg.compare.get("other"), plan)
