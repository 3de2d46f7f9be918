"""stage=mislabel: finding the labels the task flipped (task.label_noise), by each method's
self-influence, and the repair check by retraining.

Each method scores every training example with its given (possibly flipped) label; a higher
score is more suspect:
- memorization: the ledger's margin gain (as api.memorization_of);
- self_weight: the datamodel self-weight w_ii, a lasso of the models' margin on example i over
  the masks (the fit.* settings), one Ray task per block of examples;
- loss: the naive baseline, the mean training loss on the example of the models trained
  with it (softplus(−margin) for the logsumexp margin, −margin for the others);
- every baselines.methods (influence functions, TRAK, TracIn, representer points): its score
  of example i for target i, the training examples taken as targets with their given labels,
  from the first baselines.checkpoints checkpoints (one Ray task per method).
Then per method: the detection AUC and the share of the flipped labels found in the top
5/10/20% inspected, with intervals (orchestrator.metrics.memorization.detection).

The repair check (mislabel.models > 0): models trained on the whole training set as it is
(noisy), with the true labels (clean), without the flipped examples (oracle), without k random
ones (random), and for each method without its top k (remove-<method>) and with its top k
given their true labels back (relabel-<method>); k = the number flipped unless
mislabel.inspect says. Model j of every variant has the same seed. Per variant: the mean test
accuracy with a bootstrap interval over models, and the share of the accuracy the noise cost
that it recovers, (acc − noisy) / (clean − noisy), resampled over the paired models. The
models live in `mislabel/<digest>/ledger/` (resumable like the train stage); the scores in
`mislabel/self/`.
"""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from orchestrator.analyses.common import AnalysisError, label, task_images
from orchestrator.errors import ConfigError
from orchestrator.metrics.memorization import detection, found_curve, order
from orchestrator.settings.schema import MislabelConf, make_conf
from orchestrator.storage.store import Layout

log = logging.getLogger(__name__)

FRACTIONS = (0.05, 0.1, 0.2)
LEDGER_METHODS = ("memorization", "self_weight", "loss")      # from the ledger alone
SELF_BLOCK = 4096        # training examples taken as targets per call of a baseline method


def methods_of(cfg) -> list[str]:
    """mislabel.methods, or where it is empty the ledger's three and every baselines.methods."""
    asked = list(cfg.mislabel.methods or [])
    return asked or [*LEDGER_METHODS, *list(cfg.baselines.methods or [])]


def check(plan) -> None:
    """Before anything is written: margins on the training examples, planted noise, trained
    models, methods this stage knows (a baseline method needs the task's attribution inputs)."""
    from workers.attribution import METHODS
    from workers.tasks import member
    cfg = plan.cfg
    if not plan.n_self:
        raise AnalysisError("stage=mislabel needs every model's margins on the training examples beside the "
                            "targets: run with task.targets=both and task.label_noise (e.g. 0.1), then stage=mislabel")
    truth = member(plan.task, "true_labels")
    if truth is None or float(cfg.task.get("label_noise") or 0) <= 0:
        raise AnalysisError("stage=mislabel ranks planted label errors: set task.label_noise (e.g. 0.1; a new "
                            "experiment: stage=all trains it), then stage=mislabel")
    for m in methods_of(cfg):
        if m not in LEDGER_METHODS and m not in METHODS:
            raise ConfigError(f"mislabel.methods: {m!r} is not a method; use any of "
                              f"{'|'.join([*LEDGER_METHODS, *sorted(METHODS)])}")
        if m in METHODS and member(plan.task, "attribution_inputs") is None:
            raise ConfigError(f"mislabel.methods: {m} needs the task's attribution_inputs(); "
                              f"use {'|'.join(LEDGER_METHODS)}")
    if not plan.store.list(Layout.LEDGER, ".parquet") or not plan.ledger.index().count("train"):
        raise AnalysisError(f"stage=mislabel: {plan.store.where()} has no trained models yet; run stage=all first")


