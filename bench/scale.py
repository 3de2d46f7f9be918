"""The driver's memory against the ledger's size: flat in the number of models, or not.

Synthetic ledgers of m train models (plus 100 eval masks x 3 replicas) over n training
examples and T targets are written with the project's own writer (Ledger.write_unit through
a Store, units of --unit models; masks from masks.make_packed_masks with a fixed seed;
margins random float32; an Identity the ledger verifies against). The units of the largest
ledger are written once; a smaller ledger is hard links to its first units. Each step a
driver runs is then measured in a fresh process (peak resident set: the process's VmHWM,
and RSS sampled every 2 ms above the step's start) with its wall time. (Not ru_maxrss: on
Linux a child starts with the high-water mark of the parent it was forked from.)

  index            Ledger.index(): verify every file (digests, masks regenerated), index metadata
  index again      the next run's Ledger.index(): every file read and its digests checked, the
                   masks not regenerated (the first run recorded them as checked)
  fit driver       what fit_stage.run does on the driver before its tasks run: the good train
                   models' positions (one footer read), the chunks' done checks, and the index
                   and positions put in Ray's object store (TrainRows.refs) for the tasks
  accuracy_summary pipeline.accuracy_summary: two small columns of every model
  eval_set         evaluate_evalset.eval_set: the eval rows only
  fit task read    one fit task's read of its block (Ledger.read_block: the mask column and one
                   margins column of all m models): a task's memory, O(m n / 8), not the driver's

The lasso itself (m x n design) is not run: at m = 200k, n = 50k it is hours of work here.

(b) --per-target RUN: each stage's compute against the number of targets T, on the same
models: a finished experiment's ledger with at least max(--sizes) targets (read only; e.g.
experiment=fmnist_10k's). For each T, each in a fresh process, with the experiment's own
settings, peak resident set (VmHWM) and wall time:

  fit              the fit stage's tasks one after another, as its Ray tasks run them: every
                   chunk of fit.targets_per_task targets read from the store (Ledger.read_block)
                   and fit (workers.lasso.fit_lasso) with fit.cpus_per_task threads, on all good
                   train models (the stage also fits each fit.prefixes size the same way; with
                   --prefixes they are timed too); nothing written
  <method>         each baselines.methods: compute_scores on the first K checkpoints and the
                   task's first T targets, baselines.cpus_per_task threads
  evaluate         the eval set read and LDS with its bootstrap (evaluate.score_blocks, one block
                   of fit.targets_per_task targets at a time) of the fit's datamodels and of as
                   many [T, n] arrays again as there are baselines, as the evaluate stage does

Printed with the per-target cost and its ratio to the smallest T's. The Ray scheduling, the
MLflow calls and the files the stages write are not in these figures (bench/orchestration.py
measures them: about 12 ms of driver CPU per unit).

    .venv/bin/python bench/scale.py [--models 10000,50000,200000] [--n 50000] [--targets 1000]
                                    [--quick] [--root /tmp/scale] [--keep]
    .venv/bin/python bench/scale.py --per-target runs/fmnist_10k-<hash> [--sizes 200,1000,10000]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SEED, ALPHA, N_EVAL, REPLICAS = 0, 0.5, 100, 3
STEPS = ("index", "index again", "fit driver", "accuracy_summary", "eval_set", "fit task read")


# ----------------------------------------------------------------------------- the ledgers
def identity(n: int, T: int):
    from orchestrator.storage.ledger import Identity
    return Identity(config_hash="bench-scale", alpha=ALPHA, seed=SEED, n=n, n_targets=T)


def unit_rows(mask_set: str, ids: np.ndarray, replicas: np.ndarray, n: int, T: int) -> dict:
    """One unit's rows as the train stage writes them, with random margins and accuracies."""
    from orchestrator.storage import masks as M
    k = len(ids)
    rng = np.random.default_rng([SEED, M.set_code(mask_set), int(ids[0]), int(replicas[0])])
    return {
        "mask_set": [mask_set] * k, "model_id": ids, "replica": replicas,
        "seed": M.MaskSets().seeds(SEED, mask_set, ids, replicas), "alpha": [ALPHA] * k,
        "mask": M.make_packed_masks(SEED, mask_set, ids, n, ALPHA),
        "margins": rng.standard_normal((k, T), dtype=np.float32),
        "train_acc": rng.uniform(size=k).astype(np.float32), "target_acc": rng.uniform(size=k).astype(np.float32),
        "loss": rng.uniform(size=k).astype(np.float32), "seconds": np.ones(k, np.float32),
        "code_version": ["bench"] * k, "config_hash": ["bench-scale"] * k,
    }


