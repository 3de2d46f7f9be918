"""The evaluate stage: the Linear Datamodeling Score of every method on the held-out eval masks
(orchestrator.metrics.lds), with the compute each cost (orchestrator.metrics.compute): the
datamodels, each prefix of them (the LDS-against-models curve), every baseline and each
checkpoint budget of the checkpoint ensembles. Scored one target block at a time, plotted,
written to the store and logged to MLflow.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from orchestrator.metrics.compute import baseline_compute, datamodels_compute
from orchestrator.metrics.lds import score_blocks
from orchestrator.plots.evaluate import plot_lds, plot_lds_vs_compute, plot_lds_vs_models, plot_top_examples
from orchestrator.plots.style import task_class_names
from orchestrator.runtime.artifacts import Artifacts
from orchestrator.storage import datamodels as dm_format
from orchestrator.storage.checkpoints import check_checkpoint
from orchestrator.storage.datamodels import DatamodelsError, fit_seconds, iter_datamodels
from orchestrator.storage.evalset import eval_set
from orchestrator.storage.ledger import LedgerError
from orchestrator.storage.scores import BaselinesError, budget_files, expected_files, open_scores
from orchestrator.storage.store import CorruptFile, Layout
from workers.tasks import member

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("lds", "lds_curve", "eval_masks", "plots")     # what the stage puts in summary.json


@dataclass
class EvalSet:
    """What every method is scored on: the eval masks, their replica-averaged margins, the
    bootstrap's settings, and the rows of the targets the plot of top examples shows (kept
    as the target blocks go by, so that no method's whole [T, n] is held)."""
    X: np.ndarray
    Y: np.ndarray
    replicas: np.ndarray
    n_boot: int
    seed: int
    shown: int
    weights: dict = field(default_factory=dict)      # method -> rows of the shown targets

    def score(self, name: str | None, blocks, with_intercept: bool) -> tuple[dict, np.ndarray]:
        """LDS of the target blocks (a, b, weights [b - a, n], intercept); `name`: keep the shown
        targets' rows as that method's."""
        return score_blocks(self.X, self.Y, self._kept(name, blocks), with_intercept, self.n_boot, self.seed)

    def _kept(self, name, blocks):
        for a, b, w, icpt in blocks:
            if name is not None and a < self.shown:
                self.weights[name] = np.concatenate([self.weights.get(name, np.zeros((0, w.shape[1]), np.float32)),
                                                     np.asarray(w[:self.shown - a], np.float32)])
            yield a, b, w, icpt


def datamodel_blocks(store, rel_dir: str, n_targets: int):
    """The target blocks of a datamodels directory; a chunk that fails verification is one line
    naming it and the fix."""
    try:
        yield from ((a, b, w, icpt) for a, b, w, icpt in iter_datamodels(store, rel_dir, n_targets))
    except CorruptFile as err:
        raise DatamodelsError(f"evaluate: {store.where(err.rel)} fails verification ({err.reason}); "
                              f"run stage=fit to refit it") from None


class Checkpoints:
    """The digests of the checkpoints in the store now, read once each, to tell a scores file
    computed from other checkpoints (retrained since) from a current one."""

    def __init__(self, plan):
        self.plan, self.now = plan, {}

    def stale(self, meta: dict) -> str | None:
        """What is wrong with the checkpoints a scores file records, or None. A checkpoint that
        is gone or fails verification now is the train and baselines stages' to mend: it does
        not make the scores stale."""
        used = meta.get("checkpoint_digests")
        if not isinstance(used, list):
            return "checkpoints it does not record (it was written before scores recorded them)"
        for i, digest in enumerate(used):
            if i not in self.now:
                self.now[i] = check_checkpoint(self.plan.store, i, self.plan.config_hash)[0]
            if self.now[i] is not None and self.now[i] != digest:
                return f"another checkpoint {i} than the one in {self.plan.store.where(Layout.CHECKPOINTS)} now"
        return None


def baseline_blocks(plan, checkpoints: Checkpoints, name: str, rel: str, what: str = ""):
    """(metadata, target blocks (a, b, scores [b - a, n], None)) of a method's scores file,
    checked against the checkpoints in the store now."""
    f = open_scores(plan.store, rel, plan.n, plan.n_targets, f"evaluate: baseline {name}{what}")
    stale = checkpoints.stale(f.meta)
    if stale is not None:
        raise BaselinesError(f"evaluate: {plan.store.where(rel)} ({name}{what}) was computed from {stale}; "
                             f"run stage=baselines to score them again")
    return f.meta, ((a, b, S.T, None) for a, b, S in f.blocks())


