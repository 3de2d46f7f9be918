"""Fit throughput: python-glmnet per target on Ray (all cores) vs the batched torch solver.

Same synthetic problem, same run: exact-size alpha=0.5 masks, k planted nonzero weights per
target plus noise (workers.lasso.synthetic.make_planted). Both backends use the same split, λ path,
early stopping, selection rule and refit (workers.lasso.fit_lasso). glmnet runs one Ray task
per chunk of targets on a local Ray instance with one CPU per task; torch runs in this process
with all cores. If --glmnet-targets is below --targets, glmnet is timed on the first
--glmnet-targets targets and its time extrapolated linearly (printed as such).

    python bench/fit_throughput.py                       # 4000 masks x 2000 examples x 1000 targets
    python bench/fit_throughput.py --masks 1000 --n 400 --targets 100
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# A shared 2-core box: OpenMP threads that spin while waiting make small ops 3x slower when
# other processes hold the cores. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def glmnet_chunk(packed, Y, n, cfg_dict):
    from workers.lasso import LassoConfig, fit_lasso
    t0 = time.perf_counter()
    res = fit_lasso(packed, Y, LassoConfig(**cfg_dict), n=n)
    return res, time.perf_counter() - t0


def warm(_):
    # what the tasks import: glmnet, and torch (fit_lasso's λ_max; the fit stage's tasks import it too)
    import glmnet  # noqa: F401
    import torch  # noqa: F401

    import workers.lasso  # noqa: F401
    return os.getpid()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", type=int, default=4000)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--targets", type=int, default=1000)
    ap.add_argument("--glmnet-targets", type=int, default=None,
                    help="time glmnet on this many targets and extrapolate (default: all)")
    ap.add_argument("--k", type=int, default=20, help="planted nonzeros per target")
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--n-lambdas", type=int, default=100)
    ap.add_argument("--lambda-min-ratio", type=float, default=1e-3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--chunk", type=int, default=None, help="targets per glmnet Ray task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from workers.lasso import LassoConfig, fit_lasso
    from workers.lasso.synthetic import make_planted

    torch.set_num_threads(args.cpus)
    m, n, T = args.masks, args.n, args.targets
    Tg = T if args.glmnet_targets is None else min(T, args.glmnet_targets)
    print(f"problem: {m} masks x {n} examples x {T} targets, alpha=0.5 exact-size masks, "
          f"k={args.k} planted weights, snr={args.snr}; path {args.n_lambdas} λ down to "
          f"{args.lambda_min_ratio} λ_max, val 10%, early stop patience 5; {args.cpus} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    P, Y, Wt = make_planted(m, n, T, k=args.k, snr=args.snr, seed=args.seed)
    P, Y, Wt = P.numpy(), Y.numpy(), Wt.numpy()
    print(f"data generated in {time.perf_counter() - t0:.1f} s")
    common = dict(n_lambdas=args.n_lambdas, lambda_min_ratio=args.lambda_min_ratio)

    # --- batched torch solver, all cores in this process
    cfg_t = LassoConfig(backend="torch", device="cpu", **common)
    t0 = time.perf_counter()
    rt = fit_lasso(P, Y, cfg_t, n=n)
    t_torch = time.perf_counter() - t0
    print(f"torch  (batched, {torch.get_num_threads()} threads): {T} targets in {t_torch:.1f} s "
          f"({T / t_torch:.1f} targets/s), load average {os.getloadavg()[0]:.2f}")

    # --- python-glmnet per target on Ray, one task per chunk, one CPU each
    import ray
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                       "OPENBLAS_NUM_THREADS": "1",
                                       "PYTHONPATH": repo}})
    remote = ray.remote(num_cpus=1)(glmnet_chunk)
    pids = ray.get([ray.remote(num_cpus=1)(warm).remote(i) for i in range(args.cpus)])
    chunk = args.chunk or max(1, -(-Tg // (4 * args.cpus)))
    cfg_g = dict(LassoConfig(backend="glmnet", **common).__dict__)
    t0 = time.perf_counter()
    p_ref = ray.put(P)
    refs = [remote.remote(p_ref, np.ascontiguousarray(Y[:, a:min(Tg, a + chunk)]), n, cfg_g)
            for a in range(0, Tg, chunk)]
    outs = ray.get(refs)
    t_glmnet_sub = time.perf_counter() - t0
    ray.shutdown()
    rg_lam = np.concatenate([o[0].lam for o in outs])
    rg_val = np.concatenate([o[0].val_mse for o in outs])
    rg_nnz = np.concatenate([o[0].nnz for o in outs])
    rg_w = np.concatenate([o[0].weights for o in outs])
    task_s = sum(o[1] for o in outs)
    t_glmnet = t_glmnet_sub * T / Tg
    print(f"glmnet (per target, Ray, {args.cpus} workers {sorted(set(pids))}, {len(refs)} tasks of "
          f"{chunk}): {Tg} targets in {t_glmnet_sub:.1f} s wall ({task_s / Tg:.2f} s per target "
          f"inside tasks), load average {os.getloadavg()[0]:.2f}")
    if Tg < T:
        print(f"glmnet time for {T} targets EXTRAPOLATED linearly from {Tg}: "
              f"{t_glmnet_sub:.1f} x {T}/{Tg} = {t_glmnet:.1f} s")

    def corr(W):
        return np.mean([np.corrcoef(W[t], Wt[:, t])[0, 1] for t in range(len(W))])

    same = np.isclose(rt.lam[:Tg], rg_lam, rtol=1e-5)
    print(f"validation MSE (mean over targets): torch {rt.val_mse.mean():.5f} (all {T}), "
          f"torch {rt.val_mse[:Tg].mean():.5f} vs glmnet {rg_val.mean():.5f} (first {Tg})")
    print(f"same λ chosen: {same.mean():.1%} of {Tg}; mean nnz torch {rt.nnz[:Tg].mean():.1f} "
          f"glmnet {rg_nnz.mean():.1f}; corr(w, w_true) torch {corr(rt.weights[:Tg]):.4f} "
          f"glmnet {corr(rg_w):.4f}; max |w_torch - w_glmnet| {np.abs(rt.weights[:Tg] - rg_w).max():.2e}")
    print(f"RESULT torch {t_torch:.1f} s, glmnet {t_glmnet:.1f} s"
          f"{' (extrapolated)' if Tg < T else ''} for {T} targets: torch is {t_glmnet / t_torch:.1f}x faster")


if __name__ == "__main__":
    main()
