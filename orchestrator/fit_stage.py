"""The fit stage: one lasso datamodel per target, target chunks across Ray tasks.

X (the train masks, bit-packed) is put in the object store once; each task fits a chunk of
targets with workers.lasso and writes one Parquet file of datamodels. The store is keyed by
the number of train models and the fit settings, so a finished chunk is never refit and a
grown ledger gets fresh datamodels.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.ledger import Ledger, atomic_write, filesystem

log = logging.getLogger(__name__)


def lasso_config(fit_cfg: dict):
    from workers.lasso import LassoConfig
    names = {f.name for f in fields(LassoConfig)}
    return LassoConfig(**{k: v for k, v in fit_cfg.items() if k in names})


def store_dir(exp_dir: str, m: int, fit_cfg: dict) -> str:
    keep = {k: v for k, v in fit_cfg.items()
            if k not in ("targets_per_task", "cpus_per_task", "gpus_per_task", "device", "prefixes",
                         "targets_per_block", "rows_per_block", "memory_budget_bytes")}
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join(exp_dir, "datamodels", f"m{m}-{fit_cfg['backend']}-{h}")


def datamodel_table(target_ids, res) -> pa.Table:
    T, n = res.weights.shape
    return pa.table({
        "target_id": pa.array(np.asarray(target_ids, np.int32)),
        "intercept": pa.array(res.intercept.astype(np.float32)),
        "lam": pa.array(res.lam.astype(np.float64)),
        "val_mse": pa.array(res.val_mse.astype(np.float64)),
        "nnz": pa.array(res.nnz.astype(np.int32)),
        "weights": pa.FixedSizeListArray.from_arrays(
            pa.array(res.weights.astype(np.float32).reshape(-1)), n),
    })


def fit_chunk(packed: np.ndarray, Y: np.ndarray, n: int, fit_cfg: dict, target_ids, out_path: str) -> dict:
    """Runs in a Ray task: fit the targets `target_ids` (columns of Y) and write their file."""
    from workers.lasso import fit_lasso
    try:
        import torch
        torch.set_num_threads(max(1, int(fit_cfg.get("cpus_per_task") or 1)))
    except ImportError:
        pass
    t0 = time.perf_counter()
    res = fit_lasso(packed, Y, lasso_config(fit_cfg), n=n)
    table = datamodel_table(target_ids, res)
    table = table.replace_schema_metadata({"seconds": str(time.perf_counter() - t0)})
    fs, path, local = filesystem(out_path)
    atomic_write(table, fs, path, local)
    return {"targets": len(target_ids), "seconds": time.perf_counter() - t0,
            "val_mse": float(np.mean(res.val_mse)), "nnz": float(np.mean(res.nnz))}


def fit_seconds(path: str) -> float:
    """Worker-seconds spent fitting the datamodels in a store dir (sum over its chunks)."""
    total = 0.0
    for f in os.listdir(path) if os.path.isdir(path) else []:
        if f.endswith(".parquet") and not f.startswith("."):
            meta = pq.read_schema(os.path.join(path, f)).metadata or {}
            total += float(meta.get(b"seconds", b"0"))
    return total


def load_datamodels(path: str, n_targets: int):
    """(weights float32 [T, n], intercept [T], table of per-target stats) from a store dir."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".parquet") and not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"no datamodels in {path}; run stage=fit first")
    table = pa.concat_tables([pq.read_table(os.path.join(path, f)) for f in files])
    order = np.argsort(table["target_id"].to_numpy(), kind="stable")
    table = table.take(pa.array(order))
    ids = table["target_id"].to_numpy()
    if len(ids) != n_targets or not np.array_equal(ids, np.arange(n_targets)):
        raise FileNotFoundError(f"datamodels in {path} cover {len(np.unique(ids))} of {n_targets} "
                                f"targets; run stage=fit to finish them")
    col = table["weights"].combine_chunks()
    W = col.flatten().to_numpy().reshape(len(ids), col.type.list_size)
    return W, table["intercept"].to_numpy(), table


