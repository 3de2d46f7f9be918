"""Influence functions against leave-one-out retraining (Koh & Liang 2017, Fig. 2 style).

L2-regularised multinomial logistic regression on scikit-learn digits, trained to
convergence in float64 (LBFGS, then Newton polish to ‖∇R‖ < 1e-12). For the test point with the highest loss,
retrain without each of 50 training points of largest |predicted influence| and 50 random
ones (weight of z_i set to 0, i.e. minimise (1/n) Σ_{j≠i} L_j + (l2/2)‖θ‖², the exact
counterpart of IF's ε = −1/n), and correlate the actual change of the test loss and margin
with the prediction of if_exact / if_cg / if_lissa. Prints the figures.

    PYTHONPATH=. python bench/if_loo.py [--n-train 500] [--l2 0.01] [--k 50]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.datasets import load_digits
from torch import nn

from workers.attribution import compute_scores
from workers.attribution.common import output_values
from workers.attribution.influence import influence_scores
from workers.attribution.reference import fit_logreg, logreg_state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--l2", type=float, default=0.01)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    X, Y = load_digits(return_X_y=True)
    perm = rng.permutation(len(X))
    tr, te = perm[:a.n_train], perm[a.n_train:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
    xtr = torch.tensor((X[tr] - mu) / sd)
    ytr = torch.tensor(Y[tr])
    xte = torch.tensor((X[te] - mu) / sd)
    yte = torch.tensor(Y[te])
    n, C = len(xtr), 10

    t0 = time.time()
    flat, gnorm = fit_logreg(xtr, ytr, C, a.l2)
    theta = logreg_state(flat, 64, C)
    model = nn.Linear(64, C).double()
    model.load_state_dict(theta)
    with torch.no_grad():
        test_loss = F.cross_entropy(model(xte), yte, reduction="none")
        acc = (model(xte).argmax(1) == yte).double().mean()
    t = int(test_loss.argmax())
    xt, yt = xte[t:t + 1], yte[t:t + 1]
    print(f"digits multinomial LR: n_train={n}, P={64 * C + C}, l2={a.l2}, float64 LBFGS "
          f"‖∇R‖={gnorm:.1e}, test acc={acc:.3f}; target = test point {t} "
          f"(label {int(yt)}, loss {float(test_loss[t]):.3f}) [{time.time() - t0:.1f}s]")

    model_fn = lambda: nn.Linear(64, C)  # noqa: E731  (float32 module; the float64 checkpoint replaces its tensors)
    common = dict(l2=a.l2, device="cpu", batch_size=256)
    t0 = time.time()
    pred = {
        ("loss", "if_exact"): influence_scores(model_fn, [theta], xtr, ytr, xt, yt, common, solver="exact",
                                               output="loss")[:, 0],
        ("margin", "if_exact"): compute_scores("if_exact", model_fn, [theta], xtr, ytr, xt, yt, common)[:, 0],
        ("margin", "if_cg"): compute_scores("if_cg", model_fn, [theta], xtr, ytr, xt, yt,
                                            {**common, "damping": 0.0, "cg_iters": 500, "cg_tol": 1e-10})[:, 0],
        ("margin", "if_lissa"): compute_scores("if_lissa", model_fn, [theta], xtr, ytr, xt, yt,
                                               {**common, "damping": 0.0, "lissa_depth": 1000,
                                                "lissa_batch": None})[:, 0],
        ("margin", "if_lissa/b50"): compute_scores("if_lissa", model_fn, [theta], xtr, ytr, xt, yt,
                                                   {**common, "damping": 0.0, "lissa_depth": 3000,
                                                    "lissa_batch": 50})[:, 0],
    }
    print(f"predictions: {time.time() - t0:.1f}s")

    top = np.argsort(-np.abs(pred[("loss", "if_exact")]))[:a.k]
    rest = np.setdiff1d(np.arange(n), top)
    rand = rng.choice(rest, a.k, replace=False)
    idx = np.concatenate([top, rand])

    def outputs(state):
        m = nn.Linear(64, C).double()
        m.load_state_dict(state)
        with torch.no_grad():
            z = m(xt)
            return float(F.cross_entropy(z, yt)), float(output_values(z, yt, "margin", "logsumexp")[0])

    base = outputs(theta)
    t0 = time.time()
    actual = {"loss": np.zeros(len(idx)), "margin": np.zeros(len(idx))}
    worst = 0.0
    for j, i in enumerate(idx):
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0
        th, g = fit_logreg(xtr, ytr, C, a.l2, weights=w, init=flat)
        th = logreg_state(th, 64, C)
        worst = max(worst, g)
        lo, ma = outputs(th)
        # "including i" minus "without i", the package's sign convention
        actual["loss"][j] = base[0] - lo
        actual["margin"][j] = base[1] - ma
    print(f"{len(idx)} leave-one-out retrains in {time.time() - t0:.1f}s, worst ‖∇R‖={worst:.1e}")

    print(f"{'output':7s} {'method':12s} {'points':14s} {'Pearson':>8s} {'Spearman':>9s} {'slope':>7s}")
    for (out, meth), pr in pred.items():
        for name, sel in ((f"top-{a.k} |IF|", slice(0, a.k)), (f"random {a.k}", slice(a.k, None)),
                          (f"all {len(idx)}", slice(None))):
            p, q = pr[idx][sel], actual[out][sel]
            slope = float(np.dot(p, q) / np.dot(p, p))
            print(f"{out:7s} {meth:12s} {name:14s} {pearsonr(p, q)[0]:8.4f} {spearmanr(p, q)[0]:9.4f} {slope:7.3f}")
    ex = pred[("margin", "if_exact")]
    for meth in ("if_cg", "if_lissa", "if_lissa/b50"):
        rel = np.linalg.norm(pred[("margin", meth)] - ex) / np.linalg.norm(ex)
        print(f"{meth} vs if_exact, all {n} training points: relative error {rel:.2e}")


if __name__ == "__main__":
    main()
