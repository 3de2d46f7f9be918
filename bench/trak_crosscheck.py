"""Cross-check of workers.attribution's TRAK against MadryLab's `traker` 0.3.2 package.

Same small MLP (digits, 64-32-10), same K checkpoints (each trained on a random 50% subset),
same projection dimension; traker on CPU (BasicProjector, Gaussian). Prints Pearson and
Spearman correlations of the two score matrices (all entries, and mean over targets), and
decomposes the differences:
  1. projection noise: ours with another projection seed vs ours;
  2. traker's formula re-implemented on traker's own stored features (must match ~exactly);
  3. our formula on traker's features: the effect of traker dividing each checkpoint's
     (ΦᵀΦ)⁻¹ by its mean absolute entry, i.e. re-weighting the checkpoints in the ensemble;
  4. traker in float16 (its default, use_half_precision=True) vs float32.

    PYTHONPATH=. python bench/trak_crosscheck.py [--proj-dim 512] [--k 3]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.datasets import load_digits
from torch import nn

from workers.attribution import compute_scores
from workers.attribution.trak import ensemble, kernel_scores


def make_model():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(x, y, seed, steps=300):
    torch.manual_seed(seed)
    m = make_model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def corr(a, b):
    """(Pearson, Spearman) over all entries, and their means over targets (columns);
    entries that are not finite in either matrix are left out."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    cols = [(pearsonr(a[ok[:, t], t], b[ok[:, t], t])[0], spearmanr(a[ok[:, t], t], b[ok[:, t], t])[0])
            for t in range(a.shape[1])]
    return (pearsonr(a[ok], b[ok])[0], spearmanr(a[ok], b[ok])[0], *np.mean(cols, axis=0))


def run_traker(ckpts, x, y, xt, yt, proj_dim, half, bs=100):
    from trak import TRAKer
    n, T = len(x), len(xt)
    with tempfile.TemporaryDirectory() as d:
        tr = TRAKer(model=make_model(), task="image_classification", train_set_size=n, save_dir=d,
                    device="cpu", proj_dim=proj_dim, use_half_precision=half, projector_seed=0,
                    logging_level=logging.WARNING)
        for mid, st in enumerate(ckpts):
            tr.load_checkpoint(st, model_id=mid)
            for s in range(0, n, bs):
                tr.featurize(batch=(x[s:s + bs], y[s:s + bs]), num_samples=len(x[s:s + bs]))
        tr.finalize_features()
        for mid, st in enumerate(ckpts):
            tr.start_scoring_checkpoint(exp_name="x", checkpoint=st, model_id=mid, num_targets=T)
            for s in range(0, T, bs):
                tr.score(batch=(xt[s:s + bs], yt[s:s + bs]), num_samples=len(xt[s:s + bs]))
        scores = np.array(tr.finalize_scores(exp_name="x"), dtype=np.float64)
        feats = []
        for mid in range(len(ckpts)):
            tr.saver.load_current_store(mid)  # train-side arrays
            G = np.array(tr.saver.current_store["grads"], np.float64)
            q = np.array(tr.saver.current_store["out_to_loss"], np.float64)[:, 0]
            tr.saver.load_current_store(mid, "x", T)  # adds the target-side arrays
            feats.append((G, np.array(tr.saver.current_store["x_grads"], np.float64), q))
    return scores, feats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-target", type=int, default=100)
    ap.add_argument("--proj-dim", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--k", type=int, default=3)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    X, Y = load_digits(return_X_y=True)
    perm = rng.permutation(len(X))
    tr, te = perm[:a.n_train], perm[a.n_train:a.n_train + a.n_target]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
    x = torch.tensor((X[tr] - mu) / sd, dtype=torch.float32)
    y = torch.tensor(Y[tr])
    xt = torch.tensor((X[te] - mu) / sd, dtype=torch.float32)
    yt = torch.tensor(Y[te])
    ckpts = []
    for k in range(a.k):
        sub = torch.tensor(rng.choice(len(x), len(x) // 2, replace=False))
        ckpts.append(train(x[sub], y[sub], k))
    P = sum(v.numel() for v in ckpts[0].values())
    print(f"digits MLP 64-32-10 ({P} params), n_train={len(x)}, targets={len(xt)}, "
          f"K={a.k} checkpoints (50% subsets), torch {torch.__version__}, CPU")
    hdr = f"{'comparison':58s} {'Pearson':>8s} {'Spearman':>9s} {'P/target':>9s} {'S/target':>9s}"
    for k in a.proj_dim:
        print(f"\n== proj_dim = {k} ==")
        t0 = time.time()
        p = {"device": "cpu", "proj_dim": k, "proj_type": "gaussian", "dtype": "float64"}
        ours = compute_scores("trak", make_model, ckpts, x, y, xt, yt, p)
        ours_seed1 = compute_scores("trak", make_model, ckpts, x, y, xt, yt, {**p, "seed": 1})
        t1 = time.time()
        theirs32, feats = run_traker(ckpts, x, y, xt, yt, k, half=False)
        t2 = time.time()
        theirs16, _ = run_traker(ckpts, x, y, xt, yt, k, half=True)
        t3 = time.time()
        print(f"time: ours {(t1 - t0) / 2:.1f}s per run, traker fp32 {t2 - t1:.1f}s, fp16 {t3 - t2:.1f}s")

        # traker's formula, re-implemented on its stored features; and ours on the same features
        S_theirs, S_ours, Q = 0, 0, 0
        for G, g, q in feats:
            inv = np.linalg.inv(G.T @ G)
            S_theirs = S_theirs + G @ (inv / np.abs(inv).mean()) @ g.T
            S_ours = S_ours + G @ inv @ g.T
            Q = Q + q
        K = len(feats)
        theirs_reimpl = (S_theirs / K) * (Q / K)[:, None]
        ours_on_their_feats = ensemble(torch.tensor(S_ours), torch.tensor(Q), 1, None).numpy() / K ** 2
        check = kernel_scores(torch.tensor(feats[0][0]), torch.tensor(feats[0][1]), 0.0, torch.float64).numpy()
        assert np.allclose(check, feats[0][0] @ np.linalg.solve(feats[0][0].T @ feats[0][0], feats[0][1].T))
        w = [1 / np.abs(np.linalg.inv(G.T @ G)).mean() for G, _, _ in feats]

        print(hdr)
        rows = [
            ("ours vs traker fp32 (independent projections)", ours, theirs32),
            ("ours vs traker fp16 (traker default)", ours, theirs16),
            ("1. ours seed 0 vs ours seed 1 (projection noise)", ours, ours_seed1),
            ("2. traker fp32 vs its formula re-implemented", theirs32, theirs_reimpl),
            ("3. our formula vs traker's, on traker's features", ours_on_their_feats, theirs32),
            ("4. traker fp16 vs traker fp32", theirs16, theirs32),
        ]
        for name, u, v in rows:
            print(f"{name:58s} " + " ".join(f"{c:9.4f}" for c in corr(u, v)))
        print(f"traker's per-checkpoint weights 1/mean|(ΦᵀΦ)⁻¹| relative to their mean: "
              f"{np.round(np.array(w) / np.mean(w), 3).tolist()}")
        print(f"traker fp16: {np.mean(~np.isfinite(theirs16)):.2%} of the scores are inf/NaN "
              f"(left out of the correlations above)")
        print(f"scale: median |ours| / |traker fp32| = {np.median(np.abs(ours)) / np.median(np.abs(theirs32)):.3g}")


if __name__ == "__main__":
    main()