def score_datamodels(plan, ev: EvalSet, datamodels_dir: str, prefix_dirs: dict, compute: dict):
    """(results, per target LDS, the LDS-against-models curve) of the datamodels and their prefixes."""
    store, per_model = plan.store, compute.get("per_model")
    result, per_target = ev.score("datamodels", datamodel_blocks(store, datamodels_dir, plan.n_targets), True)
    fitting = None
    if compute.get("datamodels") is not None and per_model is not None and compute.get("models") is not None:
        fitting = float(compute["datamodels"]) - float(per_model) * int(compute["models"])
    _, parts = datamodels_compute(compute.get("models"), per_model, fitting)
    result.update(seconds=compute.get("datamodels"), seconds_parts=parts)
    curve = {}
    for m, d in sorted(prefix_dirs.items()):
        curve[int(m)], _ = ev.score(None, datamodel_blocks(store, d, plan.n_targets), True)
        total, parts = datamodels_compute(int(m), compute.get("per_model", 0.0), fit_seconds(store, d))
        curve[int(m)].update(seconds=total, seconds_parts=parts)
    if curve and compute.get("models"):
        curve[int(compute["models"])] = dict(result)
    return result, per_target, curve


def score_baselines(plan, ev: EvalSet, per_model) -> tuple[dict, dict, dict]:
    """(results, per target LDS, budget curves) of every configured baseline, and of each
    checkpoint budget k < K of the checkpoint ensembles (its K point is the method's own)."""
    checkpoints = Checkpoints(plan)
    budget_rel = budget_files(plan.cfg)
    results, per_target, lds_budget = {}, {}, {}
    for name, rel in sorted(expected_files(plan.cfg).items()):
        meta, blocks = baseline_blocks(plan, checkpoints, name, rel)
        results[name], per_target[name] = ev.score(name, blocks, False)
        total, parts = baseline_compute(meta.get("seconds"), meta.get("checkpoints"), per_model)
        results[name].update(seconds=total, seconds_parts=parts, params=meta.get("params"),
                             checkpoints=meta.get("checkpoints"))
        if name not in budget_rel:
            continue
        curve_k = {}
        for k, brel in sorted(budget_rel[name].items()):
            mk, blocks_k = baseline_blocks(plan, checkpoints, name, brel,
                                           f" for its first {k} checkpoints (baselines.budget_checkpoints)")
            rk, _ = ev.score(None, blocks_k, False)
            total_k, parts_k = baseline_compute(mk.get("seconds"), k, per_model)
            curve_k[k] = {**rk, "seconds": total_k, "seconds_parts": parts_k}
        r = results[name]
        curve_k[int(meta.get("checkpoints") or 0)] = {key: r[key] for key in
                                                      ("mean", "ci95", "median", "targets", "seconds", "seconds_parts")}
        lds_budget[name] = {str(k): v for k, v in sorted(curve_k.items())}
        results[name]["budget"] = lds_budget[name]
    return results, per_target, lds_budget


def read_eval_set(plan, shown: bool = True) -> EvalSet:
    """The eval set of this run (its eval masks and replicas, from the ledger), with the
    bootstrap's settings; `shown`: keep the rows of the targets the plot of top examples shows."""
    cfg = plan.cfg
    X, Y, replicas = eval_set(plan.ledger, plan.n, plan.n_targets)
    if len(X) < 3:
        raise LedgerError(f"only {len(X)} eval masks in the ledger; LDS needs more (masks.n_eval)")
    return EvalSet(X, Y, replicas, int(cfg.eval.bootstrap), int(cfg.eval.bootstrap_seed),
                   min(int(cfg.eval.get("show_targets") or 0), plan.n_targets) if shown else 0)


def draw(plan, artifacts: Artifacts, ev: EvalSet, results: dict, per_target: dict, curve: dict, lds_budget: dict,
         per_model) -> dict[str, str]:
    """The plots (local paths in the scratch directory's evaluate/), stored with the LDS per target."""
    plots = {"lds": artifacts.local("evaluate/lds.png"),
             "lds_vs_compute": artifacts.local("evaluate/lds_vs_compute.png")}
    plot_lds(results, per_target, plots["lds"])
    plot_lds_vs_compute(results, curve, plots["lds_vs_compute"], lds_budget, per_model)
    if len(curve) > 1:
        plots["lds_vs_models"] = artifacts.local("evaluate/lds_vs_models.png")
        plot_lds_vs_models(curve, plots["lds_vs_models"])
    images = member(plan.task, "arrays")
    if images is not None and ev.shown > 0:
        x_tr, y_tr, x_tg, y_tg, num_classes = images()
        plots["top_examples"] = artifacts.local("evaluate/top_examples.png")
        plot_top_examples(ev.weights, x_tr, x_tg, list(range(ev.shown)), plots["top_examples"], train_labels=y_tr,
                          target_labels=y_tg, names=task_class_names(plan.task, int(num_classes)))
    artifacts.arrays(Layout.LDS_PER_TARGET, per_target)
    return plots


