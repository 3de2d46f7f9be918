"""The baselines stage: attribution scores of cheaper methods (TRAK, influence functions,
TracIn, representer points) from the checkpoints the train stage saved.

One Ray task per method builds the task's data, reads the first K checkpoints from the
store, and writes a verified Parquet file of scores (train example × target) with the
method, its parameters and its compute time. A method whose file reads back verified for
the same parameters and checkpoints is not recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pyarrow as pa

from orchestrator.store import CorruptFile, Layout
from orchestrator.train_stage import missing_checkpoints, worker_slots
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


def scores_table(scores: np.ndarray, meta: dict) -> pa.Table:
    n, T = scores.shape
    table = pa.table({
        "train_index": pa.array(np.arange(n, dtype=np.int32)),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.astype(np.float32).reshape(-1)), T),
    })
    return table.replace_schema_metadata({"datamodels": json.dumps(meta, default=str)})


def read_scores(store, rel: str) -> tuple[np.ndarray, dict]:
    """(scores float32 [n, T], metadata) of a verified scores file."""
    table = store.read_table(rel)
    col = table["scores"].combine_chunks()
    S = col.flatten().to_numpy().reshape(table.num_rows, col.type.list_size)
    meta = json.loads(store.read_schema(rel).metadata[b"datamodels"])
    return S, meta


def scores_ok(store, rel: str, n: int, T: int) -> dict | None:
    """The metadata of a finished, verified scores file of shape [n, T], else None (a
    corrupt or misshapen file is deleted, to be recomputed)."""
    try:
        S, meta = read_scores(store, rel)
    except FileNotFoundError:
        return None
    except (CorruptFile, KeyError, ValueError) as err:
        log.error("baselines: %s is corrupt (%s); it will be recomputed", store.where(rel),
                  getattr(err, "reason", str(err)))
        store.delete(rel)
        return None
    if S.shape != (n, T):
        log.error("baselines: %s has shape %s, expected (%d, %d); it will be recomputed",
                  store.where(rel), S.shape, n, T)
        store.delete(rel)
        return None
    return meta


def load_checkpoints(store, k: int) -> list[dict]:
    """The first k train-set checkpoints, loaded with weights_only."""
    from workers.checkpoints import from_bytes
    out = []
    for i in range(k):
        rel = Layout.checkpoint("train", i, 0)
        try:
            blob = store.read_bytes(rel)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint {store.where(rel)} is missing; run stage=train with "
                                    f"baselines.checkpoints>={k}") from None
        out.append(from_bytes(blob))
    return out


def compute_method(task_cfg: dict, method: str, params: dict, n_ckpt: int, rel: str, threads: int,
                   store_handle) -> dict:
    """Runs in a Ray task: build the task, load checkpoints, score, write the file."""
    import torch
    from hydra.utils import instantiate

    from workers.attribution import compute_scores
    torch.set_num_threads(max(1, threads))
    store = store_handle.open()
    task = instantiate(task_cfg, _convert_="all")
    model_fn, x_tr, y_tr, x_tg, y_tg = task.attribution_inputs()
    ckpts = load_checkpoints(store, n_ckpt)
    t0 = time.perf_counter()
    scores = compute_scores(method, model_fn, ckpts, x_tr, y_tr, x_tg, y_tg, dict(params),
                            margin_kind=getattr(task, "margin", "logsumexp"))
    seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(scores)):
        raise BaselinesError(f"{method}: {int((~np.isfinite(scores)).sum())} non-finite scores; "
                             f"check baselines.params.{method}")
    meta = {"method": method, "params": params, "checkpoints": n_ckpt, "seconds": seconds}
    store.write_table(rel, scores_table(scores, meta))
    return meta


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
    missing = missing_checkpoints(store, n_ckpt)
    if missing:
        raise BaselinesError(f"baselines need {n_ckpt} checkpoints in {store.where(Layout.CHECKPOINTS)} "
                             f"({len(missing)} missing); run stage=train (it saves baselines.checkpoints of them)")
    import ray
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    threads = int(bcfg.get("cpus_per_task") or 1)
    gpus = float(bcfg.get("gpus_per_task") or 0)
    remote = ray.remote(compute_method).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
    files = expected_files(cfg)
    out, items = {}, []
    for method in methods:
        meta = scores_ok(store, files[method], plan.n, plan.n_targets)
        if meta is not None:
            out[method] = meta | {"file": files[method], "cached": True}
        else:
            params = dict((bcfg.get("params") or {}).get(method) or {})
            items.append(Item(f"{method}-{files[method].rsplit('-', 1)[1][:-8]}", (method, params)))

    def submit(_, payload):
        method, params = payload
        return remote.remote(task_cfg, method, params, n_ckpt, files[method], threads, plan.handle)

    def done(its):
        return [it.key for it in its if scores_ok(store, files[it.payload[0]], plan.n, plan.n_targets)]

    def on_result(item, meta):
        out[item.payload[0]] = meta | {"file": files[item.payload[0]], "cached": False}
        log.info("baselines: %s done in %.1f s", item.payload[0], meta["seconds"])

    if items:
        Pool("baselines", submit=submit, capacity=lambda: max(1, worker_slots(threads, gpus)), per_worker=1,
             claims=plan.claims, done=done, on_result=on_result, unit="method",
             max_deaths=int(cfg.train.max_worker_deaths)).run(items)
    for method in methods:       # computed elsewhere (another driver): read what it wrote
        if method not in out:
            meta = scores_ok(store, files[method], plan.n, plan.n_targets)
            if meta is None:
                raise BaselinesError(f"baselines: {method} has no scores in {store.where(files[method])}; "
                                     f"run stage=baselines")
            out[method] = meta | {"file": files[method], "cached": True}
    return {"methods": out}
