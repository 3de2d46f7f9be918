"""The baselines stage: attribution scores of cheaper methods (TRAK, influence functions,
TracIn, representer points) from the checkpoints the train stage saved.

One Ray task per method builds the task's data, reads the first K checkpoints from the
store, and writes a verified Parquet file of scores (train example × target) with the
method, its parameters, its compute time and the digests of the checkpoints it used. Every
checkpoint is verified (its digest, and that it is this experiment's model i) before the
stage starts and again before it is loaded; one that fails stops the stage with one line
naming it (run stage=train: it retrains it). A method whose file reads back verified for the
same parameters and the same checkpoints (the digests in its metadata) is not recomputed.

Checkpoint budgets: the checkpoint ensembles (TRAK, TracIn: workers.attribution.STEPS) are
also scored with their first k checkpoints for every k in baselines.budget_checkpoints below
K, from the same pass over the checkpoints (the per-checkpoint terms are running sums, so a
budget costs only forming its ensemble from the sums so far). Each budget is its own scores
file, the very file a run with baselines.checkpoints=k would write (`scores_file(method,
params, k)`), its metadata carrying the seconds of those k checkpoints' share of the scoring.
A method is done when its K file and every budget file read back verified; when only budget
files are missing, the task scores just the checkpoints those need and writes only them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pyarrow as pa

from orchestrator.store import CorruptFile, Layout, StoreError
from orchestrator.train_stage import check_checkpoint, worker_slots
from orchestrator.workpool import Item, Pool

log = logging.getLogger(__name__)


class BaselinesError(RuntimeError):
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


def budget_sizes(cfg) -> list[int]:
    """The checkpoint budgets k < baselines.checkpoints (K) at which the checkpoint ensembles
    are also scored: baselines.budget_checkpoints, sorted, values >= K left out (K itself is
    the method's own file)."""
    from omegaconf import OmegaConf
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    raw = bcfg.get("budget_checkpoints") or []
    if not isinstance(raw, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                            for k in raw):
        from orchestrator.config import ConfigError
        raise ConfigError(f"baselines.budget_checkpoints={raw!r} must be a list of checkpoint counts >= 1, "
                          f"e.g. baselines.budget_checkpoints=[1,2]")
    return sorted({k for k in raw if k < int(bcfg["checkpoints"])})


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
    from orchestrator.ledger import block_array
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
    from orchestrator.ledger import block_columns, decode_margins, list_matrix
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
    CorruptFile): `shape` (n, T) and `meta`, then its targets by block. The one way the
    readers of every block (the check, evaluate, counterfactual) read it."""

    def __init__(self, store, rel: str):
        self.store, self.rel = store, rel
        self.schema = store.read_schema(rel)
        self.shape, self.meta = scores_info(store, rel, self.schema)

    def ranges(self) -> list[tuple[int, int]]:
        """[a, b) of each stored block of targets (the whole file in the older one-column layout)."""
        from orchestrator.ledger import margin_columns
        if "scores" in self.schema.names:
            return [(0, self.shape[1])]
        return [(a, b) for _, a, b in margin_columns(self.shape[1], "scores")]

    def read(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Scores float32 [n, b - a] of targets [a, b)."""
        return read_scores(self.store, self.rel, a, b, self.schema)[0]

    def blocks(self):
        """(a, b, scores [n, b - a]) of every stored block, one block held at a time."""
        for a, b in self.ranges():
            yield a, b, self.read(a, b)


def scores_ok(store, rel: str, n: int, T: int, digests: list[str] | None = None) -> dict | None:
    """The metadata of a finished, verified scores file of shape [n, T], else None (a
    corrupt or misshapen file is deleted, to be recomputed). Verified one target block at a
    time, so that the check holds at most one block of the file. `digests`: those of the
    checkpoints the file must have been computed from (its metadata's `checkpoint_digests`);
    a file of other checkpoints, or one written before files recorded them, is recomputed."""
    try:
        f = ScoresFile(store, rel)
        shape, meta = f.shape, f.meta
        if shape == (n, T):
            for _ in f.blocks():
                pass
    except FileNotFoundError:
        return None
    except (CorruptFile, KeyError, ValueError) as err:
        log.error("baselines: %s is corrupt (%s); it will be recomputed", store.where(rel),
                  getattr(err, "reason", str(err)))
        store.delete(rel)
        return None
    if shape != (n, T):
        log.error("baselines: %s has shape %s, expected (%d, %d); it will be recomputed",
                  store.where(rel), shape, n, T)
        store.delete(rel)
        return None
    if digests is not None and meta.get("checkpoint_digests") != list(digests):
        what = "other checkpoints" if "checkpoint_digests" in meta else "checkpoints it does not record"
        log.warning("baselines: %s was computed from %s than the %d in %s now; it will be recomputed",
                    store.where(rel), what, len(digests), store.where(Layout.CHECKPOINTS))
        return None
    return meta