def log_results(tracker, results: dict, curve: dict, lds_budget: dict, plots: dict) -> dict:
    """The stage's MLflow run: every method's LDS, the curves by step, the plots; returns the
    metrics of each method (its own nested run's, logged after the stage's run: `after`)."""
    method_metrics = {}
    for name, r in results.items():
        metrics = {"lds": r["mean"], "lds_ci_lo": r["ci95"][0], "lds_ci_hi": r["ci95"][1]}
        if r.get("seconds") is not None:
            metrics["compute_seconds"] = r["seconds"]
        for part, v in (r.get("seconds_parts") or {}).items():
            if v is not None:
                metrics[f"compute_seconds_{part}"] = v
        if "mse" in r:
            metrics["mse"] = r["mse"]
        method_metrics[name] = metrics
        tracker.log_metrics({f"lds_{name}": r["mean"]})
    for m, r in sorted(curve.items()):
        tracker.log_metrics({"lds_datamodels_curve": r["mean"]}, step=m)
    for name, bk in lds_budget.items():
        for k, r in bk.items():
            tracker.log_metrics({f"lds_{name}_budget": r["mean"]}, step=int(k))
    for path in plots.values():
        tracker.log_artifact(path)
    return method_metrics


def score(plan, tracker, datamodels_dir: str, prefix_dirs: dict | None = None, compute: dict | None = None,
          artifacts: Artifacts | None = None) -> dict:
    """LDS of the datamodels, of each datamodels prefix and of every configured baseline
    (and of each checkpoint budget of the checkpoint ensembles, baselines.budget_checkpoints).
    Plots are drawn in the scratch directory, then written to the store and MLflow.

    compute: {"models": m, "per_model": seconds per trained model, "datamodels": per_model·m +
    fit seconds}. The compute counted for each method (result["seconds"], its parts in
    result["seconds_parts"]):
      datamodels (and each prefix of m models): m × per_model (training) + the fit's seconds;
      a baseline with k checkpoints: k × per_model (training the checkpoint models, which
        are train-set models like the others) + its measured scoring seconds (for a budget
        k < K, the seconds of those k checkpoints' share of the scoring pass).
    """
    compute = compute or {}
    artifacts = artifacts or Artifacts(plan.store, tracker, tempfile.mkdtemp(prefix="datamodels-plots-"))
    ev = read_eval_set(plan)
    X, replicas = ev.X, ev.replicas
    dm, dm_per_target, curve = score_datamodels(plan, ev, datamodels_dir, prefix_dirs or {}, compute)
    results, per_target, lds_budget = score_baselines(plan, ev, compute.get("per_model"))
    results, per_target = {"datamodels": dm, **results}, {"datamodels": dm_per_target, **per_target}
    plots = draw(plan, artifacts, ev, results, per_target, curve, lds_budget, compute.get("per_model"))
    stored = {name: artifacts.plot(name, path, log=False) for name, path in plots.items()}
    method_metrics = log_results(tracker, results, curve, lds_budget, plots)
    return {"lds": results, "lds_curve": {str(m): r for m, r in curve.items()}, "lds_budget": lds_budget,
            "method_metrics": method_metrics, "eval_masks": int(len(X)), "replicas_mean": float(replicas.mean()),
            "plots": stored, "scratch": os.path.dirname(plots["lds"])}


def run(ctx) -> dict:
    """LDS of every method (`score`), with the compute each cost: the training of the models it
    uses, at the mean seconds per trained model, and its fitting or scoring."""
    plan = ctx.plan
    index = ctx.ledger_index()
    train_seconds = plan.ledger.seconds("train", index)   # one column, not the masks
    m = len(train_seconds)
    dm_dir = dm_format.full_dir(plan, index)
    per_model = float(np.sum(train_seconds)) / max(m, 1)
    compute = {"models": m, "per_model": per_model,
               "datamodels": per_model * m + dm_format.fit_seconds(plan.store, dm_dir)}
    return score(plan, ctx.tracker, dm_dir, dm_format.prefix_dirs(plan, index), compute, ctx.artifacts)


def after(ctx, out: dict) -> None:
    """After the stage's own MLflow run: one nested run per method, and the plots on the parent run."""
    tracker = ctx.tracker
    for name, metrics in out.pop("method_metrics").items():
        with tracker.stage(f"method:{name}", {"method": name, "params": out["lds"][name].get("params") or {}}):
            tracker.log_metrics(metrics)
    for name in sorted(os.listdir(out["scratch"])):
        if name.endswith(".png"):
            tracker.log_artifact(os.path.join(out["scratch"], name), "plots")
