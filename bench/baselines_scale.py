"""Cost of every attribution baseline against the number of targets T, on real checkpoints.

Reads the task, the baselines' params and the first K checkpoints of a finished experiment
(read only; by default the embedded Fashion-MNIST one), rebuilds the task with T test-set
targets and times compute_scores per method at each T, each in a fresh child process so
that its peak RSS is its own (`--repeats` calls in that process, the median timed; the first
call's seconds beside it). Prints seconds, seconds per target, peak RSS and the ratio of
the per-target cost at T to the old path's at the smallest T (a method's own, where its
code did not change). if_cg and tracin also run their old paths, the baselines of their
ratios: if_cg with params.inverse="cg" (CG instead of the Woodbury factor of the GGN),
tracin with params.factored=false (dense per-example gradients). At the smallest T, which is
the experiment's own n_targets, new and old paths are compared entry by entry and by LDS on
the experiment's eval masks, beside the LDS its summary.json reports. trak's old path is
params.factored=false (vmap's per-example gradients; at T <= n its kernel solve is the old
one). representer's old path is params.batch_size=128 (the forward in the other methods'
batches, its default before it became 2048); at T = 200 one row block holds every row, so it
is then the code before the row blocks too.

    PYTHONPATH=. .venv/bin/python bench/baselines_scale.py [--sizes 200,1000,10000] \\
        [--old-sizes 200,1000] [--methods trak,tracin,representer,if_cg] [--threads 1] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

RUN = "runs/fmnist_mlp-6693add97e"
# The old path of a method whose default changed, as "method/variant", and the params it adds.
OLD = {"if_cg": "if_cg/cg", "tracin": "tracin/dense", "trak": "trak/dense",
       "representer": "representer/b128"}
VARIANTS: dict[str, dict] = {"cg": {"inverse": "cg"}, "dense": {"factored": False},
                             "b128": {"batch_size": 128}}


def experiment(run: str):
    """(task config, baselines config) of the experiment in `run`, from its config.yaml."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(run, "config.yaml")), resolve=True)
    return cfg["task"], cfg["baselines"]


def child(run: str, method: str, variant: str, T: int, threads: int, repeats: int, out: str) -> None:
    """Scores `method` (with the params of `variant`) on T targets `repeats` times in this
    process; writes the median and the first call's seconds and the peak RSS to `out` (JSON)
    and the scores to `out`.npy."""
    import torch

    from orchestrator.settings.task import build_task
    from orchestrator.storage.checkpoints import load_checkpoints
    from orchestrator.storage.store import Store
    from workers.attribution import compute_scores
    torch.set_num_threads(threads)
    task_cfg, bcfg = experiment(run)
    task = build_task({**task_cfg, "n_targets": T})
    model_fn, x_tr, y_tr, x_tg, y_tg = task.attribution_inputs()
    ckpts = load_checkpoints(Store(os.path.abspath(run)), int(bcfg["checkpoints"]))
    params = dict((bcfg.get("params") or {}).get(method) or {})
    params.update(VARIANTS.get(variant, {}))
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = compute_scores(method, model_fn, ckpts, x_tr, y_tr, x_tg, y_tg, params,
                                margin_kind=task.margin)
        seconds.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(out + ".npy", scores)
    with open(out, "w") as f:
        json.dump({"seconds": float(np.median(seconds)), "first": seconds[0], "rss_mb": rss_mb}, f)


def measure(run: str, name: str, T: int, threads: int, repeats: int, keep: bool, tmp: str) -> dict:
    method, _, variant = name.partition("/")
    out = os.path.join(tmp, f"{method}-{variant or 'new'}-{T}.json")
    subprocess.run([sys.executable, __file__, "--run", run, "--threads", str(threads),
                    "--repeats", str(repeats), "--child", method, variant or "new", str(T), out], check=True)
    with open(out) as f:
        res = json.load(f)
    if keep:
        res["scores"] = np.load(out + ".npy")
    os.remove(out + ".npy")
    return res