def bad_checkpoint(store, rel: str, reason: str) -> BaselinesError:
    """The one line for a checkpoint the baselines cannot use: its path, why, and the fix."""
    if reason == "missing":
        return BaselinesError(f"checkpoint {store.where(rel)} is missing; run stage=train (it saves "
                              f"baselines.checkpoints of them)")
    return BaselinesError(f"checkpoint {store.where(rel)} fails verification ({reason}); run stage=train to "
                          f"retrain it (the bad file is moved to {Layout.CHECKPOINTS}/_quarantine/)")


def checkpoint_digests(store, k: int, config_hash: str) -> list[str]:
    """The digests of the first k train-set checkpoints, each verified (its bytes, and the
    identity of this experiment's model i) without unpickling; BaselinesError (one line naming
    the file) at the first that is missing or fails."""
    out = []
    for i in range(k):
        digest, why = check_checkpoint(store, i, config_hash)
        if digest is None:
            raise bad_checkpoint(store, Layout.checkpoint("train", i, 0), why)
        out.append(digest)
    return out


def read_checkpoints(store, k: int, config_hash: str | None = None,
                     digests: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """(state dicts, digests) of the first k train-set checkpoints, each verified before it is
    loaded with weights_only: its digest, the identity of experiment `config_hash`'s model i
    (when given), and the digest the caller saw (`digests`, when given: the files are the ones
    it checked). BaselinesError (one line naming the file) when one is missing or fails."""
    from workers.checkpoints import CheckpointError, checkpoint_identity, from_bytes, verify
    states, seen = [], []
    for i in range(k):
        rel = Layout.checkpoint("train", i, 0)
        try:
            blob = store.read_bytes(rel)
        except FileNotFoundError:
            raise bad_checkpoint(store, rel, "missing") from None
        expect = checkpoint_identity(config_hash, "train", i, 0) if config_hash is not None else None
        try:
            digest = verify(blob, expect)
            if digests is not None and digest != digests[i]:
                raise CheckpointError("it changed since the stage checked it (another run retrained it?)")
            states.append(from_bytes(blob, expect))
        except CheckpointError as err:
            raise bad_checkpoint(store, rel, err.reason) from None
        seen.append(digest)
    return states, seen


def load_checkpoints(store, k: int, config_hash: str | None = None) -> list[dict]:
    """The first k train-set checkpoints, verified (read_checkpoints), loaded with weights_only."""
    return read_checkpoints(store, k, config_hash)[0]


def compute_method(task_cfg: dict, method: str, params: dict, n_ckpt: int, files, threads: int,
                   store_handle, config_hash: str | None = None, digests: list[str] | None = None) -> dict:
    """Runs in a Ray task: build the task, load checkpoints, score, write the file(s).

    files: the scores file to write, or {k: file} for the checkpoint budgets k to write (a
    checkpoint ensemble, workers.attribution.STEPS; k = n_ckpt is the method's own file).
    config_hash, digests: the experiment the checkpoints must belong to and the digests the
    driver verified (read_checkpoints). Each file's metadata records the digests of the
    checkpoints it was computed from (`checkpoint_digests`). Returns {k: metadata written}."""
    import torch
    from hydra.utils import instantiate

    from workers.attribution import STEPS, budget_scores, compute_scores
    torch.set_num_threads(max(1, threads))
    if isinstance(files, str):
        files = {n_ckpt: files}
    store = store_handle.open()
    task = instantiate(task_cfg, _convert_="all")
    model_fn, x_tr, y_tr, x_tg, y_tg = task.attribution_inputs()
    # all K even for smaller budgets: params (tracin lrs) are per K
    ckpts, seen = read_checkpoints(store, n_ckpt, config_hash, digests)
    margin_kind = getattr(task, "margin", "logsumexp")
    from orchestrator.raycluster import worker_logging
    from workers.logs import repeats_summarised
    worker_logging()
    results: dict[int, tuple[np.ndarray, float, list[float] | None]]
    with repeats_summarised():          # a solver warning per target block is printed once, with a count
        if set(files) == {n_ckpt} and method not in STEPS:
            t0 = time.perf_counter()
            scores = compute_scores(method, model_fn, ckpts, x_tr, y_tr, x_tg, y_tg, dict(params),
                                    margin_kind=margin_kind)
            results = {n_ckpt: (scores, time.perf_counter() - t0, None)}
        else:
            b = budget_scores(method, model_fn, ckpts, x_tr, y_tr, x_tg, y_tg, dict(params), sorted(files),
                              margin_kind=margin_kind)
            results = {k: (b.scores[k], b.seconds[k], b.checkpoint_seconds[:k]) for k in sorted(files)}
    for k, (scores, _, _) in results.items():
        if not np.all(np.isfinite(scores)):
            raise BaselinesError(f"{method}: {int((~np.isfinite(scores)).sum())} non-finite scores with "
                                 f"{k} checkpoints; check baselines.params.{method}")
    written = {}
    for k in sorted(results, reverse=True):      # the method's own file first
        scores, seconds, per_ckpt = results[k]
        meta = {"method": method, "params": params, "checkpoints": k, "seconds": seconds,
                "checkpoint_digests": seen[:k]}
        if per_ckpt is not None:
            meta["checkpoint_seconds"] = per_ckpt
        if k != n_ckpt:
            meta["budget_of"] = n_ckpt           # the first k of the n_ckpt checkpoints' pass
        store.write_table(files[k], scores_table(scores, meta))
        written[k] = meta
    return written


def run(plan, tracker) -> dict:
    from omegaconf import OmegaConf

    cfg = plan.cfg
    store = plan.store
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    methods = bcfg.get("methods") or []
    if not methods:
        return {"methods": {}}
    if not hasattr(plan.task, "attribution_inputs"):
        raise BaselinesError(f"baselines.methods={methods}: task {type(plan.task).__name__} has no "
                             f"attribution_inputs(); set baselines.methods=[]")
    n_ckpt = int(bcfg["checkpoints"])
    budget_sizes(cfg)                          # a malformed budget list fails before any work
    config_hash = plan.identity.config_hash
    digests = checkpoint_digests(store, n_ckpt, config_hash)   # every checkpoint verified, or one line
    import ray
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    threads = int(bcfg.get("cpus_per_task") or 1)
    gpus = float(bcfg.get("gpus_per_task") or 0)
    remote = ray.remote(compute_method).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
    files = wanted_files(cfg)                  # method -> {checkpoints: file}

    metas: dict[str, dict[int, dict]] = {m: {} for m in methods}   # verified files' metadata

    def missing(method):
        """{k: file} of the method's files that do not read back verified (the others' metadata
        is kept in `metas`)."""
        todo = {}
        for k, rel in files[method].items():
            meta = scores_ok(store, rel, plan.n, plan.n_targets, digests[:k])
            if meta is None:
                todo[k] = rel
            else:
                metas[method][k] = meta
        return todo

    def summary(method, cached):
        meta = metas[method][n_ckpt]
        out = meta | {"file": files[method][n_ckpt], "cached": cached}
        budgets = {k: {"file": files[method][k], "seconds": metas[method][k].get("seconds")}
                   for k in sorted(files[method]) if k != n_ckpt}
        if budgets:
            out["budgets"] = budgets
        return out

    out, items = {}, []
    for method in methods:
        todo = missing(method)
        if not todo:
            out[method] = summary(method, True)
        else:
            params = dict((bcfg.get("params") or {}).get(method) or {})
            key = files[method][n_ckpt].rsplit('-', 1)[1][:-8]
            items.append(Item(f"{method}-{key}", (method, params, todo)))

    def submit(_, payload):
        method, params, todo = payload
        return remote.remote(task_cfg, method, params, n_ckpt, todo, threads, plan.handle, config_hash, digests)

    def done(its):
        return [it.key for it in its if not missing(it.payload[0])]

    def on_result(item, written):
        method = item.payload[0]
        metas[method].update(written)
        if set(metas[method]) == set(files[method]):
            out[method] = summary(method, n_ckpt not in written)
        log.info("baselines: %s done (%s checkpoints) in %s s", method, ", ".join(str(k) for k in sorted(written)),
                 ", ".join(f"{written[k]['seconds']:.1f}" for k in sorted(written)))

    if items:
        Pool("baselines", submit=submit, capacity=lambda: max(1, worker_slots(threads, gpus)), per_worker=1,
             claims=plan.claims, done=done, on_result=on_result, unit="method",
             max_deaths=int(cfg.train.max_worker_deaths), fatal=(StoreError, BaselinesError),
             timeout=0).run(items)     # no deadline: methods differ too much in cost for a median to judge
    for method in methods:       # computed elsewhere (another driver): read what it wrote
        if method not in out:
            todo = missing(method)
            if todo:
                k = max(todo)
                what = "" if k == n_ckpt else f" for its first {k} checkpoints"
                raise BaselinesError(f"baselines: {method} has no scores{what} in {store.where(todo[k])}; "
                                     f"run stage=baselines")
            out[method] = summary(method, True)
    return {"methods": out}
