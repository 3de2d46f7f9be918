"""The datamodels format: one Parquet chunk per block of targets (weights, intercept, λ,
validation MSE, non-zeros), in a directory whose name hashes the fit settings, the
experiment and the fitted models' ids (each chunk's metadata carries that key); the one
reader (`iter_datamodels`, `load_datamodels`) and the check of a finished chunk.
"""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa

from orchestrator.errors import UserError
from orchestrator.settings.names import prefix_sizes
from orchestrator.storage.ledger import list_matrix
from orchestrator.storage.store import CorruptFile, Layout

log = logging.getLogger(__name__)


class DatamodelsError(UserError):
    """Datamodels that cannot be used as asked (one line naming the file and the fix)."""


SCHEDULING_KEYS = ("targets_per_task", "cpus_per_task", "gpus_per_task", "device", "prefixes",
                   "targets_per_block", "rows_per_block", "memory_budget_bytes")
# Settings added after experiments were written, hashed only when they differ from these values,
# so that the datamodels directories written before them keep their names.
UNHASHED_DEFAULTS = {"debias": "none", "debias_phi": None}
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
