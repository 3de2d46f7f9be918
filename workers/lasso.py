"""Lasso per target: the fit stage's computation, one sparse linear datamodel per target.

For target t, with margins y [m] of m trained models and their 0/1 training masks X [m, n]:

    minimize_{w, b}  (1/2m) ||X w + b - y||^2 + lam * sum_j pf_j |w_j|        (b unpenalized)

(pf_j = 1, or the column's standard deviation when standardize=True; this is python-glmnet's
gaussian family with alpha=1 and sklearn's Lasso scaling). A path of n_lambdas values from
lam_max(t) = max_j |x_j^T (y - ybar)| / (m pf_j) down to lambda_min_ratio * lam_max(t) is fit
on a seeded fit split of the masks, lam is chosen by validation MSE on the rest, and (w, b) is
refit on fit + validation at the chosen lam. Backends: "torch" (batched, CPU or GPU), "glmnet"
(python-glmnet, one target at a time), "sklearn" (cross-checks). All return (w, b) in raw mask
space: predictions are exactly ``mask @ w + b``.

Batched solver ("torch"): FISTA on the shared centered Gram matrix, blocks of targets at once.
  With Xc the column-centered masks, mu the column means, G = Xc^T Xc / m [n, n],
  c_t = Xc^T (y_t - ybar_t) / m and b_t = ybar_t - mu^T w_t, the objective is
  (1/2) w^T G w - c_t^T w + (1/2) var(y_t) + lam ||pf * w||_1: every target shares G. Why this
  algorithm:
  * Gram space: one iteration costs 2 n^2 T_b flops, independent of m; iterating in data space
    (X z, then X^T r) costs 4 m n T_b, so the Gram wins whenever m > n/2 (datamodels use m ~ n
    to 6n), after a one-off 2 m n^2 for the Gram. The Gram of 0/1 masks is a matrix of integer
    counts < 2^24, exact in float32 (and with bf16 inputs plus float32 accumulation, exact on
    tensor cores); it is computed once per fit and pooled with the validation rows for the refit.
  * FISTA, not coordinate descent: coordinate descent (glmnet's method) is sequential in the
    coordinates; batched over targets each coordinate step is a rank-1 update of an [n, T_b]
    gradient (matrix-vector speed, n dependent steps per sweep). A FISTA step is one GEMM
    G @ Z [n, n] x [n, T_b] plus a few elementwise passes, which is what CPUs and GPUs run at
    full speed. Random alpha-masks make G ~ alpha(1-alpha) I + O(1/sqrt(m)), well conditioned
    on sparse supports, so with warm starts along the path FISTA needs about 4-10 steps per lam
    (measured on planted problems). Proximal SAGA (the reference pipeline's choice) streams all
    m rows every epoch (4 m n T_b flops) and needs many epochs.
  * Step 1/L with L = 1.02 x the top eigenvalue of G (Lanczos); adaptive gradient restart per
    target (O'Donoghue & Candes 2015). A target stops when its duality gap, a certified bound on
    objective suboptimality computed from G-products already at hand, is <= 100 tol var(y_t)
    (the gap overestimates the error about quadratically; measured objective errors vs glmnet
    at tol 1e-14 stay below 1e-7 relative). Converged or early-stopped targets leave the GEMM.
  * Path: targets of a block step through their own lam_k = lam_max(t) r^k together. Warm
    starts are extrapolated, w_{k-1} + q (w_{k-1} - w_{k-2}) (the path is piecewise linear in
    lam), which saves about a third of the steps. A target's path stops once its validation MSE
    has not improved for early_stop_patience steps; lam is the argmin over the steps taken
    (select_lambda: the same rule the per-target backends apply; python-glmnet, which has no
    warm-start API, refits growing prefixes of the path, 10 λ at a time, until the rule stops).
  Precision: masks and iterations in float32; column means, centering of G, X^T Y
  accumulation over row blocks, var(y), intercepts and validation MSE sums in float64.

Streaming and memory (torch backend). X stays bit-packed (or bool) on the host or device and
is unpacked to float32 one block of r rows at a time; X is never materialized as float64
(nor as float32 beyond one row block, and the validation rows if they fit). With n examples,
T_b targets per block, r rows per block and m_v validation rows, device memory is at most

    bytes = 4 n^2                          Gram (float32, centered in place)
          + 4 n T_b * 14                   solver state, X^T Y accumulator (float64), W_best
          + r (17 n + 4 T_b)               row block: packed, unpacked bits, float32/float64
          + 8 m_v T_b                      validation targets and predictions
          + 4 m_v n   (only if cached)     validation rows kept unpacked in float32

(see memory_bytes). plan_blocks halves r and T_b until this fits memory_budget_bytes (default:
85% of free GPU memory, or half of the host's available memory); results do not depend on the
blocking beyond float32 rounding. Example: n = 50 000, T_b = 1024, r = 8192, m_v = 30 000:
10.0 + 2.9 + 7.1 + 0.25 (+ 6.0) GB, so 300 000 masks x 50 000 examples fit an 80 GB GPU.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class LassoConfig:
    backend: str = "glmnet"        # "glmnet" (per target, python-glmnet) | "torch" (batched) | "sklearn"
    n_lambdas: int = 100
    lambda_min_ratio: float = 1e-3
    val_fraction: float = 0.1
    split_seed: int = 0
    standardize: bool = False      # if True, penalty weights pf_j = std of column j (glmnet's
    #                                standardize); weights are returned in raw mask space
    tol: float = 1e-7
    max_iter: int = 100000
    device: str = "auto"           # torch backend: "auto" | "cpu" | "cuda" | "cuda:1" ...
    targets_per_block: int = 1024  # torch backend
    rows_per_block: int = 65536    # torch backend streaming
    early_stop_patience: int = 5   # stop a target's path when val error has not improved this many steps
    memory_budget_bytes: int | None = None


@dataclass
class FitResult:
    weights: np.ndarray     # float32 [T, n]
    intercept: np.ndarray   # float32 [T]
    lam: np.ndarray         # float64 [T] chosen λ
    val_mse: np.ndarray     # float64 [T] validation MSE at chosen λ (fit-split model)
    nnz: np.ndarray         # int64 [T]


# ----------------------------------------------------------------------------------------
# Shared pieces: split, λ path, selection rule, objective
# ----------------------------------------------------------------------------------------

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


def _as_float64_rows(X) -> np.ndarray:
    return np.asarray(X, dtype=np.float64)


def lambda_max(X, y, penalty_factor=None) -> float:
    """Smallest λ with w = 0 optimal: max_j |x_j^T (y - ybar)| / (m pf_j), x_j centered."""
    X = _as_float64_rows(X)
    y = np.asarray(y, dtype=np.float64)
    c = (X - X.mean(0)).T @ (y - y.mean()) / len(y)
    pf = np.ones(X.shape[1]) if penalty_factor is None else np.asarray(penalty_factor, np.float64)
    ok = pf > 0
    return float(np.max(np.abs(c[ok]) / pf[ok])) if ok.any() else 0.0


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
    X = _as_float64_rows(X)
    return X.std(0)


def fit_lasso(X, Y, cfg: LassoConfig, n: int | None = None) -> FitResult:
    """Fit one lasso per column of Y on masks X; see the module docstring.

    X: bool [m, n], or packed uint8 [m, ceil(n/8)] (workers.bits, little bit order) with n
    given; numpy, or a torch tensor (torch backend: may already be on the device).
    Y: float [m, T] margins (numpy or torch)."""
    m = X.shape[0]
    packed, n = _input_kind(X, n)
    if Y.ndim != 2 or Y.shape[0] != m:
        raise ValueError(f"Y must be [m={m}, T], got shape {tuple(Y.shape)}")
    fit_idx, val_idx = split_fit_val(m, cfg.val_fraction, cfg.split_seed)
    if cfg.backend == "torch":
        return _fit_torch(X, packed, n, Y, cfg, fit_idx, val_idx)
    if cfg.backend in ("glmnet", "sklearn"):
        Xb = _bool_masks(X, packed, n)
        Yn = Y.detach().cpu().numpy() if hasattr(Y, "detach") else np.asarray(Y)
        return _fit_per_target(Xb, Yn, cfg, fit_idx, val_idx)
    raise ValueError(f"fit.backend={cfg.backend!r}: use 'torch', 'glmnet' or 'sklearn'")


def _input_kind(X, n):
    """(packed?, n) from X's dtype and shape."""
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


