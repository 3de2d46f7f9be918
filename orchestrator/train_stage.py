"""The train stage: every model the ledger lacks, trained by persistent Ray actors.

The driver lists the expected (mask set, model id, replica) keys, subtracts what the ledger
holds, splits the rest into work units and keeps a bounded number in flight per actor. Each
actor builds the task once (data resident on its device), regenerates its masks from the
seed, trains, and writes its unit to the ledger itself. A lost unit is resubmitted.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from orchestrator import masks as M
from orchestrator.ledger import Ledger, filesystem
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
    attempts: int = 0


def expected_keys(n_train: int, n_eval: int, replicas: int) -> list[tuple[str, int, int]]:
    keys = [("eval", j, r) for j in range(n_eval) for r in range(replicas)]
    keys += [("train", i, 0) for i in range(n_train)]
    return keys


def checkpoint_root(plan) -> str:
    """Where checkpoints go: beside a remote ledger, else in the experiment directory."""
    if "://" in plan.ledger_path:
        return plan.ledger_path.rstrip("/") + "_checkpoints"
    return os.path.join(plan.exp_dir, "checkpoints")


def checkpoint_path(ckpt_root: str, mask_set: str, model_id: int, replica: int) -> str:
    return f"{ckpt_root}/{mask_set}-{model_id:07d}-r{replica}.pt"


def plan_units(pending: list[tuple[str, int, int]], per_unit: int) -> list[Unit]:
    """Consecutive pending keys of one mask set, `per_unit` at a time."""
    units = []
    by_set: dict[str, list] = {}
    for key in pending:
        by_set.setdefault(key[0], []).append(key)
    for mask_set, keys in by_set.items():
        for start in range(0, len(keys), per_unit):
            chunk = keys[start:start + per_unit]
            ids = np.array([k[1] for k in chunk], dtype=np.int64)
            reps = np.array([k[2] for k in chunk], dtype=np.int32)
            name = f"{mask_set}-{ids[0]:07d}r{reps[0]}-{ids[-1]:07d}r{reps[-1]}"
            units.append(Unit(name, mask_set, ids, reps))
    return units


class TrainWorker:
    """A persistent training process: the task (data on device) is built once."""

    def __init__(self, task_cfg: dict, train_cfg: dict, ledger_path: str, meta: dict):
        from hydra.utils import instantiate
        try:
            import torch
            torch.set_num_threads(max(1, int(train_cfg.get("cpus_per_worker") or 1)))
        except ImportError:
            pass
        self.task = instantiate(task_cfg, _convert_="all")
        self.task.setup(train_cfg)
        self.ledger = Ledger(ledger_path)
        self.meta = meta
        self.host = socket.gethostname()

    def run_unit(self, unit: Unit, ckpt_ids: list[int]) -> dict:
        meta = self.meta
        masks = M.make_masks(meta["seed"], unit.mask_set, unit.ids, meta["n"], meta["alpha"])
        seeds = np.array([M.model_seed(meta["seed"], unit.mask_set, int(i), int(r))
                          for i, r in zip(unit.ids, unit.replicas)], dtype=np.int64)
        t0 = time.perf_counter()
        res = self.task.train(masks, seeds, return_weights=bool(ckpt_ids))
        seconds = time.perf_counter() - t0
        k = len(unit.ids)
        margins = np.asarray(res.margins, dtype=np.float32)
        if margins.shape != (k, meta["n_targets"]):
            raise TrainStageError(f"task.train returned margins of shape {margins.shape}, "
                                  f"expected ({k}, {meta['n_targets']})")
        rows = {
            "mask_set": [unit.mask_set] * k, "model_id": unit.ids, "replica": unit.replicas,
            "seed": seeds, "alpha": [meta["alpha"]] * k, "mask": bits.pack(masks),
            "margins": margins, "train_acc": np.asarray(res.train_acc, np.float32),
            "target_acc": np.asarray(res.target_acc, np.float32),
            "loss": np.asarray(res.loss, np.float32), "seconds": [seconds / k] * k,
            "host": [self.host] * k, "code_version": [meta["code_version"]] * k,
            "config_hash": [meta["config_hash"]] * k,
        }
        if ckpt_ids:
            self._save_checkpoints(unit, res.state_dicts, set(ckpt_ids))
        self.ledger.write_unit(unit.name, rows)
        return {"unit": unit.name, "models": k, "seconds": seconds,
                "target_acc": float(np.mean(res.target_acc)), "train_acc": float(np.mean(res.train_acc))}

    def _save_checkpoints(self, unit: Unit, state_dicts, wanted: set[int]) -> None:
        from workers.checkpoints import to_bytes
        fs, root, _ = filesystem(self.meta["ckpt_path"])
        fs.create_dir(root, recursive=True)
        for i, r, sd in zip(unit.ids, unit.replicas, state_dicts):
            if int(i) in wanted and unit.mask_set == "train":
                path = checkpoint_path(root, unit.mask_set, int(i), int(r))
                with fs.open_output_stream(path + ".tmp") as out:
                    out.write(to_bytes(sd))
                fs.move(path + ".tmp", path)


def missing_checkpoints(ckpt_path: str, count: int) -> list[int]:
    """Ids among the first `count` train models whose checkpoint file is not in ckpt_path."""
    if count <= 0:
        return []
    import pyarrow.fs as pafs
    fs, root, _ = filesystem(ckpt_path)
    try:
        have = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root))}
    except FileNotFoundError:
        have = set()
    return [i for i in range(count) if os.path.basename(checkpoint_path("", "train", i, 0)) not in have]


def _n_workers(cfg, n_units: int) -> int:
    import ray
    if cfg.train.get("workers"):
        return max(1, min(int(cfg.train.workers), n_units))
    res = ray.cluster_resources()
    cpus = float(cfg.train.cpus_per_worker or 0)
    gpus = float(cfg.train.gpus_per_worker or 0)
    slots = []
    if gpus > 0:
        slots.append(int(res.get("GPU", 0) // gpus))
    if cpus > 0:
        slots.append(int(res.get("CPU", 0) // cpus))
    n = min(slots) if slots else 1
    if n < 1:
        raise TrainStageError(
            f"the cluster has {res.get('CPU', 0)} CPUs and {res.get('GPU', 0)} GPUs, too few for one worker "
            f"with train.cpus_per_worker={cpus} train.gpus_per_worker={gpus}; lower them")
    return max(1, min(n, n_units))


def run(plan, tracker, code_version: str) -> dict:
    """Train what the ledger lacks. Returns counts and timings."""
    import ray
    from omegaconf import OmegaConf
    from tqdm import tqdm

    cfg = plan.cfg
    ledger = Ledger(plan.ledger_path)
    ckpt_path = checkpoint_root(plan)
    expected = expected_keys(int(cfg.masks.n_train), int(cfg.masks.n_eval), int(cfg.eval.replicas))
    present = ledger.keys()
    n_ckpt = int(cfg.train.get("checkpoints") or 0)
    if cfg.get("baselines") and cfg.baselines.get("methods") and hasattr(plan.task, "attribution_inputs"):
        n_ckpt = max(n_ckpt, int(cfg.baselines.checkpoints))
    ckpt_ids = missing_checkpoints(ckpt_path, min(n_ckpt, int(cfg.masks.n_train)))
    missing_ckpt = set(("train", i, 0) for i in ckpt_ids)
    pending = [k for k in expected if k not in present or k in missing_ckpt]
    done_before = len(expected) - len([k for k in expected if k not in present])
    stats = {"models_expected": len(expected), "models_present": done_before,
             "models_trained": 0, "units": 0, "seconds": 0.0, "checkpoints": ckpt_path if n_ckpt else None}
    if not pending:
        log.info("train: all %d models are in the ledger; nothing to train", len(expected))
        return stats
    units = plan_units(pending, int(cfg.train.models_per_unit))
    n_workers = _n_workers(cfg, len(units))
    log.info("train: %d models to train (%d already in the ledger) in %d units on %d workers",
             len(pending), done_before, len(units), n_workers)

    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    meta = {"seed": int(cfg.exp.seed), "n": plan.n, "n_targets": plan.n_targets,
            "alpha": float(cfg.masks.alpha), "code_version": code_version,
            "config_hash": plan.config_hash, "ckpt_path": ckpt_path}
    Actor = ray.remote(TrainWorker).options(
        num_cpus=float(cfg.train.cpus_per_worker or 0), num_gpus=float(cfg.train.gpus_per_worker or 0),
        max_restarts=int(cfg.train.max_retries), max_task_retries=0)
    actors = [Actor.remote(task_cfg, train_cfg, plan.ledger_path, meta) for _ in range(n_workers)]
    ckpt_set = set(ckpt_ids)

    queue = list(units)
    in_flight: dict = {}
    per_actor = {i: 0 for i in range(n_workers)}
    limit = int(cfg.train.max_in_flight)
    t0 = time.perf_counter()
    done_models = 0
    accs = []
    bar = tqdm(total=len(pending), unit="model", desc="train", dynamic_ncols=True, mininterval=1.0)
    try:
        while queue or in_flight:
            for a in range(n_workers):
                while queue and per_actor[a] < limit:
                    unit = queue.pop(0)
                    ids = [int(i) for i in unit.ids if int(i) in ckpt_set] if unit.mask_set == "train" else []
                    ref = actors[a].run_unit.remote(unit, ids)
                    in_flight[ref] = (unit, a)
                    per_actor[a] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                unit, a = in_flight.pop(ref)
                per_actor[a] -= 1
                try:
                    out = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as err:
                    unit.attempts += 1
                    if unit.attempts > int(cfg.train.max_retries):
                        raise TrainStageError(f"unit {unit.name} was lost {unit.attempts} times "
                                              f"(last: {type(err).__name__}); finished units are in the "
                                              f"ledger, re-run to resume") from err
                    log.warning("train: unit %s lost (%s); resubmitting (attempt %d)",
                                unit.name, type(err).__name__, unit.attempts + 1)
                    queue.append(unit)
                    continue
                done_models += out["models"]
                accs.append(out["target_acc"])
                bar.update(out["models"])
                elapsed = time.perf_counter() - t0
                tracker.log_metrics({"models_done": done_before + done_models,
                                     "models_per_s": done_models / max(elapsed, 1e-9),
                                     "unit_target_acc": out["target_acc"]},
                                    step=done_before + done_models)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    stats.update(models_trained=done_models, units=len(units), seconds=time.perf_counter() - t0)
    return stats