def lds(run: str, scores: np.ndarray) -> tuple[float, float, float]:
    """(mean LDS, CI low, CI high) of scores [n, T] on the experiment's eval masks, exactly as
    the evaluate stage computes it."""
    from omegaconf import OmegaConf

    from orchestrator.metrics.lds import score_method
    from orchestrator.storage.evalset import eval_set
    from orchestrator.storage.ledger import Ledger
    from orchestrator.storage.store import Store
    cfg = OmegaConf.load(os.path.join(run, "config.yaml"))
    X, Y, _ = eval_set(Ledger(Store(os.path.abspath(run))), scores.shape[0], scores.shape[1])
    r, _ = score_method(X, Y, scores.T, None, int(cfg.eval.bootstrap), int(cfg.eval.bootstrap_seed))
    return r["mean"], r["ci95"][0], r["ci95"][1]


def compare(run: str, method: str, new: np.ndarray, old: np.ndarray) -> None:
    """Prints how far the new path's scores are from the old path's, and both LDS."""
    from scipy.stats import spearmanr
    rel = np.linalg.norm(new - old) / np.linalg.norm(old)
    rho = np.mean([spearmanr(new[:, t], old[:, t])[0] for t in range(new.shape[1])])
    print(f"\n{method} at T={new.shape[1]}: new vs old path: relative difference {rel:.2e}, "
          f"mean Spearman over targets {rho:.5f}")
    with open(os.path.join(run, "summary.json")) as f:
        reported = json.load(f)["lds"][method]
    print(f"  LDS reported (summary.json) {reported['mean']:.4f} "
          f"[{reported['ci95'][0]:.4f}, {reported['ci95'][1]:.4f}]")
    for label, s in (("old path", old), ("new path", new)):
        m, lo, hi = lds(run, s)
        print(f"  LDS {label:<14} {m:.4f} [{lo:.4f}, {hi:.4f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=RUN, help="a finished experiment directory (read only)")
    ap.add_argument("--sizes", default="200,1000,10000")
    ap.add_argument("--old-sizes", default="200,1000", help="T at which the old paths are timed")
    ap.add_argument("--methods", default="trak,tracin,representer,if_cg")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the stage's cpus_per_task)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="calls per measurement, in one process; the median is timed (for the methods "
                         "that take milliseconds, whose one call is mostly noise)")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "VARIANT", "T", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, variant, T, out = args.child
        child(args.run, method, variant, int(T), args.threads, args.repeats, out)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    old_sizes = [int(s) for s in args.old_sizes.split(",") if s]
    names = [m for m in args.methods.split(",") if m]
    runs = [(name, T) for name in names for T in sizes]
    runs += [(OLD[name], T) for name in names if name in OLD for T in old_sizes]
    T0 = min(sizes + old_sizes)
    res: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, T in runs:
            res[name, T] = measure(args.run, name, T, args.threads, args.repeats, keep=T == T0, tmp=tmp)
            r = res[name, T]
            print(f"  {name} T={T}: {r['seconds']:.3f} s (first call {r['first']:.3f} s), "
                  f"peak RSS {r['rss_mb']:.0f} MB", flush=True)
    print(f"\n{'method':<16} {'T':>6} {'seconds':>9} {'ms/target':>10} {'peak RSS MB':>12} "
          f"{'per-target : old at T=' + str(T0):>26}")
    for name, T in runs:
        r = res[name, T]
        base = res.get((OLD.get(name.partition("/")[0], name), T0))
        ratio = (r["seconds"] / T) / (base["seconds"] / T0) if base else float("nan")
        print(f"{name:<16} {T:>6} {r['seconds']:>9.3f} {1e3 * r['seconds'] / T:>10.3f} "
              f"{r['rss_mb']:>12.0f} {ratio:>26.3f}")
    for method, old in OLD.items():
        if (method, T0) in res and (old, T0) in res:
            compare(args.run, method, res[method, T0]["scores"], res[old, T0]["scores"])


if __name__ == "__main__":
    main()
