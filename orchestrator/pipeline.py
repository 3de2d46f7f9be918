"""The pipeline: masks → train → fit → baselines → evaluate, each resumable and runnable alone.

`run(cfg)` validates everything and checks every output location before Ray starts, then
runs the asked stages (a loop over `orchestrator.STAGES`) under one MLflow parent
run (a nested run per stage) and writes
summary.json into the experiment's store. The store, not this process's memory, is the
source of truth: a driver that dies is replaced by submitting the same command again, and
drivers running at once share the work through claims in the store.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
from omegaconf import DictConfig, OmegaConf

from orchestrator.analyses import brittleness, compare, counterfactual, embedding, leakage, memorization, mislabel
from orchestrator.analyses.common import check_datamodels
from orchestrator.runtime import plan as C
from orchestrator.runtime.artifacts import Artifacts
from orchestrator.runtime.context import Context, Stage
from orchestrator.scheduling import cluster as raycluster
from orchestrator.scheduling.serve import serve
from orchestrator.stages import baselines, evaluate, fit, masks, rounds, train
from orchestrator.storage import experiment
from orchestrator.storage.claims import Claims
from orchestrator.storage.store import Layout
from orchestrator.tracking import Tracker
from orchestrator.uris import redact

log = logging.getLogger(__name__)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("datamodels")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def redacted(obj):
    """A copy of a config container with every URI's credentials redacted."""
    if isinstance(obj, dict):
        return {k: redacted(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redacted(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return redact(obj)
    return obj


def accuracy_summary(plan, index) -> dict:
    """Mean, min and max train/target accuracy per mask set: two columns read, one ledger
    file at a time, so that the driver holds no array of every model's values."""
    out = {}
    keys = ("target_acc", "train_acc")
    for mask_set in ("train", "eval"):
        pos = index.select(mask_set)
        if not len(pos):
            continue
        total, low, high = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, np.inf), dict.fromkeys(keys, -np.inf)
        for _, t in plan.ledger.iter_columns(index, pos, list(keys)):
            for key in keys:
                v = t[key].to_numpy().astype(np.float64)
                total[key] += float(v.sum())
                low[key], high[key] = min(low[key], float(v.min())), max(high[key], float(v.max()))
        for key in keys:
            out[f"{mask_set}.{key}"] = {"mean": total[key] / len(pos), "min": low[key], "max": high[key]}
    return out


def table_lines(summary: dict) -> list[str]:
    """The LDS table: a line per method (LDS, its 95% interval, MSE where it predicts margins)."""
    lds = summary.get("lds") or {}
    if not lds:
        return []
    lines = [f"{'method':<16}{'LDS':>8}   {'95% CI':<18}{'MSE':>10}"]
    for name, r in lds.items():
        ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        mse = f"{r['mse']:.4f}" if "mse" in r else "-"
        lines.append(f"{name:<16}{r['mean']:>8.3f}   {ci:<18}{mse:>10}")
    return lines


def rounds_lines(summary: dict) -> list[str]:
    """The rounds of a run in rounds: models, LDS and gain per doubling each, and why they stopped."""
    entry = summary.get("rounds")
    if not isinstance(entry, dict) or not entry.get("rounds"):
        return []
    lines = [f"rounds (until {entry['rule']}):"]
    for r in entry["rounds"]:
        gain = "" if r.get("gain_per_doubling") is None else f"  {r['gain_per_doubling']:+.4f}/doubling"
        lines.append(f"  {r['models']:>7} models  LDS {r['lds']:.4f}{gain}")
    lines.append(f"  stopped: {entry['stopped']}")
    fc = entry["rounds"][-1].get("forecast")
    if fc is not None:
        lines.append(f"  {rounds.forecast_line(fc)}")
    return lines


def print_table(summary: dict, evaluated: bool = True, ui: str | None = None) -> None:
    """The run's last words: model counts, the LDS table, the headline of the application
    stage that ran (stage=counterfactual, ...), and where to read the rest: the files of
    every stage, the applications' of this run first, then those an earlier run left."""
    lines = ["", f"models: train {summary['models'].get('train', 0)}, eval {summary['models'].get('eval', 0)}"]
    if summary.get("models_failed"):
        lines.append(f"failed models (not fitted): {summary['models_failed']}")
    if summary.get("stage") == "all":          # a run in rounds (a single stage's run did not train them)
        lines += rounds_lines(summary)
    table = table_lines(summary)
    if table and not evaluated:
        lines.append("LDS from the last evaluation (stage=evaluate was not run this time):")
    lines += table
    ran = summary.get("stage")
    apps = [s.name for s in STAGES if not s.in_all and isinstance(summary.get(s.name), dict)]
    apps = [a for a in apps if a == ran] + [a for a in apps if a != ran]     # this run's first
    if ran in apps and summary[ran].get("headline"):
        lines.append(f"{ran}:")
        lines += [f"  {line}" for line in summary[ran]["headline"]]
    where = summary["experiment_dir"]
    lines.append(f"results:  {where}")
    files = ["summary.json"] + sorted(os.path.basename(p) for p in (summary.get("plots") or {}).values())
    lines.append(f"          {', '.join(files)}")
    for name in apps:
        entry = summary[name]
        named = entry.get("files") or [p for p in [entry.get("table"), entry.get("csv"),
                                                   *(entry.get("plots") or {}).values()] if p]
        when = "" if name == ran else f" (from an earlier stage={name} run)"
        lines.append(f"          {name}{when}: {', '.join(named) or '-'}")
    if ui:
        lines.append(f"MLflow:   {ui}")
    print("\n".join(lines), flush=True)


# Set by the sweep launcher (hydra_plugins.datamodels_launcher) for each point's driver.
SWEEP_ID_ENV, SWEEP_POINT_ENV = "DATAMODELS_SWEEP_ID", "DATAMODELS_SWEEP_POINT"


def sweep_point() -> tuple[str | None, dict]:
    """(the sweep's id, {key: value} of the keys that vary across its points) or (None, {})."""
    try:
        point = json.loads(os.environ.get(SWEEP_POINT_ENV) or "{}")
    except ValueError:
        point = {}
    return os.environ.get(SWEEP_ID_ENV), point if isinstance(point, dict) else {}


def run_name(cfg: DictConfig, stage: str, point: dict, chash: str | None = None, in_rounds: bool = False) -> str:
    """What tells this run from its neighbours, e.g. `fmnist_mlp-3f2a9c01de α=0.25 m=4000`:
    the experiment's directory name (exp.name and the hash of its recipe, so two recipes
    never share a name), α, the number of models, a sweep's varied keys, the stage when it is
    not `all` (`m=auto` for a run in rounds: its models are its metric models.train). The
    tracker adds ` (resume N)` to the Nth re-run of the same experiment."""
    name = f"{cfg.exp.name}-{chash}" if chash else str(cfg.exp.name)
    parts = [name, f"α={float(cfg.masks.alpha):g}", "m=auto" if in_rounds else f"m={int(cfg.masks.n_train)}"]
    parts += [f"{k}={v}" for k, v in point.items()
              if k.lstrip("+~") not in ("masks.alpha", "masks.n_train", "exp.name")]
    if stage != "all":
        parts.append(f"stage={stage}")
    return " ".join(parts)


def headline(summary: dict, evaluated: bool) -> dict:
    """The parent run's metrics: every method's LDS with its interval, compute, model counts
    and stage seconds, so that MLflow's compare view needs the parent runs alone."""
    out = {f"models.{k}": v for k, v in summary["models"].items()}
    out["models.failed"] = summary.get("models_failed", 0)
    if evaluated:
        for name, r in (summary.get("lds") or {}).items():
            out[f"lds.{name}"] = r["mean"]
            out[f"lds.{name}.ci_lo"], out[f"lds.{name}.ci_hi"] = r["ci95"]
            if "mse" in r:
                out[f"mse.{name}"] = r["mse"]
            if r.get("seconds") is not None:
                out[f"compute_seconds.{name}"] = r["seconds"]
    for stage_name, seconds in summary.get("timings", {}).items():
        out[f"seconds.{stage_name}"] = seconds
    return out


def _previous_summary(store) -> dict:
    """The summary.json of the runs before, whose entries a run of one stage keeps. One that is
    not a JSON object is moved aside (kept, never dropped) with one warning, and the run starts
    a new one."""
    try:
        raw = store.read_bytes(Layout.SUMMARY)
    except FileNotFoundError:
        return {}
    try:
        old = json.loads(raw)
        why = None if isinstance(old, dict) else f"it holds a JSON {type(old).__name__}, not an object"
    except ValueError as err:
        why = f"not JSON: {str(err)[:80]}"
    if why is None:
        return old
    aside = f"{Layout.SUMMARY}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    store.move(Layout.SUMMARY, aside)
    log.warning("%s is unreadable (%s); moved to %s, and this run writes a new summary (the entries of the stages "
                "that do not run now are not in it: run them again to add them)",
                store.where(Layout.SUMMARY), why, store.where(aside))
    return {}


def run(cfg: DictConfig, plan: C.Plan | None = None, checked: bool = False) -> dict:
    """Run the stages `cfg.stage` asks for. `plan`: the config already validated (the CLI's
    preflight); `checked`: `check(plan)` has run too (so neither is done twice)."""
    plan = plan or C.validate(cfg)
    if not checked:
        check(plan)
    if plan.rounds is not None:        # masks.n_train=auto: the first round's count until the rounds end
        plan.use_models(plan.rounds.sizes(1)[0])
    todo = selected(str(cfg.stage))
    tracker = Tracker(plan.tracking_uri, cfg.exp.name, bool(cfg.tracking.required),
                      float(cfg.tracking.timeout_seconds), plan.artifact_root)
    resolved = redacted(OmegaConf.to_container(cfg, resolve=True))
    config_text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    experiment.claim(plan)
    scratch = tempfile.mkdtemp(prefix="datamodels-")       # removed when the run ends
    try:
        return _run(cfg, plan, todo, tracker, resolved, config_text, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(cfg: DictConfig, plan: C.Plan, todo: list[Stage], tracker: Tracker, resolved: dict, config_text: str,
         scratch: str) -> dict:
    stage, store = cfg.stage, plan.store
    artifacts = Artifacts(store, tracker, scratch)
    artifacts.text(Layout.CONFIG, config_text, log=False)
    summary = _previous_summary(store)
    summary.update({"experiment_dir": store.where(), "paths": "relative to experiment_dir",
                    "ledger": Layout.LEDGER, "config_hash": plan.config_hash, "stage": stage, "n": plan.n,
                    "n_targets": plan.n_targets, "alpha": float(cfg.masks.alpha)})
    summary.setdefault("timings", {})
    version = code_version()
    sweep_id, point = sweep_point()
    tags = {"experiment_dir": summary["experiment_dir"], "config_hash": plan.config_hash,
            "code_version": version, "stage": stage}
    if sweep_id:
        tags["sweep"] = sweep_id
        tags.update({f"sweep.{k.lstrip('+~')}": str(v) for k, v in point.items()})
    evaluated = any(st.name == "evaluate" for st in todo)
    if plan.rounds is not None:
        tags["rounds"] = plan.rounds.describe()
    with tracker.parent(run_name(cfg, stage, point, plan.config_hash, plan.rounds is not None), resolved, tags,
                        store=store,
                        lease=float(cfg.store.lease_seconds), previous=summary.get("mlflow")):
        tracker.log_artifact(artifacts.local(Layout.CONFIG))
        if any(st.uses_ray(cfg) for st in todo):
            raycluster.connect(cfg.cluster)
            plan.handle = serve(store)
            plan.claims = Claims(store, float(cfg.store.lease_seconds)).start()
        try:
            ctx = Context(plan, tracker, resolved, version, summary, scratch)
            if plan.rounds is not None:
                t0 = time.perf_counter()
                summary["rounds"] = rounds.run(ctx)
                summary["timings"]["rounds"] = time.perf_counter() - t0
                plan.use_models(summary["rounds"]["models"])    # the stages run on what the rounds stopped at
                ctx.index = None
                artifacts.text(Layout.CONFIG, OmegaConf.to_yaml(OmegaConf.create(
                    redacted(OmegaConf.to_container(cfg, resolve=True)))), log=False)
            elif stage == "all":
                summary.pop("rounds", None)     # an earlier run's rounds; this run's models are masks.n_train
            for st in todo:
                run_stage(st, ctx)
            index = ctx.ledger_index()
            summary["models"] = {s: index.count(s) for s in ("train", "eval")}
            failed = index.failed_models()
            summary["models_failed"] = len(failed)
            if failed:
                summary["failed"] = failed[:100]
            summary["duplicate_rows"] = index.duplicates
            if tracker.enabled and tracker.parent_id:
                summary["mlflow"] = {"tracking_uri": redact(tracker.uri), "experiment_id": tracker.experiment_id,
                                     "run_id": tracker.parent_id, "page": tracker.ui_page()}
            summary["accuracy"] = accuracy_summary(plan, index)
            if plan.ledger.quarantined:
                summary["quarantined"] = plan.ledger.quarantined
            artifacts.text(Layout.SUMMARY, json.dumps(summary, indent=2, default=float))
            tracker.log_metrics(headline(summary, evaluated), step=summary["models"].get("train", 0))
            if evaluated:        # the run page's description: the table as the terminal shows it
                tracker.set_tags({"mlflow.note.content": "```\n" + "\n".join(table_lines(summary)) + "\n```"})
        finally:
            if plan.claims is not None:
                plan.claims.close()
            if plan.handle is not None:
                plan.handle.close()
    print_table(summary, evaluated, tracker.ui_hint())
    return summary


def check(plan, hydra_dir: str | None = None) -> None:
    """Before anything is written: every place the run writes can be written, the cluster it
    joins answers (when an asked stage needs Ray), and the asked stages' inputs are there
    (runtime.plan.check_outputs, with what this registry knows of the stages)."""
    C.check_outputs(plan, hydra_dir, needs_ray=any(st.uses_ray(plan.cfg) for st in selected(str(plan.cfg.stage))),
                    inputs=check_inputs)


# The stages, in the order stage=all runs them (the settings' list, schema.STAGES, names them
# too: a test keeps the two the same). Each module's `run(ctx) -> dict` returns its entry of
# summary.json; its `check(plan)` (given here) runs before anything is written.
STAGES: tuple[Stage, ...] = (
    Stage("masks", masks.run),
    Stage("train", train.run, params="train", needs_ray=True),
    Stage("fit", fit.run, params="fit", needs_ray=True),
    Stage("baselines", baselines.run, params="baselines", needs_ray=True),
    Stage("evaluate", evaluate.run, merged=evaluate.SUMMARY_KEYS, after=evaluate.after),
    Stage("counterfactual", counterfactual.run, params="counterfactual", needs_ray=True, in_all=False,
          check=check_datamodels),
    Stage("brittleness", brittleness.run, params="brittleness", needs_ray=True, in_all=False,
          check=check_datamodels),
    Stage("leakage", leakage.run, params="leakage", in_all=False, check=check_datamodels),
    Stage("embedding", embedding.run, params="embedding", in_all=False, check=check_datamodels),
    Stage("compare", compare.run, params="compare", in_all=False, check=compare.check),
    Stage("memorization", memorization.run, params="memorization", in_all=False, check=memorization.check,
          needs_ray=memorization.retrains),
    Stage("mislabel", mislabel.run, params="mislabel", in_all=False, check=mislabel.check, needs_ray=mislabel.retrains),
)


def check_inputs(plan) -> None:
    """Read-only, before anything is written: the experiment's directory holds this experiment
    (or none yet), and what the asked stages read is there (their `check`s). One line otherwise."""
    experiment.check(plan)
    for st in selected(str(plan.cfg.stage)):
        if st.check is not None:
            st.check(plan)


def selected(stage: str) -> list[Stage]:
    """The stages `stage=` asks for: one by name, or all of them in order."""
    return [s for s in STAGES if stage == s.name or (stage == "all" and s.in_all)]


def run_stage(st: Stage, ctx: Context) -> dict:
    """Run one stage under its own MLflow run; record its entry and duration in the summary."""
    t0 = time.perf_counter()
    params = {st.params: ctx.resolved[st.params]} if st.params else None
    with ctx.tracker.stage(st.name, params):
        out = st.run(ctx)
    if st.after is not None:
        st.after(ctx, out)
    if st.merged:
        ctx.summary.update({k: out[k] for k in st.merged if k in out})
    else:
        ctx.summary[st.name] = out
    ctx.summary["timings"][st.name] = time.perf_counter() - t0
    return out
