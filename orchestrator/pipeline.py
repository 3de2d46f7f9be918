"""The pipeline: masks → train → fit → evaluate, each stage resumable and runnable alone.

`run(cfg)` validates everything before Ray starts, then runs the asked stages under one
MLflow parent run (a nested run per stage) and writes summary.json in the experiment
directory. The ledger, not this process's memory, is the source of truth.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time

import numpy as np
from omegaconf import DictConfig, OmegaConf

from orchestrator import config as C
from orchestrator import baselines_stage, evaluate, fit_stage, train_stage
from orchestrator import masks as M
from orchestrator.ledger import Ledger
from orchestrator.tracking import Tracker
from workers import bits

log = logging.getLogger(__name__)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("datamodels")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def masks_stage(plan) -> dict:
    """Write the mask sets (bit-packed .npy) for inspection; every other stage regenerates
    masks from the seed, so this file is a convenience, checked against the ledger."""
    cfg = plan.cfg
    out = {}
    os.makedirs(os.path.join(plan.exp_dir, "masks"), exist_ok=True)
    for mask_set, count in (("train", int(cfg.masks.n_train)), ("eval", int(cfg.masks.n_eval))):
        X = M.make_masks(int(cfg.exp.seed), mask_set, np.arange(count), plan.n, float(cfg.masks.alpha))
        np.save(os.path.join(plan.exp_dir, "masks", f"{mask_set}.npy"), bits.pack(X))
        out[mask_set] = count
    out["size"] = M.mask_size(plan.n, float(cfg.masks.alpha))
    return out


def check_ledger_masks(plan, sample: int = 8) -> None:
    """Compare a few ledger masks with their regeneration from the seed."""
    ledger = Ledger(plan.ledger_path)
    cfg = plan.cfg
    for mask_set in ("train", "eval"):
        try:
            data = ledger.load(mask_set, n=plan.n, n_targets=plan.n_targets)
        except Exception:  # noqa: BLE001 - an empty mask set is checked by the stage that needs it
            continue
        for row in np.linspace(0, len(data) - 1, min(sample, len(data))).astype(int):
            want = M.make_mask(int(cfg.exp.seed), mask_set, int(data.model_id[row]), plan.n,
                               float(cfg.masks.alpha))
            if not np.array_equal(bits.unpack(data.packed[row:row + 1], plan.n)[0], want):
                raise C.ConfigError(
                    f"ledger.path={plan.ledger_path}: mask {mask_set}/{data.model_id[row]} does not match "
                    f"exp.seed/masks.alpha; point ledger.path at this experiment's ledger")


def accuracy_summary(plan) -> dict:
    ledger = Ledger(plan.ledger_path)
    out = {}
    for mask_set in ("train", "eval"):
        try:
            d = ledger.load(mask_set)
        except Exception:  # noqa: BLE001
            continue
        for key in ("target_acc", "train_acc"):
            v = d.extra[key]
            out[f"{mask_set}.{key}"] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
    return out


def print_table(summary: dict) -> None:
    lines = ["", f"experiment: {summary['experiment_dir']}",
             f"models: train {summary['models'].get('train', 0)}, eval {summary['models'].get('eval', 0)}"]
    lds = summary.get("lds") or {}
    if lds:
        lines.append(f"{'method':<16}{'LDS':>8}   {'95% CI':<18}{'MSE':>10}")
        for name, r in lds.items():
            ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            mse = f"{r['mse']:.4f}" if "mse" in r else "-"
            lines.append(f"{name:<16}{r['mean']:>8.3f}   {ci:<18}{mse:>10}")
    print("\n".join(lines), flush=True)


def run(cfg: DictConfig, plan: C.Plan | None = None) -> dict:
    plan = plan or C.validate(cfg)
    stage = cfg.stage
    os.makedirs(plan.exp_dir, exist_ok=True)
    tracker = Tracker(plan.tracking_uri, cfg.exp.name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with open(os.path.join(plan.exp_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    summary_path = os.path.join(plan.exp_dir, "summary.json")
    summary = {"experiment_dir": os.path.abspath(plan.exp_dir), "ledger": plan.ledger_path,
               "config_hash": plan.config_hash, "stage": stage, "n": plan.n, "n_targets": plan.n_targets,
               "alpha": float(cfg.masks.alpha), "timings": {}}
    version = code_version()
    want = (lambda s: stage in ("all", s))
    with tracker.parent(f"{cfg.exp.name}-{stage}", resolved,
                        {"experiment_dir": summary["experiment_dir"], "config_hash": plan.config_hash,
                         "code_version": version}):
        tracker.log_artifact(os.path.join(plan.exp_dir, "config.yaml"))
        if want("masks"):
            t0 = time.perf_counter()
            with tracker.stage("masks"):
                summary["masks"] = masks_stage(plan)
            summary["timings"]["masks"] = time.perf_counter() - t0
        if stage in ("all", "train", "fit", "baselines", "evaluate"):
            from orchestrator import raycluster
            check_ledger_masks(plan)
            if stage in ("all", "train", "fit", "baselines"):
                raycluster.connect(cfg.cluster)
        if want("train"):
            t0 = time.perf_counter()
            with tracker.stage("train", {"train": resolved["train"]}):
                st = train_stage.run(plan, tracker, version)
                tracker.log_metrics({"models_trained": st["models_trained"], "train_seconds": st["seconds"]})
            summary["train"] = st
            summary["timings"]["train"] = time.perf_counter() - t0
        fit_cfg = OmegaConf.to_container(cfg.fit, resolve=True)
        if want("fit"):
            t0 = time.perf_counter()
            with tracker.stage("fit", {"fit": resolved["fit"]}):
                st = fit_stage.run(plan, tracker)
            summary["fit"] = st
            summary["timings"]["fit"] = time.perf_counter() - t0
        if want("baselines"):
            t0 = time.perf_counter()
            with tracker.stage("baselines", {"baselines": resolved["baselines"]}):
                summary["baselines"] = baselines_stage.run(plan, tracker)
            summary["timings"]["baselines"] = time.perf_counter() - t0
        if want("evaluate"):
            t0 = time.perf_counter()
            train_seconds = Ledger(plan.ledger_path).seconds("train")  # one column, not the masks
            m = len(train_seconds)
            dm_dir = fit_stage.store_dir(plan.exp_dir, m, fit_cfg)
            prefixes = fit_stage.prefix_sizes(fit_cfg, m)
            prefix_dirs = {k: fit_stage.store_dir(plan.exp_dir, k, fit_cfg) for k in prefixes}
            per_model = float(np.sum(train_seconds)) / max(m, 1)
            compute = {"models": m, "per_model": per_model,
                       "datamodels": per_model * m + fit_stage.fit_seconds(dm_dir)}
            with tracker.stage("evaluate"):
                ev = evaluate.run(plan, tracker, dm_dir, prefix_dirs, compute)
            for name, metrics in ev.pop("method_metrics").items():
                with tracker.stage(f"method:{name}", {"method": name,
                                                      "params": ev["lds"][name].get("params") or {}}):
                    tracker.log_metrics(metrics)
            summary.update(lds=ev["lds"], lds_curve=ev["lds_curve"], eval_masks=ev["eval_masks"])
            summary["timings"]["evaluate"] = time.perf_counter() - t0
        ledger = Ledger(plan.ledger_path)
        summary["models"] = {s: ledger.count(s) for s in ("train", "eval")}
        summary["accuracy"] = accuracy_summary(plan)
        if ledger.quarantined:
            summary["quarantined"] = ledger.quarantined
        evaluate.write_summary(summary_path, summary)
        tracker.log_artifact(summary_path)
        tracker.log_metrics({f"models_{k}": v for k, v in summary["models"].items()})
    print_table(summary)
    return summary
