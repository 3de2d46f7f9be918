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

import hashlib
import json
import logging
import time
from dataclasses import fields

import numpy as np
import pyarrow as pa

from orchestrator.ledger import list_matrix
from orchestrator.store import CorruptFile, Layout
from orchestrator.workpool import Item, Pool, shuffled

log = logging.getLogger(__name__)

class DatamodelsError(RuntimeError):
    """Datamodels that cannot be used as asked (one line naming the file and the fix)."""


SCHEDULING_KEYS = ("targets_per_task", "cpus_per_task", "gpus_per_task", "device", "prefixes",
                   "targets_per_block", "rows_per_block", "memory_budget_bytes")

# Settings added after experiments were written, hashed only when they differ from these values,
# so that the datamodels directories written before them keep their names.
UNHASHED_DEFAULTS = {"debias": "none", "debias_phi": None}


def lasso_config(fit_cfg: dict):
    from workers.lasso import LassoConfig
    names = {f.name for f in fields(LassoConfig)}
    return LassoConfig(**{k: v for k, v in fit_cfg.items() if k in names})


KEY_META = b"datamodels.key"     # a chunk's metadata: the settings and models its directory's name hashes


def dir_key(fit_cfg: dict, models: dict | None = None) -> dict:
    """What names a datamodels directory: the fit settings (scheduling settings excluded) and,
    for the pipeline's directories, `models` = {"config_hash": the experiment, "models": a
    digest of the model ids fitted}, so that datamodels are never reused for another
    experiment or another set of models (models_key)."""
    keep = {k: v for k, v in fit_cfg.items() if k not in SCHEDULING_KEYS and UNHASHED_DEFAULTS.get(k, k) != v}
    if models is not None:
        keep["fitted_on"] = models
    return keep


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]


def store_dir(m: int, fit_cfg: dict, models: dict | None = None) -> str:
    """The datamodels directory (relative to the store) of `m` train models and these fit
    settings: `dir_key`'s hash in its name."""
    return Layout.datamodels(m, fit_cfg["backend"], _key_hash(dir_key(fit_cfg, models)))


def models_key(config_hash: str, model_ids: np.ndarray) -> dict:
    """The experiment and the train models (their ids, in fit order) a datamodels directory holds."""
    ids = np.ascontiguousarray(np.asarray(model_ids, dtype="<i8"))
    return {"config_hash": config_hash, "models": hashlib.sha256(ids.tobytes()).hexdigest()[:16]}


def train_positions(plan, index) -> np.ndarray:
    """Positions in `index` (the run's view: masks.n_train) of the good train models, by model id."""
    return index.select("train")


def full_dir(plan, index) -> str:
    """The datamodels directory of the good train models this run uses (the one the fit stage
    writes first and every later stage reads)."""
    from omegaconf import OmegaConf
    pos = train_positions(plan, index)
    return store_dir(len(pos), OmegaConf.to_container(plan.cfg.fit, resolve=True),
                     models_key(plan.config_hash, index.model_id[pos]))


def prefix_dirs(plan, index) -> dict[int, str]:
    """{m: datamodels directory of the first m good train models} for the LDS-versus-models curve."""
    from omegaconf import OmegaConf
    fit_cfg = OmegaConf.to_container(plan.cfg.fit, resolve=True)
    ids = index.model_id[train_positions(plan, index)]
    return {k: store_dir(k, fit_cfg, models_key(plan.config_hash, ids[:k])) for k in prefix_sizes(fit_cfg, len(ids))}


def chunks(T: int, per: int) -> list[tuple[int, int]]:
    return [(a, min(a + per, T)) for a in range(0, T, per)]


