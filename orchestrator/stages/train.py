"""The train stage: every model the ledger lacks, trained by persistent Ray actors.

The expected (mask set, model id, replica) keys are cut into units of fixed boundaries
(`train.models_per_unit`), so every driver names the same units and can claim them. The
work pool keeps units in flight on `TrainWorker` actors; each actor builds the task once
(data resident on its device), regenerates its masks from the seed, trains, and writes its
unit file (and the checkpoints the baselines need) through the store.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from orchestrator.scheduling.actors import PROBE_GROUP, TrainWorker, Unit, probe, worker_slots
from orchestrator.scheduling.workpool import Item, Pool, shuffled
from orchestrator.storage.checkpoints import missing_checkpoints
from orchestrator.storage.store import Layout
from workers.tasks import member

log = logging.getLogger(__name__)


def expected_keys(n_train: int, n_eval: int, replicas: int) -> dict[str, list[tuple[str, int, int]]]:
    """The keys of each mask set, in the order that defines unit boundaries."""
    return {"eval": [("eval", j, r) for j in range(n_eval) for r in range(replicas)],
            "train": [("train", i, 0) for i in range(n_train)]}


def plan_units(expected: dict, pending: set, per_unit: int) -> list[Unit]:
    """Units of fixed boundaries (block b holds keys [b*per_unit, (b+1)*per_unit) of its
    mask set), each with the block's pending keys only."""
    units = []
    for mask_set, keys in expected.items():
        for b, start in enumerate(range(0, len(keys), per_unit)):
            todo = [k for k in keys[start:start + per_unit] if k in pending]
            if todo:
                units.append(Unit(f"{mask_set}-{b:06d}", mask_set,
                                  np.array([k[1] for k in todo], dtype=np.int64),
                                  np.array([k[2] for k in todo], dtype=np.int32)))
    return units


def run(ctx) -> dict:
    """Train what the ledger lacks (and the checkpoints the baselines need that are missing or
    fail verification). Returns counts and timings; logs models_trained and train_seconds."""
    plan, tracker = ctx.plan, ctx.tracker
    cfg = plan.cfg
    ledger = plan.ledger
    expected = expected_keys(int(cfg.masks.n_train), int(cfg.masks.n_eval), int(cfg.eval.replicas))
    all_keys = [k for keys in expected.values() for k in keys]
    index = ledger.index()
    present = index.keys()
    n_ckpt = int(cfg.train.get("checkpoints") or 0)
    if cfg.baselines.get("methods") and member(plan.task, "attribution_inputs") is not None:
        n_ckpt = max(n_ckpt, int(cfg.baselines.checkpoints))
    ckpt_ids = missing_checkpoints(plan.store, min(n_ckpt, int(cfg.masks.n_train)), plan.identity.config_hash)
    pending = {k for k in all_keys if k not in present} | {("train", i, 0) for i in ckpt_ids}
    done_before = len(all_keys) - len([k for k in all_keys if k not in present])
    stats = {"models_expected": len(all_keys), "models_present": done_before, "models_trained": 0,
             "models_failed": 0, "units": 0, "seconds": 0.0, "duplicates_before": index.duplicates,
             "checkpoints": Layout.CHECKPOINTS if n_ckpt else None}
    if not pending:
        log.info("train: all %d models are in the ledger; nothing to train", len(all_keys))
    else:
        stats.update(train_models(plan, tracker, ctx.version, ledger, expected, pending, done_before, ckpt_ids))
    tracker.log_metrics({"models_trained": stats["models_trained"], "train_seconds": stats["seconds"]})
    return stats


def train_models(plan, tracker, code_version: str, ledger, expected: dict, pending: set, done_before: int = 0,
                 ckpt_ids=(), name: str = "train") -> dict:
    """Train the `pending` keys of `expected` (mask set -> keys in unit order) into `ledger` (the
    experiment's, or a removal experiment's with its own mask sets and directory) on the work
    pool's actors; returns counts, timings, hosts and the pool's statistics."""
    import ray
    from omegaconf import OmegaConf

    cfg = plan.cfg
    ckpt_set = set(ckpt_ids)
    units = plan_units(expected, pending, int(plan.models_per_unit or cfg.train.models_per_unit))
    log.info("%s: %d models to train (%d already in the ledger) in %d units",
             name, len(pending), done_before, len(units))

    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    ident = plan.identity
    meta = {"code_version": code_version, "identity": ident.__dict__, "root": ledger.root, "sets": ledger.sets}
    cpus, gpus = float(cfg.train.cpus_per_worker), float(cfg.train.gpus_per_worker)
    cap = int(cfg.train.workers) if cfg.train.get("workers") else None
    probed = ray.remote(concurrency_groups=PROBE_GROUP)  # type: ignore[call-overload]  # a probe beside the unit
    Actor = probed(TrainWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)
    need = {u.name: set(u.keys) for u in units}
    hosts: dict[str, int] = {}
    t0 = time.perf_counter()
    done_models = [0, 0]

    def done(items):
        idx = ledger.index()
        have = idx.keys()
        return [it.key for it in items if need[it.key] <= have]

    def on_result(item, out):
        done_models[0] += out["models"]
        done_models[1] += out["failed"]
        hosts[out["host"]] = hosts.get(out["host"], 0) + out["models"]
        elapsed = time.perf_counter() - t0
        tracker.log_metrics({"models_done": done_before + done_models[0],
                             "models_per_s": done_models[0] / max(elapsed, 1e-9),
                             "unit_target_acc": out["target_acc"]}, step=done_before + done_models[0])

    def submit(actor, unit):
        ids = [int(i) for i in unit.ids if int(i) in ckpt_set] if unit.mask_set == "train" else []
        return actor.run_unit.remote(unit, ids)

    pool = Pool(name, submit=submit,
                spawn=lambda: Actor.remote(task_cfg, train_cfg, plan.handle, meta),
                capacity=lambda: worker_slots(cpus, gpus, cap), per_worker=int(cfg.train.max_in_flight),
                claims=plan.claims, done=done, on_result=on_result, unit="model",
                max_deaths=int(cfg.train.max_worker_deaths), item_workers=int(cfg.train.max_retries),
                timeout=cfg.train.get("unit_timeout_seconds"), timeout_setting="train.unit_timeout_seconds",
                probe=probe)
    items = shuffled([Item(u.name, u, len(u.ids)) for u in units], plan.claims.owner if plan.claims else "")
    pool_stats = pool.run(items)
    if done_models[1]:
        log.warning("%s: %d models diverged (non-finite margins); they are recorded as failed and not fitted",
                    name, done_models[1])
    return {"models_trained": done_models[0], "models_failed": done_models[1], "units": len(units),
            "seconds": time.perf_counter() - t0, "hosts": hosts, "pool": pool_stats}
