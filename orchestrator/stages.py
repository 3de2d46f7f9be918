"""The stage protocol: what each step of the pipeline reads and writes in the experiment's
store, the resources its Ray work asks for, what it logs to MLflow, and the function that
runs it. `pipeline.run` is a loop over `STAGES`; the Ray work of every stage goes through
one work pool (`orchestrator.workpool`), which resumes from the verified outputs in the store.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from orchestrator.store import Layout


@dataclass
class Context:
    """What a stage gets: the validated plan (config, store, ledger, handles), the MLflow
    tracker, the redacted resolved config, the code version, and the summary so far."""
    plan: Any
    tracker: Any
    resolved: dict
    version: str
    summary: dict
    scratch: str                      # a local directory for files on their way to the store/MLflow
    index: Any = None                 # the ledger's verified index, once a stage has built it

    def ledger_index(self):
        if self.index is None:
            self.index = self.plan.ledger.index()
        return self.index


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]    # returns this stage's entry of summary.json
    reads: tuple[str, ...] = ()       # store paths (Layout) it reads
    writes: tuple[str, ...] = ()      # store paths it writes
    resources: str | None = None      # the config section whose cpus/gpus settings size its Ray work
    params: str | None = None         # the config section logged as its MLflow run's parameters
    merge: bool = False               # its entry is merged into summary.json's top level
    needs_ray: bool = False
    logs: tuple[str, ...] = field(default=())   # what its MLflow run holds, beyond the params
    in_all: bool = True               # stage=all runs it (the analyses that retrain run when asked)
    precheck: Callable[[Any], None] | None = None   # given the plan, before Ray starts: inputs it needs

    def describe(self) -> str:
        return (f"{self.name}: reads {', '.join(self.reads) or '-'}; writes {', '.join(self.writes) or '-'}"
                + (f"; resources from {self.resources}" if self.resources else ""))


# ----------------------------------------------------------------------------- the stages

def _masks(ctx: Context) -> dict:
    """Write the mask sets (bit-packed .npy) for inspection; every other stage regenerates
    masks from the seed and the ledger is checked against them."""
    import mmap

    from orchestrator import masks as M
    plan = ctx.plan
    cfg = plan.cfg
    out = {}
    block = max(1, (1 << 26) // plan.n)   # masks at a time (64 MB as bool): never a whole set in memory
    for mask_set, count in (("train", int(cfg.masks.n_train)), ("eval", int(cfg.masks.n_eval))):
        # the .npy (np.save's header, then the rows) goes to a local scratch file block by block,
        # then to the store from a read-only mapping of it (file pages, not the driver's heap)
        path = os.path.join(ctx.scratch, f"masks-{mask_set}.npy")
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": (count, (plan.n + 7) // 8)})
            for a in range(0, count, block):
                f.write(M.make_packed_masks(int(cfg.exp.seed), mask_set, np.arange(a, min(a + block, count)),
                                            plan.n, float(cfg.masks.alpha), block=block).data)
        with open(path, "rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                plan.store.write_bytes(Layout.masks(mask_set), view)   # writes any buffer
        os.unlink(path)
        out[mask_set] = count
    out["size"] = M.mask_size(plan.n, float(cfg.masks.alpha))
    return out


def _train(ctx: Context) -> dict:
    from orchestrator import train_stage
    st = train_stage.run(ctx.plan, ctx.tracker, ctx.version)
    ctx.tracker.log_metrics({"models_trained": st["models_trained"], "train_seconds": st["seconds"]})
    return st


def _fit(ctx: Context) -> dict:
    from orchestrator import fit_stage
    return fit_stage.run(ctx.plan, ctx.tracker)


def _baselines(ctx: Context) -> dict:
    from orchestrator import baselines_stage
    return baselines_stage.run(ctx.plan, ctx.tracker)


def _evaluate(ctx: Context) -> dict:
    """LDS of every method (evaluate.run), with the compute each cost; a nested MLflow run per
    method; the plots also on the parent run."""
    from orchestrator import evaluate, fit_stage
    plan, tracker, store = ctx.plan, ctx.tracker, ctx.plan.store
    index = ctx.ledger_index()
    train_seconds = plan.ledger.seconds("train", index)   # one column, not the masks
    m = len(train_seconds)
    dm_dir = fit_stage.full_dir(plan, index)
    prefix_dirs = fit_stage.prefix_dirs(plan, index)
    per_model = float(np.sum(train_seconds)) / max(m, 1)
    compute = {"models": m, "per_model": per_model,
               "datamodels": per_model * m + fit_stage.fit_seconds(store, dm_dir)}
    ev = evaluate.run(plan, tracker, dm_dir, prefix_dirs, compute)
    return ev


def _log_methods(ctx: Context, ev: dict) -> None:
    """After the evaluate run: one nested run per method, and the plots on the parent run."""
    tracker = ctx.tracker
    for name, metrics in ev.pop("method_metrics").items():
        with tracker.stage(f"method:{name}", {"method": name, "params": ev["lds"][name].get("params") or {}}):
            tracker.log_metrics(metrics)
    for name in sorted(os.listdir(ev["scratch"])):
        if name.endswith(".png"):
            tracker.log_artifact(os.path.join(ev["scratch"], name), "plots")


def _counterfactual(ctx: Context) -> dict:
    from orchestrator import counterfactual
    return counterfactual.counterfactual_stage(ctx)


def _brittleness(ctx: Context) -> dict:
    from orchestrator import counterfactual
    return counterfactual.brittleness_stage(ctx)


def _analysis(name: str) -> Callable[[Context], dict]:
    """stage=leakage|embedding|compare (orchestrator.analysis), with its config section."""
    def run(ctx: Context) -> dict:
        from orchestrator import analysis
        fn = getattr(analysis, f"{name}_stage")
        return fn(ctx, OmegaConf.to_container(ctx.plan.cfg[name], resolve=True))
    return run


def _precheck_datamodels(plan) -> None:
    from orchestrator import counterfactual
    counterfactual.precheck(plan)


def _precheck_compare(plan) -> None:
    from orchestrator import analysis
    _precheck_datamodels(plan)
    analysis.other_experiment(plan.cfg.compare.get("other"), plan)


def check_inputs(plan) -> None:
    """What the stages asked for read, checked without reading the ledger (cheap, and
    writing nothing: config.check_outputs runs it before anything is written): an
    experiment without any datamodels, or a compare.other that cannot be compared, is one
    line. The stages' own prechecks check the rest before Ray starts."""
    todo = selected(plan.cfg.stage)
    if any(st.precheck is not None for st in todo):
        from orchestrator import counterfactual
        counterfactual.quick_precheck(plan)
    if any(st.precheck is _precheck_compare for st in todo):
        from orchestrator import analysis
        analysis.other_experiment(plan.cfg.compare.get("other"), plan)


