"""The scores format of the attribution baselines: one Parquet file per method, checkpoint
count and parameters (`scores_file`), a row per training example and the targets in the
ledger's column blocks, with the method's metadata (parameters, seconds, the digests of
the checkpoints it was computed from); the one reader (`ScoresFile`) and the check of a
finished file (`scores_ok`).
"""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa

from orchestrator.errors import UserError
from orchestrator.settings.names import budget_sizes
from orchestrator.storage.ledger import block_array, block_columns, decode_margins, list_matrix, margin_columns
from orchestrator.storage.store import CorruptFile, Layout

log = logging.getLogger(__name__)


class BaselinesError(UserError):
    """A method's scores that should exist and do not (one line, naming the method)."""


def scores_file(method: str, params: dict, n_ckpt: int) -> str:
    h = hashlib.sha256(json.dumps([params, n_ckpt], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Layout.scores(method, n_ckpt, h)


def expected_files(cfg) -> dict[str, str]:
    """method -> scores file that the config asks for."""
    from omegaconf import OmegaConf
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    n_ckpt = int(bcfg["checkpoints"])
    return {m: scores_file(m, dict((bcfg.get("params") or {}).get(m) or {}), n_ckpt)
            for m in bcfg.get("methods") or []}


def budget_files(cfg) -> dict[str, dict[int, str]]:
    """method -> {k: scores file of its first k checkpoints} for every budget k < K, for the
    configured methods that are checkpoint ensembles (workers.attribution.STEPS)."""
    from omegaconf import OmegaConf

    from workers.attribution import STEPS
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    ks = budget_sizes(cfg)
    return {m: {k: scores_file(m, dict((bcfg.get("params") or {}).get(m) or {}), k) for k in ks}
            for m in bcfg.get("methods") or [] if m in STEPS and ks}


def wanted_files(cfg) -> dict[str, dict[int, str]]:
    """method -> {checkpoints: scores file} of every file the config asks for (K and budgets)."""
    n_ckpt = int(cfg.baselines.checkpoints)
    budgets = budget_files(cfg)
    return {m: {**budgets.get(m, {}), n_ckpt: rel} for m, rel in expected_files(cfg).items()}


def scores_table(scores: np.ndarray, meta: dict) -> pa.Table:
    """A scores file: one row per training example, the targets in columns of MARGIN_BLOCK
    (scores_0, scores_1, ...: the ledger's blocks), so that a reader of some targets reads
    their columns only."""
    n = scores.shape[0]
    table = pa.table({"train_index": pa.array(np.arange(n, dtype=np.int32)), **block_array(scores, "scores")})
    return table.replace_schema_metadata({"datamodels": json.dumps(meta, default=str)})


def scores_info(store, rel: str, schema: pa.Schema | None = None) -> tuple[tuple[int, int], dict]:
    """((n, T), metadata) of a scores file, from its footer (`schema`, if already read) and its
    train_index column (both layouts: the blocked one and the single `scores` column of files
    written before it)."""
    schema = schema if schema is not None else store.read_schema(rel)
    T, meta = _footer(rel, schema)
    return (int(store.read_table(rel, ["train_index"]).num_rows), T), meta


def _footer(rel: str, schema: pa.Schema) -> tuple[int, dict]:
    """(T, metadata) of a scores file's footer; CorruptFile when it is another file's."""
    try:
        if "scores" in schema.names:
            T = schema.field("scores").type.list_size
        else:
            T = sum(schema.field(c).type.list_size for c in schema.names if c.startswith("scores_"))
        meta = json.loads((schema.metadata or {})[b"datamodels"])
    except (KeyError, AttributeError, ValueError) as err:
        raise CorruptFile(rel, f"not a scores file ({type(err).__name__}: {err})") from None
    if "train_index" not in schema.names or not isinstance(meta, dict):
        raise CorruptFile(rel, "not a scores file (no train_index column or metadata)")
    return int(T), meta


def read_scores(store, rel: str, a: int = 0, b: int | None = None,
                schema: pa.Schema | None = None) -> tuple[np.ndarray, dict]:
    """(scores float32 [n, b - a] of targets [a, b) (all by default), metadata) of a verified
    scores file: only the columns holding those targets are read. `schema`: its footer, if
    already read (a reader of every block reads it once, not once a block)."""
    schema = schema if schema is not None else store.read_schema(rel)
    T, meta = _footer(rel, schema)
    if "scores" in schema.names:             # the single-column layout of older files
        S = list_matrix(store.read_table(rel, ["scores"])["scores"])
        return (S if a == 0 and b is None else S[:, a:b].copy()), meta
    b = T if b is None else b
    if not 0 <= a <= b <= T:
        raise ValueError(f"{store.where(rel)}: targets [{a}, {b}) asked of {T}")
    return decode_margins(store.read_table(rel, block_columns(a, b, "scores")), a, b, "scores"), meta


class ScoresFile:
    """One scores file whose footer is read once (on construction: FileNotFoundError,
    CorruptFile): `shape` (n, T) and `meta`, then its targets by block. The one way every
    reader reads it (the check, evaluate, counterfactual, the API; `open_scores`). `who`: the
    reader, for whom a block that fails verification later is BaselinesError naming the file."""

    def __init__(self, store, rel: str, who: str | None = None):
        self.store, self.rel, self.who = store, rel, who
        self.schema = store.read_schema(rel)
        self.shape, self.meta = scores_info(store, rel, self.schema)

    def ranges(self) -> list[tuple[int, int]]:
        """[a, b) of each stored block of targets (the whole file in the older one-column layout)."""
        if "scores" in self.schema.names:
            return [(0, self.shape[1])]
        return [(a, b) for _, a, b in margin_columns(self.shape[1], "scores")]

    def read(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Scores float32 [n, b - a] of targets [a, b)."""
        try:
            return read_scores(self.store, self.rel, a, b, self.schema)[0]
        except (FileNotFoundError, CorruptFile) as err:
            if self.who is None:
                raise
            raise unusable(self.store, self.rel, self.who, err) from None

    def blocks(self):
        """(a, b, scores [n, b - a]) of every stored block, one block held at a time."""
        for a, b in self.ranges():
            yield a, b, self.read(a, b)


def unusable(store, rel: str, who: str, err: BaseException) -> BaselinesError:
    """The one line for a scores file a reader cannot use: who reads it, the file, why, the fix."""
    if isinstance(err, FileNotFoundError):
        return BaselinesError(f"{who}: no scores at {store.where(rel)}; run stage=baselines")
    return BaselinesError(f"{who}: {store.where(rel)} fails verification ({getattr(err, 'reason', err)}); "
                          f"run stage=baselines to recompute it")


def open_scores(store, rel: str, n: int, T: int, who: str) -> ScoresFile:
    """The scores file at `rel`, as every reader opens it: verified, of shape (n, T), else
    BaselinesError (one line naming `who`, the file, why and stage=baselines); its blocks read
    later fail the same way."""
    try:
        f = ScoresFile(store, rel, who)
    except (FileNotFoundError, CorruptFile) as err:
        raise unusable(store, rel, who, err) from None
    if f.shape != (n, T):
        raise BaselinesError(f"{who}: {store.where(rel)} has shape {f.shape}, expected ({n}, {T}); "
                             f"run stage=baselines")
    return f


def scores_ok(store, rel: str, n: int, T: int, digests: list[str] | None = None, who: str = "baselines") -> dict | None:
    """The metadata of a finished, verified scores file of shape [n, T], else None (a
    corrupt or misshapen file is deleted, to be recomputed). Verified one target block at a
    time, so that the check holds at most one block of the file. `digests`: those of the
    checkpoints the file must have been computed from (its metadata's `checkpoint_digests`);
    a file of other checkpoints, or one written before files recorded them, is recomputed.
    `who`: the stage named in the messages."""
    try:
        f = ScoresFile(store, rel)
        shape, meta = f.shape, f.meta
        if shape == (n, T):
            for _ in f.blocks():
                pass
    except FileNotFoundError:
        return None
    except (CorruptFile, KeyError, ValueError) as err:
        log.error("%s: %s is corrupt (%s); it will be recomputed", who, store.where(rel),
                  getattr(err, "reason", str(err)))
        store.delete(rel)
        return None
    if shape != (n, T):
        log.error("%s: %s has shape %s, expected (%d, %d); it will be recomputed",
                  who, store.where(rel), shape, n, T)
        store.delete(rel)
        return None
    if digests is not None and meta.get("checkpoint_digests") != list(digests):
        what = "other checkpoints" if "checkpoint_digests" in meta else "checkpoints it does not record"
        log.warning("%s: %s was computed from %s than the %d in %s now; it will be recomputed",
                    who, store.where(rel), what, len(digests), store.where(Layout.CHECKPOINTS))
        return None
    return meta
