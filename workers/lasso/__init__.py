"""Lasso per target: the fit stage's computation, one sparse linear datamodel per target.

fit_lasso fits, for every target (a column of the margins Y), the lasso of its margins on the
0/1 training masks X along a λ path, chooses λ on a validation split and refits at it; see
workers.lasso.problem for the problem and the selection rule. Backends: "torch" (batched, CPU or
GPU), "glmnet" (python-glmnet, one target at a time), "sklearn" (cross-checks). All return
(w, b) in raw mask space: predictions are exactly ``mask @ w + b``. The modules, along the
algorithm:

    problem     settings, result, split, λ path and λ_max, selection rule, objective
    per_target  the glmnet and sklearn backends
    gram        torch backend data: row streaming, the centered Gram, memory budget and blocks
    fista       torch backend solver: FISTA, the λ path per target block, the refit
    debias      torch backend debiasing: least squares on each support from the Gram, the blend
    synthetic   planted problems for tests and benchmarks (not imported here)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from workers import bits
from workers.lasso.fista import fit_torch, lasso_path_torch
from workers.lasso.gram import BlockPlan, memory_bytes, plan_blocks
from workers.lasso.per_target import fit_per_target
from workers.lasso.problem import (
    FitResult,
    LassoConfig,
    check_debias,
    column_std,
    lambda_max,
    lambda_ratios,
    lasso_objective,
    mask_format,
    select_lambda,
    split_fit_val,
)
from workers.settings import check

__all__ = ["BlockPlan", "FitResult", "LassoConfig", "column_std", "fit_lasso", "lambda_max", "lambda_ratios",
           "lasso_objective", "lasso_path_torch", "memory_bytes", "plan_blocks", "select_lambda",
           "split_fit_val"]


def fit_lasso(X: Any, Y: Any, cfg: LassoConfig, n: int | None = None) -> FitResult:
    """Fit one lasso per column of Y on masks X; see the module docstring.

    X: bool [m, n], or packed uint8 [m, ceil(n/8)] (workers.bits, little bit order) with n
    given; numpy, or a torch tensor (torch backend: may already be on the device).
    Y: float [m, T] margins (numpy or torch)."""
    check(cfg, "fit.")
    check_debias(cfg)
    m = X.shape[0]
    packed, n = mask_format(X, n)
    if Y.ndim != 2 or Y.shape[0] != m:
        raise ValueError(f"Y must be [m={m}, T], got shape {tuple(Y.shape)}")
    fit_idx, val_idx = split_fit_val(m, cfg.val_fraction, cfg.split_seed)
    if cfg.backend == "torch":
        return fit_torch(X, packed, n, Y, cfg, fit_idx, val_idx)
    if cfg.backend in ("glmnet", "sklearn"):
        Xn = _numpy(X)
        Xb = bits.unpack(Xn, n) if packed else Xn
        return fit_per_target(Xb, _numpy(Y), cfg, fit_idx, val_idx)
    raise ValueError(f"fit.backend={cfg.backend!r}: use 'torch', 'glmnet' or 'sklearn'")


def _numpy(a: Any) -> np.ndarray:
    """A numpy array of a (a torch tensor is copied to the host)."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