def retrains(cfg) -> bool:
    """Ray work: the self-weights, a baseline's self-influence, or the repair models."""
    methods = methods_of(cfg)
    return "self_weight" in methods or any(m not in LEDGER_METHODS for m in methods) or int(cfg.mislabel.models) > 0


# --------------------------------------------------------------------------- scores
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_vector(store, rel: str, n: int, digests: list[str] | None, config_hash: str) -> np.ndarray | None:
    """A verified [n] score vector written by `_write_vector` for the experiment of
    `config_hash`, else None (recomputed: a file of another experiment is never read)."""
    from orchestrator.storage.scores import read_scores, scores_ok
    meta = scores_ok(store, rel, n, 1, digests, who="mislabel")
    if meta is None:
        return None
    if meta.get("config_hash") != config_hash:
        log.warning("mislabel: %s was computed for experiment %s, not %s; it will be recomputed", store.where(rel),
                    meta.get("config_hash"), config_hash)
        return None
    return read_scores(store, rel)[0][:, 0].astype(np.float64)


def _write_vector(store, rel: str, values: np.ndarray, meta: dict, config_hash: str) -> None:
    from orchestrator.storage.scores import scores_table
    store.write_table(rel, scores_table(np.asarray(values, np.float32).reshape(-1, 1),
                                        {**meta, "config_hash": config_hash}))


def self_weight_chunk(index, positions: np.ndarray, ledger_root: str, a: int, b: int, n: int, fit_cfg: dict,
                      rel: str, store_handle, config_hash: str) -> dict:
    """Runs in a Ray task: the lasso of the models' margins on examples [a, b) themselves over
    the masks (fit.* settings); writes w_ii of each as a verified file."""
    import time

    from orchestrator.scheduling.cluster import worker_setup
    from orchestrator.stages.fit import lasso_config
    from orchestrator.storage.ledger import Ledger
    from workers.lasso import fit_lasso
    from workers.logs import repeats_summarised
    store = worker_setup(fit_cfg.get("cpus_per_task"), store_handle)
    packed, own, _ = Ledger(store, root=ledger_root).read_self(index, positions, a, b)
    t0 = time.perf_counter()
    with repeats_summarised():
        res = fit_lasso(packed, own, lasso_config(fit_cfg), n=n)
    diag = res.weights[np.arange(b - a), np.arange(a, b)]
    _write_vector(store, rel, diag, {"method": "self_weight", "examples": [a, b], "models": len(positions)},
                  config_hash)
    return {"examples": b - a, "seconds": time.perf_counter() - t0}


def self_influence(task_cfg: dict, method: str, params: dict, n_ckpt: int, threads: int, rel: str, store_handle,
                   config_hash: str, digests: list[str]) -> dict:
    """Runs in a Ray task: `method`'s score of each training example for itself as a target
    (with its given label), from the first n_ckpt verified checkpoints; writes them."""
    import time

    from orchestrator.scheduling.cluster import worker_setup
    from orchestrator.settings.task import build_task
    from orchestrator.storage.checkpoints import read_checkpoints
    from workers.attribution import compute_scores
    from workers.logs import repeats_summarised
    from workers.tasks import member
    store = worker_setup(threads, store_handle)
    task = build_task(task_cfg)
    model_fn, x_tr, y_tr, _, _ = task.attribution_inputs()
    ckpts, seen = read_checkpoints(store, n_ckpt, config_hash, digests)
    n = len(x_tr)
    diag = np.empty(n, np.float64)
    t0 = time.perf_counter()
    with repeats_summarised():
        for a in range(0, n, SELF_BLOCK):      # every call scores all n against a block of them
            b = min(n, a + SELF_BLOCK)
            s = compute_scores(method, model_fn, ckpts, x_tr, y_tr, x_tr[a:b], y_tr[a:b], dict(params),
                               margin_kind=member(task, "margin"))
            diag[a:b] = s[np.arange(a, b), np.arange(b - a)]
    if not np.all(np.isfinite(diag)):
        raise AnalysisError(f"mislabel: {method}'s self-influence has {int((~np.isfinite(diag)).sum())} non-finite "
                            f"values; check baselines.params.{method}")
    seconds = time.perf_counter() - t0
    _write_vector(store, rel, diag, {"method": method, "params": params, "checkpoints": n_ckpt,
                                     "checkpoint_digests": seen, "seconds": seconds}, config_hash)
    return {"seconds": seconds}


