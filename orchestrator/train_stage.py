"""The train stage: every model the ledger lacks, trained by persistent Ray actors.

The expected (mask set, model id, replica) keys are cut into units of fixed boundaries
(`train.models_per_unit`), so every driver names the same units and can claim them. The
work pool keeps units in flight on `TrainWorker` actors; each actor builds the task once
(data resident on its device), regenerates its masks from the seed, trains, and writes its
unit file (and the checkpoints the baselines need) through the store.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import cast

import numpy as np

from orchestrator import masks as M
from orchestrator.ledger import Identity, Ledger
from orchestrator.store import Layout
from orchestrator.workpool import Item, Pool, shuffled
from workers import bits

log = logging.getLogger(__name__)


class TrainStageError(RuntimeError):
    pass


@dataclass
class Unit:
    name: str
    mask_set: str
    ids: np.ndarray       # int64 [k]
    replicas: np.ndarray  # int32 [k]

    @property
    def keys(self):
        return [(self.mask_set, int(i), int(r)) for i, r in zip(self.ids, self.replicas)]


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


class TrainWorker:
    """A persistent training process: the task (data on device) is built once."""

    def __init__(self, task_cfg: dict, train_cfg: dict, store_handle, meta: dict):
        from hydra.utils import instantiate

        from orchestrator.ledger import Identity
        from orchestrator.raycluster import worker_logging
        worker_logging()
        try:
            import torch
            torch.set_num_threads(max(1, int(train_cfg.get("cpus_per_worker") or 1)))
        except ImportError:
            pass
        self.task = instantiate(task_cfg, _convert_="all")
        self.task.setup(train_cfg)
        self.store = store_handle.open()
        self.sets = meta.get("sets") or M.MaskSets()
        self.ledger = Ledger(self.store, Identity(**meta["identity"]), meta.get("root", Layout.LEDGER), self.sets)
        self.meta = meta
        try:
            import ray
            node = ray.get_runtime_context().get_node_id()[:8]
        except Exception:  # noqa: BLE001 - outside Ray (tests, notebooks)
            node = "local"
        self.host = f"{socket.gethostname()}/{node}"

    def ready(self) -> str:
        return self.host

    def run_unit(self, unit: Unit, ckpt_ids: list[int]) -> dict:
        meta, ident = self.meta, cast(Identity, self.ledger.identity)
        masks = self.sets.masks(ident.seed, unit.mask_set, unit.ids, ident.n, ident.alpha)
        seeds = self.sets.seeds(ident.seed, unit.mask_set, unit.ids, unit.replicas)
        t0 = time.perf_counter()
        res = self.task.train(masks, seeds, return_weights=bool(ckpt_ids))
        seconds = time.perf_counter() - t0
        k = len(unit.ids)
        margins = np.asarray(res.margins, dtype=np.float32)
        if margins.shape != (k, ident.n_targets):
            raise TrainStageError(f"task.train returned margins of shape {margins.shape}, "
                                  f"expected ({k}, {ident.n_targets})")
        rows = {
            "mask_set": [unit.mask_set] * k, "model_id": unit.ids, "replica": unit.replicas,
            "seed": seeds, "alpha": [ident.alpha] * k, "mask": bits.pack(masks),
            "margins": margins, "train_acc": np.asarray(res.train_acc, np.float32),
            "target_acc": np.asarray(res.target_acc, np.float32),
            "loss": np.asarray(res.loss, np.float32), "seconds": [seconds / k] * k,
            "host": [self.host] * k, "code_version": [meta["code_version"]] * k,
            "config_hash": [ident.config_hash] * k,
        }
        if ckpt_ids:
            from workers.checkpoints import checkpoint_identity, to_bytes
            wanted = set(ckpt_ids)
            for i, r, sd in zip(unit.ids, unit.replicas, res.state_dicts):
                if int(i) in wanted and unit.mask_set == "train":
                    ckpt_id = checkpoint_identity(ident.config_hash, unit.mask_set, int(i), int(r))
                    self.store.write_bytes(Layout.checkpoint(unit.mask_set, int(i), int(r)), to_bytes(sd, ckpt_id))
        rel = self.ledger.write_unit(unit.name, rows)
        failed = int((~np.isfinite(margins).all(1)).sum())
        return {"unit": unit.name, "file": rel, "models": k, "failed": failed, "seconds": seconds,
                "host": self.host, "target_acc": float(np.nanmean(res.target_acc)),
                "train_acc": float(np.nanmean(res.train_acc))}


def check_checkpoint(store, i: int, config_hash: str) -> tuple[str | None, str]:
    """(digest, "") of train model i's checkpoint when its bytes match its digest and it is this
    experiment's (`config_hash`) model i; (None, why) when it is missing or fails. Nothing is
    unpickled (workers.checkpoints.verify)."""
    from workers.checkpoints import CheckpointError, checkpoint_identity, verify
    rel = Layout.checkpoint("train", i, 0)
    try:
        blob = store.read_bytes(rel)
    except FileNotFoundError:
        return None, "missing"
    try:
        return verify(blob, checkpoint_identity(config_hash, "train", i, 0)), ""
    except CheckpointError as err:
        return None, err.reason


def quarantine_checkpoint(store, i: int, reason: str) -> None:
    """Move train model i's checkpoint to checkpoints/_quarantine/ (named by its content, so
    nothing quarantined before is overwritten), with one log line."""
    import hashlib
    rel = Layout.checkpoint("train", i, 0)
    try:
        blob = store.read_bytes(rel)
    except FileNotFoundError:      # another driver moved it first
        return
    name = rel.rsplit("/", 1)[1]
    dest = f"{Layout.quarantine(Layout.CHECKPOINTS)}/{name[:-3]}-{hashlib.sha256(blob).hexdigest()[:12]}.pt"
    try:
        store.move(rel, dest)
    except FileNotFoundError:
        return
    log.error("checkpoints: %s quarantined to %s: %s; it will be retrained", store.where(rel),
              store.where(dest), reason)


def missing_checkpoints(store, count: int, config_hash: str) -> list[int]:
    """Ids among the first `count` train models without a good checkpoint: missing, or failing
    verification (its digest, or the identity of experiment `config_hash` and model i). Those
    that fail are moved to checkpoints/_quarantine/ (one log line each); the train stage
    trains their models again."""
    out = []
    for i in range(max(0, count)):
        digest, why = check_checkpoint(store, i, config_hash)
        if digest is None:
            if why != "missing":
                quarantine_checkpoint(store, i, why)
            out.append(i)
    return out


def worker_slots(cpus: float, gpus: float, cap: int | None = None) -> int:
    """Workers of (cpus, gpus) each that the cluster's live nodes hold now (capped)."""
    import ray
    res = ray.cluster_resources()
    slots = []
    if gpus > 0:
        slots.append(int(res.get("GPU", 0) // gpus))
    if cpus > 0:
        slots.append(int(res.get("CPU", 0) // cpus))
    n = min(slots) if slots else 1
    return max(0, min(n, cap) if cap else n)


def run(plan, tracker, code_version: str) -> dict:
    """Train what the ledger lacks. Returns counts and timings."""
    cfg = plan.cfg
    ledger = plan.ledger
    expected = expected_keys(int(cfg.masks.n_train), int(cfg.masks.n_eval), int(cfg.eval.replicas))
    all_keys = [k for keys in expected.values() for k in keys]
    index = ledger.index()
    present = index.keys()
    n_ckpt = int(cfg.train.get("checkpoints") or 0)
    if cfg.baselines.get("methods") and hasattr(plan.task, "attribution_inputs"):
        n_ckpt = max(n_ckpt, int(cfg.baselines.checkpoints))
    ckpt_ids = missing_checkpoints(plan.store, min(n_ckpt, int(cfg.masks.n_train)), plan.identity.config_hash)
    pending = {k for k in all_keys if k not in present} | {("train", i, 0) for i in ckpt_ids}
    done_before = len(all_keys) - len([k for k in all_keys if k not in present])
    stats = {"models_expected": len(all_keys), "models_present": done_before, "models_trained": 0,
             "models_failed": 0, "units": 0, "seconds": 0.0, "duplicates_before": index.duplicates,
             "checkpoints": Layout.CHECKPOINTS if n_ckpt else None}
    if not pending:
        log.info("train: all %d models are in the ledger; nothing to train", len(all_keys))
        return stats
    stats.update(train_models(plan, tracker, code_version, ledger, expected, pending, done_before, ckpt_ids))
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
    Actor = ray.remote(TrainWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)
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
                timeout=cfg.train.get("unit_timeout_seconds"), timeout_setting="train.unit_timeout_seconds")
    items = shuffled([Item(u.name, u, len(u.ids)) for u in units], plan.claims.owner if plan.claims else "")
    pool_stats = pool.run(items)
    if done_models[1]:
        log.warning("%s: %d models diverged (non-finite margins); they are recorded as failed and not fitted",
                    name, done_models[1])
    return {"models_trained": done_models[0], "models_failed": done_models[1], "units": len(units),
            "seconds": time.perf_counter() - t0, "hosts": hosts, "pool": pool_stats}