def _bool_masks(X, packed, n) -> np.ndarray:
    X = X.detach().cpu().numpy() if hasattr(X, "detach") else np.asarray(X)
    if packed:
        return np.unpackbits(X, axis=-1, count=n, bitorder="little").astype(bool)
    return X


# ----------------------------------------------------------------------------------------
# Per-target backends (python-glmnet, sklearn)
# ----------------------------------------------------------------------------------------

_GLMNET_SEGMENT = 10   # python-glmnet has no warm start: early stopping refits growing prefixes


def _fit_per_target(Xb, Y, cfg, fit_idx, val_idx) -> FitResult:
    """glmnet / sklearn: the same split, λ path, selection rule and refit, one target at a time."""
    m, n = Xb.shape
    T = Y.shape[1]
    order = np.concatenate([fit_idx, val_idx])
    Xa = np.asfortranarray(Xb[order], dtype=np.float64)     # the one float64 copy of X
    Xf, Xv = Xa[: len(fit_idx)], Xa[len(fit_idx):]
    pf_f = Xf.std(0) if cfg.standardize else np.ones(n)
    ratios = lambda_ratios(cfg.n_lambdas, cfg.lambda_min_ratio)
    out = FitResult(np.zeros((T, n), np.float32), np.zeros(T, np.float32), np.zeros(T),
                    np.zeros(T), np.zeros(T, np.int64))
    path_fn = _glmnet_path if cfg.backend == "glmnet" else _sklearn_path
    for t in _progress(range(T), "fit targets", cfg):
        y = np.asarray(Y[:, t], np.float64)
        yf, yv = y[fit_idx], y[val_idx]
        c = Xf.T @ (yf - yf.mean()) / len(yf)             # = centered X^T (y - ybar) / m
        ok = pf_f > 0
        lmax = float(np.max(np.abs(c[ok]) / pf_f[ok])) if ok.any() else 0.0
        if lmax <= 0.0:        # constant target on the fit rows: intercept only
            out.intercept[t] = y.mean()
            out.val_mse[t] = np.mean((yf.mean() - yv) ** 2)
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
        coef, icpt = path_fn(Xa, y[order], lams[:best + 1], cfg)
        out.weights[t] = coef[:, -1]
        out.intercept[t] = icpt[-1]
        out.lam[t] = lams[best]
        out.val_mse[t] = mse[best]
        out.nnz[t] = np.count_nonzero(out.weights[t])
    return out


