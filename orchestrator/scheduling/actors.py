"""The training actors and the sizing of Ray work: `TrainWorker` (a persistent process
that builds the task once and trains units of models into the ledger) and
`worker_slots` (how many workers of a size the cluster holds now).
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import cast

import numpy as np

from orchestrator.errors import UserError
from orchestrator.scheduling.cluster import worker_setup
from orchestrator.storage import masks as M
from orchestrator.storage.ledger import Identity, Ledger
from orchestrator.storage.store import Layout
from workers import bits


class TrainStageError(UserError):
    """A task's train() that returned something other than what the protocol says."""


@dataclass
class Unit:
    name: str
    mask_set: str
    ids: np.ndarray       # int64 [k]
    replicas: np.ndarray  # int32 [k]

    @property
    def keys(self):
        return [(self.mask_set, int(i), int(r)) for i, r in zip(self.ids, self.replicas)]


PROBE_GROUP = {"probe": 1}     # the actors' concurrency group that answers while a unit runs


class Probed:
    """An actor that tells the work pool whether it is still computing: `cpu_seconds()` runs
    in its own concurrency group (PROBE_GROUP, given to ray.remote), beside the unit being
    trained, and returns the process's CPU seconds (every thread's). A stopped process never
    answers; a blocked one answers with a number that no longer grows."""

    def cpu_seconds(self) -> float:
        return time.process_time()

    # what @ray.method(concurrency_group="probe") sets, without importing Ray with this module
    # (a test checks that the probe answers while a unit runs)
    cpu_seconds.__ray_concurrency_group__ = "probe"  # type: ignore[attr-defined]


def probe(actor):
    """The work pool's probe of a Probed actor: an ObjectRef of its CPU seconds."""
    return actor.cpu_seconds.remote()


class TrainWorker(Probed):
    """A persistent training process: the task (data on device) is built once."""

    def __init__(self, task_cfg: dict, train_cfg: dict, store_handle, meta: dict):
        from orchestrator.settings.task import build_task

        self.store = worker_setup(train_cfg.get("cpus_per_worker"), store_handle)
        self.task = build_task(task_cfg)
        self.task.setup(train_cfg)
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
        labels = self.sets.labels(unit.mask_set, self.task)
        t0 = time.perf_counter()
        res = self.task.train(masks, seeds, return_weights=bool(ckpt_ids),
                              **({"labels": labels} if labels is not None else {}))
        seconds = time.perf_counter() - t0
        k = len(unit.ids)
        margins = np.asarray(res.margins, dtype=np.float32)
        if margins.shape != (k, ident.n_targets):
            raise TrainStageError(f"task.train returned margins of shape {margins.shape}, "
                                  f"expected ({k}, {ident.n_targets})")
        own = {}
        if ident.n_self:
            got, right = getattr(res, "self_margins", None), getattr(res, "self_correct", None)
            want = (k, ident.n_self)
            if got is None or right is None or np.shape(got) != want or np.shape(right) != want:
                shape = None if got is None else np.shape(got)
                raise TrainStageError(f"task.targets=both: task.train returned margins on the training examples of "
                                      f"shape {shape}, expected ({k}, {ident.n_self}) with self_correct")
            own = {"self_margins": np.asarray(got, np.float32), "self_correct": np.asarray(right, bool)}
        rows = {
            **own,
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
