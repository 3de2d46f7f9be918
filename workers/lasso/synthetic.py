"""Synthetic datamodel problems with planted sparse weights, for tests and benchmarks only (no
production code path imports this module): exact-size alpha-masks, bit packed, and margins
Y = X W + 1 + noise at a given signal-to-noise ratio, generated on any torch device.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from workers import bits
from workers.devices import is_cuda
from workers.lasso.gram import mm_f32

if TYPE_CHECKING:
    import torch


def make_planted(m: int, n: int, T: int, *, alpha: float = 0.5, k: int = 20, snr: float = 1.0,
                 seed: int = 0, device: str | torch.device = "cpu", row_block: int = 4096
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    packed = torch.empty(m, (n + 7) // 8, dtype=torch.uint8, device=device)
    Y = torch.empty(m, T, dtype=torch.float32, device=device)
    Wb = Wt.bfloat16() if is_cuda(device) else Wt
    for a in range(0, m, row_block):
        e = min(m, a + row_block)
        keys = torch.rand(e - a, n, generator=gen, device=device)
        Xb = torch.zeros(e - a, n, dtype=torch.bool, device=device)
        Xb.scatter_(1, keys.topk(ones, dim=1).indices, True)
        del keys
        packed[a:e] = bits.pack_tensor(Xb)
        Y[a:e] = mm_f32(Xb.to(Wb.dtype), Wb) + 1.0
        Y[a:e] += torch.randn(e - a, T, generator=gen, device=device) * noise_sd
        del Xb
    return packed, Y, Wt
