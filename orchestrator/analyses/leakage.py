"""stage=leakage: each target's top-weight training examples beside it, and the (target,
training example) pairs that are near-duplicates in input space.
"""
from __future__ import annotations

import logging

import numpy as np

from orchestrator.analyses.common import datamodels, label, no_more_weights, task_images
from orchestrator.metrics.geometry import nearest, positive_top, robust_threshold, weight_ranks
from orchestrator.plots.analyses import plot_rows
from orchestrator.settings.schema import LeakageConf, make_conf

log = logging.getLogger(__name__)


def find_leakage(x_train, x_target, W: np.ndarray, conf: LeakageConf) -> dict:
    """Near-duplicate (target, training example) pairs among each target's nearest
    neighbours, with each pair's datamodel weight and rank, and how often a target's
    top-weight examples (its largest positive weights: `top`, -1 past the last positive one)
    are its nearest neighbour in input space. W: [T, n] for these targets."""
    sims, ids = nearest(x_target, x_train, conf.neighbours, conf.block, conf.device)
    thr = float(conf.threshold) if conf.threshold is not None else robust_threshold(sims[:, 0], conf.spread)
    t_of, j_of = np.nonzero(sims >= thr)
    i_of = ids[t_of, j_of]
    top = positive_top(W, conf.top)
    nn1 = ids[:, 0]
    return {"threshold": thr, "nearest_similarity": sims[:, 0], "nearest_ids": ids, "nearest_sims": sims,
            "top": top, "pairs": {"target": t_of, "train_id": i_of, "neighbour": j_of + 1,
                                  "similarity": sims[t_of, j_of], "weight": W[t_of, i_of],
                                  "rank": weight_ranks(W, t_of, i_of)},
            "top1_is_nearest": int((top[:, 0] == nn1).sum()),
            "nearest_in_top": int((top == nn1[:, None]).any(1).sum())}


