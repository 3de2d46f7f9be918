"""Debiased datamodels on a finished experiment: LDS, MSE and predicted top-k margin drop per
fit.debias option (none, refit, relaxed), fit in this process from the experiment's ledger.

The lasso shrinks the weights it selects, so the datamodels under-predict what removing their
own top examples does to a margin (retraining measured 3.5 predicted against 5.0 actual on the
default experiment); LDS, a rank measure, cannot see it. For each option this prints the LDS
mean with its bootstrap 95% interval and the MSE on the eval masks (orchestrator.metrics.lds), the
mean predicted margin drop sum_{i in top-k(w) ∩ S} w_i over eval masks S and targets for
k = 10, 20, 50 (the k most positive weights of each target), the mean nnz and phi, and the fit's
wall seconds. The fit settings are the default fit config (orchestrator/settings/schema.py FitConf,
conf/fit/torch.yaml) on the CPU. The experiment directory is only read.

With --scales, it also prints, on all train models, the lasso at c x each target's chosen λ
for each scale c, blended with its support's least squares at phi = 1, 0.5, 0, and least
squares on all n examples: how far any support refit can move the predicted drop.

    python bench/debias.py                                  # runs/fmnist_mlp-6693add97e
    python bench/debias.py --exp runs/<name>-<hash> --threads 2 --scales 1,2,4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

# A shared 2-core box: OpenMP threads that spin while waiting make small ops 3x slower when
# other processes hold the cores. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_K = (10, 20, 50)


def default_fit_config():
    """The fit stage's LassoConfig of the default fit config (FitConf's defaults; the torch
    preset sets nothing), on the CPU."""
    from omegaconf import OmegaConf

    from orchestrator.settings.schema import FitConf
    from orchestrator.stages.fit import lasso_config
    cfg = lasso_config(OmegaConf.to_container(OmegaConf.structured(FitConf), resolve=True))
    return dataclasses.replace(cfg, device="cpu")


def predicted_drop(W: np.ndarray, X_eval: np.ndarray, k: int) -> float:
    """Mean over targets and eval masks S of sum_{i in top-k(w_t) ∩ S} w_ti: the margin drop
    the datamodel predicts for removing its k most positive examples from S."""
    top = np.argsort(-W, axis=1)[:, :k]                       # [T, k]
    w_top = np.take_along_axis(W, top, axis=1)                # [T, k]
    in_S = X_eval[:, top]                                     # [e, T, k]
    return float((in_S * w_top[None]).sum(2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", default=os.path.join(REPO, "runs", "fmnist_mlp-6693add97e"),
                    help="a finished experiment directory (read only)")
    ap.add_argument("--options", default="none,refit,relaxed", help="fit.debias values, comma separated")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--scales", default="", help="λ scales c for the support-refit sweep, comma separated")
    args = ap.parse_args()

    import torch

    from orchestrator.storage.evalset import eval_set
    from orchestrator.storage.ledger import Ledger
    from orchestrator.storage.store import Store
    from workers.lasso import fit_lasso
    torch.set_num_threads(args.threads)

    with open(os.path.join(args.exp, "summary.json")) as f:
        summary = json.load(f)                              # n and T of the experiment's task
    n, T = int(summary["n"]), int(summary["n_targets"])
    ledger = Ledger(Store(os.path.abspath(args.exp)))       # no identity: integrity checks only
    train = ledger.load("train", n=n, n_targets=T)
    X_eval, Y_eval, _ = eval_set(ledger, n, T)
    X_eval = X_eval.astype(np.float32)
    base = default_fit_config()
    print(f"{args.exp}: m={len(train)} train models, n={n}, T={T} targets, "
          f"{len(X_eval)} eval masks; fit {base.backend} on cpu, {args.threads} thread(s)")
    head = (f"{'debias':<9}{'LDS':>7}   {'95% CI':<17}{'MSE':>8}"
            + "".join(f"{'drop@' + str(k):>9}" for k in TOP_K) + f"{'nnz':>7}{'phi':>6}{'fit s':>8}")
    rows = []
    for opt in args.options.split(","):
        cfg = dataclasses.replace(base, debias=opt.strip())
        t0 = time.perf_counter()
        res = fit_lasso(train.packed, train.margins, cfg, n=n)
        seconds = time.perf_counter() - t0
        rows.append(row(cfg.debias, res.weights, res.intercept, X_eval, Y_eval, res.phi.mean(), seconds))
        if opt.strip() == "relaxed":
            vals, counts = np.unique(res.phi, return_counts=True)
            rows.append("           phi chosen: " + ", ".join(f"{v:g}: {c}" for v, c in zip(vals, counts)))
        lam = res.lam
    print(head)
    print("\n".join(rows))
    if args.scales:
        print("support refits on all train models (phi: the lasso's share):")
        print("\n".join(sweep(train, n, lam, [float(c) for c in args.scales.split(",")], base, X_eval, Y_eval)))


def row(name: str, W: np.ndarray, b: np.ndarray, X_eval: np.ndarray, Y_eval: np.ndarray, phi: float,
        seconds: float | None) -> str:
    """One table row: LDS [95% CI], MSE, predicted drops, nnz, phi, fit seconds."""
    from orchestrator.metrics.lds import score_method
    lds, _ = score_method(X_eval, Y_eval, W, b, n_boot=1000, seed=0)
    lo, hi = lds["ci95"]
    return (f"{name:<9}{lds['mean']:>7.3f}   [{lo:.3f}, {hi:.3f}]   {lds['mse']:>8.4f}"
            + "".join(f"{predicted_drop(W, X_eval, k):>9.3f}" for k in TOP_K)
            + f"{np.count_nonzero(W, axis=1).mean():>7.1f}{phi:>6.2f}"
            + (f"{seconds:>8.1f}" if seconds is not None else f"{'-':>8}"))


def sweep(train, n: int, lam: np.ndarray, scales: list[float], cfg, X_eval: np.ndarray, Y_eval: np.ndarray
          ) -> list[str]:
    """Rows of the lasso at c x lam (all rows, no split) blended with its support refit, and
    least squares on all examples (the support refit of a full support)."""
    import torch

    from workers.lasso import lasso_path_torch
    from workers.lasso.debias import blend, support_refit
    from workers.lasso.gram import Gram, Rows, TargetStats
    scales = sorted(scales, reverse=True)                   # λ decreasing along the path
    W, _ = lasso_path_torch(train.packed, train.margins, np.outer(scales, lam), cfg, n=n)
    idx = np.arange(len(train))
    with torch.inference_mode():
        rows = Rows(train.packed, True, n, "cpu")
        gram = Gram(rows, idx, int(cfg.rows_per_block))
        tgt = TargetStats(rows, train.margins, idx, 0, len(lam), int(cfg.rows_per_block), gram)
        out = []
        for c, Wc in zip(scales, W):
            Wl = torch.from_numpy(Wc.T.copy())
            V = support_refit(gram.G, tgt.C, Wl)
            for phi in (1.0, 0.5, 0.0):
                Wb = blend(Wl, V, torch.full((len(lam),), phi, dtype=torch.float64))
                out.append(row(f"λ x{c:g}", Wb.T.numpy(), tgt.intercepts(Wb, gram).numpy(), X_eval, Y_eval,
                               phi, None))
        V = support_refit(gram.G, tgt.C, torch.ones(n, len(lam)))
        out.append(row("lstsq", V.T.numpy(), tgt.intercepts(V, gram).numpy(), X_eval, Y_eval, 0.0, None))
    return out


if __name__ == "__main__":
    main()