def _glmnet_path(X, y, lams, cfg):
    """python-glmnet ElasticNet(alpha=1) on the given λ path, no CV: (coef [n, K], icpt [K])."""
    from glmnet import ElasticNet
    est = ElasticNet(alpha=1.0, lambda_path=np.asarray(lams, np.float64), standardize=cfg.standardize,
                     fit_intercept=True, n_splits=0, tol=cfg.tol, max_iter=cfg.max_iter)
    est.fit(X, y)
    K = len(lams)
    if est.coef_path_.shape[-1] != K:
        raise RuntimeError(f"glmnet returned {est.coef_path_.shape[-1]} of {K} path points")
    return est.coef_path_.reshape(X.shape[1], K), np.atleast_1d(est.intercept_path_)


def _sklearn_path(X, y, lams, cfg):
    """sklearn lasso_path on centered (and, if standardize, scaled) data, folded back."""
    from sklearn.linear_model import lasso_path
    mu = X.mean(0)
    sd = X.std(0) if cfg.standardize else np.ones(X.shape[1])
    scale = np.where(sd > 0, sd, 1.0)
    Xs = np.asfortranarray((X - mu) / scale)
    ybar = y.mean()
    _, coefs, _ = lasso_path(Xs, y - ybar, alphas=np.asarray(lams, np.float64), tol=cfg.tol,
                             max_iter=cfg.max_iter)
    coefs = coefs / scale[:, None]
    return coefs, ybar - mu @ coefs


def _progress(it, desc, cfg, total=None):
    from tqdm import tqdm
    return tqdm(it, desc=desc, total=total, leave=False, disable=None, mininterval=2.0)


# ----------------------------------------------------------------------------------------
# Batched torch backend
# ----------------------------------------------------------------------------------------

_GAP_PER_TOL = 100.0  # torch solver: a target stops at duality gap <= 100 tol var(y) (see _fista)
_STATE_WORDS = 14   # float32 [n, T_b]-sized buffers alive at once in the solver (see memory_bytes)


def memory_bytes(n: int, targets_per_block: int, rows_per_block: int, m_val: int,
                 cache_val: bool) -> int:
    """Upper bound on the torch backend's device memory (bytes); the module docstring's formula.

    Terms: the float32 Gram (4 n^2); per target block the solver's float32 [n, T_b] buffers
    (W, Z, V, D, C, thresholds, step temporaries, W at the best λ, the path's W, copies made
    when targets are compacted) and the float64 X^T Y accumulator, 14 words per entry in all;
    one row block: packed bytes (n/8), unpacked bits (n), float32 rows (4n), float64 Gram
    centering rows (8n), float32 product (4n) and targets (4 T_b); validation targets and
    predictions (8 m_v T_b); the validation rows unpacked in float32 if cached (4 m_v n)."""
    n, tb, r, mv = int(n), int(targets_per_block), int(rows_per_block), int(m_val)
    return (4 * n * n + 4 * _STATE_WORDS * n * tb + r * (17 * n + 4 * tb) + 8 * mv * tb
            + (4 * mv * n if cache_val else 0))


@dataclass
class BlockPlan:
    targets_per_block: int
    rows_per_block: int
    cache_val: bool
    budget: int
    bytes: int


def plan_blocks(m: int, n: int, T: int, m_val: int, cfg: LassoConfig, device: str = "cpu") -> BlockPlan:
    """Largest blocks (≤ the configured sizes) whose memory_bytes fit the budget.

    Halves whichever of the target block / row block costs more until the bound fits, then
    halves the row block (down to 4096 rows) if that lets the validation rows be cached
    unpacked; they are cached only if the bound still fits."""
    budget = cfg.memory_budget_bytes
    if budget is None:
        budget = _default_budget(device)
    tb = max(1, min(int(cfg.targets_per_block), T))
    r = max(1, min(int(cfg.rows_per_block), m))
    while memory_bytes(n, tb, r, m_val, False) > budget:
        row_cost, tgt_cost = r * 17 * n, 4 * _STATE_WORDS * n * tb
        if (row_cost >= tgt_cost and r > 1) or tb == 1:
            if r == 1:
                raise ValueError(
                    f"fit.memory_budget_bytes={budget} is too small for n={n}: the Gram matrix "
                    f"alone needs {4 * n * n} bytes and one target with one row "
                    f"{memory_bytes(n, 1, 1, m_val, False)}; raise the budget")
            r = (r + 1) // 2
        else:
            tb = (tb + 1) // 2
    while memory_bytes(n, tb, r, m_val, True) > budget and r > 4096:
        r = (r + 1) // 2          # streaming validation rows every λ costs more than small row blocks
    cache = memory_bytes(n, tb, r, m_val, True) <= budget
    return BlockPlan(tb, r, cache, int(budget), memory_bytes(n, tb, r, m_val, cache))


