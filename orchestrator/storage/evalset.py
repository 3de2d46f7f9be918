"""The eval set: the held-out masks and their replica-averaged margins, read from the
ledger's eval rows (what LDS is computed on).
"""
from __future__ import annotations

import numpy as np

from orchestrator.storage.ledger import Ledger, LedgerError
from workers import bits


def eval_set(ledger: Ledger, n: int, n_targets: int, index=None):
    """(masks bool [e, n], replica-averaged margins float32 [e, T], replicas per mask [e]).
    Only the eval rows are read (O(eval masks x replicas) memory, whatever the train set's
    size); `index`, the ledger's index when the caller has it, spares rebuilding it."""
    data = ledger.load("eval", n=n, n_targets=n_targets, index=index)
    ids, start, counts = np.unique(data.model_id, return_index=True, return_counts=True)
    sums = np.add.reduceat(data.margins.astype(np.float64), start, axis=0)
    Y = (sums / counts[:, None]).astype(np.float32)
    X = bits.unpack(data.packed[start], n)
    # every replica of a mask must carry the same mask
    first = np.repeat(start, counts)
    if not np.array_equal(data.packed, data.packed[first]):
        raise LedgerError("eval masks differ between replicas of one model id: the ledger mixes experiments")
    return X, Y, counts