STAGES: tuple[Stage, ...] = (
    Stage("masks", _masks, writes=(Layout.masks("train"), Layout.masks("eval")),
          logs=("its duration",)),
    Stage("train", _train, reads=(Layout.LEDGER,), writes=(Layout.LEDGER, Layout.CHECKPOINTS),
          resources="train", params="train", needs_ray=True,
          logs=("models_done per unit", "models_trained", "train_seconds")),
    Stage("fit", _fit, reads=(Layout.LEDGER,), writes=(Layout.DATAMODELS,), resources="fit", params="fit",
          needs_ray=True, logs=("targets fitted", "fit seconds")),
    Stage("baselines", _baselines, reads=(Layout.CHECKPOINTS,), writes=(Layout.SCORES,), resources="baselines",
          params="baselines", needs_ray=True, logs=("seconds per method",)),
    Stage("evaluate", _evaluate, reads=(Layout.LEDGER, Layout.DATAMODELS, Layout.SCORES),
          writes=(Layout.LDS_PER_TARGET, "*.png"), merge=True,
          logs=("lds_<method>", "the plots", "a nested run per method")),
    Stage("counterfactual", _counterfactual, reads=(Layout.DATAMODELS, Layout.SCORES),
          writes=("counterfactual/", "counterfactual.json", "counterfactual_*.png"), resources="train",
          params="counterfactual", needs_ray=True, in_all=False, precheck=_precheck_datamodels,
          logs=("cf_drop_<method>_k<k>", "cf_slope_<method>", "cf_corr_<method>", "the plots", "the table")),
    Stage("brittleness", _brittleness, reads=(Layout.LEDGER, Layout.DATAMODELS),
          writes=("brittleness/", "brittleness.json", "brittleness.png"), resources="train",
          params="brittleness", needs_ray=True, in_all=False, precheck=_precheck_datamodels,
          logs=("brittle_predicted_k<k>", "brittle_verified_k<k>", "the plot", "the table")),
    Stage("leakage", _analysis("leakage"), reads=(Layout.DATAMODELS,),
          writes=("leakage.json", "leakage_pairs.csv", "leakage_*.png"), params="leakage", in_all=False,
          precheck=_precheck_datamodels, logs=("flagged pairs", "the table", "the image grids")),
    Stage("embedding", _analysis("embedding"), reads=(Layout.DATAMODELS, Layout.CHECKPOINTS),
          writes=("embedding.json", "embedding_*.png"), params="embedding", in_all=False,
          precheck=_precheck_datamodels, logs=("explained variance", "the spectrum", "the extremes")),
    Stage("compare", _analysis("compare"), reads=(Layout.DATAMODELS,), writes=("compare.json", "compare.png"),
          params="compare", in_all=False, precheck=_precheck_compare,
          logs=("cosine similarity per target", "the most-disagreeing targets")),
)

# after a stage's MLflow run has ended, in the parent run
AFTER: dict[str, Callable[[Context, dict], None]] = {"evaluate": _log_methods}
EVALUATE_KEYS = ("lds", "lds_curve", "eval_masks", "plots")     # what evaluate puts in summary.json


def selected(stage: str) -> list[Stage]:
    """The stages `stage=` asks for: one by name, or all of them in order."""
    return [s for s in STAGES if stage == s.name or (stage == "all" and s.in_all)]


def run_stage(st: Stage, ctx: Context) -> dict:
    """Run one stage under its own MLflow run; record its entry and duration in the summary."""
    t0 = time.perf_counter()
    params = {st.params: ctx.resolved[st.params]} if st.params else None
    with ctx.tracker.stage(st.name, params):
        out = st.run(ctx)
    if st.name in AFTER:
        AFTER[st.name](ctx, out)
    if st.merge:
        ctx.summary.update({k: out[k] for k in EVALUATE_KEYS if k in out})
    else:
        ctx.summary[st.name] = out
    ctx.summary["timings"][st.name] = time.perf_counter() - t0
    return out
