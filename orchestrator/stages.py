"""The stage protocol: what each step of the pipeline reads and writes in the experiment's
store, the resources its Ray work asks for, what it logs to MLflow, and the function that
runs it. `pipeline.run` is a loop over `STAGES`; the Ray work of every stage goes through
one work pool (`orchestrator.workpool`), which resumes from the verified outputs in the store.
"""
from __future__ import annotations

import io
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

    def describe(self) -> str:
        return (f"{self.name}: reads {', '.join(self.reads) or '-'}; writes {', '.join(self.writes) or '-'}"
                + (f"; resources from {self.resources}" if self.resources else ""))


# ----------------------------------------------------------------------------- the stages

def _masks(ctx: Context) -> dict:
    """Write the mask sets (bit-packed .npy) for inspection; every other stage regenerates
    masks from the seed and the ledger is checked against them."""
    from orchestrator import masks as M
    plan = ctx.plan
    cfg = plan.cfg
    out = {}
    for mask_set, count in (("train", int(cfg.masks.n_train)), ("eval", int(cfg.masks.n_eval))):
        packed = M.make_packed_masks(int(cfg.exp.seed), mask_set, np.arange(count), plan.n, float(cfg.masks.alpha))
        buf = io.BytesIO()
        np.save(buf, packed)
        plan.store.write_bytes(Layout.masks(mask_set), buf.getvalue())
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
    fit_cfg = OmegaConf.to_container(plan.cfg.fit, resolve=True)
    index = ctx.ledger_index()
    train_seconds = plan.ledger.seconds("train", index)   # one column, not the masks
    m = len(train_seconds)
    dm_dir = fit_stage.store_dir(m, fit_cfg)
    prefix_dirs = {k: fit_stage.store_dir(k, fit_cfg) for k in fit_stage.prefix_sizes(fit_cfg, m)}
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
)

# after a stage's MLflow run has ended, in the parent run
AFTER: dict[str, Callable[[Context, dict], None]] = {"evaluate": _log_methods}
EVALUATE_KEYS = ("lds", "lds_curve", "eval_masks", "plots")     # what evaluate puts in summary.json


def selected(stage: str) -> list[Stage]:
    """The stages `stage=` asks for: one by name, or all of them in order."""
    return [s for s in STAGES if stage in ("all", s.name)]


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
