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

import logging
import time

import numpy as np

from orchestrator.scheduling.actors import worker_slots
from orchestrator.scheduling.cluster import worker_setup
from orchestrator.scheduling.workpool import Item, Pool
from orchestrator.settings.names import budget_sizes
from orchestrator.storage.checkpoints import checkpoint_digests, read_checkpoints
from orchestrator.storage.scores import BaselinesError, scores_ok, scores_table, wanted_files
from orchestrator.storage.store import StoreError
from workers.tasks import member

log = logging.getLogger(__name__)


def compute_method(task_cfg: dict, method: str, params: dict, n_ckpt: int, files, threads: int,
                   store_handle, config_hash: str | None = None, digests: list[str] | None = None) -> dict:
    """Runs in a Ray task: build the task, load checkpoints, score, write the file(s).

    files: the scores file to write, or {k: file} for the checkpoint budgets k to write (a
    checkpoint ensemble, workers.attribution.STEPS; k = n_ckpt is the method's own file).
    config_hash, digests: the experiment the checkpoints must belong to and the digests the
    driver verified (read_checkpoints). Each file's metadata records the digests of the
    checkpoints it was computed from (`checkpoint_digests`). Returns {k: metadata written}."""
    from orchestrator.settings.task import build_task
    from workers.attribution import STEPS, budget_scores, compute_scores
    store = worker_setup(threads, store_handle)
    if isinstance(files, str):
        files = {n_ckpt: files}
    task = build_task(task_cfg)
    model_fn, x_tr, y_tr, x_tg, y_tg = task.attribution_inputs()
    # all K even for smaller budgets: params (tracin lrs) are per K
    ckpts, seen = read_checkpoints(store, n_ckpt, config_hash, digests)
    margin_kind = member(task, "margin")
    from workers.logs import repeats_summarised
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


def run(ctx) -> dict:
    """Every asked method's scores file (and its checkpoint budgets' files), each computed once
    from the verified checkpoints by one Ray task."""
    from omegaconf import OmegaConf

    plan = ctx.plan
    cfg = plan.cfg
    store = plan.store
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    methods = bcfg.get("methods") or []
    if not methods:
        return {"methods": {}}
    if member(plan.task, "attribution_inputs") is None:
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
