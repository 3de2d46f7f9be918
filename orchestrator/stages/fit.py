"""The fit stage: one lasso datamodel per target, target chunks as Ray tasks.

The driver holds metadata only: the ledger's index, and the positions in it of the good
train models. Each task reads its own rows from the store (the mask column and the margins
column of its target block, verified again: the default fit.targets_per_task is the
ledger's MARGIN_BLOCK; a chunk across two blocks reads both), fits its chunk of targets
with workers.lasso and writes one verified Parquet file through the store. The datamodels
of a ledger live in `datamodels/m<models>-<backend>-<settings hash>/`, so a finished chunk
is never refit (it is read back and verified first) and a grown ledger gets fresh datamodels.
"""
from __future__ import annotations

import logging
import time
from dataclasses import fields

import numpy as np

from orchestrator.scheduling.actors import worker_slots
from orchestrator.scheduling.cluster import worker_setup
from orchestrator.scheduling.workpool import Item, Pool, shuffled
from orchestrator.settings.names import prefix_sizes
from orchestrator.storage.datamodels import chunk_ok, chunks, datamodel_table, dir_key, models_key, store_dir
from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Layout

log = logging.getLogger(__name__)


def lasso_config(fit_cfg: dict):
    from workers.lasso import LassoConfig
    names = {f.name for f in fields(LassoConfig)}
    return LassoConfig(**{k: v for k, v in fit_cfg.items() if k in names})


def gpus_per_task(fit_cfg: dict, resources: dict) -> float:
    """fit.gpus_per_task, or where it is null one GPU per task when the cluster has GPUs
    (`resources`: ray.cluster_resources()) and fit.device is not cpu, else none."""
    value = fit_cfg.get("gpus_per_task")
    if value is not None:
        return float(value)
    has_gpus = float(resources.get("GPU", 0) or 0) >= 1
    return 1.0 if has_gpus and str(fit_cfg.get("device") or "auto") != "cpu" else 0.0


def fit_chunk(index, positions: np.ndarray, ledger_root: str, a: int, b: int, n: int, fit_cfg: dict,
              rel: str, store_handle, key: dict | None = None) -> dict:
    """Runs in a Ray task: read the masks and the margins of targets [a, b) of the models at
    `positions` of the ledger's `index` from the store, fit those targets, write their chunk.
    A ledger file that changed since the index was built is LedgerError (one line naming it)."""
    from workers.lasso import fit_lasso
    from workers.logs import repeats_summarised
    store = worker_setup(fit_cfg.get("cpus_per_task"), store_handle)
    packed, Y = Ledger(store, root=ledger_root).read_block(index, positions, a, b)
    t0 = time.perf_counter()
    with repeats_summarised():          # a solver warning per target is printed once, with a count
        res = fit_lasso(packed, Y, lasso_config(fit_cfg), n=n)
    seconds = time.perf_counter() - t0
    store.write_table(rel, datamodel_table(np.arange(a, b), res, seconds, key))
    return {"targets": b - a, "seconds": seconds,
            "val_mse": float(np.mean(res.val_mse)), "nnz": float(np.mean(res.nnz))}


class TrainRows:
    """What the fit tasks read: the ledger's index and the positions in it of the good train
    models in model-id order (a prefix of m models is the first m), put in Ray's object store
    once, when a first chunk is to be fit. Metadata only: the tasks read masks and margins."""

    def __init__(self, ledger, index, positions: np.ndarray):
        self.ledger_root, self.index, self.positions = ledger.root, index, positions
        self._refs: tuple | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def refs(self, m: int) -> tuple:
        """(index, positions of the first m models) as Ray object refs (a task resolves them)."""
        import ray
        if self._refs is None:
            self._refs = (ray.put(self.index), {})
        index_ref, prefixes = self._refs
        if m not in prefixes:
            prefixes[m] = ray.put(np.ascontiguousarray(self.positions[:m]))
        return index_ref, prefixes[m]