def _default_budget(device: str) -> int:
    import torch
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(0.85 * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(0.5 * avail)


def _resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class _Rows:
    """Blocks of mask rows, unpacked on the device as float32 (or bf16) [r, n]."""

    def __init__(self, X, packed: bool, n: int, device):
        import torch
        self.X, self.packed, self.n, self.device = X, packed, n, device
        self.is_torch = isinstance(X, torch.Tensor)
        self.shifts = torch.arange(8, device=device, dtype=torch.uint8)

    def get(self, rows: np.ndarray, dtype):
        import torch
        if self.is_torch:
            idx = torch.as_tensor(rows, device=self.X.device)
            raw = self.X.index_select(0, idx).to(self.device, non_blocking=True)
        else:
            raw = torch.from_numpy(np.ascontiguousarray(self.X[rows])).to(self.device)
        if not self.packed:
            return raw.to(dtype)
        bits = (raw.unsqueeze(-1) >> self.shifts) & 1          # [r, n/8, 8], little bit order
        return bits.reshape(raw.shape[0], -1)[:, : self.n].to(dtype)


def _take_y(Y, rows: np.ndarray, t0: int, t1: int, device):
    """float32 [len(rows), t1 - t0] on the device."""
    import torch
    if isinstance(Y, torch.Tensor):
        idx = torch.as_tensor(rows, device=Y.device)
        return Y[:, t0:t1].index_select(0, idx).to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(Y[rows, t0:t1], dtype=np.float32)).to(device)


def _blocks(idx: np.ndarray, r: int):
    for a in range(0, len(idx), r):
        yield idx[a:a + r]


class _Gram:
    """The centered Gram matrix G = Xc^T Xc / m of a row set, float32 [n, n] on the device,
    with its column means (float64), diagonal and step size 1/L."""

    def __init__(self, rows: _Rows, idx: np.ndarray, r: int, device):
        import torch
        n = rows.n
        self.m = len(idx)
        if self.m >= 1 << 24:
            raise ValueError("more than 2^24 masks: float32 Gram counts would not be exact")
        G = torch.zeros(n, n, dtype=torch.float32, device=device)
        colsum = torch.zeros(n, dtype=torch.float64, device=device)
        use_bf16 = _gram_in_bf16(device)   # 0/1 is exact in bf16; counts accumulate in fp32
        for b in _blocks(idx, r):
            Xb = rows.get(b, torch.bfloat16 if use_bf16 else torch.float32)
            if use_bf16:
                for a in range(0, n, r):          # output in row chunks: no n x n temporary
                    G[a:a + r] += _mm_f32(Xb[:, a:a + r].T, Xb)
            else:
                G.addmm_(Xb.T, Xb)
            colsum += Xb.sum(0, dtype=torch.float64)
            del Xb
        self.mu = colsum / self.m
        self.G = G
        self._center(r)
        self.diag = torch.diagonal(self.G).clone()

    def _center(self, r):
        """In place, in row chunks via float64: G <- G_raw / m - mu mu^T."""
        n = self.G.shape[0]
        for a in range(0, n, r):
            blk = self.G[a:a + r].double().div_(self.m)
            blk.addr_(self.mu[a:a + r], self.mu, alpha=-1.0)
            self.G[a:a + r] = blk.float()
            del blk

    def pool_with(self, rows: _Rows, idx_v: np.ndarray, r: int, Xv_cache):
        """In place: G of (these rows + rows idx_v), by the pooled-covariance identity
        G_a = (m_f G_f + m_v G_v + (m_f m_v / m_a) d d^T) / m_a, d = mu_f - mu_v,
        computing the validation Gram in row chunks of G (no second n x n matrix)."""
        import torch
        n = self.G.shape[0]
        mf, mv = self.m, len(idx_v)
        ma = mf + mv
        colsum = torch.zeros(n, dtype=torch.float64, device=self.G.device)
        if Xv_cache is not None:
            colsum += Xv_cache.sum(0, dtype=torch.float64)
        else:
            for b in _blocks(idx_v, r):
                colsum += rows.get(b, torch.float32).sum(0, dtype=torch.float64)
        mu_v = colsum / mv
        d = self.mu - mu_v
        for a in range(0, n, r):
            e = min(n, a + r)
            gv = torch.zeros(e - a, n, dtype=torch.float32, device=self.G.device)
            if Xv_cache is not None:
                gv.addmm_(Xv_cache[:, a:e].T, Xv_cache)
            else:
                for b in _blocks(idx_v, r):
                    Xb = rows.get(b, torch.float32)
                    gv.addmm_(Xb[:, a:e].T, Xb)
                    del Xb
            blk = gv.double().div_(mv).addr_(mu_v[a:e], mu_v, alpha=-1.0).mul_(mv / ma)
            del gv
            blk.add_(self.G[a:a + r].double(), alpha=mf / ma)
            blk.addr_(d[a:e], d, alpha=mf * mv / ma / ma)
            self.G[a:a + r] = blk.float()
            del blk
        self.mu = (mf * self.mu + mv * mu_v) / ma
        self.m = ma
        self.diag = torch.diagonal(self.G).clone()

    def step(self) -> float:
        """1 / (1.02 L), L the largest eigenvalue of G (Lanczos, full reorthogonalization)."""
        L = _top_eigenvalue(self.G)
        return 1.0 / (1.02 * L) if L > 0 else 1.0


def _gram_in_bf16(device) -> bool:
    """Gram products with bf16 inputs (tensor cores) on CUDA; float32 elsewhere."""
    return str(device).startswith("cuda")


def _mm_f32(a, b):
    """a @ b with float32 output: bf16 inputs on tensor cores with float32 accumulation where
    torch supports out_dtype (CUDA), else a float32 product."""
    import torch
    if a.dtype == torch.bfloat16:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()


def _top_eigenvalue(G, iters: int = 40) -> float:
    import torch
    n = G.shape[0]
    k = min(iters, n)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(G.device)
    v /= v.norm()
    V = torch.zeros(k, n, dtype=torch.float64, device=G.device)
    alpha, beta = [], []
    for i in range(k):
        V[i] = v
        w = (G @ v.float()).double()
        a = float(w @ v)
        alpha.append(a)
        w -= V[: i + 1].T @ (V[: i + 1] @ w)      # full reorthogonalization (twice)
        w -= V[: i + 1].T @ (V[: i + 1] @ w)
        bnorm = float(w.norm())
        if i == k - 1 or bnorm < 1e-10 * max(1.0, abs(a)):
            break
        beta.append(bnorm)
        v = w / bnorm
    Tm = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
        Tm += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(Tm).max())


def _fista(G, C, lam, pf, W0, step: float, yy, tol: float, max_iter: int):
    """Solve min_w (1/2) w^T G w - c^T w + lam * sum_j pf_j |w_j| for every column by FISTA.

    C [n, A] float32, lam [A] float32, pf [n] float32 or None (ones), W0 [n, A] warm start,
    yy [A] float64 = var(y). A column stops when the duality gap at the extrapolated point z,
        gap(z) = (1/2) rr (1 - s)^2 + lam ||pf z||_1 - s z^T g,   g = c - G z,
        rr = ||y - X z||^2 / m = yy - c^T z - z^T g,  s = min(1, lam / max_j |g_j| / pf_j),
    is <= tol * yy; it returns the prox step from z, whose objective is <= that of z. A column
    whose gap stops improving (float32 noise floor, 30 steps without a 10% gain) stops too.
    The gap bounds F(w) - F* from above but overestimates it roughly quadratically (it is first
    order in the largest KKT violation), so callers pass tol = 100 x LassoConfig.tol: measured
    objective errors stay near 1e-8 relative to glmnet run at tol 1e-14.
    Returns (W [n, A], GEMM column count)."""
    import torch
    A = C.shape[1]
    dev = C.device
    out = torch.empty_like(W0)
    idx = torch.arange(A, device=dev)
    W = W0.clone()
    Z = W0.clone()
    lam = lam.clone()
    thr = (lam * step).unsqueeze(0)
    Thr = thr if pf is None else pf.unsqueeze(1) * thr
    inv_pf = None if pf is None else torch.where(pf > 0, 1.0 / pf.clamp_min(1e-30), 0.0).unsqueeze(1)
    tk = torch.ones(A, dtype=torch.float32, device=dev)
    yy = yy.clone()
    tol_abs = tol * yy
    best_gap = torch.full((A,), math.inf, dtype=torch.float64, device=dev)
    last_gain = torch.zeros(A, dtype=torch.long, device=dev)
    gemms = 0
    it = 0
    while idx.numel() > 0:
        it += 1
        g = torch.addmm(C, G, Z, alpha=-1.0)                # g = c - G z   (the one GEMM)
        gemms += idx.numel()
        # duality gap at z (float32 column sums, combined in float64)
        zg = (Z * g).sum(0).double()
        cz = (Z * C).sum(0).double()
        az = Z.abs()
        l1 = (az if pf is None else az.mul_(pf.unsqueeze(1))).sum(0).double()
        ag = g.abs()
        gmax = (ag if inv_pf is None else ag.mul_(inv_pf)).amax(0).double()
        del az, ag
        lam64 = lam.double()
        s = torch.where(gmax > lam64, lam64 / gmax.clamp_min(1e-300), 1.0)
        rr = (yy - cz - zg).clamp_min(0.0)
        gap = 0.5 * rr * (1.0 - s).square() + lam64 * l1 - s * zg
        # prox-gradient step from z, then the momentum update
        V = torch.add(Z, g, alpha=step)
        del g
        V -= torch.clamp(V, min=-Thr, max=Thr)              # soft threshold: V is the new w
        D = V - W
        Z.sub_(V)
        restart = (Z * D).sum(0) > 0                          # (z - w_new) . (w_new - w) > 0
        tn = (1.0 + torch.sqrt(1.0 + 4.0 * tk * tk)) * 0.5
        beta = torch.where(restart, 0.0, (tk - 1.0) / tn)
        tk = torch.where(restart, 1.0, tn)
        Z = torch.addcmul(V, D, beta.unsqueeze(0))
        W = V
        del D, V
        gain = gap < 0.9 * best_gap
        best_gap = torch.where(gain, gap, best_gap)
        last_gain = torch.where(gain, it, last_gain)
        done = (gap <= tol_abs) | (it - last_gain >= 30)
        if it >= max_iter:
            log.warning("lasso: %d targets did not converge in max_iter=%d steps",
                        int((~done).sum()), max_iter)
            done = torch.ones_like(done)
        if bool(done.any()):
            out[:, idx[done]] = W[:, done]
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            idx, W, Z, C, tk, lam, yy, tol_abs, best_gap, last_gain = (
                idx[keep], W[:, keep], Z[:, keep], C[:, keep], tk[keep], lam[keep], yy[keep],
                tol_abs[keep], best_gap[keep], last_gain[keep])
            Thr = Thr[:, keep]
    return out, gemms


class _TargetBlock:
    """X^T y statistics of a block of targets over a row set (float64 accumulation)."""

    def __init__(self, rows: _Rows, Y, idx, t0, t1, r, gram: _Gram, device):
        import torch
        n, tb = rows.n, t1 - t0
        acc = torch.zeros(n, tb, dtype=torch.float64, device=device)
        ys = torch.zeros(tb, dtype=torch.float64, device=device)
        yss = torch.zeros(tb, dtype=torch.float64, device=device)
        for b in _blocks(idx, r):
            Xb = rows.get(b, torch.float32)
            Yb = _take_y(Y, b, t0, t1, device)
            acc += Xb.T @ Yb
            ys += Yb.sum(0, dtype=torch.float64)
            yss += Yb.double().square().sum(0)
            del Xb, Yb
        m = len(idx)
        self.ybar = ys / m
        self.yy = (yss / m - self.ybar.square()).clamp_min(0.0)
        acc /= m
        acc.addr_(gram.mu, self.ybar, alpha=-1.0)        # centered: X^T y / m - mu ybar
        acc[gram.diag <= 0] = 0.0                         # constant columns: exactly no signal
        self.C = acc.float()
        del acc
        # constant targets (zero variance up to rounding): intercept only
        self.constant = self.yy <= 1e-12 * self.ybar.square()
        self.C[:, self.constant] = 0.0


def _fit_torch(X, packed, n, Y, cfg: LassoConfig, fit_idx, val_idx) -> FitResult:
    import torch
    device = _resolve_device(cfg.device)
    with torch.inference_mode():
        return _fit_torch_impl(X, packed, n, Y, cfg, fit_idx, val_idx, device)


def _fit_torch_impl(X, packed, n, Y, cfg, fit_idx, val_idx, device) -> FitResult:
    import torch
    m, T = X.shape[0], Y.shape[1]
    plan = plan_blocks(m, n, T, len(val_idx), cfg, device)
    log.info("lasso torch: m=%d n=%d T=%d on %s, %d targets x %d rows per block, val cached=%s, "
             "memory bound %.3g GB of budget %.3g GB", m, n, T, device, plan.targets_per_block,
             plan.rows_per_block, plan.cache_val, plan.bytes / 1e9, plan.budget / 1e9)
    rows = _Rows(X, packed, n, device)
    r, tb = plan.rows_per_block, plan.targets_per_block
    ratios = torch.as_tensor(lambda_ratios(cfg.n_lambdas, cfg.lambda_min_ratio), dtype=torch.float64)
    out = FitResult(np.zeros((T, n), np.float32), np.zeros(T, np.float32), np.zeros(T),
                    np.zeros(T), np.zeros(T, np.int64))
    clock = _Clock(device)
    Xv = rows.get(val_idx, torch.float32) if plan.cache_val else None
    gram = _Gram(rows, fit_idx, r, device)
    step = gram.step()
    pf = _penalty_factor(gram, cfg)
    log.info("lasso torch: Gram of %d fit rows and step 1/L in %.2f s", len(fit_idx), clock.lap())
    blocks = [(a, min(T, a + tb)) for a in range(0, T, tb)]
    gemms = 0
    for t0, t1 in _progress(blocks, "lasso path (target blocks)", cfg):
        W, res = _path_block(rows, Y, t0, t1, fit_idx, val_idx, r, gram, step, pf, ratios, cfg,
                             device, Xv)
        gemms += res["gemms"]
        out.weights[t0:t1] = W.T.cpu().numpy()
        out.lam[t0:t1] = res["lam"]
        out.val_mse[t0:t1] = res["val_mse"]
        del W
        log.info("lasso torch: path block %d-%d: %.2f s, %d λ steps, %.1f FISTA steps per "
                 "target and step", t0, t1, clock.lap(), res["steps"],
                 res["gemms"] / max(1, res["target_steps"]))
    # refit on fit + validation rows at the chosen λ, warm started from the path's solution
    gram.pool_with(rows, val_idx, r, Xv)
    del Xv
    step = gram.step()
    pf = _penalty_factor(gram, cfg)
    log.info("lasso torch: Gram of all %d rows and step 1/L in %.2f s", m, clock.lap())
    all_idx = np.sort(np.concatenate([fit_idx, val_idx]))
    for t0, t1 in _progress(blocks, "lasso refit (target blocks)", cfg):
        tgt = _TargetBlock(rows, Y, all_idx, t0, t1, r, gram, device)
        lam = torch.as_tensor(out.lam[t0:t1], dtype=torch.float32, device=device)
        W0 = torch.from_numpy(out.weights[t0:t1].T.copy()).to(device)
        live = lam > 0
        W = torch.zeros_like(W0)
        if bool(live.any()):
            k = live.nonzero().squeeze(1)
            Wk, g = _fista(gram.G, tgt.C[:, k], lam[k], pf, W0[:, k], step, tgt.yy[k],
                           _GAP_PER_TOL * cfg.tol, cfg.max_iter)
            W[:, k] = Wk
            gemms += g
            del Wk
        b = tgt.ybar - W.T.double() @ gram.mu
        out.weights[t0:t1] = W.T.cpu().numpy()
        out.intercept[t0:t1] = b.cpu().numpy()
        del tgt, W, W0
        log.info("lasso torch: refit block %d-%d: %.2f s", t0, t1, clock.lap())
    out.nnz[:] = np.count_nonzero(out.weights, axis=1)
    log.info("lasso torch: done, %d target-GEMM columns, mean nnz %.1f", gemms, out.nnz.mean())
    return out


def lasso_path_torch(X, Y, lambdas, cfg: LassoConfig, n: int | None = None):
    """The torch solver on all rows of X (no split, no early stop) at given λ values.

    lambdas: float [K] (shared) or [K, T] (per target), decreasing along K; warm starts along
    the path as in fit_lasso. Returns (W float32 [K, T, n], b float64 [K, T]). For tests and
    cross-checks."""
    import torch
    packed, n = _input_kind(X, n)
    device = _resolve_device(cfg.device)
    m, T = X.shape[0], Y.shape[1]
    lams = np.asarray(lambdas, np.float64)
    lams = np.repeat(lams[:, None], T, 1) if lams.ndim == 1 else lams
    idx = np.arange(m)
    with torch.inference_mode():
        rows = _Rows(X, packed, n, device)
        r = min(int(cfg.rows_per_block), m)
        gram = _Gram(rows, idx, r, device)
        step, pf = gram.step(), _penalty_factor(gram, cfg)
        tgt = _TargetBlock(rows, Y, idx, 0, T, r, gram, device)
        W = torch.zeros(n, T, dtype=torch.float32, device=device)
        W_prev = W
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.nan_to_num(np.diff(lams, axis=0)[1:] / np.diff(lams, axis=0)[:-1])
        q = np.concatenate([np.zeros((2, T)), q]) if len(lams) > 2 else np.zeros((len(lams), T))
        Ws, bs = [], []
        for k in range(lams.shape[0]):
            lam = torch.as_tensor(lams[k], dtype=torch.float32, device=device)
            W0 = W if k < 2 else _extrapolate(W, W_prev, torch.as_tensor(q[k], dtype=torch.float32, device=device))
            W_prev = W
            W, _ = _fista(gram.G, tgt.C, lam, pf, W0, step, tgt.yy, _GAP_PER_TOL * cfg.tol, cfg.max_iter)
            Ws.append(W.T.cpu().numpy())
            bs.append((tgt.ybar - W.T.double() @ gram.mu).cpu().numpy())
    return np.stack(Ws), np.stack(bs)


class _Clock:
    """Wall-clock laps, synchronizing the device first."""

    def __init__(self, device):
        import time
        self.device, self.time = str(device), time.perf_counter
        self.t = self.time()

    def lap(self) -> float:
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        now = self.time()
        dt, self.t = now - self.t, now
        return dt


def _penalty_factor(gram: _Gram, cfg):
    """None (all ones) or, with standardize, the columns' population standard deviations."""
    if not cfg.standardize:
        return None
    return gram.diag.clamp_min(0.0).sqrt()


def _path_block(rows, Y, t0, t1, fit_idx, val_idx, r, gram, step, pf, ratios, cfg, device, Xv):
    """The λ path for targets [t0, t1) on the fit rows, with validation and early stopping.
    Returns (W at the chosen λ [n, T_b], dict of chosen λ, val MSE, GEMM count)."""
    import torch
    n, tb = rows.n, t1 - t0
    tgt = _TargetBlock(rows, Y, fit_idx, t0, t1, r, gram, device)
    Yv = _take_y(Y, val_idx, t0, t1, device)
    absC = tgt.C.abs()
    if pf is not None:
        absC = torch.where(pf.unsqueeze(1) > 0, absC / pf.clamp_min(1e-30).unsqueeze(1), 0.0)
    lmax = absC.amax(0).double()
    del absC
    W = torch.zeros(n, tb, dtype=torch.float32, device=device)
    W_prev = torch.zeros_like(W)         # the path's previous point, for extrapolated warm starts
    W_best = torch.zeros_like(W)
    best_k = torch.zeros(tb, dtype=torch.long, device=device)
    stopped = lmax <= 0                  # constant targets: intercept only, λ = 0
    best_mse = _val_mse(W, tgt, gram, Yv, Xv, rows, val_idx, r, torch.arange(tb, device=device))
    chosen_lam = lmax.clone()
    gemms = 0
    K = len(ratios)
    patience = cfg.early_stop_patience
    steps = target_steps = 0
    for k in range(1, K):
        act = (~stopped).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        steps += 1
        target_steps += act.numel()
        lam = (lmax[act] * float(ratios[k])).float()
        Wa = W[:, act]
        q = float((ratios[k] - ratios[k - 1]) / (ratios[k - 1] - ratios[k - 2])) if k >= 2 else 0.0
        W0 = _extrapolate(Wa, W_prev[:, act], q)
        Wk, g = _fista(gram.G, tgt.C[:, act], lam, pf, W0, step, tgt.yy[act],
                       _GAP_PER_TOL * cfg.tol, cfg.max_iter)
        del W0
        gemms += g
        W_prev[:, act] = Wa
        W[:, act] = Wk
        del Wa
        mse = _val_mse(Wk, tgt, gram, Yv, Xv, rows, val_idx, r, act)
        better = mse < best_mse[act]
        imp = act[better]
        best_mse[imp] = mse[better]
        best_k[imp] = k
        chosen_lam[imp] = lmax[imp] * float(ratios[k])
        W_best[:, imp] = Wk[:, better]
        if patience > 0:
            stopped[act] = (k - best_k[act]) >= patience
        del Wk
    chosen_lam[lmax <= 0] = 0.0
    del W, W_prev, Yv, tgt
    return W_best, {"lam": chosen_lam.cpu().numpy(), "val_mse": best_mse.cpu().numpy(), "gemms": gemms,
                    "steps": steps, "target_steps": target_steps}


