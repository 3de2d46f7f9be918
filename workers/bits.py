"""Bit-packed masks: the ledger's storage form and the fit stage's input form.

A mask set of m masks over n training examples is a bool matrix [m, n]; packed, it is a
uint8 matrix [m, ceil(n / 8)] (little bit order), 8x smaller. One format, used by the
ledger, the fit stage and evaluation.
"""
from __future__ import annotations

import numpy as np


def pack(masks: np.ndarray) -> np.ndarray:
    """bool [m, n] -> uint8 [m, ceil(n/8)], little bit order."""
    masks = np.asarray(masks, dtype=bool)
    return np.packbits(masks, axis=-1, bitorder="little")


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [m, ceil(n/8)] -> bool [m, n]."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.unpackbits(packed, axis=-1, count=n, bitorder="little").astype(bool)