def ray_scores(ctx, methods: list[str], models: int) -> dict[str, np.ndarray]:
    """The self-weights and the baseline methods' self-influence: read back where they were
    computed already, else computed by Ray tasks (a work pool, resumable)."""
    import ray
    from omegaconf import OmegaConf

    from orchestrator.scheduling.actors import worker_slots
    from orchestrator.scheduling.workpool import Item, Pool
    from orchestrator.storage.checkpoints import checkpoint_digests
    from orchestrator.storage.ledger import MARGIN_BLOCK, LedgerError
    from orchestrator.storage.scores import BaselinesError
    from orchestrator.storage.store import StoreError
    plan = ctx.plan
    cfg, store, n = plan.cfg, plan.store, plan.n
    fit_cfg = OmegaConf.to_container(cfg.fit, resolve=True)
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    index = ctx.ledger_index()
    pos, _, _ = plan.ledger.good_models("train", index)
    items: list = []
    reads: dict[str, tuple[list[str], list[tuple[int, int]], list[str] | None]] = {}
    if "self_weight" in methods:
        key = _key("self_weight", models, {k: v for k, v in fit_cfg.items() if k not in ("prefixes",)})
        chunks = [(a, min(n, a + MARGIN_BLOCK)) for a in range(0, n, MARGIN_BLOCK)]
        rels = [f"mislabel/self/self_weight-{key}/{a:07d}-{b:07d}.parquet" for a, b in chunks]
        reads["self_weight"] = (rels, chunks, None)
        remote = ray.remote(self_weight_chunk).options(num_cpus=float(fit_cfg.get("cpus_per_task") or 1),
                                                       max_retries=0)
        for (a, b), rel in zip(chunks, rels):
            items.append(Item(f"self_weight-{a}", (rel, b - a, None,
                                                   lambda a=a, b=b, rel=rel: remote.remote(
                                                       index, pos, plan.ledger.root, a, b, n, fit_cfg, rel,
                                                       plan.handle, plan.identity.config_hash))))
    others = [m for m in methods if m not in LEDGER_METHODS]
    if others:
        n_ckpt = int(bcfg["checkpoints"])
        digests = checkpoint_digests(store, n_ckpt, plan.identity.config_hash)
        threads = int(bcfg.get("cpus_per_task") or 1)
        task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
        remote_si = ray.remote(self_influence).options(num_cpus=threads, num_gpus=float(bcfg.get("gpus_per_task") or 0),
                                                       max_retries=0)
        for m in others:
            params = dict((bcfg.get("params") or {}).get(m) or {})
            rel = f"mislabel/self/{m}-{_key(m, params, n_ckpt)}.parquet"
            reads[m] = ([rel], [(0, n)], digests)
            items.append(Item(m, (rel, n, digests,
                                  lambda m=m, params=params, rel=rel: remote_si.remote(
                                      task_cfg, m, params, n_ckpt, threads, rel, plan.handle,
                                      plan.identity.config_hash, digests))))

    got: dict[str, np.ndarray] = {}          # rel -> its verified vector, read once

    def vector(rel: str, size: int, digests) -> np.ndarray | None:
        if rel not in got and (v := _read_vector(store, rel, size, digests, plan.identity.config_hash)) is not None:
            got[rel] = v
        return got.get(rel)

    def ok(item) -> bool:
        return vector(*item.payload[:3]) is not None

    todo = [it for it in items if not ok(it)]
    if todo:
        log.info("mislabel: %d Ray tasks (self-weights by block, self-influence by method)", len(todo))
        Pool("mislabel", submit=lambda _, payload: payload[3](), capacity=lambda: max(1, worker_slots(1, 0)),
             per_worker=1, claims=plan.claims, done=lambda its: [it.key for it in its if ok(it)], unit="task",
             max_deaths=int(cfg.train.max_worker_deaths), fatal=(StoreError, BaselinesError, LedgerError),
             timeout=0).run(todo)
    out = {}
    for m, (rels, spans, wanted) in reads.items():
        v = np.empty(n)
        for rel, (a, b) in zip(rels, spans):
            part = vector(rel, b - a, wanted)
            if part is None:
                raise AnalysisError(f"mislabel: {store.where(rel)} is missing after its task; run stage=mislabel again")
            v[a:b] = part
        out[m] = v
    return out