def prefix_sizes(fit_cfg: dict, m: int) -> list[int]:
    """Sizes of the train-model prefixes fit for the LDS-versus-models curve."""
    return sorted({max(10, int(round(f * m))) for f in (fit_cfg.get("prefixes") or []) if 0 < f < 1} - {m})


def run(plan, tracker) -> dict:
    """Fit datamodels on all train models, and on the prefixes `fit.prefixes` (fractions of
    the train models, by model id) for the LDS-versus-models curve."""
    from omegaconf import OmegaConf

    cfg = plan.cfg
    fit_cfg = OmegaConf.to_container(cfg.fit, resolve=True)
    data = Ledger(plan.ledger_path).load("train", n=plan.n, n_targets=plan.n_targets)
    m = len(data)
    if m < int(cfg.masks.n_train):
        log.warning("fit: the ledger holds %d of %d train models; fitting on those", m, cfg.masks.n_train)
    t0 = time.perf_counter()
    sizes = prefix_sizes(fit_cfg, m)
    stats = _fit_store(plan, tracker, fit_cfg, data.packed, data.margins, m, m)
    stats["seconds_full"] = stats["seconds"]
    stats["prefixes"] = {}
    for size in sizes:
        # prefixes are the first `size` train models by id (data is sorted by model id)
        sub = _fit_store(plan, tracker, fit_cfg, data.packed[:size], data.margins[:size], size, m,
                         desc=f"fit m={size}")
        stats["prefixes"][size] = sub["dir"]
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _fit_store(plan, tracker, fit_cfg, packed, margins, m, m_total, desc="fit") -> dict:
    """Fit the targets' chunks missing from this store dir (the masks go to Ray only if any are)."""
    import ray
    from tqdm import tqdm

    out_dir = store_dir(plan.exp_dir, m, fit_cfg)
    os.makedirs(out_dir, exist_ok=True)
    T = plan.n_targets
    per = int(fit_cfg["targets_per_task"])
    chunks = [(a, min(a + per, T)) for a in range(0, T, per)]
    done = {f for f in os.listdir(out_dir) if f.endswith(".parquet")}
    todo = [(a, b) for a, b in chunks if f"chunk-{a:06d}-{b:06d}.parquet" not in done]
    stats = {"dir": out_dir, "models": m, "targets": T, "chunks": len(chunks), "chunks_fit": len(todo),
             "seconds": 0.0}
    if not todo:
        log.info("%s: all %d targets already fit in %s", desc, T, out_dir)
        return stats
    log.info("%s: %d targets on %d train models (%s backend), %d chunks to fit",
             desc, T, m, fit_cfg["backend"], len(todo))
    t0 = time.perf_counter()
    packed_ref = ray.put(packed)
    remote = ray.remote(fit_chunk).options(num_cpus=float(fit_cfg.get("cpus_per_task") or 1),
                                           num_gpus=float(fit_cfg.get("gpus_per_task") or 0),
                                           max_retries=2)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue = list(todo)
    in_flight = {}
    bar = tqdm(total=sum(b - a for a, b in todo), unit="target", desc=desc, dynamic_ncols=True, mininterval=1.0)
    done_targets = 0
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                a, b = queue.pop(0)
                path = os.path.join(out_dir, f"chunk-{a:06d}-{b:06d}.parquet")
                ref = remote.remote(packed_ref, np.ascontiguousarray(margins[:, a:b]), plan.n,
                                    fit_cfg, np.arange(a, b), path)
                in_flight[ref] = (a, b)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                in_flight.pop(ref)
                out = ray.get(ref)
                done_targets += out["targets"]
                bar.update(out["targets"])
                if m == m_total:
                    tracker.log_metrics({"targets_done": done_targets, "chunk_val_mse": out["val_mse"],
                                         "chunk_nnz": out["nnz"]}, step=done_targets)
    finally:
        bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats
