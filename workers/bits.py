"""Bit-packed masks: the ledger's storage form and the fit stage's input form.

A mask set of m masks over n training examples is a bool matrix [m, n]; packed, it is a
uint8 matrix [m, ceil(n / 8)] (little bit order), 8x smaller. One format, used by the
ledger, the fit stage and evaluation: numpy here, and the same layout on torch tensors
(pack_tensor, unpack_tensor: on the tensor's device, for the lasso's row blocks on a GPU).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def pack(masks: np.ndarray) -> np.ndarray:
    """bool [m, n] -> uint8 [m, ceil(n/8)], little bit order."""
    masks = np.asarray(masks, dtype=bool)
    return np.packbits(masks, axis=-1, bitorder="little")


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [m, ceil(n/8)] -> bool [m, n]."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.unpackbits(packed, axis=-1, count=n, bitorder="little").astype(bool)


def pack_tensor(masks: torch.Tensor) -> torch.Tensor:
    """pack on a torch tensor: bool [m, n] -> uint8 [m, ceil(n/8)] on masks' device."""
    import torch
    m, n = masks.shape
    nb = (n + 7) // 8
    pad = torch.zeros(m, nb * 8, dtype=torch.int32, device=masks.device)
    pad[:, :n] = masks
    weights = 2 ** torch.arange(8, device=masks.device, dtype=torch.int32)
    return (pad.view(m, nb, 8) * weights).sum(-1).to(torch.uint8)


def unpack_tensor(packed: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """unpack on a torch tensor: uint8 [m, ceil(n/8)] -> [m, n] of 0/1 in `dtype` (default
    bool) on packed's device."""
    import torch
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1          # [m, n/8, 8], little bit order
    return bits.reshape(packed.shape[0], -1)[:, :n].to(torch.bool if dtype is None else dtype)