def ledger_scores(ledger, index, n: int, methods: list[str], margin_kind: str) -> dict[str, np.ndarray]:
    """The asked ones of `memorization` (the margin gain, as api.memorization_of) and `loss` (per
    example, the mean over the models trained with it of its training loss: softplus(−margin),
    the cross-entropy, for the logsumexp margin, −margin otherwise), from one read of the
    ledger's margins on the training examples."""
    from orchestrator.api import self_blocks
    from orchestrator.metrics.memorization import memorization
    out: dict[str, np.ndarray] = {m: np.full(n, np.nan) for m in ("memorization", "loss") if m in methods}
    if not out:
        return out
    for a, b, X, own, _ in self_blocks(ledger, index, n):
        if "memorization" in out:
            out["memorization"][a:b] = memorization(X, own, n_boot=0)["value"]
        if "loss" in out:
            v = own.astype(np.float64)
            loss = np.logaddexp(0.0, -v) if margin_kind == "logsumexp" else -v
            with np.errstate(invalid="ignore"):
                out["loss"][a:b] = (loss * X).sum(0) / X.sum(0)
    return out


# --------------------------------------------------------------------------- repair
def repair(ctx, flagged: dict[str, np.ndarray], flipped: np.ndarray, k: int, models: int) -> dict:
    """Train the repair variants (module docstring) and return per variant the mean test
    accuracy with its interval and the share of the noise's cost recovered."""
    from orchestrator.stages.train import train_models
    from orchestrator.storage import masks as M
    from orchestrator.storage.ledger import Ledger
    plan = ctx.plan
    n, none = plan.n, np.zeros(0, np.int64)
    rng = np.random.default_rng([int(plan.cfg.exp.seed), 0x2E9A12])
    variants = {"noisy": (none, none), "clean": (none, np.flatnonzero(flipped)),
                "oracle": (np.flatnonzero(flipped), none), "random": (np.sort(rng.choice(n, k, replace=False)), none)}
    for m, ids in flagged.items():
        variants[f"remove-{m}"] = (np.sort(ids), none)
        ids = np.sort(ids)
        variants[f"relabel-{m}"] = (none, ids[flipped[ids]])    # a clean example's true label is its label
    same: dict[str, str] = {}        # a variant equal to an earlier one (two methods' top k alike) trains once
    seen: dict[bytes, str] = {}
    for v, (rem, res) in variants.items():
        same[v] = seen.setdefault(rem.tobytes() + b"|" + res.tobytes(), v)
    sets = M.RepairSets({f"repair-{v}": ids for v, ids in variants.items() if same[v] == v}, models)
    root = f"mislabel/{_key(sets.describe())[:10]}"
    ledger = Ledger(plan.store, plan.identity, f"{root}/ledger", sets)
    expected = {name: [(name, j, 0) for j in range(models)] for name in sets.names}
    have = ledger.index().keys()
    pending = {key for keys in expected.values() for key in keys if key not in have}
    total = len(sets.names) * models
    stats = {"dir": root, "models_expected": total, "models_trained": 0}
    if pending:
        stats.update(train_models(plan, ctx.tracker, ctx.version, ledger, expected, pending, total - len(pending),
                                  name="mislabel-repair"))
    names = list(variants)
    acc = np.full((len(names), models), np.nan)
    index = ledger.index()
    for row, v in enumerate(names):
        data = ledger.load(f"repair-{same[v]}", n=n, n_targets=plan.n_targets, index=index)
        acc[row, data.model_id] = data.extra["target_acc"]
    noisy, clean = acc[names.index("noisy")], acc[names.index("clean")]
    ev = plan.cfg.eval
    boot_rng = np.random.default_rng(int(ev.bootstrap_seed))
    picks = boot_rng.integers(0, models, (int(ev.bootstrap), models))
    rows = {}
    for row, v in enumerate(names):
        a = acc[row]
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = (np.nanmean(a) - np.nanmean(noisy)) / (np.nanmean(clean) - np.nanmean(noisy))
            rec_b = ((np.nanmean(a[picks], 1) - np.nanmean(noisy[picks], 1))
                     / (np.nanmean(clean[picks], 1) - np.nanmean(noisy[picks], 1)))
            acc_b = np.nanmean(a[picks], 1)
        removed, restored = variants[v]
        rows[v] = {"test_acc": float(np.nanmean(a)), "test_acc_ci95": _ci(acc_b), "recovered": _finite(rec),
                   **({"same_as": same[v]} if same[v] != v else {}),
                   "recovered_ci95": _ci(rec_b), "models": int(np.isfinite(a).sum()),
                   "removed": int(len(removed)), "relabelled": int(len(restored)),
                   "flipped_among": int(flipped[removed].sum() if len(removed) else len(restored))}
    return {"variants": rows, "k": int(k), "models_per_variant": int(models), "training_set": "whole (n examples)",
            "models": stats}


