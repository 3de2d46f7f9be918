"""The lasso problem every backend solves, and the rule that picks its λ.

Owns the settings (LassoConfig) and the result (FitResult), the input forms of the masks, the
seeded fit/validation split, the λ path and its start λ_max, the selection rule, and the
objective and penalty weights used to check a fit. For target t, with margins y [m] of m
trained models and their 0/1 training masks X [m, n]:

    minimize_{w, b}  (1/2m) ||X w + b - y||^2 + lam * sum_j pf_j |w_j|        (b unpenalized)

(pf_j = 1, or the column's standard deviation when standardize=True; this is python-glmnet's
gaussian family with alpha=1 and sklearn's Lasso scaling). A path of n_lambdas values from
lam_max(t) = max_j |x_j^T (y - ybar)| / (m pf_j) down to lambda_min_ratio * lam_max(t) is fit
on a seeded fit split of the masks, lam is chosen by validation MSE on the rest (select_lambda:
the first minimum, with early stopping), and (w, b) is refit on fit + validation at the chosen
lam. Every backend returns (w, b) in raw mask space: predictions are exactly ``mask @ w + b``.

Debiasing (debias): the lasso shrinks its selected weights towards 0. "refit" replaces (w, b) by
the least-squares fit on w's support S (same rows, intercept refit, a ridge of RIDGE times the
mean column variance for stability); "relaxed" is the relaxed lasso (Meinshausen 2007),
w = phi w_lasso + (1 - phi) w_refit, with phi per target chosen on the validation split from
PHI_GRID (select_phi) or fixed by debias_phi. "refit" is "relaxed" at phi = 0, "none" at phi = 1.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from workers.settings import SettingError, setting

if TYPE_CHECKING:
    import torch

_T = TypeVar("_T")

DEBIAS = ("none", "refit", "relaxed")
PHI_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)   # relaxed lasso's candidate phi, lasso first: ties keep it
RIDGE = 1e-6         # support refit's ridge, relative to the mean column variance of the masks


@dataclass
class LassoConfig:
    """The lasso fit (conf/fit/: presets set what differs). Defaults, types and allowed values
    are declared here once (workers.settings); the structured config `fit`
    (orchestrator/schema.py) extends this class with the fit stage's scheduling."""

    backend: str = setting("torch", choices=("torch", "glmnet", "sklearn"))  # torch: batched, CPU or
    #                                GPU; glmnet: per target, python-glmnet; sklearn: cross-checks
    n_lambdas: int = setting(100, lo=1, example=100)
    lambda_min_ratio: float = setting(1e-3, lo=0, hi=1, lo_open=True, hi_open=True, example=1.0e-3)
    val_fraction: float = setting(0.1, lo=0, hi=1, lo_open=True, hi_open=True, example=0.1)
    split_seed: int = setting(0, lo=0, hi=2 ** 63 - 1, example=0)
    standardize: bool = setting(False)  # if True, penalty weights pf_j = std of column j (glmnet's
    #                                standardize); weights are returned in raw mask space
    tol: float = setting(1e-7, lo=0, lo_open=True, example=1.0e-7)
    max_iter: int = setting(100000, lo=1, example=100000)
    device: str = "auto"           # torch backend: auto | cpu | cuda | cuda:N
    targets_per_block: int = setting(1024, lo=1, example=1024)  # torch backend
    rows_per_block: int = setting(65536, lo=1, example=65536)   # torch backend streaming
    early_stop_patience: int = setting(5, lo=0, example=5)  # stop a target's path when val error has not
    #                                improved this many steps
    memory_budget_bytes: int | None = setting(None, lo=1, example=2 ** 30)  # null: 85% of free GPU
    #                                memory, or half of the host's available memory
    debias: str = setting("none", choices=DEBIAS)  # none: the lasso; refit: least squares on its
    #                                support; relaxed: a per-target blend of the two (module docstring)
    debias_phi: float | None = setting(None, lo=0, hi=1, example=0.5)  # relaxed: the lasso's share phi;
    #                                null: chosen per target on the validation split from PHI_GRID


@dataclass
class FitResult:
    weights: np.ndarray     # float32 [T, n]
    intercept: np.ndarray   # float32 [T]
    lam: np.ndarray         # float64 [T] chosen λ
    val_mse: np.ndarray     # float64 [T] validation MSE at chosen λ (and phi) (fit-split model)
    nnz: np.ndarray         # int64 [T]
    phi: np.ndarray         # float64 [T] the lasso's share in the debiased weights (1: debias=none)

    @classmethod
    def zeros(cls, T: int, n: int) -> FitResult:
        """The result of T targets over n examples, all zero (phi all 1), for a backend to fill in."""
        return cls(np.zeros((T, n), np.float32), np.zeros(T, np.float32), np.zeros(T),
                   np.zeros(T), np.zeros(T, np.int64), np.ones(T))


def debias_phis(cfg: LassoConfig) -> tuple[float, ...] | None:
    """The candidate phi (the lasso's share) of cfg.debias, in PHI_GRID's order; None for "none"."""
    if cfg.debias == "none":
        return None
    if cfg.debias == "refit":
        return (0.0,)
    return PHI_GRID if cfg.debias_phi is None else (float(cfg.debias_phi),)


def check_debias(cfg: LassoConfig) -> None:
    """debias_phi without debias=relaxed would be silently ignored: refuse it in one line."""
    if cfg.debias_phi is not None and cfg.debias != "relaxed":
        raise SettingError(f"fit.debias_phi={cfg.debias_phi} applies only to fit.debias=relaxed "
                           f"(fit.debias={cfg.debias!r}): set fit.debias=relaxed or fit.debias_phi=null")


