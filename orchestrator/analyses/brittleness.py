"""stage=brittleness: for correctly classified targets, the datamodel's smallest flipping
set (greedy by weight), verified by retraining masks without it.
"""
from __future__ import annotations

import logging

import numpy as np

from orchestrator.analyses import removal
from orchestrator.analyses.common import datamodels
from orchestrator.analyses.counterfactual import CounterfactualError, chosen_targets, resolved_ks
from orchestrator.metrics.removal import support_sizes
from orchestrator.plots.analyses import plot_brittleness
from orchestrator.storage.evalset import eval_set

log = logging.getLogger(__name__)


def run(ctx) -> dict:
    from omegaconf import OmegaConf

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
    out["table"] = ctx.artifacts.json("brittleness", {**out, "per_target": per_target}, train_stats.get("dir"))
    path = ctx.artifacts.local("brittleness.png")
    plot_brittleness(curve, ks, len(targets), rem.base, path)
    plots = {"brittleness": ctx.artifacts.plot("brittleness", path)}
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