def _extrapolate(W, W_prev, q):
    """Warm start for the next λ: the lasso path is piecewise linear in λ, so within a piece
    w(λ_k) = w_{k-1} + q (w_{k-1} - w_{k-2}), q = (λ_k - λ_{k-1}) / (λ_{k-1} - λ_{k-2});
    q is one float for all columns or a tensor [T] of one per column."""
    if isinstance(q, float) and q == 0.0:
        return W.clone()
    return W.lerp(W_prev, -q)


def _val_mse(W, tgt: _TargetBlock, gram: _Gram, Yv, Xv, rows, val_idx, r, cols):
    """Validation MSE (float64 [A]) of the fit-rows model (W [n, A], b = ybar - mu^T W) for the
    block's targets `cols`."""
    import torch
    b = (tgt.ybar[cols] - W.T.double() @ gram.mu).float()
    sse = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
    if Xv is not None:
        P = torch.addmm(b.unsqueeze(0) - Yv[:, cols], Xv, W)
        sse += P.square().sum(0, dtype=torch.float64)
    else:
        for a in range(0, len(val_idx), r):
            Xb = rows.get(val_idx[a:a + r], torch.float32)
            P = torch.addmm(b.unsqueeze(0) - Yv[a:a + r][:, cols], Xb, W)
            sse += P.square().sum(0, dtype=torch.float64)
            del Xb, P
    return sse / len(val_idx)


def make_planted(m: int, n: int, T: int, *, alpha: float = 0.5, k: int = 20, snr: float = 1.0,
                 seed: int = 0, device="cpu", row_block: int = 4096):
    """Synthetic datamodel problem, generated on `device` (torch), for tests and benchmarks.

    Masks: m exact-size alpha-subsets of n (each row has round(alpha n) ones), returned
    bit-packed uint8 [m, ceil(n/8)] (little bit order). Weights: k nonzeros per target,
    N(0, 1) rounded to bf16 (so X @ w is exact in any precision), at random positions.
    Margins: Y = X W + 1 + noise, noise std = (std of X W over rows) / sqrt(snr), float32 [m, T].
    Returns (packed, Y, W_true float32 [n, T])."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    ones = int(round(alpha * n))
    Wt = torch.zeros(n, T, dtype=torch.float32, device=device)
    for a in range(0, T, 1024):
        e = min(T, a + 1024)
        pos = torch.rand(n, e - a, generator=gen, device=device).topk(k, dim=0).indices
        vals = torch.randn(k, e - a, generator=gen, device=device).bfloat16().float()
        Wt[:, a:e].scatter_(0, pos, vals)
    sig_sd = float(math.sqrt(alpha * (1 - alpha)))       # per-row std of x^T w over masks, per unit ||w||
    noise_sd = (Wt.norm(dim=0) * sig_sd / math.sqrt(snr)).unsqueeze(0)
    nb = (n + 7) // 8
    packed = torch.empty(m, nb, dtype=torch.uint8, device=device)
    Y = torch.empty(m, T, dtype=torch.float32, device=device)
    weights = (2 ** torch.arange(8, device=device, dtype=torch.int32))
    Wb = Wt.bfloat16() if str(device).startswith("cuda") else Wt
    for a in range(0, m, row_block):
        e = min(m, a + row_block)
        keys = torch.rand(e - a, n, generator=gen, device=device)
        Xb = torch.zeros(e - a, n, dtype=torch.bool, device=device)
        Xb.scatter_(1, keys.topk(ones, dim=1).indices, True)
        del keys
        pad = torch.zeros(e - a, nb * 8, dtype=torch.int32, device=device)
        pad[:, :n] = Xb
        packed[a:e] = (pad.view(e - a, nb, 8) * weights).sum(-1).to(torch.uint8)
        del pad
        Y[a:e] = _mm_f32(Xb.to(Wb.dtype), Wb) + 1.0
        Y[a:e] += torch.randn(e - a, T, generator=gen, device=device) * noise_sd
        del Xb
    return packed, Y, Wt
