"""The torch backend's debiasing (LassoConfig.debias): least squares on each target's lasso
support, batched over targets, and the relaxed-lasso blend of the two fits.

For target t with support S (w_t != 0) the refit solves (G_SS + ridge I) v_S = c_S, with the
centered Gram G and correlations c of workers.lasso.gram: the normal equations of least squares
on the centered masks, read off the Gram already built for the lasso (X is not touched again);
the intercept follows as ybar - mu^T v, as for the lasso. Supports differ per target, so targets
are sorted by support size and solved in groups as one padded batch [B, k, k] (padding is the
identity), in float64, with B k^2 bounded by SOLVE_ENTRIES.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from workers.lasso.problem import RIDGE

if TYPE_CHECKING:
    import torch

SOLVE_ENTRIES = 1 << 24   # float64 entries of one padded batch of support systems (128 MiB)


def support_refit(G: torch.Tensor, C: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Least squares of every column on its lasso support: V [n, A] float32, zero off the support
    of W [n, A], solving (G_SS + ridge I) v_S = C_S with G [n, n] the centered Gram and C [n, A]
    the centered correlations; ridge = RIDGE x mean(diag G), the mean column variance."""
    import torch
    A = W.shape[1]
    out = torch.zeros_like(W)
    nz = W != 0
    sizes = nz.sum(0)
    order = torch.argsort(sizes, stable=True)
    k_sorted = sizes[order].tolist()                 # on the host: one transfer, not one per target
    # each column's support first (in index order), then its zeros: a permutation of rows
    by_support = torch.sort(nz.to(torch.int8), dim=0, descending=True, stable=True).indices
    ridge = RIDGE * float(torch.diagonal(G).double().mean())
    a = 0
    while a < A:
        if k_sorted[a] == 0:                         # no support: v = 0
            a += 1
            continue
        b = a + 1                                    # grow the group while its padded batch fits
        while b < A and (b + 1 - a) * k_sorted[b] ** 2 <= SOLVE_ENTRIES:
            b += 1
        cols = order[a:b]
        out[:, cols] = _solve_group(G, C, by_support, sizes, cols, ridge)
        a = b
    return out


def _solve_group(G: torch.Tensor, C: torch.Tensor, by_support: torch.Tensor, sizes: torch.Tensor,
                 cols: torch.Tensor, ridge: float) -> torch.Tensor:
    """The support refits of columns `cols` as one padded batch: [n, B] float32."""
    import torch
    k = int(sizes[cols].max())
    idx = by_support[:k, cols].T                                       # [B, k] support rows, then pads
    valid = torch.arange(k, device=G.device).unsqueeze(0) < sizes[cols].unsqueeze(1)
    keep = valid.double()
    M = G[idx.unsqueeze(2), idx.unsqueeze(1)].double()
    M.mul_(keep.unsqueeze(2)).mul_(keep.unsqueeze(1))                  # pads' rows and columns: 0
    M.diagonal(dim1=1, dim2=2).add_(torch.where(valid, ridge, 1.0))    # ridge; identity on pads
    rhs = torch.where(valid, C[:, cols].T.gather(1, idx).double(), 0.0)
    v = torch.linalg.solve(M, rhs.unsqueeze(2)).squeeze(2)
    del M
    V = torch.zeros(len(cols), G.shape[0], dtype=torch.float32, device=G.device)
    V.scatter_(1, idx, torch.where(valid, v, 0.0).float())            # idx rows are distinct
    return V.T


def blend(W: torch.Tensor, V: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """phi w + (1 - phi) v per column (phi [A]), exactly w where phi = 1 and v where phi = 0."""
    import torch
    p = phi.to(W.dtype).unsqueeze(0)
    mixed = V + p * (W - V)
    return torch.where(p == 1, W, torch.where(p == 0, V, mixed))