def select_phi(val_mse: np.ndarray) -> np.ndarray:
    """Index of the chosen phi per target from val_mse [P, T] (candidates along P, in
    debias_phis order): the first minimum, so a tie keeps the candidate nearer the lasso."""
    return np.argmin(np.asarray(val_mse, np.float64), axis=0)


def mask_format(X: Any, n: int | None) -> tuple[bool, int]:
    """(packed?, n) of masks X: bool [m, n], or packed uint8 [m, ceil(n/8)] (workers.bits) with
    n given; numpy arrays or torch tensors."""
    dt = str(X.dtype)
    if dt.endswith("bool"):
        if n is not None and n != X.shape[1]:
            raise ValueError(f"bool masks have {X.shape[1]} columns but n={n}")
        return False, X.shape[1]
    if dt.endswith("uint8"):
        if n is None:
            raise ValueError("packed uint8 masks need n (the number of training examples)")
        if X.shape[1] != (n + 7) // 8:
            raise ValueError(f"packed masks have {X.shape[1]} bytes per row, need ceil({n}/8)")
        return True, n
    raise ValueError(f"masks must be bool [m, n] or packed uint8, got dtype {X.dtype}")


def split_fit_val(m: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): a seeded random split of range(m), each sorted.

    The validation set has round(val_fraction * m) rows (at least 1); both sets are disjoint
    and cover range(m). The split depends on (m, val_fraction, seed) only."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"fit.val_fraction={val_fraction} must be in (0, 1)")
    n_val = max(1, int(round(val_fraction * m)))
    if m - n_val < 2:
        raise ValueError(f"{m} masks are too few to split with val_fraction={val_fraction}")
    perm = np.random.default_rng(seed).permutation(m)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def lambda_ratios(n_lambdas: int, lambda_min_ratio: float) -> np.ndarray:
    """r_k = lambda_min_ratio^(k/(K-1)), k = 0..K-1: the path is lam_max * r_k (log spaced)."""
    if n_lambdas < 1 or not 0.0 < lambda_min_ratio <= 1.0:
        raise ValueError(f"need n_lambdas >= 1 and 0 < lambda_min_ratio <= 1, got "
                         f"{n_lambdas}, {lambda_min_ratio}")
    if n_lambdas == 1:
        return np.ones(1)
    return lambda_min_ratio ** (np.arange(n_lambdas) / (n_lambdas - 1))


def select_lambda(val_mse: np.ndarray, patience: int) -> tuple[int, int]:
    """(chosen index, number of path steps taken) for one target's validation MSE sequence.

    Walks the path in order: an index becomes the best when its MSE is strictly below every
    earlier one; the walk stops after `patience` steps without improvement (patience <= 0:
    never). The torch backend applies the same rule step by step while fitting."""
    best, best_mse = 0, np.inf
    for k, v in enumerate(np.asarray(val_mse, dtype=np.float64)):
        if v < best_mse:
            best, best_mse = k, v
        elif patience > 0 and k - best >= patience:
            return best, k + 1
    return best, len(val_mse)


def lambda_max_of(c: np.ndarray | torch.Tensor, penalty_factor: np.ndarray | torch.Tensor | None = None
                  ) -> torch.Tensor:
    """λ_max from the centered correlations c = Xc^T (y - ybar) / m, [n] for one target or
    [n, T] for T (numpy, or torch on any device, in its dtype): max_j |c_j| / pf_j over the
    columns with pf_j > 0, 0 where there are none; the smallest λ at which w = 0 is optimal.
    Returns a tensor [] or [T] on c's device. The one definition every backend uses."""
    import torch
    a = torch.as_tensor(c).abs()
    if penalty_factor is not None:
        pf = torch.as_tensor(penalty_factor, device=a.device)
        pf = pf.reshape(pf.shape + (1,) * (a.dim() - 1))
        a = torch.where(pf > 0, a / pf, 0.0)         # columns with pf_j = 0 are never penalized
    return a.amax(0)


def lambda_max(X, y, penalty_factor=None) -> float:
    """Smallest λ with w = 0 optimal: max_j |x_j^T (y - ybar)| / (m pf_j), x_j centered."""
    X = _as_float64_rows(X)
    y = np.asarray(y, dtype=np.float64)
    c = (X - X.mean(0)).T @ (y - y.mean()) / len(y)
    pf = np.ones(X.shape[1]) if penalty_factor is None else np.asarray(penalty_factor, np.float64)
    return float(lambda_max_of(c, pf))


def lasso_objective(X, y, w, b, lam, penalty_factor=None) -> float:
    """(1/2m) ||X w + b - y||^2 + lam * sum_j pf_j |w_j|, in float64."""
    X = _as_float64_rows(X)
    r = X @ np.asarray(w, np.float64) + float(b) - np.asarray(y, np.float64)
    pen = np.abs(np.asarray(w, np.float64))
    if penalty_factor is not None:
        pen = pen * np.asarray(penalty_factor, np.float64)
    return float(0.5 * np.mean(r * r) + lam * pen.sum())


def column_std(X) -> np.ndarray:
    """Population standard deviation of each column (glmnet's standardization), float64."""
    return _as_float64_rows(X).std(0)


def _as_float64_rows(X) -> np.ndarray:
    return np.asarray(X, dtype=np.float64)


def progress(it: Iterable[_T], desc: str) -> Iterable[_T]:
    """A progress bar over targets or target blocks, quiet when stderr is not a terminal."""
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False, disable=None, mininterval=2.0)
