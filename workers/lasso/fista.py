"""The torch backend ("torch"): FISTA on the shared centered Gram matrix, blocks of targets at
once, CPU or GPU; the λ path per target block with validation and early stopping, and the refit.

With G, mu and c_t of workers.lasso.gram and b_t = ybar_t - mu^T w_t, the objective is
(1/2) w^T G w - c_t^T w + (1/2) var(y_t) + lam ||pf * w||_1: every target shares G. Why this
algorithm:
  * Gram space: one iteration costs 2 n^2 T_b flops, independent of m; iterating in data space
    (X z, then X^T r) costs 4 m n T_b, so the Gram wins whenever m > n/2 (datamodels use m ~ n
    to 6n), after a one-off 2 m n^2 for the Gram.
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
    (select_lambda's rule, applied step by step).
  * Debiasing (LassoConfig.debias, workers.lasso.debias): at the chosen λ, least squares on the
    support from the same Gram; "relaxed" picks each target's blend phi on the validation rows
    with the fit rows' solutions, then blends the refit's solutions on all rows with that phi.
  Precision: iterations in float32; intercepts and validation MSE sums in float64.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.devices import is_cuda, resolve_device
from workers.lasso.debias import blend, support_refit
from workers.lasso.gram import Gram, Rows, TargetStats, plan_blocks, take_y
from workers.lasso.problem import (
    FitResult,
    LassoConfig,
    debias_phis,
    lambda_max_of,
    lambda_ratios,
    mask_format,
    progress,
    select_phi,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("workers.lasso")   # the package's one logger, as before the split

GAP_PER_TOL = 100.0  # a target stops at duality gap <= 100 tol var(y) (see fista)


def step_size(G: torch.Tensor) -> float:
    """1 / (1.02 L), L the largest eigenvalue of G (Lanczos, full reorthogonalization)."""
    L = top_eigenvalue(G)
    return 1.0 / (1.02 * L) if L > 0 else 1.0


def top_eigenvalue(G: torch.Tensor, iters: int = 40) -> float:
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


def fista(G: torch.Tensor, C: torch.Tensor, lam: torch.Tensor, pf: torch.Tensor | None, W0: torch.Tensor,
          step: float, yy: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, int]:
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


def extrapolate(W: torch.Tensor, W_prev: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """Warm start for the next λ: the lasso path is piecewise linear in λ, so within a piece
    w(λ_k) = w_{k-1} + q (w_{k-1} - w_{k-2}), q = (λ_k - λ_{k-1}) / (λ_{k-1} - λ_{k-2});
    q is one float for all columns or a tensor [T] of one per column."""
    if isinstance(q, float) and q == 0.0:
        return W.clone()
    return W.lerp(W_prev, -q)


def extrapolation_factors(lams: np.ndarray) -> np.ndarray:
    """extrapolate's q_k for a path lams [K] or [K, T] decreasing along K: 0 for k < 2 (no two
    earlier points) and where λ repeats, float64 of lams' shape."""
    q = np.zeros(np.shape(lams))
    if len(lams) > 2:
        d = np.diff(lams, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            q[2:] = np.nan_to_num(d[1:] / d[:-1])
    return q


@dataclass
class Solver:
    """What FISTA needs of one row set besides the targets: its Gram matrix, the step 1/L, the
    penalty weights (None: all ones) and the stopping rule."""
    gram: Gram
    step: float
    pf: torch.Tensor | None
    tol: float            # duality gap per var(y): GAP_PER_TOL x LassoConfig.tol
    max_iter: int

    @classmethod
    def of(cls, gram: Gram, cfg: LassoConfig) -> Solver:
        return cls(gram, step_size(gram.G), gram.penalty_factor(cfg.standardize), GAP_PER_TOL * cfg.tol,
                   cfg.max_iter)

    def solve(self, tgt: TargetStats, lam: torch.Tensor, W0: torch.Tensor,
              cols: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """fista for the targets `cols` of tgt (default: all) at λ = lam [A] from W0 [n, A]."""
        C, yy = (tgt.C, tgt.yy) if cols is None else (tgt.C[:, cols], tgt.yy[cols])
        return fista(self.gram.G, C, lam, self.pf, W0, self.step, yy, self.tol, self.max_iter)


@dataclass
class PathResult:
    """A target block's λ path: the chosen λ (0: intercept only), the debias blend phi (1:
    the lasso) and the validation MSE at both per target [T_b], with the work done (FISTA GEMM
    columns, λ steps, target-steps)."""
    lam: np.ndarray
    val_mse: np.ndarray
    gemms: int
    steps: int
    target_steps: int
    phi: np.ndarray


@dataclass
class BlockPath:
    """The λ path on the fit rows, shared by every target block: the masks and margins, the
    fit/validation rows (streamed r at a time, or the validation rows cached unpacked as Xv),
    the fit rows' Solver, the λ ratios, the early-stopping patience and the debias candidates
    phi (problem.debias_phis; None: no debiasing)."""
    rows: Rows
    Y: Any
    fit_idx: np.ndarray
    val_idx: np.ndarray
    r: int
    solver: Solver
    ratios: np.ndarray
    patience: int
    Xv: torch.Tensor | None
    phis: tuple[float, ...] | None = None

    def fit(self, t0: int, t1: int) -> tuple[torch.Tensor, PathResult]:
        """The path for targets [t0, t1) with validation and early stopping: (W at the chosen λ
        [n, T_b], PathResult)."""
        import torch
        n, tb, device = self.rows.n, t1 - t0, self.rows.device
        tgt = TargetStats(self.rows, self.Y, self.fit_idx, t0, t1, self.r, self.solver.gram)
        Yv = take_y(self.Y, self.val_idx, t0, t1, device)
        lmax = lambda_max_of(tgt.C, self.solver.pf).double()
        q = extrapolation_factors(self.ratios)
        W = torch.zeros(n, tb, dtype=torch.float32, device=device)
        W_prev = torch.zeros_like(W)         # the path's previous point, for extrapolated warm starts
        W_best = torch.zeros_like(W)
        best_k = torch.zeros(tb, dtype=torch.long, device=device)
        stopped = lmax <= 0                  # constant targets: intercept only, λ = 0
        best_mse = self.val_mse(W, tgt, Yv, torch.arange(tb, device=device))
        chosen_lam = lmax.clone()
        gemms = steps = target_steps = 0
        for k in range(1, len(self.ratios)):
            act = (~stopped).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            steps += 1
            target_steps += act.numel()
            lam = (lmax[act] * float(self.ratios[k])).float()
            Wa = W[:, act]
            W0 = extrapolate(Wa, W_prev[:, act], float(q[k]))
            Wk, g = self.solver.solve(tgt, lam, W0, act)
            del W0
            gemms += g
            W_prev[:, act] = Wa
            W[:, act] = Wk
            del Wa
            mse = self.val_mse(Wk, tgt, Yv, act)
            better = mse < best_mse[act]
            imp = act[better]
            best_mse[imp] = mse[better]
            best_k[imp] = k
            chosen_lam[imp] = lmax[imp] * float(self.ratios[k])
            W_best[:, imp] = Wk[:, better]
            if self.patience > 0:
                stopped[act] = (k - best_k[act]) >= self.patience
            del Wk
        chosen_lam[lmax <= 0] = 0.0
        del W, W_prev
        phi = np.ones(tb)
        if self.phis is not None:
            phi, best_mse = self.debias(W_best, best_mse, tgt, Yv, self.phis)
        del Yv, tgt
        return W_best, PathResult(chosen_lam.cpu().numpy(), best_mse.cpu().numpy(), gemms, steps,
                                  target_steps, phi)

    def debias(self, W: torch.Tensor, mse_lasso: torch.Tensor, tgt: TargetStats, Yv: torch.Tensor,
               phis: tuple[float, ...]) -> tuple[np.ndarray, torch.Tensor]:
        """The phi of `phis` whose blend of the fit rows' lasso W [n, T_b] (validation MSE
        mse_lasso) with its support refit has the least validation MSE, per target: (phi [T_b],
        that MSE [T_b]). W, the refit's warm start, is left as it is."""
        import torch
        A, dev = W.shape[1], W.device
        V = support_refit(self.solver.gram.G, tgt.C, W)
        cols = torch.arange(A, device=dev)
        mse = torch.stack([mse_lasso if p == 1.0 else
                           self.val_mse(blend(W, V, torch.full((A,), p, dtype=torch.float64, device=dev)),
                                        tgt, Yv, cols)
                           for p in phis])
        del V
        pick = select_phi(mse.cpu().numpy())
        return np.asarray(phis, np.float64)[pick], mse[torch.as_tensor(pick, device=dev), cols]

    def val_mse(self, W: torch.Tensor, tgt: TargetStats, Yv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Validation MSE (float64 [A]) of the fit-rows model (W [n, A], b = ybar - mu^T W) for
        the block's targets `cols`."""
        import torch
        b = tgt.intercepts(W, self.solver.gram, cols).float()
        sse = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
        if self.Xv is not None:
            P = torch.addmm(b.unsqueeze(0) - Yv[:, cols], self.Xv, W)
            sse += P.square().sum(0, dtype=torch.float64)
        else:
            for a in range(0, len(self.val_idx), self.r):
                Xb = self.rows.get(self.val_idx[a:a + self.r], torch.float32)
                P = torch.addmm(b.unsqueeze(0) - Yv[a:a + self.r][:, cols], Xb, W)
                sse += P.square().sum(0, dtype=torch.float64)
                del Xb, P
        return sse / len(self.val_idx)


@dataclass
class Refit:
    """The refit at the chosen λ on all rows (idx), warm started from the path's solution, and
    debiased if `debias` (blended with its support refit at the path's phi)."""
    rows: Rows
    Y: Any
    idx: np.ndarray
    r: int
    solver: Solver
    debias: bool = False

    def fit(self, t0: int, t1: int, lam: np.ndarray, W0: np.ndarray, phi: np.ndarray | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Targets [t0, t1) at λ = lam [T_b] (0: intercept only) from W0 [T_b, n], blended at
        phi [T_b] if debiasing: (W [n, T_b], b float64 [T_b], GEMM columns)."""
        import torch
        device = self.rows.device
        tgt = TargetStats(self.rows, self.Y, self.idx, t0, t1, self.r, self.solver.gram)
        lam_t = torch.as_tensor(lam, dtype=torch.float32, device=device)
        W0_t = torch.from_numpy(W0.T.copy()).to(device)
        live = lam_t > 0
        W = torch.zeros_like(W0_t)
        gemms = 0
        if bool(live.any()):
            k = live.nonzero().squeeze(1)
            Wk, gemms = self.solver.solve(tgt, lam_t[k], W0_t[:, k], k)
            W[:, k] = Wk
            del Wk
        if self.debias and phi is not None:
            V = support_refit(self.solver.gram.G, tgt.C, W)
            W = blend(W, V, torch.as_tensor(phi, device=device))
            del V
        b = tgt.intercepts(W, self.solver.gram)
        del tgt, W0_t
        return W, b, gemms


def fit_torch(X: Any, packed: bool, n: int, Y: Any, cfg: LassoConfig, fit_idx: np.ndarray,
              val_idx: np.ndarray) -> FitResult:
    """fit_lasso's torch backend: the λ path of each target block on the fit rows, then the
    refit of each block on all rows at the chosen λ."""
    import torch
    device = resolve_device(cfg.device)
    with torch.inference_mode():
        m, T = X.shape[0], Y.shape[1]
        plan = plan_blocks(m, n, T, len(val_idx), cfg, device)
        log.info("lasso torch: m=%d n=%d T=%d on %s, %d targets x %d rows per block, val cached=%s, "
                 "memory bound %.3g GB of budget %.3g GB", m, n, T, device, plan.targets_per_block,
                 plan.rows_per_block, plan.cache_val, plan.bytes / 1e9, plan.budget / 1e9)
        rows = Rows(X, packed, n, device)
        r, tb = plan.rows_per_block, plan.targets_per_block
        blocks = [(a, min(T, a + tb)) for a in range(0, T, tb)]
        out = FitResult.zeros(T, n)
        clock = _Clock(device)
        Xv = rows.get(val_idx, torch.float32) if plan.cache_val else None
        gram = Gram(rows, fit_idx, r)
        phis = debias_phis(cfg)
        path = BlockPath(rows, Y, fit_idx, val_idx, r, Solver.of(gram, cfg),
                         lambda_ratios(cfg.n_lambdas, cfg.lambda_min_ratio), cfg.early_stop_patience, Xv,
                         phis)
        log.info("lasso torch: Gram of %d fit rows and step 1/L in %.2f s", len(fit_idx), clock.lap())
        gemms = 0
        for t0, t1 in progress(blocks, "lasso path (target blocks)"):
            W, res = path.fit(t0, t1)
            gemms += res.gemms
            out.weights[t0:t1] = W.T.cpu().numpy()
            out.lam[t0:t1] = res.lam
            out.val_mse[t0:t1] = res.val_mse
            out.phi[t0:t1] = res.phi
            del W
            log.info("lasso torch: path block %d-%d: %.2f s, %d λ steps, %.1f FISTA steps per "
                     "target and step", t0, t1, clock.lap(), res.steps, res.gemms / max(1, res.target_steps))
        # refit on fit + validation rows at the chosen λ, warm started from the path's solution
        gram.pool_with(rows, val_idx, r, Xv)
        del path, Xv                         # the cached validation rows
        refit = Refit(rows, Y, np.sort(np.concatenate([fit_idx, val_idx])), r, Solver.of(gram, cfg),
                      phis is not None)
        log.info("lasso torch: Gram of all %d rows and step 1/L in %.2f s", m, clock.lap())
        for t0, t1 in progress(blocks, "lasso refit (target blocks)"):
            W, b, g = refit.fit(t0, t1, out.lam[t0:t1], out.weights[t0:t1], out.phi[t0:t1])
            gemms += g
            out.weights[t0:t1] = W.T.cpu().numpy()
            out.intercept[t0:t1] = b.cpu().numpy()
            del W, b
            log.info("lasso torch: refit block %d-%d: %.2f s", t0, t1, clock.lap())
    out.nnz[:] = np.count_nonzero(out.weights, axis=1)
    log.info("lasso torch: done, %d target-GEMM columns, mean nnz %.1f", gemms, out.nnz.mean())
    return out


def lasso_path_torch(X: Any, Y: Any, lambdas: np.ndarray, cfg: LassoConfig, n: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The torch solver on all rows of X (no split, no early stop) at given λ values.

    lambdas: float [K] (shared) or [K, T] (per target), decreasing along K; warm starts along
    the path as in fit_lasso. Returns (W float32 [K, T, n], b float64 [K, T]). For tests and
    cross-checks."""
    import torch
    packed, n = mask_format(X, n)
    device = resolve_device(cfg.device)
    m, T = X.shape[0], Y.shape[1]
    lams = np.asarray(lambdas, np.float64)
    lams = np.repeat(lams[:, None], T, 1) if lams.ndim == 1 else lams
    idx = np.arange(m)
    with torch.inference_mode():
        rows = Rows(X, packed, n, device)
        r = min(int(cfg.rows_per_block), m)
        solver = Solver.of(Gram(rows, idx, r), cfg)
        tgt = TargetStats(rows, Y, idx, 0, T, r, solver.gram)
        W = torch.zeros(n, T, dtype=torch.float32, device=device)
        W_prev = W
        q = extrapolation_factors(lams)
        Ws, bs = [], []
        for k in range(lams.shape[0]):
            lam = torch.as_tensor(lams[k], dtype=torch.float32, device=device)
            W0 = W if k < 2 else extrapolate(W, W_prev, torch.as_tensor(q[k], dtype=torch.float32, device=device))
            W_prev = W
            W, _ = solver.solve(tgt, lam, W0)
            Ws.append(W.T.cpu().numpy())
            bs.append(tgt.intercepts(W, solver.gram).cpu().numpy())
    return np.stack(Ws), np.stack(bs)


class _Clock:
    """Wall-clock laps, synchronizing the device first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t = time.perf_counter()

    def lap(self) -> float:
        import torch
        if is_cuda(self.device):
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