def datamodel_table(target_ids, res, seconds: float, key: dict | None = None) -> pa.Table:
    T, n = res.weights.shape
    table = pa.table({
        "target_id": pa.array(np.asarray(target_ids, np.int32)),
        "intercept": pa.array(res.intercept.astype(np.float32)),
        "lam": pa.array(res.lam.astype(np.float64)),
        "val_mse": pa.array(res.val_mse.astype(np.float64)),
        "nnz": pa.array(res.nnz.astype(np.int32)),
        "weights": pa.FixedSizeListArray.from_arrays(pa.array(res.weights.astype(np.float32).reshape(-1)), n),
    })
    meta = {"seconds": str(seconds)}
    if key is not None:
        meta[KEY_META.decode()] = json.dumps(key, sort_keys=True, default=str)
    return table.replace_schema_metadata(meta)


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
    from orchestrator.ledger import Ledger
    from workers.lasso import fit_lasso
    try:
        import torch
        torch.set_num_threads(max(1, int(fit_cfg.get("cpus_per_task") or 1)))
    except ImportError:
        pass
    from orchestrator.raycluster import worker_logging
    from workers.logs import repeats_summarised
    worker_logging()
    store = store_handle.open()
    packed, Y = Ledger(store, root=ledger_root).read_block(index, positions, a, b)
    t0 = time.perf_counter()
    with repeats_summarised():          # a solver warning per target is printed once, with a count
        res = fit_lasso(packed, Y, lasso_config(fit_cfg), n=n)
    seconds = time.perf_counter() - t0
    store.write_table(rel, datamodel_table(np.arange(a, b), res, seconds, key))
    return {"targets": b - a, "seconds": seconds,
            "val_mse": float(np.mean(res.val_mse)), "nnz": float(np.mean(res.nnz))}


def chunk_key_error(rel: str, schema: pa.Schema, keyed: bool = True) -> str | None:
    """Why the chunk at `rel` does not belong to its directory (its metadata's key does not
    hash to the name), or None. `keyed`: the directory's chunks carry keys (the pipeline's);
    a directory of chunks without keys (written before keys were recorded, or by hand) is
    read as it is, but a keyless chunk in a keyed directory is not."""
    raw = (schema.metadata or {}).get(KEY_META)
    if raw is None:
        return "it records no key (fit before datamodels recorded their models)" if keyed else None
    try:
        key = json.loads(raw)
    except ValueError:
        return "its key is not JSON"
    want = rel.rsplit("/", 2)[-2].rsplit("-", 1)[-1]
    if not isinstance(key, dict) or _key_hash(key) != want:
        return "it was fit for another experiment, other models or other settings than its directory's"
    return None


def chunk_ok(store, rel: str, a: int, b: int, n: int, keyed: bool = False) -> bool:
    """A chunk file counts as done only if it reads back verified with the right targets (and,
    `keyed`, the key its directory's name hashes: the experiment, models and settings)."""
    try:
        table = store.read_table(rel, ["target_id", "weights"])
        why = chunk_key_error(rel, store.read_schema(rel), keyed)
    except FileNotFoundError:
        return False
    except CorruptFile as err:
        log.error("fit: %s is corrupt (%s); it will be refit", store.where(rel), err.reason)
        store.delete(rel)
        return False
    if why:
        log.error("fit: %s: %s; it will be refit", store.where(rel), why)
        store.delete(rel)
        return False
    ok = (table["target_id"].to_numpy().tolist() == list(range(a, b))
          and table.schema.field("weights").type.list_size == n)
    if not ok:
        log.error("fit: %s does not hold targets %d-%d of n=%d; it will be refit", store.where(rel), a, b, n)
        store.delete(rel)
    return ok


def fit_seconds(store, rel_dir: str) -> float:
    """Worker-seconds spent fitting the datamodels in a directory (sum over its chunks)."""
    total = 0.0
    for e in store.list(rel_dir, ".parquet"):
        try:
            meta = store.read_schema(e.rel).metadata or {}
            total += float(meta.get(b"seconds", b"0"))
        except (CorruptFile, ValueError) as err:
            raise DatamodelsError(f"{store.where(e.rel)} fails verification ({getattr(err, 'reason', err)}); "
                                  f"run stage=fit to refit it") from None
    return total


