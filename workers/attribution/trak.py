"""TRAK (Park et al., ICML 2023): attribution through the kernel of projected margin
gradients, ensembled over checkpoints.

For checkpoint k: Φ_k = G_k R_k [n, d] (G_k rows ∇_θ f(z_i; θ_k), f = margin; R_k a seeded
random projection, or none), φ_k(z) = R_kᵀ ∇_θ f(z; θ_k), Q_k = diag(1 − p_i) with p_i the
softmax probability of z_i's label (the loss-to-output derivative of the cross-entropy).

    score(z) = (1/K Σ_k Q_k) · (1/K Σ_k Φ_k (Φ_kᵀΦ_k + λI)⁻¹ φ_k(z))    (paper, Algorithm 1)

optionally soft-thresholded, S(τ, s) = sign(τ)·max(|τ| − s, 0). Positive scores mean
including z_i raises z's margin (the Newton step on the linearised model). Unlike the
`traker` package, the inverse kernel is NOT divided by its mean absolute entry and nothing is
stored in float16: scores are the formula above, with the kernel solved in params.dtype.

Cost per target and checkpoint: 2·P·d multiply-adds for its projection (the whole of it at
large T), 2·n·d for its kernel scores. An MLP's per-example gradients are built from their
factors (common.per_example_grads) rather than by vmap; the projection is the same dense R.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np
import torch

from .common import (
    batches,
    forward_all,
    load_checkpoint,
    make_projector,
    resolve_dtype,
    resolve_params,
    stacked_grads,
    to_numpy_scores,
)

log = logging.getLogger(__name__)
Tensor = torch.Tensor

# factored: build the per-example gradients of an all-affine model from its factors
# (common.per_example_grads; false: vmap's, the same numbers up to rounding, for cross-checks)
DEFAULTS = {"layer": "all", "proj_dim": 2048, "proj_type": "gaussian", "lam": 0.0,
            "dtype": "float32", "soft_threshold": None, "factored": True}


def kernel_scores(Phi: Tensor, phi_t: Tensor, lam: float, dtype: torch.dtype,
                  block: int = 16384) -> Tensor:
    """Φ (ΦᵀΦ + λI)⁻¹ φ_tᵀ [n, T] for Φ [n, d], φ_t [T, d]; the kernel is accumulated and
    solved (Cholesky) in `dtype`, the result is returned in `dtype`. The solve takes the
    fewer right-hand sides: the targets' (ΦᵀΦ + λI)⁻¹ φ_tᵀ when T <= n, else the training
    rows' Φ (ΦᵀΦ + λI)⁻¹ (the kernel is symmetric), 2·d²·min(n, T) multiply-adds.

    With fewer training rows than features (n < d), ΦᵀΦ has rank n and no inverse at λ = 0:
    the n×n Gram form (ΦΦᵀ + λI)⁻¹ Φ φ_tᵀ is used instead, the same scores for λ > 0 (the
    push-through identity) and at λ = 0 the pseudo-inverse's, Φ (ΦᵀΦ)⁺ φ_tᵀ."""
    n, d = Phi.shape
    if n < d:
        P = Phi.to(dtype)
        G = P @ P.T + lam * torch.eye(n, dtype=dtype, device=P.device)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            hint = "" if dtype == torch.float64 else " or use params.dtype='float64'"
            raise ValueError(f"TRAK Gram matrix ΦΦᵀ + λI ({n}x{n}, proj_dim {d}) is not positive definite in "
                             f"{dtype}: training examples with identical projected gradients; set params.lam > 0"
                             f"{hint}")
        return torch.cholesky_solve(P @ phi_t.to(dtype).T, L)
    K = torch.zeros(d, d, dtype=dtype, device=Phi.device)
    for rows in batches(len(Phi), block):
        Pb = Phi[rows].to(dtype)
        K += Pb.T @ Pb
    K += lam * torch.eye(d, dtype=dtype, device=K.device)
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        hint = "" if dtype == torch.float64 else " or use params.dtype='float64'"
        raise ValueError(f"TRAK kernel ΦᵀΦ + λI ({d}x{d}, n={len(Phi)}) is not positive definite "
                         f"in {dtype}; set params.lam > 0, lower params.proj_dim{hint}")
    if len(phi_t) <= len(Phi):
        A = torch.cholesky_solve(phi_t.to(dtype).T, L)  # [d, T]
        return torch.cat([Phi[rows].to(dtype) @ A for rows in batches(len(Phi), block)])
    At = phi_t.to(dtype).T                             # [d, T]
    return torch.cat([torch.cholesky_solve(Phi[rows].to(dtype).T, L).T @ At
                      for rows in batches(len(Phi), block)])


def ensemble(S_sum: Tensor, Q_sum: Tensor, K: int, soft_threshold: float | None) -> Tensor:
    """(mean_k Q_k) · (mean_k kernel scores_k) from the sums over K checkpoints, then the
    optional soft-thresholding."""
    scores = (Q_sum / K)[:, None].to(S_sum.dtype) * (S_sum / K)
    if soft_threshold is not None:
        scores = torch.sign(scores) * torch.clamp(scores.abs() - float(soft_threshold), min=0)
    return scores


def features(fm, x, y, margin_kind, batch_size, projector, factored=True):
    """Projected margin gradients [n, d] (or the gradients themselves)."""
    return stacked_grads(fm, x, y, "margin", margin_kind, batch_size, projector, factored)


def trak_steps(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
               margin_kind="logsumexp"):
    """Yields once per checkpoint, in order: after checkpoint k (1-based), a function that
    returns the TRAK scores of checkpoints 1..k, float32 [n_train, n_targets] — exactly what
    trak_scores(checkpoints[:k]) returns (same projections, same sums, same order). The
    work of checkpoint k is done before its yield; the function only forms the ensemble."""
    p = resolve_params("trak", params, DEFAULTS)
    dtype = resolve_dtype(p["dtype"], "trak")
    S_sum = Q_sum = None
    for k, state in enumerate(checkpoints):
        fm = load_checkpoint(model_fn, state, p["layer"], p["device"])
        proj = make_projector(p, fm.num_params, k)
        Phi = features(fm, x_train, y_train, margin_kind, p["batch_size"], proj, p["factored"])
        phi_t = features(fm, x_target, y_target, margin_kind, p["batch_size"], proj, p["factored"])
        logits, _ = forward_all(fm, x_train, p["batch_size"])
        prob = torch.softmax(logits.double(), -1).gather(
            1, y_train.to(logits.device).long()[:, None]).squeeze(1)
        log.info("TRAK checkpoint %d/%d: %d params -> d=%d", k + 1, len(checkpoints),
                 fm.num_params, Phi.shape[1])
        S = kernel_scores(Phi, phi_t, float(p["lam"]), dtype)
        S_sum = S if S_sum is None else S_sum + S
        Q_sum = 1 - prob if Q_sum is None else Q_sum + (1 - prob)
        del Phi, phi_t, S
        yield partial(_finish, S_sum, Q_sum, k + 1, p["soft_threshold"])


def _finish(S_sum: Tensor, Q_sum: Tensor, K: int, soft_threshold) -> np.ndarray:
    return to_numpy_scores(ensemble(S_sum, Q_sum, K, soft_threshold))


def trak_scores(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
                margin_kind="logsumexp") -> np.ndarray:
    """TRAK scores float32 [n_train, n_targets]; checkpoint k uses projection seed (seed, k)."""
    finish: Any = None
    for finish in trak_steps(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,  # noqa: B007
                             margin_kind):
        pass
    return finish()
