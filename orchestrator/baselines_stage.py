"""The baselines stage: attribution scores of cheaper methods (TRAK, influence functions,
TracIn, representer points) from the checkpoints the train stage saved.

One Ray task per method runs workers.attribution on the task's data and the first K
checkpoints, and writes a Parquet file of scores (train example × target) with the method,
its parameters and its compute time. A method whose file exists for the same parameters
and checkpoints is not recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.ledger import atomic_write, filesystem
from orchestrator.train_stage import checkpoint_path, checkpoint_root, missing_checkpoints

log = logging.getLogger(__name__)


def scores_dir(exp_dir: str) -> str:
    return os.path.join(exp_dir, "scores")


def scores_file(exp_dir: str, method: str, params: dict, n_ckpt: int) -> str:
    h = hashlib.sha256(json.dumps([params, n_ckpt], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join(scores_dir(exp_dir), f"{method}-k{n_ckpt}-{h}.parquet")


def write_scores(path: str, scores: np.ndarray, meta: dict) -> None:
    n, T = scores.shape
    table = pa.table({
        "train_index": pa.array(np.arange(n, dtype=np.int32)),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.astype(np.float32).reshape(-1)), T),
    })
    table = table.replace_schema_metadata({"datamodels": json.dumps(meta, default=str)})
    fs, p, local = filesystem(path)
    atomic_write(table, fs, p, local)


def read_scores(path: str) -> tuple[np.ndarray, dict]:
    """(scores float32 [n, T], metadata) of a scores file."""
    table = pq.read_table(path)
    col = table["scores"].combine_chunks()
    S = col.flatten().to_numpy().reshape(table.num_rows, col.type.list_size)
    meta = json.loads(table.schema.metadata[b"datamodels"])
    return S, meta


def load_checkpoints(ckpt_root: str, k: int) -> list[dict]:
    """The first k train-set checkpoints (local path or URI), loaded with weights_only."""
    from workers.checkpoints import from_bytes
    fs, root, _ = filesystem(ckpt_root)
    out = []
    for i in range(k):
        path = checkpoint_path(root, "train", i, 0)
        try:
            with fs.open_input_file(path) as f:
                blob = f.read()
        except (FileNotFoundError, OSError):
            raise FileNotFoundError(f"checkpoint {path} is missing; run stage=train with "
                                    f"baselines.checkpoints>={k}") from None
        out.append(from_bytes(blob))
    return out


def compute_method(task_cfg: dict, method: str, params: dict, ckpt_root: str, n_ckpt: int,
                   out_path: str, threads: int) -> dict:
    """Runs in a Ray task: build the task, load checkpoints, score, write the file."""
    import torch
    from hydra.utils import instantiate

    from workers.attribution import compute_scores
    torch.set_num_threads(max(1, threads))
    task = instantiate(task_cfg, _convert_="all")
    model_fn, x_tr, y_tr, x_tg, y_tg = task.attribution_inputs()
    ckpts = load_checkpoints(ckpt_root, n_ckpt)
    t0 = time.perf_counter()
    scores = compute_scores(method, model_fn, ckpts, x_tr, y_tr, x_tg, y_tg, dict(params),
                            margin_kind=getattr(task, "margin", "logsumexp"))
    seconds = time.perf_counter() - t0
    meta = {"method": method, "params": params, "checkpoints": n_ckpt, "seconds": seconds}
    write_scores(out_path, scores, meta)
    return meta


def run(plan, tracker) -> dict:
    import ray
    from omegaconf import OmegaConf
    from tqdm import tqdm

    cfg = plan.cfg
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    methods = bcfg.get("methods") or []
    if not methods:
        return {"methods": []}
    if not hasattr(plan.task, "attribution_inputs"):
        log.warning("baselines: task %s has no attribution_inputs(); skipping baselines", type(plan.task).__name__)
        return {"methods": []}
    n_ckpt = int(bcfg["checkpoints"])
    ckpt_root = checkpoint_root(plan)
    missing = missing_checkpoints(ckpt_root, n_ckpt)
    if missing:
        raise FileNotFoundError(f"baselines need {n_ckpt} checkpoints in {ckpt_root} ({len(missing)} missing); "
                                f"run stage=train (it saves baselines.checkpoints of them)")
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    threads = int(bcfg.get("cpus_per_task") or 1)
    remote = ray.remote(compute_method).options(num_cpus=threads, num_gpus=float(bcfg.get("gpus_per_task") or 0),
                                                max_retries=1)
    refs, out = {}, {}
    for method in methods:
        params = dict((bcfg.get("params") or {}).get(method) or {})
        path = scores_file(plan.exp_dir, method, params, n_ckpt)
        if os.path.exists(path):
            out[method] = read_scores(path)[1] | {"path": path, "cached": True}
            continue
        refs[remote.remote(task_cfg, method, params, ckpt_root, n_ckpt, path, threads)] = (method, path)
    bar = tqdm(total=len(refs), unit="method", desc="baselines", dynamic_ncols=True)
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                method, path = refs.pop(ref)
                meta = ray.get(ref)
                out[method] = meta | {"path": path, "cached": False}
                bar.update(1)
                log.info("baselines: %s done in %.1f s", method, meta["seconds"])
    finally:
        bar.close()
    return {"methods": out}
