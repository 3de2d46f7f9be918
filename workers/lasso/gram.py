"""The torch backend's data side: mask rows streamed in blocks, the centered Gram matrix, the
targets' X^T y statistics, and the memory budget that sizes the blocks.

With Xc the column-centered masks of a row set and mu their column means, G = Xc^T Xc / m
[n, n] is shared by every target; target t enters only through c_t = Xc^T (y_t - ybar_t) / m,
ybar_t and var(y_t). The Gram of 0/1 masks is a matrix of integer counts < 2^24, exact in
float32 (and with bf16 inputs plus float32 accumulation, exact on tensor cores); it is computed
once per fit and pooled with the validation rows for the refit. Precision: masks in float32;
column means, centering of G, X^T Y accumulation over row blocks and var(y) in float64.

Streaming and memory. X stays bit-packed (or bool) on the host or device and is unpacked to
float32 one block of r rows at a time (workers.bits.unpack_tensor); X is never materialized as
float64 (nor as float32 beyond one row block, and the validation rows if they fit). With n
examples, T_b targets per block, r rows per block and m_v validation rows, device memory is at
most

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

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from workers import bits
from workers.devices import is_cuda
from workers.lasso.problem import LassoConfig

if TYPE_CHECKING:
    import torch

STATE_WORDS = 14   # float32 [n, T_b]-sized buffers alive at once in the solver (see memory_bytes)


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
    return (4 * n * n + 4 * STATE_WORDS * n * tb + r * (17 * n + 4 * tb) + 8 * mv * tb
            + (4 * mv * n if cache_val else 0))


@dataclass
class BlockPlan:
    targets_per_block: int
    rows_per_block: int
    cache_val: bool
    budget: int
    bytes: int


def plan_blocks(m: int, n: int, T: int, m_val: int, cfg: LassoConfig,
                device: str | torch.device = "cpu") -> BlockPlan:
    """Largest blocks (≤ the configured sizes) whose memory_bytes fit the budget.

    Halves whichever of the target block / row block costs more until the bound fits, then
    halves the row block (down to 4096 rows) if that lets the validation rows be cached
    unpacked; they are cached only if the bound still fits."""
    budget = cfg.memory_budget_bytes
    if budget is None:
        budget = default_budget(device)
    tb = max(1, min(int(cfg.targets_per_block), T))
    r = max(1, min(int(cfg.rows_per_block), m))
    while memory_bytes(n, tb, r, m_val, False) > budget:
        row_cost, tgt_cost = r * 17 * n, 4 * STATE_WORDS * n * tb
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


def default_budget(device: str | torch.device) -> int:
    """85% of the GPU's free memory, or half of the host's available memory."""
    import torch
    if is_cuda(device):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(0.85 * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(0.5 * avail)


class Rows:
    """Blocks of mask rows, unpacked on the device as float32 (or bf16) [r, n]."""

    def __init__(self, X: Any, packed: bool, n: int, device: str | torch.device):
        import torch
        self.X, self.packed, self.n, self.device = X, packed, n, device
        self.is_torch = isinstance(X, torch.Tensor)

    def get(self, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        import torch
        if self.is_torch:
            idx = torch.as_tensor(rows, device=self.X.device)
            raw = self.X.index_select(0, idx).to(self.device, non_blocking=True)
        else:
            raw = torch.from_numpy(np.ascontiguousarray(self.X[rows])).to(self.device)
        if not self.packed:
            return raw.to(dtype)
        return bits.unpack_tensor(raw, self.n, dtype)


def take_y(Y: Any, rows: np.ndarray, t0: int, t1: int, device: str | torch.device) -> torch.Tensor:
    """Margins of targets [t0, t1) at `rows`: float32 [len(rows), t1 - t0] on the device."""
    import torch
    if isinstance(Y, torch.Tensor):
        idx = torch.as_tensor(rows, device=Y.device)
        return Y[:, t0:t1].index_select(0, idx).to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(Y[rows, t0:t1], dtype=np.float32)).to(device)


def row_blocks(idx: np.ndarray, r: int) -> Iterator[np.ndarray]:
    for a in range(0, len(idx), r):
        yield idx[a:a + r]


class Gram:
    """The centered Gram matrix G = Xc^T Xc / m of a row set, float32 [n, n] on the rows'
    device, with its column means mu (float64) and diagonal."""

    def __init__(self, rows: Rows, idx: np.ndarray, r: int):
        import torch
        n, device = rows.n, rows.device
        self.m = len(idx)
        if self.m >= 1 << 24:
            raise ValueError("more than 2^24 masks: float32 Gram counts would not be exact")
        G = torch.zeros(n, n, dtype=torch.float32, device=device)
        colsum = torch.zeros(n, dtype=torch.float64, device=device)
        use_bf16 = gram_in_bf16(device)   # 0/1 is exact in bf16; counts accumulate in fp32
        for b in row_blocks(idx, r):
            Xb = rows.get(b, torch.bfloat16 if use_bf16 else torch.float32)
            if use_bf16:
                for a in range(0, n, r):          # output in row chunks: no n x n temporary
                    G[a:a + r] += mm_f32(Xb[:, a:a + r].T, Xb)
            else:
                G.addmm_(Xb.T, Xb)
            colsum += Xb.sum(0, dtype=torch.float64)
            del Xb
        self.mu = colsum / self.m
        self.G = G
        self._center(r)
        self.diag = torch.diagonal(self.G).clone()

    def _center(self, r: int) -> None:
        """In place, in row chunks via float64: G <- G_raw / m - mu mu^T."""
        n = self.G.shape[0]
        for a in range(0, n, r):
            blk = self.G[a:a + r].double().div_(self.m)
            blk.addr_(self.mu[a:a + r], self.mu, alpha=-1.0)
            self.G[a:a + r] = blk.float()
            del blk

    def pool_with(self, rows: Rows, idx_v: np.ndarray, r: int, Xv_cache: torch.Tensor | None) -> None:
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
            for b in row_blocks(idx_v, r):
                colsum += rows.get(b, torch.float32).sum(0, dtype=torch.float64)
        mu_v = colsum / mv
        d = self.mu - mu_v
        for a in range(0, n, r):
            e = min(n, a + r)
            gv = torch.zeros(e - a, n, dtype=torch.float32, device=self.G.device)
            if Xv_cache is not None:
                gv.addmm_(Xv_cache[:, a:e].T, Xv_cache)
            else:
                for b in row_blocks(idx_v, r):
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

    def penalty_factor(self, standardize: bool) -> torch.Tensor | None:
        """None (all ones) or, with standardize, the columns' population standard deviations
        (workers.lasso.problem.column_std, from G's diagonal)."""
        if not standardize:
            return None
        return self.diag.clamp_min(0.0).sqrt()


class TargetStats:
    """X^T y statistics of targets [t0, t1) over a row set (float64 accumulation): the centered
    correlations C = Xc^T (y - ybar) / m (float32 [n, T_b]), ybar and var(y) (float64 [T_b])."""

    def __init__(self, rows: Rows, Y: Any, idx: np.ndarray, t0: int, t1: int, r: int, gram: Gram):
        import torch
        n, tb, device = rows.n, t1 - t0, rows.device
        acc = torch.zeros(n, tb, dtype=torch.float64, device=device)
        ys = torch.zeros(tb, dtype=torch.float64, device=device)
        yss = torch.zeros(tb, dtype=torch.float64, device=device)
        for b in row_blocks(idx, r):
            Xb = rows.get(b, torch.float32)
            Yb = take_y(Y, b, t0, t1, device)
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

    def intercepts(self, W: torch.Tensor, gram: Gram, cols: torch.Tensor | None = None) -> torch.Tensor:
        """b = ybar - mu^T w (float64) of the weights W [n, A] of targets `cols` (default: all):
        the intercept that makes the raw-mask model X w + b equal the centered fit."""
        ybar = self.ybar if cols is None else self.ybar[cols]
        return ybar - W.T.double() @ gram.mu


def gram_in_bf16(device: str | torch.device) -> bool:
    """Gram products with bf16 inputs (tensor cores) on CUDA; float32 elsewhere."""
    return is_cuda(device)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 output: bf16 inputs on tensor cores with float32 accumulation where
    torch supports out_dtype (CUDA), else a float32 product."""
    import torch
    if a.dtype == torch.bfloat16:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()
