"""stage=memorization: how much each training example is memorized, from the models already
trained (task.targets=both): the mean margin, and the mean correctness, of a model on the
example itself over the models trained with it, minus the same over the models trained
without it (api.memorization_of). Where the task planted label noise (task.label_noise), how
well the estimate finds the flipped labels.
"""
from __future__ import annotations

import logging

import numpy as np

from orchestrator.analyses.common import AnalysisError, label, task_images
from orchestrator.api import memorization_of
from orchestrator.metrics.memorization import detection, order
from orchestrator.plots.analyses import plot_rows
from orchestrator.settings.schema import MemorizationConf, make_conf
from orchestrator.storage.store import Layout

log = logging.getLogger(__name__)

FRACTIONS = (0.05, 0.1, 0.2)


def check(plan) -> None:
    """Before anything is written: the ledger holds the models' margins on the training
    examples (an experiment of task.targets=both) and some train models."""
    if not plan.n_self:
        raise AnalysisError("stage=memorization needs every model's margins on the training examples beside the "
                            "targets: run with task.targets=both (a new experiment: stage=all trains it), then "
                            "stage=memorization")
    if not plan.store.list(Layout.LEDGER, ".parquet") or not plan.ledger.index().count("train"):
        raise AnalysisError(f"stage=memorization: {plan.store.where()} has no trained models yet; run stage=all "
                            f"(or stage=train) first")


def retrains(cfg) -> bool:
    """Whether the stage runs Ray work: the check by retraining (memorization.verify > 0), the
    self-weights' fits (memorization.self_weight)."""
    return int(cfg.memorization.verify) > 0 or bool(cfg.memorization.self_weight)


