"""Influence functions (Koh & Liang, ICML 2017) with three inverse-Hessian paths: the
exact Hessian (small models, or the last layer), conjugate gradient and LiSSA (Agarwal et
al. 2017) on Hessian-vector products for networks.

Training objective R(θ) = (1/n) Σ_i L(z_i; θ) + (l2/2)‖θ‖², L = cross-entropy, n = len(x_train).
Upweighting z_i by ε moves the optimum by dθ/dε = −H⁻¹∇L(z_i) (H = ∇²R, l2·I included), and
removing z_i is ε = −1/n, so f(z_t) changes by ≈ +(1/n) ∇f(z_t)ᵀ H⁻¹ ∇L(z_i). Including
z_i therefore contributes the negative of that, and with the package's sign convention
(score > 0: including i increases the target's margin)

    score[i, t] = −(1/n) ∇_θ f(z_t)ᵀ (H + damping·I)⁻¹ ∇_θ L(z_i),   f = margin.

H is the exact Hessian of the mean loss + l2·I (params.hessian="exact"; indefinite for a
network away from a minimum, so damping is needed there) or its Gauss-Newton part
(params.hessian="ggn", always PSD; identical for logistic regression and the last layer).
It is computed on x_train (or a seeded subsample of params.hessian_samples rows), not on the
α-subset the checkpoint was trained on; scores are averaged over the checkpoints given.

For the GGN of h rows and C outputs, if_cg by default (params.inverse="auto") skips CG: with
G = AᵀA, A [hC, P], Woodbury gives (G + sI)⁻¹ = (I − Aᵀ(AAᵀ + sI)⁻¹A)/s, so one Cholesky
factor of the [hC, hC] matrix serves every target, and each target costs inner products of
its gradient with A's hC rows and the n train gradients (GGNFactor, woodbury_scores): from
factored gradients when every selected layer is affine (an MLP), else by Jacobian-vector
products. It is the operator CG solves, solved exactly. CG stays for the exact Hessian, for
h·C > params.factor_max_rows, and for params.inverse="cg".
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vjp, vmap

from .common import (
    FunctionalModel,
    batches,
    factor_dots,
    forward_all,
    linear_factors,
    load_checkpoint,
    output_fn,
    per_example_grads,
    progress,
    resolve_dtype,
    resolve_params,
    stacked_grads,
    to_numpy_scores,
)

log = logging.getLogger(__name__)
Tensor = torch.Tensor

_BASE = {"layer": "all", "l2": 0.0, "damping": 0.0, "hessian": "exact", "hessian_samples": None}
DEFAULTS = {
    "exact": {**_BASE, "dtype": "float64", "max_params": 20_000},
    # inverse: "auto" (the Woodbury factor for hessian="ggn" when h·C <= factor_max_rows, else
    # CG), "cg" or "woodbury"; target_chunk: targets per CG block solve or per factor product
    "cg": {**_BASE, "damping": 1e-3, "cg_iters": 100, "cg_tol": 1e-6, "target_chunk": 64,
           "inverse": "auto", "factor_max_rows": 8192},
    "lissa": {**_BASE, "damping": 1e-3, "lissa_depth": 1000, "lissa_scale": None,
              "lissa_batch": 256, "lissa_repeats": 1, "target_chunk": 64},
}


# --------------------------------------------------------------------------- Hessian

def _batch_loss(fm: FunctionalModel, flat: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
    """Σ_j L(z_j; θ) over a batch, as a function of the flat selected parameters."""
    return F.cross_entropy(fm.logits(fm.unflatten(flat), xb), yb, reduction="sum")


class HessianOperator:
    """V [r, P] ↦ V (H_L + shift·I), H_L = (1/m) Σ_j ∇²_θ L(z_j; θ) over the m rows of (x, y).

    kind="exact": the true Hessian, by forward-over-reverse products (jvp of grad).
    kind="ggn": the Gauss-Newton matrix (1/m) Σ_j J_jᵀ (diag p_j − p_j p_jᵀ) J_j, J_j the
    Jacobian of z_j's logits; positive semi-definite, and equal to the Hessian when the
    logits are linear in θ (logistic regression, params.layer="last").
    Both vmapped over the r vectors.
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, y: Tensor, shift: float,
                 batch_size: int, kind: str = "exact"):
        if kind not in ("exact", "ggn"):
            raise ValueError(f"influence: params.hessian={kind!r} is not 'exact' or 'ggn'")
        self.fm, self.x, self.y, self.shift, self.batch_size = fm, x, y, shift, batch_size
        self.theta0 = theta0 = fm.theta_flat()

        if kind == "exact":
            g = grad(partial(_batch_loss, fm))

            def hvp_one(v, xb, yb):
                return jvp(lambda t: g(t, xb, yb), (theta0,), (v,))[1]
        else:
            def hvp_one(v, xb, yb):
                def logits(t):
                    return fm.logits(fm.unflatten(t), xb)
                z, Jv = jvp(logits, (theta0,), (v,))
                p = torch.softmax(z, -1)
                HJv = p * Jv - p * (p * Jv).sum(-1, keepdim=True)
                return vjp(logits, theta0)[1](HJv)[0]

        self._hvp = vmap(hvp_one, in_dims=(0, None, None))

    def batch_hvp(self, V: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        """Σ_j ∇²L(z_j) v over one batch of rows (no mean, no shift)."""
        xb, yb = self.fm.prep(xb, yb)
        return self._hvp(V, xb, yb).detach()

    def __call__(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for rows in batches(len(self.x), self.batch_size):
            out += self.batch_hvp(V, self.x[rows], self.y[rows])
        return out / len(self.x) + self.shift * V

    def matrix(self, dtype: torch.dtype, chunk: int = 256) -> Tensor:
        """H_L + shift·I as a dense [P, P] matrix in `dtype`, symmetrized."""
        P = self.theta0.numel()
        eye = torch.eye(P, dtype=self.theta0.dtype, device=self.theta0.device)
        H = torch.cat([self(eye[r]).to(dtype)
                       for r in progress(batches(P, chunk), "hessian", total=-(-P // chunk))])
        return (H + H.T) / 2


# --------------------------------------------------------------------------- Woodbury factor

class GGNFactor:
    """The GGN of the h rows of (x, y) as G = AᵀA, and one Cholesky factor of AAᵀ + shift·I.

    A [hC, P] is the Jacobian of u(θ) = (u_1, …, u_h), u_j = (1/√h) S_jᵀ z_j(θ) with z_j the
    logits of row j and S_j = diag(√p_j) − p_j √p_jᵀ at the checkpoint (held fixed), so that
    S_j S_jᵀ = diag p_j − p_j p_jᵀ (the softmax Hessian of the cross-entropy) and AᵀA is
    HessianOperator(kind="ggn")'s matrix. A is never stored as [hC, P]: `fa` holds its rows in
    factored form (common.linear_factors) when the model allows, and AAᵀ is their inner
    products; else `project` applies A by Jacobian-vector products of u (one forward pass with
    tangents per vector) and AAᵀ is `project` of A's rows, a block of rows' Jacobians at a
    time. The Cholesky factor is float64; shift = l2 + damping must be > 0 (AᵀA has rank
    ≤ h(C − 1)).
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, y: Tensor, shift: float, batch_size: int):
        if not shift > 0:
            raise ValueError("if_cg: the GGN is singular, so params.l2 + params.damping must be > 0 "
                             "for params.inverse='woodbury'; raise params.damping")
        self.fm, self.shift, self.batch_size = fm, shift, batch_size
        self.x = x.to(fm.device, fm.dtype)
        self.theta0 = theta0 = fm.theta_flat()
        logits, _ = forward_all(fm, self.x, batch_size)
        self.p = torch.softmax(logits, -1).detach()
        self.h, self.C = self.p.shape

        def u(t: Tensor, xb: Tensor, pb: Tensor) -> Tensor:      # [B, C]
            return self._mix(fm.logits(fm.unflatten(t), xb), pb)

        def u_jvp(v, xb, pb):
            return jvp(lambda t: u(t, xb, pb), (theta0,), (v,))[1]

        def u_one(t, xi, pi):
            return u(t, xi.unsqueeze(0), pi.unsqueeze(0)).squeeze(0)
        self._jvp = vmap(u_jvp, in_dims=(0, None, None))                    # [r, B, C]
        self._jac = vmap(jacrev(u_one), in_dims=(None, 0, 0))               # [B, C, P]
        # A's rows in factored form when the model's selected layers are all affine
        self.fa = linear_factors(fm, self.x, lambda z, rows: self._mix(z, self.p[rows]), batch_size)
        if self.fa is not None:
            M = factor_dots(self.fa, self.fa).double()
            M = (M + M.T) / 2
        else:
            M = self.gram()
        M.diagonal().add_(shift)
        self.L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            raise ValueError(f"if_cg: AAᵀ + {shift:g}·I ({len(M)}x{len(M)}) is not positive definite; "
                             f"raise params.damping or use params.inverse='cg'")

    def _mix(self, z: Tensor, pb: Tensor) -> Tensor:
        """u of the rows whose logits are z [B, C] and probabilities pb: (1/√h) S_jᵀ z_j."""
        return pb.sqrt() * (z - (pb * z).sum(-1, keepdim=True)) / math.sqrt(self.h)

    def project(self, V: Tensor) -> Tensor:
        """V [r, P] ↦ V Aᵀ [r, hC] (model dtype), columns ordered (row j, class c)."""
        return torch.cat([self._jvp(V, self.x[rows], self.p[rows]).detach().reshape(len(V), -1)
                          for rows in batches(self.h, self.batch_size)], 1)

    def gram(self) -> Tensor:
        """AAᵀ [hC, hC] in float64, symmetrized: `project` of A's rows, ⌊batch_size/C⌋ rows'
        Jacobians at a time."""
        k = max(1, self.batch_size // self.C)
        blocks = []
        for rows in progress(batches(self.h, k), "ggn factor", total=-(-self.h // k)):
            A_rows = self._jac(self.theta0, self.x[rows], self.p[rows]).detach()
            blocks.append(self.project(A_rows.reshape(-1, A_rows.shape[-1])).double())
        M = torch.cat(blocks)
        return (M + M.T) / 2

    def solve_projected(self, V: Tensor) -> Tensor:
        """(AAᵀ + shift·I)⁻¹ A Vᵀ [hC, r] in float64, for V [r, P]."""
        return torch.cholesky_solve(self.project(V).double().T, self.L)


INVERSES = ("auto", "cg", "woodbury")


def use_factor(p: dict, fm: FunctionalModel, xh: Tensor) -> bool:
    """Whether if_cg solves by GGNFactor (Woodbury) rather than CG on the Hessian rows xh:
    params.inverse="woodbury", or "auto" with hessian="ggn" and h·C <= factor_max_rows."""
    if p["inverse"] == "cg":
        return False
    if p["hessian"] != "ggn":
        if p["inverse"] == "woodbury":
            raise ValueError("if_cg: params.inverse='woodbury' factorises the GGN only; set "
                             "params.hessian='ggn' or params.inverse='cg'")
        return False
    C = fm.logits(fm.theta(), xh[:1].to(fm.device, fm.dtype)).shape[1]
    if p["inverse"] == "auto" and len(xh) * C > int(p["factor_max_rows"]):
        log.info("if_cg: the GGN factor would be %dx%d (> params.factor_max_rows=%d): CG instead",
                 len(xh) * C, len(xh) * C, int(p["factor_max_rows"]))
        return False
    return True


# --------------------------------------------------------------------------- solvers

def conjugate_gradient(A, B: Tensor, iters: int, tol: float) -> Tensor:
    """Solves X A = B row by row ([r, P]) for a symmetric positive definite operator A by
    conjugate gradient; each row stops when ‖residual‖ ≤ tol·‖b‖."""
    X = torch.zeros_like(B)
    R = B.clone()
    D = R.clone()
    rs = (R * R).sum(1)
    stop = tol ** 2 * rs
    active = rs > stop
    for it in range(iters):  # noqa: B007 (`it` is logged after the loop)
        if not bool(active.any()):
            break
        AD = A(D)
        curv = (D * AD).sum(1)
        if bool((curv[active] <= 0).any()):
            raise ValueError("influence CG: H + damping·I is not positive definite along a search "
                             "direction; raise params.damping or use params.hessian='ggn'")
        alpha = torch.where(active, rs / torch.where(active, curv, torch.ones_like(curv)),
                            torch.zeros_like(rs))
        X += alpha[:, None] * D
        R -= alpha[:, None] * AD
        rs_new = (R * R).sum(1)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        D = R + beta[:, None] * D
        rs = rs_new
        active = rs > stop
    rel = (rs / (B * B).sum(1).clamp_min(1e-300)).sqrt()
    log.info("CG: %d iterations, max relative residual %.2e", it + 1, float(rel.max()))
    if float(rel.max()) > max(tol, 1e-3):
        log.warning("CG stopped at %d iterations with relative residual %.2e > tol %.1e; "
                    "raise params.cg_iters or params.damping", iters, float(rel.max()), tol)
    return X


def top_eigenvalue(A, P: int, iters: int, device, dtype, seed: int) -> float:
    """Largest eigenvalue of a symmetric PSD operator by power iteration."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(1, P, generator=gen, dtype=torch.float64).to(device, dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = A(v)
        lam = float((w * v).sum())
        v = w / w.norm().clamp_min(1e-30)
    return lam


def lissa(op: HessianOperator, B: Tensor, depth: int, scale: float, batch: int | None,
          repeats: int, seed: int) -> Tensor:
    """LiSSA estimate of B (H + shift·I)⁻¹, rows of B [r, P].

    Recursion X_j = B + X_{j−1} − X_{j−1}(H_j + shift·I)/scale, X_0 = B, with H_j the
    Hessian of a minibatch of `batch` rows drawn with replacement (all rows if None: exact
    but a full pass per step; params.lissa_batch defaults to 256); its
    fixed point is X = scale·B (H + shift·I)⁻¹, so the estimate is X_depth / scale, averaged
    over `repeats` runs. Converges when scale > λ_max(H_j + shift·I) / 2.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(op.x)
    total = torch.zeros_like(B)
    for r in range(repeats):
        X = B.clone()
        for j in progress(range(depth), f"lissa {r + 1}/{repeats}"):
            if batch is None:
                HX = op(X)
            else:
                idx = torch.randint(0, n, (batch,), generator=gen)
                HX = op.batch_hvp(X, op.x[idx], op.y[idx]) / batch + op.shift * X
            X = B + X - HX / scale
            if not bool(torch.isfinite(X).all()):
                raise ValueError(f"influence LiSSA diverged at step {j}; raise params.lissa_scale "
                                 f"(now {scale:.3g}) or params.damping")
        total += X / scale
    return total / repeats


# --------------------------------------------------------------------------- scores

def _subsample(x: Tensor, y: Tensor, m: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if m is None or m >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:m]
    return x[idx], y[idx]


def inverse_hvp(solver: str, fm: FunctionalModel, Gt: Tensor, xh: Tensor, yh: Tensor,
                p: dict) -> Tensor:
    """Rows of Gt [T, P] times (H + (l2 + damping)·I)⁻¹, by `solver`."""
    shift = float(p["l2"]) + float(p["damping"])
    op = HessianOperator(fm, xh, yh, shift, p["batch_size"], p["hessian"])
    if solver == "exact":
        P = fm.num_params
        if P > p["max_params"]:
            raise ValueError(f"if_exact: {P} parameters need a {P}x{P} Hessian; use "
                             f"params.layer='last' or method if_cg, or raise params.max_params")
        H = op.matrix(resolve_dtype(p["dtype"], "if_exact"))
        return torch.linalg.solve(H, Gt.to(H.dtype).T).T.to(Gt.dtype)
    chunk = int(p["target_chunk"])
    if solver == "cg":
        return torch.cat([conjugate_gradient(op, Gt[r], int(p["cg_iters"]), float(p["cg_tol"]))
                          for r in batches(len(Gt), chunk)])
    if solver == "lissa":
        scale = p["lissa_scale"]
        if scale is None:  # power iteration on the full-data operator (30 passes)
            lam = top_eigenvalue(op, fm.num_params, 30, fm.device, fm.dtype, p["seed"])
            scale = 1.5 * lam
            log.info("LiSSA: λ_max(H + shift) ≈ %.4g, scale = %.4g", lam, scale)
        return torch.cat([lissa(op, Gt[r], int(p["lissa_depth"]), float(scale), p["lissa_batch"],
                                int(p["lissa_repeats"]), p["seed"])
                          for r in batches(len(Gt), chunk)])
    raise ValueError(f"unknown influence solver {solver!r}")


def influence_scores(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
                     margin_kind="logsumexp", *, solver: str, output: str = "margin") -> np.ndarray:
    """score[i, t] = −(1/n) ∇out(z_t)ᵀ (H + (l2 + damping)·I)⁻¹ ∇L(z_i), averaged over
    checkpoints; float32 [n_train, n_targets].

    output="margin" (the package's f) or "loss" (the target's cross-entropy, Koh & Liang's
    test-loss influence: then score ≈ L_t(with i) − L_t(without i)).
    """
    p = resolve_params(f"if_{solver}", params, DEFAULTS[solver])
    if solver == "cg" and p["inverse"] not in INVERSES:
        raise ValueError(f"if_cg: params.inverse={p['inverse']!r} is not one of {list(INVERSES)} "
                         f"('auto' factorises the GGN, 'cg' iterates)")
    n = len(x_train)
    xh, yh = _subsample(x_train, y_train, p["hessian_samples"], p["seed"])
    total: Any = None
    for state in checkpoints:
        fm = load_checkpoint(model_fn, state, p["layer"], p["device"])
        if solver == "cg" and use_factor(p, fm, xh):
            shift = float(p["l2"]) + float(p["damping"])
            factor = GGNFactor(fm, xh, yh, shift, p["batch_size"])
            scores = woodbury_scores(factor, fm, x_train, y_train, x_target, y_target, output,
                                     margin_kind, p)
        else:
            Gt = stacked_grads(fm, x_target, y_target, output, margin_kind, p["batch_size"])
            X = inverse_hvp(solver, fm, Gt, xh, yh, p)  # [T, P]
            scores = torch.empty(n, len(Gt), dtype=Gt.dtype, device=fm.device)
            for rows, G in per_example_grads(fm, x_train, y_train, "loss", margin_kind,
                                             p["batch_size"], "train grads"):
                scores[rows] = -(G @ X.T) / n
            del Gt, X
        total = scores if total is None else total + scores
    return to_numpy_scores(total / len(checkpoints))


def woodbury_scores(factor: GGNFactor, fm: FunctionalModel, x_train: Tensor, y_train: Tensor,
                    x_target: Tensor, y_target: Tensor, output: str, margin_kind: str, p: dict) -> Tensor:
    """−(1/n) ∇L(z_i)ᵀ (AᵀA + sI)⁻¹ ∇out(z_t) [n, T] through Woodbury, with no [T, P] solve:
    with U = (AAᵀ + sI)⁻¹ A Gtᵀ [hC, T] (Gt the target gradients), the scores of a block G
    of train gradients are −(G Gtᵀ − (G Aᵀ) U) / (n s). Every product is an inner product of
    gradients: from factored gradients (common.linear_factors) when the model allows, else
    Jacobian-vector products with the stacked target gradients."""
    n, s = len(x_train), factor.shift
    bs = p["batch_size"]
    ft = None
    if factor.fa is not None:
        ft = linear_factors(fm, x_target, output_fn(fm, y_target, output, margin_kind), bs)
    if ft is not None and factor.fa is not None:
        fa = factor.fa
        U = torch.cat([torch.cholesky_solve(factor_dots(fa, [(a[r], d[r]) for a, d in ft]).double(), factor.L)
                       for r in batches(len(x_target), 1024)], 1)
        f = linear_factors(fm, x_train, output_fn(fm, y_train, "loss", margin_kind), bs)
        assert f is not None
        scores = torch.empty(n, len(x_target), dtype=fm.dtype, device=fm.device)
        for rows in batches(n, 1024):
            fr = [(a[rows], d[rows]) for a, d in f]
            correction = (factor_dots(fr, fa).double() @ U).to(fm.dtype)
            scores[rows] = -(factor_dots(fr, ft) - correction) / (n * s)
        return scores
    Gt = stacked_grads(fm, x_target, y_target, output, margin_kind, bs)
    U = torch.cat([factor.solve_projected(Gt[r]) for r in batches(len(Gt), int(p["target_chunk"]))], 1)
    scores = torch.empty(n, len(Gt), dtype=Gt.dtype, device=fm.device)
    for rows, G in per_example_grads(fm, x_train, y_train, "loss", margin_kind, bs, "train grads"):
        correction = (factor.project(G).double() @ U).to(G.dtype)
        scores[rows] = -(G @ Gt.T - correction) / (n * s)
    return scores


if_exact = partial(influence_scores, solver="exact")
if_cg = partial(influence_scores, solver="cg")
if_lissa = partial(influence_scores, solver="lissa")
