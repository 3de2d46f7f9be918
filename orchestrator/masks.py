"""Masks: exact-size α-subsets of the training set, regenerable anywhere.

Mask i of mask set s is a function of (experiment seed, s, i) alone, so any node can rebuild
any mask and the ledger can be checked against it. Model seeds are derived the same way from
(experiment seed, s, i, replica).
"""
from __future__ import annotations

import zlib

import numpy as np

MASK_SETS = ("train", "eval")


def set_code(mask_set: str) -> int:
    """A stable integer for a mask set's name (crc32), so new sets need no registry."""
    return zlib.crc32(mask_set.encode())


def mask_size(n: int, alpha: float) -> int:
    """round(α·n), the exact number of examples in every mask."""
    return int(round(alpha * n))


def make_mask(seed: int, mask_set: str, i: int, n: int, alpha: float) -> np.ndarray:
    """bool [n] with exactly round(α·n) True entries, a function of (seed, mask_set, i)."""
    rng = np.random.default_rng([seed, set_code(mask_set), i])
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=mask_size(n, alpha), replace=False)] = True
    return mask


def make_masks(seed: int, mask_set: str, ids, n: int, alpha: float) -> np.ndarray:
    """bool [len(ids), n]: make_mask for each id."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.zeros((len(ids), n), dtype=bool)
    for row, i in enumerate(ids):
        out[row] = make_mask(seed, mask_set, int(i), n, alpha)
    return out


def make_packed_masks(seed: int, mask_set: str, ids, n: int, alpha: float, block: int = 4096) -> np.ndarray:
    """uint8 [len(ids), ceil(n/8)]: the packed form of make_masks, built `block` masks at a
    time, so the bool matrix (8x larger) never exists whole."""
    from workers import bits
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((len(ids), (n + 7) // 8), dtype=np.uint8)
    for a in range(0, len(ids), block):
        out[a:a + block] = bits.pack(make_masks(seed, mask_set, ids[a:a + block], n, alpha))
    return out


def model_seed(seed: int, mask_set: str, i: int, replica: int) -> int:
    """The training seed of model (mask_set, i, replica): 63-bit, stable across machines."""
    ss = np.random.SeedSequence([seed, set_code(mask_set), i, replica, 0x5EED])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