def memorization_stage(ctx, settings: dict) -> dict:
    """memorization.json (summary numbers; per-example values in memorization.csv) and
    memorization_extremes.png (the most and least memorized examples with their labels)."""
    conf = make_conf(MemorizationConf, settings, "memorization")
    plan = ctx.plan
    ev = plan.cfg.eval
    est = memorization_of(plan.ledger, ctx.ledger_index(), plan.n, int(ev.bootstrap), int(ev.bootstrap_seed))
    mem, ci = est["margin"]["value"], est["margin"]["ci95"]
    acc, acc_ci = est["correct"]["value"], est["correct"]["ci95"]
    images = task_images(plan, "memorization", needed=False)
    y = np.asarray(images[1]) if images is not None else None
    names = images[4] if images is not None else None
    from workers.tasks import member
    truth = member(plan.task, "true_labels")
    truth = truth() if truth is not None else None
    finite = np.isfinite(mem)
    found: dict = {}
    out: dict = {
        "estimate": "mean over the models trained with the example minus the mean over those without, of the "
                    "model's margin on the example (its correctness for `correct`), 95% bootstrap over models",
        "models": est["models"], "examples": int(plan.n), "estimated": int(finite.sum()),
        "margin": _quantiles(mem), "correct": _quantiles(acc),
        "spearman_margin_correct": _spearman(mem, acc),
    }
    header = ["id", "label", "mem_margin", "mem_margin_lo", "mem_margin_hi", "mem_correct", "mem_correct_lo",
              "mem_correct_hi", "in_models", "out_models"]
    rows = [[i, label(names, y[i]) if y is not None else "", *_num(mem[i], *ci[i], acc[i], *acc_ci[i]),
             int(est["in_models"][i]), int(est["out_models"][i])] for i in range(plan.n)]
    weights = None
    if conf.self_weight:          # the same files as stage=mislabel's self_weight (computed once for both)
        from orchestrator.analyses.mislabel import ray_scores
        weights = ray_scores(ctx, ["self_weight"], est["models"])["self_weight"]
        header.append("self_weight")
        for i, r in enumerate(rows):
            r += _num(weights[i])
        out["self_weight"] = {**_quantiles(weights), "spearman_with_margin": _spearman(mem, weights)}
    if truth is not None:
        y_true, flipped = truth
        header += ["true_label", "flipped"]
        for i, r in enumerate(rows):
            r += [label(names, y_true[i]), bool(flipped[i])]
        n_boot, seed = int(ev.bootstrap), int(ev.bootstrap_seed)
        found = {key: detection(np.nan_to_num(v, nan=-np.inf), flipped, FRACTIONS, n_boot, seed)
                 for key, v in (("margin", mem), ("correct", acc), ("self_weight", weights)) if v is not None}
        out["label_noise"] = {"flipped": int(flipped.sum()),
                              "mean_margin_flipped": float(np.nanmean(mem[flipped])) if flipped.any() else None,
                              "mean_margin_clean": float(np.nanmean(mem[~flipped])),
                              "detection": {k: _jsonable(v) for k, v in found.items()}}
    if conf.verify:
        out["verify"] = verify_by_retraining(ctx, mem, conf)
    out["table"] = ctx.artifacts.json("memorization", out)
    out["csv"] = ctx.artifacts.csv("memorization.csv", header, rows)
    plots = {}
    if images is not None and conf.show:
        path = ctx.artifacts.local("memorization_extremes.png")
        ranked = [int(i) for i in order(mem) if finite[i]]
        shown = {"most memorized": ranked[:conf.show], "least memorized": ranked[::-1][:conf.show]}
        x, labels = images[0], np.asarray(images[1])
        true_labels, flips = truth if truth is not None else (labels, np.zeros(plan.n, bool))
        grid = []
        for what, ids in shown.items():
            per_row = 6
            for a in range(0, len(ids), per_row):
                cells = []
                for i in ids[a:a + per_row]:
                    flipped_here = bool(flips[i])
                    given = label(names, labels[i])
                    caption = (f"#{i} {given}" + (f" (true {label(names, true_labels[i])})" if flipped_here else "")
                               + f"\nmem {mem[i]:+.2f}\nacc {acc[i]:+.2f}")
                    cells.append((x[i], caption, "darkred" if flipped_here else "black"))
                grid.append((what if a == 0 else "", cells))
        plot_rows(grid, f"Memorization of the training examples ({est['models']} models): mem = mean margin on the "
                        f"example of the models trained with it minus of those without; acc = the same for "
                        f"correctness" + ("; red: a flipped label" if truth is not None else ""), path)
        plots["memorization_extremes"] = ctx.artifacts.plot("memorization_extremes", path)
    out["plots"] = plots
    out["files"] = [out["table"], out["csv"], *plots.values()]
    top_decile = float(np.nanquantile(mem, 0.9)) if finite.any() else float("nan")
    headline = [f"memorization of {int(finite.sum())} training examples from {est['models']} models: median margin "
                f"gain {_signed(out['margin']['q50'])}, top decile above {_signed(top_decile)}; median correctness "
                f"gain {_signed(out['correct']['q50'])}"]
    metrics = {"mem_margin_median": out["margin"]["q50"], "mem_margin_q90": top_decile,
               "mem_correct_median": out["correct"]["q50"]}
    if truth is not None:
        d = found["margin"]
        headline.append(f"flipped labels ({out['label_noise']['flipped']}): memorization finds "
                        f"{100 * d['found'][0.2]:.0f}% of them in the top 20% (AUC {d['auc']:.3f} "
                        f"[{d['auc_ci95'][0]:.3f}, {d['auc_ci95'][1]:.3f}])")
        metrics.update({"mem_auc_flipped": d["auc"], "mem_found20_flipped": d["found"][0.2]})
    if weights is not None:
        rho = out["self_weight"]["spearman_with_margin"]
        headline.append(f"datamodel self-weights: median {_signed(out['self_weight']['q50'])}; Spearman with the "
                        f"margin gain {'n/a' if rho is None else f'{rho:.3f}'}")
    if "verify" in out:
        v = out["verify"]
        rho = v["spearman"]
        headline.append(f"checked by retraining {v['examples']} examples ({v['masks']} masks, each trained with "
                        f"and without every one, at the same size): Spearman "
                        f"{'n/a' if rho is None else f'{rho:.3f}'} between the ledger's estimate and the direct one")
        metrics["mem_verify_spearman"] = rho
    out["headline"] = headline
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if v is not None and np.isfinite(v)})
    for line in headline:
        log.info("memorization: %s", line)
    return out


def verify_by_retraining(ctx, mem: np.ndarray, conf: MemorizationConf) -> dict:
    """The direct estimate for `conf.verify` examples at evenly spaced ranks of `mem`: fresh
    α-masks, each trained as drawn and with the example's membership toggled at the same
    size (orchestrator.analyses.removal, toggle; the same seed), the mean over the masks of
    the margin on the example of the model that held it minus that of the one that did not,
    with a 95% bootstrap interval over the masks. The two models of a pair differ in the
    example and one other, never in the number of SGD steps."""
    from orchestrator.analyses import removal
    plan = ctx.plan
    ev = plan.cfg.eval
    ranked = [int(i) for i in order(mem) if np.isfinite(mem[i])]
    k = min(int(conf.verify), len(ranked))
    picks = [ranked[int(round(q))] for q in np.linspace(0, len(ranked) - 1, k)] if k else []
    rem = removal.Removals("memorization", int(conf.verify_masks), toggle=True)
    rs = [rem.add([i]) for i in picks]
    _, stats = removal.train(ctx, rem)
    own = removal.own_margins(ctx, rem, picks)                          # [R, J, k]
    holds = rem.base_masks(int(plan.cfg.exp.seed), plan.n, float(plan.cfg.masks.alpha))[:, picks]   # [J, k]
    rng = np.random.default_rng(int(ev.bootstrap_seed))
    direct: list[float] = []
    ci: list[list[float | None]] = []
    pairs: list[int] = []
    for col, r in enumerate(rs):
        d = np.where(holds[:, col], own[0, :, col] - own[r, :, col], own[r, :, col] - own[0, :, col])
        d = d[np.isfinite(d)]
        pairs.append(int(len(d)))
        direct.append(float(d.mean()) if len(d) else float("nan"))
        if len(d) > 1:
            boot = d[rng.integers(0, len(d), (int(ev.bootstrap), len(d)))].mean(1)
            ci.append([float(x) for x in np.quantile(boot, [0.025, 0.975])])
        else:
            ci.append([None, None])
    ledger_values = [float(mem[i]) for i in picks]
    return {"examples": k, "masks": int(conf.verify_masks), "ids": picks, "ledger": ledger_values,
            "direct": _num(*direct), "direct_ci95": ci, "pairs": pairs,
            "spearman": _spearman(np.array(ledger_values), np.array(direct)),
            "mean_abs_diff": float(np.nanmean(np.abs(np.array(ledger_values) - np.array(direct)))) if k else None,
            "models": stats}


def _signed(x) -> str:
    """+0.123, or n/a where no example was in some models and out of others."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def _quantiles(v: np.ndarray) -> dict:
    f = v[np.isfinite(v)]
    if not len(f):
        return {q: None for q in ("q10", "q50", "q90", "mean")}
    q10, q50, q90 = np.quantile(f, [0.1, 0.5, 0.9])
    return {"q10": float(q10), "q50": float(q50), "q90": float(q90), "mean": float(f.mean())}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    return float(spearmanr(a[ok], b[ok])[0])


def _num(*values) -> list:
    return [None if not np.isfinite(v) else round(float(v), 6) for v in values]


def _jsonable(d: dict) -> dict:
    return {"auc": d["auc"], "auc_ci95": d["auc_ci95"],
            "found": {str(q): v for q, v in d["found"].items()},
            "found_ci95": {str(q): v for q, v in d["found_ci95"].items()}}


def run(ctx) -> dict:
    """stage=memorization, with its config section's settings."""
    from omegaconf import OmegaConf
    return memorization_stage(ctx, OmegaConf.to_container(ctx.plan.cfg.memorization, resolve=True))