def write_units(root: str, m: int, n: int, T: int, per_unit: int) -> tuple[list[str], list[str]]:
    """Write (once) the eval units and the train units of models [0, m) into `root`/units;
    returns (eval unit paths, train unit paths in model-id order), relative to that store."""
    from orchestrator.storage.ledger import Ledger
    from orchestrator.storage.store import Store
    store = Store(os.path.join(root, "units"))
    ledger = Ledger(store, identity(n, T))
    done = os.path.join(root, "units", "written.json")
    have = json.load(open(done)) if os.path.exists(done) else {"eval": [], "train": []}
    if have.get("n") not in (None, n) or have.get("T") not in (None, T) or have.get("per_unit") not in (None, per_unit):
        raise SystemExit(f"{root}/units holds units of another shape; pass another --root or delete it")
    have.update(n=n, T=T, per_unit=per_unit)
    if not have["eval"]:
        ids = np.repeat(np.arange(N_EVAL), REPLICAS)
        reps = np.tile(np.arange(REPLICAS), N_EVAL).astype(np.int32)
        have["eval"] = [ledger.write_unit("eval-000000", unit_rows("eval", ids, reps, n, T))]
    t0 = time.perf_counter()
    for a in range(len(have["train"]) * per_unit, m, per_unit):
        ids = np.arange(a, min(a + per_unit, m))
        rows = unit_rows("train", ids, np.zeros(len(ids), np.int32), n, T)
        have["train"].append(ledger.write_unit(f"train-{a:07d}", rows))
        json.dump(have, open(done, "w"))
    if time.perf_counter() - t0 > 1:
        print(f"wrote train units up to {m} models in {time.perf_counter() - t0:.0f} s", flush=True)
    json.dump(have, open(done, "w"))
    return have["eval"], have["train"][: -(-m // per_unit)]


def ledger_of(root: str, m: int, eval_units: list[str], train_units: list[str]) -> str:
    """The store of an m-model ledger: hard links to the shared units."""
    where = os.path.join(root, f"m{m}")
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(os.path.join(where, "ledger"))
    for rel in eval_units + train_units:
        os.link(os.path.join(root, "units", rel), os.path.join(where, rel))
    return where


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """The largest resident set seen (sampled every `every` seconds) while it is entered."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self.start = every, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure(step: str, where: str, n: int, T: int) -> dict:
    """Run one step on the ledger in `where` (in this fresh process); its figures. Every
    module a step uses is imported first, so that the step's own memory is not imports."""
    import pyarrow.parquet  # noqa: F401

    from orchestrator import pipeline  # noqa: F401  (every module a step uses, imported first)
    from orchestrator.runtime import plan  # noqa: F401
    from orchestrator.stages import fit as fit_stage  # noqa: F401
    from orchestrator.storage import datamodels, evalset  # noqa: F401
    from orchestrator.storage.ledger import Ledger
    from orchestrator.storage.store import Store
    ledger = Ledger(Store(where), identity(n, T))
    index_file = os.path.join(where, "index.pickle")
    index = None
    if step not in ("index", "index again"):
        with open(index_file, "rb") as f:
            index = pickle.load(f)           # the driver's index, as the index step built it
    if step == "fit driver":
        from omegaconf import OmegaConf

        from orchestrator.scheduling import cluster as raycluster
        os.environ.pop("RAY_ADDRESS", None)
        raycluster.connect(OmegaConf.create({"address": None, "num_cpus": 1, "num_gpus": 0}))
    out = {}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        if step in ("index", "index again"):
            index = ledger.index()
            out["models"] = int(len(index.model_id))
        elif step == "fit driver":
            from orchestrator.stages import fit as fit_stage
            from orchestrator.storage import datamodels
            from orchestrator.storage.store import Layout
            pos, _, _ = ledger.good_models("train", index, n=n, n_targets=T)
            rel_dir = datamodels.store_dir(len(pos), {"backend": "torch"})
            todo = [c for c in datamodels.chunks(T, 1024)
                    if not datamodels.chunk_ok(ledger.store, Layout.chunk(rel_dir, *c), *c, n)]
            fit_stage.TrainRows(ledger, index, pos).refs(len(pos))
            out["chunks"] = len(todo)
        elif step == "accuracy_summary":
            from orchestrator.pipeline import accuracy_summary
            from orchestrator.runtime.plan import Plan
            plan = Plan(None, None, n, T, where, "bench-scale", None, ledger.store, ledger)
            accuracy_summary(plan, index)
        elif step == "eval_set":
            from orchestrator.storage.evalset import eval_set
            X, _, _ = eval_set(ledger, n, T, index=index)
            out["eval_masks"] = len(X)
        elif step == "fit task read":
            packed, Y = ledger.read_block(index, index.select("train"), 0, min(T, 1024))
            out["read_bytes"] = int(packed.nbytes + Y.nbytes)
        out["seconds"] = time.perf_counter() - t0
    if step == "index":
        with open(index_file, "wb") as f:
            pickle.dump(index, f)
    out.update(peak=rss.peak, start=rss.start, maxrss=high_water())
    return out


def high_water() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def run_step(step: str, where: str, n: int, T: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", step, "--store", where,
           "--n", str(n), "--targets", str(T)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"{step} on {where} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- (b) per target
def run_config(run: str) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(os.path.join(run, "config.yaml")), resolve=True)


def per_target_measure(stage: str, run: str, T: int, scratch: str, prefixes: bool = False) -> dict:
    """One stage's compute on the first T targets of the experiment in `run` (this process)."""
    import torch

    from orchestrator.settings import names as fit_stage_names
    from orchestrator.stages import fit as fit_stage
    from orchestrator.storage import datamodels
    from orchestrator.storage.ledger import Ledger
    from orchestrator.storage.store import Store
    cfg = run_config(run)
    ledger = Ledger(Store(os.path.abspath(run)))
    n = int(cfg["task"]["n_train"])
    out: dict = {}
    if stage == "fit":
        from workers.lasso import fit_lasso
        fit_cfg = cfg["fit"]
        torch.set_num_threads(max(1, int(fit_cfg.get("cpus_per_task") or 1)))
        index = ledger.index()
        pos, _, _ = ledger.good_models("train", index)
        t0 = time.perf_counter()
        full = None
        sizes = [len(pos), *(fit_stage_names.prefix_sizes(fit_cfg, len(pos)) if prefixes else [])]
        for m in sizes:
            weights, intercept = [], []
            for a, b in datamodels.chunks(T, int(fit_cfg["targets_per_task"])):
                packed, Y = ledger.read_block(index, pos[:m], a, b)
                res = fit_lasso(packed, Y, fit_stage.lasso_config(fit_cfg), n=n)
                weights.append(res.weights)
                intercept.append(res.intercept)
            if full is None:
                full = (np.concatenate(weights), np.concatenate(intercept))
        out["seconds"] = time.perf_counter() - t0
        out["fits"] = len(sizes)
        np.save(os.path.join(scratch, f"weights-{T}.npy"), full[0])
        np.save(os.path.join(scratch, f"intercept-{T}.npy"), full[1])
    elif stage == "evaluate":
        from orchestrator.metrics.lds import score_blocks
        from orchestrator.storage.evalset import eval_set
        weights = np.load(os.path.join(scratch, f"weights-{T}.npy"), mmap_mode="r")
        intercept = np.load(os.path.join(scratch, f"intercept-{T}.npy"))
        per = int(cfg["fit"]["targets_per_task"])
        methods = list(cfg["baselines"]["methods"])
        t0 = time.perf_counter()
        X, Y, _ = eval_set(ledger, n, int(cfg["task"]["n_targets"]))
        Y = Y[:, :T]
        lds = {}
        for name in ["datamodels", *methods]:   # the baselines' scores cost the same as any [T, n]
            blocks = ((a, b, np.array(weights[a:b]), intercept[a:b]) for a, b in datamodels.chunks(T, per))
            r, _ = score_blocks(X, Y, blocks, name == "datamodels", int(cfg["eval"]["bootstrap"]),
                                int(cfg["eval"]["bootstrap_seed"]))
            lds[name] = r["mean"]
        out["seconds"] = time.perf_counter() - t0
        out["lds"] = lds["datamodels"]
    else:
        from orchestrator.settings.task import build_task
        from orchestrator.storage.checkpoints import load_checkpoints
        from workers.attribution import compute_scores
        bcfg = cfg["baselines"]
        torch.set_num_threads(int(bcfg.get("cpus_per_task") or 1))
        task = build_task({**cfg["task"], "n_targets": T})
        model_fn, x_tr, y_tr, x_tg, y_tg = task.attribution_inputs()
        ckpts = load_checkpoints(ledger.store, int(bcfg["checkpoints"]))
        t0 = time.perf_counter()
        compute_scores(stage, model_fn, ckpts, x_tr, y_tr, x_tg, y_tg,
                       dict((bcfg.get("params") or {}).get(stage) or {}), margin_kind=task.margin)
        out["seconds"] = time.perf_counter() - t0
    out["maxrss"] = high_water()
    return out


def per_target(run: str, sizes: list[int], prefixes: bool = False) -> None:
    import tempfile
    cfg = run_config(run)
    have = int(cfg["task"]["n_targets"])
    if max(sizes) > have:
        raise SystemExit(f"--sizes: {max(sizes)} targets asked, but {run} has {have}; run "
                         f"experiment=fmnist_10k first, or lower --sizes")
    stages = ["fit", *cfg["baselines"]["methods"], "evaluate"]
    res: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        for T in sizes:
            for stage in stages:
                cmd = [sys.executable, os.path.abspath(__file__), "--per-target", run, "--measure", stage,
                       "--targets", str(T), "--store", scratch] + (["--prefixes"] if prefixes else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if proc.returncode:
                    raise SystemExit(f"{stage} at T={T} failed:\n{proc.stderr[-3000:]}")
                res[stage, T] = json.loads(proc.stdout.strip().splitlines()[-1])
                r = res[stage, T]
                print(f"T={T} {stage}: {r['seconds']:.1f} s, peak {mb(r['maxrss']).strip()} MB", flush=True)
    m = cfg["masks"]["n_train"]
    print(f"\n{run}: n={cfg['task']['n_train']}, {m} train models, fit.targets_per_task="
          f"{cfg['fit']['targets_per_task']}, fit sets timed {res['fit', sizes[0]]['fits']} (prefixes "
          f"{cfg['fit'].get('prefixes') if prefixes else 'not timed'}); each stage in a fresh process")
    head = f"per target : T={sizes[0]}"
    print(f"{'stage':<12}{'T':>7}{'seconds':>10}{'ms/target':>11}{'peak MB':>10}{head:>20}")
    for stage in stages:
        for T in sizes:
            r, base = res[stage, T], res[stage, sizes[0]]
            ratio = (r["seconds"] / T) / (base["seconds"] / sizes[0])
            print(f"{stage:<12}{T:>7}{r['seconds']:>10.1f}{1e3 * r['seconds'] / T:>11.2f}{mb(r['maxrss']):>10}"
                  f"{ratio:>20.3f}")
    for T in sizes:
        print(f"datamodels LDS on the first {T} targets: {res['evaluate', T]['lds']:.4f}")


# ----------------------------------------------------------------------------- the table
def mb(x: float) -> str:
    return f"{x / 2**20:9.1f}"


def report(sizes: list[int], results: dict, n: int, T: int) -> None:
    print(f"\nn={n}, T={T}, eval {N_EVAL} masks x {REPLICAS} replicas; each step in a fresh process")
    print("peak = VmHWM of that process (interpreter, imports and the loaded index included);")
    print("own = peak RSS sampled during the step minus RSS at its start\n")
    print(f"{'step':<18}{'models':>8}{'seconds':>9}{'peak MB':>10}{'own MB':>9}")
    for step in STEPS:
        for m in sizes:
            r = results[m][step]
            print(f"{step:<18}{m:>8}{r['seconds']:>9.2f}{mb(r['maxrss']):>10}{mb(r['peak'] - r['start']):>9}")
        if len(sizes) > 1:
            grow = [(results[b][step]["maxrss"] - results[a][step]["maxrss"]) / (b - a)
                    for a, b in zip(sizes, sizes[1:])]
            ratio = results[sizes[-1]][step]["maxrss"] / results[sizes[0]][step]["maxrss"]
            print(f"{'':<18}growth per model: {', '.join(f'{g:.0f} B' for g in grow)} between sizes; "
                  f"peak at {sizes[-1]} / at {sizes[0]} = {ratio:.2f} (models x{sizes[-1] / sizes[0]:.0f})")
    print(f"\n(per model on disk: mask {(n + 7) // 8} B + margins {4 * T} B)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="10000,50000,200000")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--targets", type=int, default=1000)
    ap.add_argument("--unit", type=int, default=1000, help="models per ledger unit")
    ap.add_argument("--quick", action="store_true", help="a small run: 1k and 4k models, n=2000, T=300")
    ap.add_argument("--root", default="/tmp/scale")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic ledgers under --root")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--per-target", metavar="RUN", help="(b): a finished experiment with max(--sizes) targets")
    ap.add_argument("--sizes", default="200,1000,10000", help="(b): the numbers of targets T")
    ap.add_argument("--prefixes", action="store_true", help="(b): also time the fit.prefixes fits")
    args = ap.parse_args()
    if args.per_target and args.measure:
        print(json.dumps(per_target_measure(args.measure, args.per_target, args.targets, args.store,
                                            args.prefixes)))
        return
    if args.per_target:
        per_target(args.per_target, sorted(int(x) for x in args.sizes.split(",")), args.prefixes)
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.store, args.n, args.targets)))
        return
    if args.quick:
        args.models, args.n, args.targets, args.unit = "1000,4000", 2000, 300, 250
    sizes = sorted(int(x) for x in args.models.split(","))
    if sizes[0] < 1 or any(m % args.unit for m in sizes):
        raise SystemExit(f"--models={args.models}: every size must be a positive multiple of --unit={args.unit}")
    results = {}
    try:
        eval_units, train_units = write_units(args.root, sizes[-1], args.n, args.targets, args.unit)
        for m in sizes:
            where = ledger_of(args.root, m, eval_units, train_units[: -(-m // args.unit)])
            results[m] = {}
            for step in STEPS:
                results[m][step] = run_step(step, where, args.n, args.targets)
                r = results[m][step]
                print(f"m={m} {step}: {r['seconds']:.2f} s, peak {mb(r['maxrss']).strip()} MB", flush=True)
            shutil.rmtree(where)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    report(sizes, results, args.n, args.targets)


if __name__ == "__main__":
    main()
