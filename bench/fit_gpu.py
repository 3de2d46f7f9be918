"""Batched torch lasso on one GPU: wall time, peak GPU memory and recovery of planted weights.

Data are generated on the GPU (workers.lasso.synthetic.make_planted: exact-size alpha=0.5 masks, bit
packed; k planted nonzero weights per target; Y = X W + 1 + noise at the given SNR) and passed
to fit_lasso as device tensors, so only the fit is timed. Per-block timings are logged as the
fit runs, so a run stopped by a time limit still leaves figures to extrapolate from.

    python bench/fit_gpu.py                                  # 10 000 targets x 50 000 x 100 000 masks
    python bench/fit_gpu.py --targets 1000 --n 5000 --masks 10000
    python bench/fit_gpu.py --check                          # small CPU-vs-GPU agreement check
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check():
    """The GPU path (bf16 Gram, device tensors) against the CPU path on a small problem."""
    import numpy as np

    from workers.lasso import LassoConfig, fit_lasso
    from workers.lasso.synthetic import make_planted
    P, Y, _ = make_planted(3000, 500, 64, k=10, seed=1)
    cfg = dict(n_lambdas=60, targets_per_block=32)
    rc = fit_lasso(P.numpy(), Y.numpy(), LassoConfig(backend="torch", device="cpu", **cfg), n=500)
    rg = fit_lasso(P.cuda(), Y.cuda(), LassoConfig(backend="torch", device="cuda", **cfg), n=500)
    same = np.isclose(rc.lam, rg.lam, rtol=1e-5).mean()
    dw = np.abs(rc.weights - rg.weights).max() / np.abs(rc.weights).max()
    print(f"check: CPU vs GPU same λ {same:.1%}, max |Δw| / max |w| {dw:.2e}, "
          f"val MSE {rc.val_mse.mean():.6f} vs {rg.val_mse.mean():.6f}")
    assert same >= 0.95 and dw < 1e-3, "GPU result disagrees with CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--masks", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=50, help="planted nonzeros per target")
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--n-lambdas", type=int, default=100)
    ap.add_argument("--targets-per-block", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="only the small CPU-vs-GPU check")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script at small sizes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    import torch

    from workers.lasso import LassoConfig, fit_lasso
    from workers.lasso.synthetic import make_planted
    if args.check:
        check()
        return
    dev = args.device
    cuda = dev.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    m, n, T = args.masks, args.n, args.targets
    print(f"fit_gpu: {m} masks x {n} examples x {T} targets, k={args.k}, snr={args.snr}, "
          f"{args.n_lambdas} λ, on {torch.cuda.get_device_name() if cuda else 'cpu'}")
    t0 = time.perf_counter()
    P, Y, Wt = make_planted(m, n, T, k=args.k, snr=args.snr, seed=args.seed, device=dev)
    sync()
    data_bytes = P.numel() + Y.numel() * 4 + Wt.numel() * 4
    print(f"data on GPU in {time.perf_counter() - t0:.1f} s: packed masks {P.numel() / 1e9:.2f} GB, "
          f"Y {Y.numel() * 4 / 1e9:.2f} GB, W_true {Wt.numel() * 4 / 1e9:.2f} GB")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    cfg = LassoConfig(backend="torch", device=dev, n_lambdas=args.n_lambdas,
                      targets_per_block=args.targets_per_block)
    t0 = time.perf_counter()
    res = fit_lasso(P, Y, cfg, n=n)
    sync()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    print(f"fit wall time {wall:.1f} s ({T / wall:.1f} targets/s); peak GPU memory "
          f"{peak / 2**30:.2f} GiB (of which inputs {base / 2**30:.2f} GiB, "
          f"data {data_bytes / 2**30:.2f} GiB)")

    # recovery quality, on the GPU
    W = torch.from_numpy(res.weights).to(dev).T            # [n, T]
    corr = torch.nn.functional.cosine_similarity(W - W.mean(0), Wt - Wt.mean(0), dim=0)
    true = Wt != 0
    est = W != 0
    recall = ((true & est).sum(0).float() / true.sum(0)).mean().item()
    strong = Wt.abs() >= 0.3
    recall_strong = ((strong & est).sum(0).float() / strong.sum(0).clamp_min(1)).mean().item()
    precision = ((true & est).sum(0).float() / est.sum(0).clamp_min(1)).mean().item()
    print(f"recovery: mean corr(w, w_true) {corr.mean().item():.4f} (min {corr.min().item():.4f}); "
          f"support recall {recall:.3f} (|w_true| >= 0.3: {recall_strong:.3f}), precision "
          f"{precision:.3f}; mean nnz {res.nnz.mean():.1f} (true {args.k}); mean val MSE "
          f"{res.val_mse.mean():.4f}; intercept mean {res.intercept.mean():.3f} (true 1)")
    print(f"RESULT fit_gpu {m}x{n}x{T}: {wall:.1f} s, peak {peak / 2**30:.2f} GiB, "
          f"corr {corr.mean().item():.4f}")


if __name__ == "__main__":
    main()
