"""Per-target backends: python-glmnet ("glmnet", coordinate descent) and sklearn ("sklearn",
the cross-check), one target at a time on float64 masks, with the split, λ path, selection rule
and refit of workers.lasso.problem. python-glmnet has no warm-start API, so early stopping refits
growing prefixes of the path, 10 λ at a time, until select_lambda stops. Debiasing
(LassoConfig.debias) refits least squares on the support of each lasso solution from the float64
masks, and blends as workers.lasso.debias does.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from workers.lasso.debias import blend
from workers.lasso.problem import (
    RIDGE,
    FitResult,
    LassoConfig,
    column_std,
    debias_phis,
    lambda_max_of,
    lambda_ratios,
    progress,
    select_lambda,
    select_phi,
)

_GLMNET_SEGMENT = 10   # python-glmnet has no warm start: early stopping refits growing prefixes

PathFn = Callable[[np.ndarray, np.ndarray, np.ndarray, LassoConfig], tuple[np.ndarray, np.ndarray]]


def fit_per_target(Xb: np.ndarray, Y: np.ndarray, cfg: LassoConfig, fit_idx: np.ndarray,
                   val_idx: np.ndarray) -> FitResult:
    """glmnet / sklearn: the same split, λ path, selection rule and refit, one target at a time."""
    n = Xb.shape[1]
    T = Y.shape[1]
    order = np.concatenate([fit_idx, val_idx])
    Xa = np.asfortranarray(Xb[order], dtype=np.float64)     # the one float64 copy of X
    Xf, Xv = Xa[: len(fit_idx)], Xa[len(fit_idx):]
    pf_f = column_std(Xf) if cfg.standardize else np.ones(n)
    ratios = lambda_ratios(cfg.n_lambdas, cfg.lambda_min_ratio)
    out = FitResult.zeros(T, n)
    path_fn: PathFn = glmnet_path if cfg.backend == "glmnet" else sklearn_path
    phis = debias_phis(cfg)
    ridge_f, ridge_a = (RIDGE * float(np.mean(column_std(x) ** 2)) for x in (Xf, Xa))
    for t in progress(range(T), "fit targets"):
        y = np.asarray(Y[:, t], np.float64)
        yf, yv = y[fit_idx], y[val_idx]
        c = Xf.T @ (yf - yf.mean()) / len(yf)             # = centered X^T (y - ybar) / m
        lmax = float(lambda_max_of(c, pf_f))
        if lmax <= 0.0:        # constant target on the fit rows: intercept only
            out.intercept[t] = y.mean()
            out.val_mse[t] = np.mean((yf.mean() - yv) ** 2)
            out.phi[t] = 1.0 if phis is None else phis[0]   # every blend of w = v = 0 ties: the first
            continue
        lams = lmax * ratios
        K = len(lams)
        k_end = K if (cfg.backend == "sklearn" or cfg.early_stop_patience <= 0) else _GLMNET_SEGMENT
        while True:
            coef, icpt = path_fn(Xf, yf, lams[:k_end], cfg)
            mse = np.mean((Xv @ coef + icpt - yv[:, None]) ** 2, axis=0)
            best, steps = select_lambda(mse, cfg.early_stop_patience)
            if steps < k_end or k_end == K:
                break
            k_end = min(K, k_end + _GLMNET_SEGMENT)
        w_f, b_f = coef[:, best], icpt[best]
        coef, icpt = path_fn(Xa, y[order], lams[:best + 1], cfg)
        w, b = coef[:, -1], icpt[-1]
        out.val_mse[t] = mse[best]
        if phis is not None:
            v_f, c_f = support_refit_one(Xf, yf, w_f, ridge_f)
            blends = [blend_one(w_f, b_f, v_f, c_f, p) for p in phis]
            mse_phi = [mse[best] if p == 1.0 else np.mean((Xv @ bw + bb - yv) ** 2)
                       for p, (bw, bb) in zip(phis, blends)]
            pick = int(select_phi(np.asarray(mse_phi)[:, None])[0])
            out.phi[t], out.val_mse[t] = phis[pick], mse_phi[pick]
            w, b = blend_one(w, b, *support_refit_one(Xa, y[order], w, ridge_a), phis[pick])
        out.weights[t] = w
        out.intercept[t] = b
        out.lam[t] = lams[best]
        out.nnz[t] = np.count_nonzero(out.weights[t])
    return out


def support_refit_one(X: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """Least squares of y on the columns of X where w != 0, centered, with `ridge` on the
    diagonal (workers.lasso.debias.support_refit for one target from the masks): (v [n], b)."""
    S = np.flatnonzero(w)
    v = np.zeros(X.shape[1])
    ybar = float(y.mean())
    if len(S) == 0:
        return v, ybar
    Xs = X[:, S]
    mu = Xs.mean(0)
    Xc = Xs - mu
    A = Xc.T @ Xc / len(y)
    A[np.diag_indices_from(A)] += ridge
    v[S] = np.linalg.solve(A, Xc.T @ (y - ybar) / len(y))
    return v, ybar - float(mu @ v[S])


def blend_one(w: np.ndarray, b: float, v: np.ndarray, c: float, phi: float) -> tuple[np.ndarray, float]:
    """(phi w + (1 - phi) v, phi b + (1 - phi) c), by workers.lasso.debias.blend on the column
    [w; b]: exactly (w, b) at phi = 1 and (v, c) at phi = 0."""
    import torch
    out = blend(torch.from_numpy(np.append(w, b)[:, None]), torch.from_numpy(np.append(v, c)[:, None]),
                torch.tensor([phi], dtype=torch.float64))[:, 0].numpy()
    return out[:-1], float(out[-1])


def glmnet_path(X: np.ndarray, y: np.ndarray, lams: np.ndarray, cfg: LassoConfig
                ) -> tuple[np.ndarray, np.ndarray]:
    """python-glmnet ElasticNet(alpha=1) on the given λ path, no CV: (coef [n, K], icpt [K])."""
    from glmnet import ElasticNet
    est = ElasticNet(alpha=1.0, lambda_path=np.asarray(lams, np.float64), standardize=cfg.standardize,
                     fit_intercept=True, n_splits=0, tol=cfg.tol, max_iter=cfg.max_iter)
    est.fit(X, y)
    K = len(lams)
    if est.coef_path_.shape[-1] != K:
        raise RuntimeError(f"glmnet returned {est.coef_path_.shape[-1]} of {K} path points")
    return est.coef_path_.reshape(X.shape[1], K), np.atleast_1d(est.intercept_path_)


def sklearn_path(X: np.ndarray, y: np.ndarray, lams: np.ndarray, cfg: LassoConfig
                 ) -> tuple[np.ndarray, np.ndarray]:
    """sklearn lasso_path on centered (and, if standardize, scaled) data, folded back."""
    from sklearn.linear_model import lasso_path
    mu = X.mean(0)
    sd = column_std(X) if cfg.standardize else np.ones(X.shape[1])
    scale = np.where(sd > 0, sd, 1.0)
    Xs = np.asfortranarray((X - mu) / scale)
    ybar = y.mean()
    _, coefs, _ = lasso_path(Xs, y - ybar, alphas=np.asarray(lams, np.float64), tol=cfg.tol,
                             max_iter=cfg.max_iter)
    coefs = coefs / scale[:, None]
    return coefs, ybar - mu @ coefs