def _ci(values: np.ndarray) -> list:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return [float(x) for x in np.percentile(v, [2.5, 97.5])] if len(v) else [None, None]


def _finite(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


# --------------------------------------------------------------------------- the stage
def mislabel_stage(ctx, settings: dict) -> dict:
    """mislabel.json (per method: detection, and the repair check), mislabel.csv (per example:
    labels and every method's score), mislabel_found.png (found against inspected),
    mislabel_flagged.png (the best method's top flagged examples) and mislabel_repair.png."""
    from orchestrator.plots.analyses import plot_found, plot_repair, plot_rows
    from workers.tasks import member
    conf = make_conf(MislabelConf, settings, "mislabel")
    plan = ctx.plan
    ev = plan.cfg.eval
    n_boot, seed = int(ev.bootstrap), int(ev.bootstrap_seed)
    methods = methods_of(plan.cfg)
    y_true, flipped = member(plan.task, "true_labels")()
    index = ctx.ledger_index()
    models = int(index.count("train"))
    scores = ledger_scores(plan.ledger, index, plan.n, methods, member(plan.task, "margin"))
    scores.update(ray_scores(ctx, [m for m in methods if m not in ("memorization", "loss")], models))
    scores = {m: scores[m] for m in methods}
    found = {m: detection(np.nan_to_num(s, nan=-np.inf), flipped, FRACTIONS, n_boot, seed) for m, s in scores.items()}
    ranked = sorted(methods, key=lambda m: (found[m]["found"][0.2], found[m]["auc"]), reverse=True)
    best = ranked[0]
    k = int(conf.inspect) or int(flipped.sum())
    out: dict = {
        "flipped": int(flipped.sum()), "examples": int(plan.n), "models": models, "best": best,
        "score": "each method's score of a training example with its given label; higher is more suspect",
        "methods": {m: _detected(found[m]) for m in ranked},
    }
    if conf.models:
        flagged = {m: order(scores[m])[:k] for m in methods}
        out["repair"] = repair(ctx, flagged, flipped, k, int(conf.models))
    images = task_images(plan, "mislabel", needed=False)
    y = np.asarray(images[1]) if images is not None else None       # the given labels
    names = images[4] if images is not None else None
    header = ["id", "label", "true_label", "flipped", *[f"{m}_score" for m in methods], *[f"{m}_rank" for m in methods]]
    ranks = {m: np.argsort(order(scores[m])) + 1 for m in methods}
    rows = [[i, label(names, y[i]) if y is not None else "", label(names, y_true[i]), bool(flipped[i]),
             *[_round(scores[m][i]) for m in methods], *[int(ranks[m][i]) for m in methods]] for i in range(plan.n)]
    out["table"] = ctx.artifacts.json("mislabel", out)
    out["csv"] = ctx.artifacts.csv("mislabel.csv", header, rows)
    plots = {}
    path = ctx.artifacts.local("mislabel_found.png")
    plot_found({m: found_curve(scores[m], flipped) for m in ranked}, {m: found[m]["auc"] for m in ranked},
               int(flipped.sum()), path)
    plots["mislabel_found"] = ctx.artifacts.plot("mislabel_found", path)
    if images is not None and y is not None and conf.show:
        path = ctx.artifacts.local("mislabel_flagged.png")
        top = [int(i) for i in order(scores[best])[:conf.show]]
        grid = []
        for a in range(0, len(top), 6):
            cells = [(images[0][i], f"#{i} given {label(names, y[i])}\n"
                      + (f"true {label(names, y_true[i])}" if flipped[i] else "(not flipped)"),
                      "darkred" if flipped[i] else "black") for i in top[a:a + 6]]
            grid.append((f"{best}: {a + 1}-{a + len(cells)}", cells))
        plot_rows(grid, f"The {len(top)} training examples {best} flags first (red: a flipped label, with its "
                        f"true label)", path)
        plots["mislabel_flagged"] = ctx.artifacts.plot("mislabel_flagged", path)
    if "repair" in out:
        path = ctx.artifacts.local("mislabel_repair.png")
        plot_repair(out["repair"], path)
        plots["mislabel_repair"] = ctx.artifacts.plot("mislabel_repair", path)
    out["plots"] = plots
    out["files"] = [out["table"], out["csv"], *plots.values()]
    d = found[best]
    headline = [f"{int(flipped.sum())} flipped labels of {plan.n}: {best} finds {100 * d['found'][0.2]:.0f}% "
                f"[{100 * d['found_ci95'][0.2][0]:.0f}, {100 * d['found_ci95'][0.2][1]:.0f}] of them in the top 20% "
                f"(AUC {d['auc']:.3f}); the loss baseline "
                + (f"{100 * found['loss']['found'][0.2]:.0f}% (AUC {found['loss']['auc']:.3f})" if "loss" in found
                   else "was not asked")]
    metrics = {}
    for m in methods:
        metrics[f"mislabel_auc_{m}"] = found[m]["auc"]
        metrics[f"mislabel_found20_{m}"] = found[m]["found"][0.2]
    if "repair" in out:
        r = out["repair"]["variants"]
        rb = r[f"remove-{best}"]
        headline.append(f"retrained without {best}'s top {k}: test accuracy {rb['test_acc']:.4f} (noisy "
                        f"{r['noisy']['test_acc']:.4f}, clean {r['clean']['test_acc']:.4f}): recovers "
                        f"{_pct(rb['recovered'])} of what the noise cost; relabelled "
                        f"{_pct(r[f'relabel-{best}']['recovered'])}, oracle removal {_pct(r['oracle']['recovered'])}, "
                        f"random removal {_pct(r['random']['recovered'])}")
        for v, row in r.items():
            metrics[f"mislabel_acc_{v}"] = row["test_acc"]
    out["headline"] = headline
    ctx.tracker.log_metrics({k_: v for k_, v in metrics.items() if v is not None and np.isfinite(v)})
    for line in headline:
        log.info("mislabel: %s", line)
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _round(v) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 6)


def _detected(d: dict) -> dict:
    return {"auc": d["auc"], "auc_ci95": d["auc_ci95"], "found": {str(q): v for q, v in d["found"].items()},
            "found_ci95": {str(q): v for q, v in d["found_ci95"].items()}}


def run(ctx) -> dict:
    """stage=mislabel, with its config section's settings."""
    from omegaconf import OmegaConf
    return mislabel_stage(ctx, OmegaConf.to_container(ctx.plan.cfg.mislabel, resolve=True))