def run(ctx, prefixes: bool = True) -> dict:
    """Fit datamodels on all good train models, and (`prefixes`) on the prefixes `fit.prefixes`
    (fractions of the train models, by model id) for the LDS-versus-models curve."""
    import ray
    from omegaconf import OmegaConf

    plan, tracker = ctx.plan, ctx.tracker
    cfg = plan.cfg
    fit_cfg = OmegaConf.to_container(cfg.fit, resolve=True)
    fit_cfg["gpus_per_task"] = gpus_per_task(fit_cfg, ray.cluster_resources())
    index = plan.ledger.index()
    pos, _, _ = plan.ledger.good_models("train", index, n=plan.n, n_targets=plan.n_targets)
    rows = TrainRows(plan.ledger, index, pos)
    m = len(rows)
    if m < int(cfg.masks.n_train):
        log.warning("fit: the ledger holds %d good of %d train models; fitting on those", m, cfg.masks.n_train)
    t0 = time.perf_counter()
    stats = _fit_store(plan, tracker, fit_cfg, rows, m, m)
    stats["seconds_full"] = stats["seconds"]
    stats["prefixes"] = {}
    for size in prefix_sizes(fit_cfg, m) if prefixes else []:
        # prefixes are the first `size` train models by id (the positions are sorted by model id)
        sub = _fit_store(plan, tracker, fit_cfg, rows, size, m)
        stats["prefixes"][size] = sub["dir"]
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _fit_store(plan, tracker, fit_cfg, rows: TrainRows, m: int, m_total: int) -> dict:
    """Fit the chunks missing from this datamodels directory, on the first m of `rows` (the
    index goes to Ray only if any chunk is missing)."""
    import ray

    store = plan.store
    models = models_key(plan.config_hash, rows.index.model_id[rows.positions[:m]])
    key = dir_key(fit_cfg, models)
    rel_dir = store_dir(m, fit_cfg, models)
    T, n = plan.n_targets, plan.n
    todo = [(a, b) for a, b in chunks(T, int(fit_cfg["targets_per_task"]))
            if not chunk_ok(store, Layout.chunk(rel_dir, a, b), a, b, n, keyed=True)]
    stats = {"dir": rel_dir, "models": m, "targets": T, "chunks": len(chunks(T, int(fit_cfg["targets_per_task"]))),
             "chunks_fit": 0, "seconds": 0.0}
    desc = "fit" if m == m_total else f"fit m={m}"
    if not todo:
        log.info("%s: all %d targets already fit in %s", desc, T, store.where(rel_dir))
        return stats
    log.info("%s: %d targets on %d train models (%s backend), %d chunks to fit",
             desc, T, m, fit_cfg["backend"], len(todo))
    t0 = time.perf_counter()
    index_ref, positions_ref = rows.refs(m)
    cpus = float(fit_cfg.get("cpus_per_task") or 1)
    gpus = float(fit_cfg.get("gpus_per_task") or 0)
    remote = ray.remote(fit_chunk).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    fitted = [0, 0]

    def submit(_, chunk):
        a, b = chunk
        return remote.remote(index_ref, positions_ref, rows.ledger_root, a, b, n, fit_cfg,
                             Layout.chunk(rel_dir, a, b), plan.handle, key)

    def done(items):
        return [it.key for it in items
                if chunk_ok(store, Layout.chunk(rel_dir, *it.payload), *it.payload, n, keyed=True)]

    def on_result(item, out):
        fitted[0] += 1
        fitted[1] += out["targets"]
        if m == m_total:
            tracker.log_metrics({"targets_done": fitted[1], "chunk_val_mse": out["val_mse"],
                                 "chunk_nnz": out["nnz"]}, step=fitted[1])

    pool = Pool(f"fit-m{m}", submit=submit, capacity=lambda: max(1, 2 * worker_slots(cpus, gpus)),
                per_worker=1, claims=plan.claims, done=done, on_result=on_result, unit="target",
                max_deaths=int(plan.cfg.train.max_worker_deaths))
    items = [Item(f"{rel_dir.rsplit('/', 1)[1]}-{a:06d}-{b:06d}", (a, b), b - a) for a, b in todo]
    stats["pool"] = pool.run(shuffled(items, plan.claims.owner if plan.claims else ""))
    stats["chunks_fit"] = fitted[0]
    stats["seconds"] = time.perf_counter() - t0
    return stats