def _chunk_files(store, rel_dir: str, n_targets: int) -> list[tuple[int, str, np.ndarray]]:
    """(first target, path, sorted target ids) of each chunk of the datamodels in `rel_dir`, in
    target order; FileNotFoundError naming the directory when they do not cover targets
    0..n_targets-1 exactly."""
    files = store.list(rel_dir, ".parquet")
    if not files:
        raise FileNotFoundError(f"no datamodels in {store.where(rel_dir)}; run stage=fit first")
    spans = []
    schemas = [store.read_schema(e.rel) for e in files]
    keyed = any(KEY_META in (sch.metadata or {}) for sch in schemas)
    for e, sch in zip(files, schemas):
        why = chunk_key_error(e.rel, sch, keyed)
        if why:
            raise CorruptFile(e.rel, f"{why}; run stage=fit to refit it")
        ids = np.sort(store.read_table(e.rel, ["target_id"])["target_id"].to_numpy())
        spans.append((int(ids.min()) if len(ids) else 0, e.rel, ids))
    spans.sort(key=lambda s: s[0])
    ids = np.concatenate([s[2] for s in spans])
    if len(ids) != n_targets or not np.array_equal(ids, np.arange(n_targets)):
        raise FileNotFoundError(f"datamodels in {store.where(rel_dir)} cover {len(np.unique(ids))} of "
                                f"{n_targets} targets; run stage=fit to finish them")
    return spans


def iter_datamodels(store, rel_dir: str, n_targets: int):
    """(a, b, weights float32 [b - a, n], intercept [b - a]) of each chunk of the datamodels in
    `rel_dir`, in target order, verified, one chunk read at a time (_chunk_files' errors)."""
    for a, rel, chunk_ids in _chunk_files(store, rel_dir, n_targets):
        table = store.read_table(rel, ["target_id", "weights", "intercept"])
        order = np.argsort(table["target_id"].to_numpy(), kind="stable")
        yield a, a + len(chunk_ids), list_matrix(table["weights"])[order], table["intercept"].to_numpy()[order]


def load_datamodels(store, rel_dir: str, n_targets: int):
    """(weights float32 [T, n], intercept [T], table of per-target stats), verified, in target
    order (_chunk_files' errors)."""
    table = pa.concat_tables([store.read_table(rel).replace_schema_metadata(None)
                              for _, rel, _ in _chunk_files(store, rel_dir, n_targets)])
    table = table.take(pa.array(np.argsort(table["target_id"].to_numpy(), kind="stable")))
    return list_matrix(table["weights"]), table["intercept"].to_numpy(), table


def prefix_sizes(fit_cfg: dict, m: int) -> list[int]:
    """Sizes of the train-model prefixes fit for the LDS-versus-models curve."""
    return sorted({max(10, int(round(f * m))) for f in (fit_cfg.get("prefixes") or []) if 0 < f < 1} - {m})


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


def run(plan, tracker) -> dict:
    """Fit datamodels on all good train models, and on the prefixes `fit.prefixes`
    (fractions of the train models, by model id) for the LDS-versus-models curve."""
    import ray
    from omegaconf import OmegaConf

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
    for size in prefix_sizes(fit_cfg, m):
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

    from orchestrator.train_stage import worker_slots
    pool = Pool(f"fit-m{m}", submit=submit, capacity=lambda: max(1, 2 * worker_slots(cpus, gpus)),
                per_worker=1, claims=plan.claims, done=done, on_result=on_result, unit="target",
                max_deaths=int(plan.cfg.train.max_worker_deaths))
    items = [Item(f"{rel_dir.rsplit('/', 1)[1]}-{a:06d}-{b:06d}", (a, b), b - a) for a, b in todo]
    stats["pool"] = pool.run(shuffled(items, plan.claims.owner if plan.claims else ""))
    stats["chunks_fit"] = fitted[0]
    stats["seconds"] = time.perf_counter() - t0
    return stats
