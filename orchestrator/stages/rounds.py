"""Training in rounds (`masks.n_train=auto`, or a number with a `budget.` rule): train the
round's models, fit the datamodels on them, score their LDS on the eval set, log it to the
parent MLflow run with the number of models as its step (the curve grows live in the UI),
forecast the LDS at 2x and 4x the models from the curve through the rounds so far
(orchestrator.metrics.curve), and stop at the first rule met (orchestrator.settings.budget).

Each round is an ordinary run of the train and fit stages on the first m models (model ids
0..m-1, so a round's models are the next round's first ones): a round that is killed loses only
its unfinished units, and the same command again walks the finished rounds from the store
(nothing trained, nothing refit) up to where it stopped. The pipeline then runs the stages on
the models the rounds stopped at, as `masks.n_train=<that count>` would.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from orchestrator.metrics.curve import forecast, gain_per_doubling
from orchestrator.stages import fit, train
from orchestrator.stages.evaluate import datamodel_blocks, read_eval_set
from orchestrator.storage import datamodels as dm_format

log = logging.getLogger(__name__)


def _interval(ci) -> str:
    return "[-]" if ci is None or not all(math.isfinite(v) for v in ci) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _models_interval(ci) -> str:
    lo, hi = ci
    if not math.isfinite(lo):
        return "[-]"
    return f"[{lo:.0f}, {hi:.0f}]" if math.isfinite(hi) else f"[{lo:.0f}, never]"


def forecast_line(fc: dict | None) -> str:
    """The forecast as the log and the closing table show it."""
    if fc is None:
        return "forecast: after 3 rounds"
    parts = [f"LDS {v['mean']:.3f} {_interval(v['ci95'])} at {m}" for m, v in fc["lds_at"].items()]
    need = fc.get("models_for")
    if need is not None:
        if math.isfinite(need["models"]):
            parts.append(f"LDS {need['lds']:g} at ~{need['models']:.0f} models {_models_interval(need['ci95'])}")
        else:
            parts.append(f"LDS {need['lds']:g} out of reach (limit {fc['limit']['mean']:.3f} "
                         f"{_interval(fc['limit']['ci95'])})")
    return "forecast: " + "; ".join(parts)


def stop_reason(rounds_cfg, done: list[dict], fc: dict | None, next_m: int | None, next_cost: float) -> str | None:
    """Why the rounds stop after the last of `done`, or None to train the next."""
    last = done[-1]
    if rounds_cfg.lds is not None and last["lds"] >= rounds_cfg.lds:
        return f"LDS {last['lds']:.4f} reached budget.lds={rounds_cfg.lds:g}"
    gain = last.get("gain_per_doubling")
    if rounds_cfg.gain_per_doubling is not None and gain is not None and gain < rounds_cfg.gain_per_doubling:
        return (f"the LDS gained {gain:.4f} per doubling from {done[-2]['models']} to {last['models']} models, below "
                f"budget.gain_per_doubling={rounds_cfg.gain_per_doubling:g}")
    if next_m is None:
        return f"{last['asked']} train models: the cap (budget.models or masks.n_train)"
    if rounds_cfg.seconds is not None:
        if last["seconds"] >= rounds_cfg.seconds:
            return f"{last['seconds']:.0f} compute seconds spent, budget.seconds={rounds_cfg.seconds:g}"
        if last["seconds"] + next_cost > rounds_cfg.seconds:
            return (f"the next round ({next_m} models) would take about {next_cost:.0f} more compute seconds, past "
                    f"budget.seconds={rounds_cfg.seconds:g} ({last['seconds']:.0f} spent)")
    only_lds = rounds_cfg.lds is not None and rounds_cfg.cap is None and rounds_cfg.seconds is None \
        and rounds_cfg.gain_per_doubling is None
    need = (fc or {}).get("models_for")
    if only_lds and need is not None and need["share_reaching"] < 0.025:
        return (f"the forecast puts LDS {rounds_cfg.lds:g} out of reach (the curve's limit "
                f"{fc['limit']['mean']:.3f} {_interval(fc['limit']['ci95'])})")       # type: ignore[index]
    return None


def run(ctx) -> dict:
    """The rounds, until a rule is met; returns the summary's `rounds` entry (each round's
    models, LDS, gain per doubling, compute seconds and forecast; why they stopped; the models
    the run goes on with)."""
    plan, tracker = ctx.plan, ctx.tracker
    cfg_rounds = plan.rounds
    done: list[dict] = []
    per_target: list[np.ndarray] = []
    ev = None
    fit_seconds_total = 0.0
    m: int | None = cfg_rounds.sizes(1)[0]
    reason = None
    log.info("rounds: from %d train models, x%g a round, until %s", m, cfg_rounds.growth, cfg_rounds.describe())
    t_start = time.perf_counter()
    while m is not None:
        r = len(done) + 1
        plan.use_models(m)
        ctx.index = None
        with tracker.stage(f"round {r}", {"round": {"number": r, "models": m}}):
            trained = train.run(ctx)
            fit.run(ctx, prefixes=False)
        index = ctx.ledger_index()
        if ev is None:
            ev = read_eval_set(plan, shown=False)
        dm_dir = dm_format.full_dir(plan, index)
        result, pt = ev.score(None, datamodel_blocks(plan.store, dm_dir, plan.n_targets), True)
        per_target.append(pt)
        fit_seconds_total += dm_format.fit_seconds(plan.store, dm_dir)
        train_seconds = plan.ledger.seconds("train", index)
        eval_seconds = plan.ledger.seconds("eval", index)
        good = int(len(train_seconds))
        spent = float(np.sum(train_seconds) + np.sum(eval_seconds)) + fit_seconds_total
        row: dict = {"round": r, "asked": int(m), "models": good, "trained": int(trained.get("models_trained", 0)),
               "lds": float(result["mean"]), "ci95": [float(v) for v in result["ci95"]], "seconds": spent,
               "wall_seconds": time.perf_counter() - t_start, "datamodels": dm_dir, "gain_per_doubling": None}
        if done:
            row["gain_per_doubling"] = gain_per_doubling(done[-1]["models"], done[-1]["lds"], good, row["lds"])
        done.append(row)
        fc = forecast([d["models"] for d in done], np.stack(per_target), at=(2 * good, 4 * good),
                      target=cfg_rounds.lds, n_boot=200, seed=int(plan.cfg.eval.bootstrap_seed))
        row["forecast"] = fc
        gain = "" if row["gain_per_doubling"] is None else f", {row['gain_per_doubling']:+.4f} per doubling"
        log.info("round %d: %d train models (%d trained now), LDS %.4f %s%s; %.0f compute seconds so far",
                 r, good, row["trained"], row["lds"], _interval(row["ci95"]), gain, spent)
        log.info("round %d: %s", r, forecast_line(fc))
        metrics = {"lds.datamodels": row["lds"], "lds.datamodels.ci_lo": row["ci95"][0],
                   "lds.datamodels.ci_hi": row["ci95"][1], "rounds.compute_seconds": spent,
                   "rounds.gain_per_doubling": row["gain_per_doubling"]}
        if fc is not None:
            for at, v in fc["lds_at"].items():
                metrics[f"forecast.lds_at_{int(at) // max(good, 1)}x"] = v["mean"]
            if fc.get("models_for") and math.isfinite(fc["models_for"]["models"]):
                metrics["forecast.models_for_lds"] = fc["models_for"]["models"]
        tracker.log_metrics(metrics, step=good)
        next_m = cfg_rounds.next_size(m)
        per_model = float(np.mean(train_seconds)) if good else 0.0
        next_cost = 0.0 if next_m is None else \
            per_model * (next_m - m) + dm_format.fit_seconds(plan.store, dm_dir) * next_m / max(m, 1)
        reason = stop_reason(cfg_rounds, done, fc, next_m, next_cost)
        if reason is not None:
            log.info("rounds: stop after round %d (%d train models): %s", r, good, reason)
            break
        m = next_m
    final = done[-1]
    return {"rule": cfg_rounds.describe(), "first": cfg_rounds.first, "growth": cfg_rounds.growth,
            "rounds": done, "stopped": reason, "models": final["asked"], "lds": final["lds"],
            "seconds": final["seconds"]}