def leakage_stage(ctx, settings: dict) -> dict:
    """Near-duplicates of the targets in the training set and their datamodel weights:
    leakage.json and leakage_pairs.csv (one row per flagged pair), leakage_pairs.png (the flagged
    pairs) and leakage_top.png (targets beside their top-weight examples and nearest neighbour)."""
    conf = make_conf(LeakageConf, settings, "leakage")
    plan = ctx.plan
    W, _, dm_dir = datamodels(ctx)
    x_tr, y_tr, x_tg, y_tg, names = task_images(plan, "leakage")
    T = min(int(conf.targets), plan.n_targets)
    res = find_leakage(x_tr, x_tg[:T], W[:T], conf)
    p = res["pairs"]
    order = np.lexsort((-p["similarity"], p["target"]))
    rows = [[int(p["target"][j]), int(p["train_id"][j]), float(p["similarity"][j]), float(p["weight"][j]),
             int(p["rank"][j]), int(p["neighbour"][j]), label(names, y_tg[p["target"][j]]),
             label(names, y_tr[p["train_id"][j]])] for j in order]
    header = ["target", "train_id", "similarity", "weight", "rank", "neighbour", "target_class", "train_class"]
    nn = res["nearest_similarity"]
    out = {"measure": "cosine similarity of the centred, normalised pixel vectors (Pearson's r of two images)",
           "threshold": res["threshold"],
           "threshold_rule": ("fixed (leakage.threshold)" if conf.threshold is not None else
                              f"robust: 1 - exp(median(log d) - {conf.spread:g} MAD(log d)), "
                              f"d = 1 - nearest similarity"),
           "targets": T, "neighbours": int(conf.neighbours), "top": int(conf.top), "datamodels": dm_dir,
           "nearest_similarity": {f"q{int(q * 100)}": float(np.quantile(nn, q)) for q in (0, 0.5, 0.9, 0.99, 1)},
           "flagged_pairs": len(rows), "flagged_targets": int(len(np.unique(p["target"]))),
           "top1_is_nearest": res["top1_is_nearest"], "nearest_in_top": res["nearest_in_top"],
           "flagged_in_top": int(((p["rank"] <= conf.top) & (p["weight"] > 0)).sum())}
    out["table"] = ctx.artifacts.json("leakage", {**out, "pairs": [dict(zip(header, r)) for r in rows]})
    out["csv"] = ctx.artifacts.csv("leakage_pairs.csv", header, rows)
    plots = {}
    if rows and conf.show:
        path = ctx.artifacts.local("leakage_pairs.png")
        per_row = 4
        cells: list = []
        for r in rows[:conf.show]:
            t, i, s, w, rank = r[:5]
            cells.append([(x_tg[t], f"target #{t}\n{label(names, y_tg[t])}", "black"),
                          (x_tr[i], f"train #{i}, s={s:.3f}\nw={w:+.3g} rank {rank}", "darkred")])
        grid = [(f"pairs {a + 1}-{min(a + per_row, len(cells))}",
                 [c for pair in cells[a:a + per_row] for c in pair + [None]][:-1])
                for a in range(0, len(cells), per_row)]
        plot_rows(grid, f"Near-duplicate pairs: similarity s ≥ {res['threshold']:.4f} ({len(rows)} pairs; "
                        f"the first {min(conf.show, len(rows))}); w: the train example's weight in the target's "
                        f"datamodel, rank 1 = the largest", path)
        plots["leakage_pairs"] = ctx.artifacts.plot("leakage_pairs", path)
    if conf.show_targets:
        path = ctx.artifacts.local("leakage_top.png")
        flagged = list(dict.fromkeys(int(t) for t in p["target"][order]))
        shown = (flagged + [t for t in range(T) if t not in set(flagged)])[:conf.show_targets]
        plot_rows([(f"target #{t}", _top_cells(t, res, W, x_tr, y_tr, x_tg, y_tg, names)) for t in shown],
                  f"Each target, the training examples with its {conf.top} largest positive datamodel "
                  f"weights (+k, weight w; zero weights are not shown) and its nearest neighbour in input "
                  f"space (s: similarity; red: s ≥ {res['threshold']:.4f}; rank: of its weight)", path)
        plots["leakage_top"] = ctx.artifacts.plot("leakage_top", path)
    out["plots"] = plots
    out["files"] = [out["table"], out["csv"], *plots.values()]
    out["headline"] = [f"{len(rows)} near-duplicate (target, training example) pairs with similarity >= "
                       f"{res['threshold']:.4f} among {T} targets; the largest-weight example is the target's "
                       f"nearest neighbour for {res['top1_is_nearest']} of them"]
    ctx.tracker.log_metrics({"leakage_flagged_pairs": len(rows), "leakage_threshold": res["threshold"],
                             "leakage_top1_is_nearest": res["top1_is_nearest"]})
    log.info("leakage: %d pairs with similarity >= %.4f among %d targets; the top-weight example is the nearest "
             "neighbour for %d targets", len(rows), res["threshold"], T, res["top1_is_nearest"])
    return out


def _top_cells(t: int, res: dict, W, x_tr, y_tr, x_tg, y_tg, names) -> list:
    """A leakage_top.png row: the target, its top-weight examples (positive weights only: a
    note where there are fewer), a gap, its nearest neighbour."""
    thr = res["threshold"]
    sim_of = dict(zip(res["nearest_ids"][t].tolist(), res["nearest_sims"][t].tolist()))
    cells: list = [(x_tg[t], f"target\n{label(names, y_tg[t])}", "black")]
    top = [int(i) for i in res["top"][t] if i >= 0]
    for j, i in enumerate(top):
        s = sim_of.get(i)
        cells.append((x_tr[i], f"+{j + 1} {label(names, y_tr[i])}\nw={W[t, i]:+.3g}"
                      + (f"\ns={s:.3f}" if s is not None else ""),
                      "darkred" if s is not None and s >= thr else "black"))
    cells += no_more_weights(len(top), len(res["top"][t]))
    i, s = int(res["nearest_ids"][t, 0]), float(res["nearest_sims"][t, 0])
    if W[t, i] > 0:
        weight = f"rank {int(weight_ranks(W, np.array([t]), np.array([i]))[0])}"
    else:
        weight = "weight 0" if W[t, i] == 0 else f"w={W[t, i]:+.3g}"
    cells += [None, (x_tr[i], f"nearest\ns={s:.3f}\n{weight}", "darkred" if s >= thr else "black")]
    return cells


def run(ctx) -> dict:
    """stage=leakage, with its config section's settings."""
    from omegaconf import OmegaConf
    return leakage_stage(ctx, OmegaConf.to_container(ctx.plan.cfg.leakage, resolve=True))
