"""The masks stage: the mask sets written (bit-packed .npy) for inspection; every other stage
regenerates masks from the seed, and the ledger is checked against them.
"""
from __future__ import annotations

import os

import numpy as np

from orchestrator.runtime.context import Context
from orchestrator.storage import masks as M
from orchestrator.storage.store import Layout


def run(ctx: Context) -> dict:
    """Write the mask sets (bit-packed .npy) for inspection; every other stage regenerates
    masks from the seed and the ledger is checked against them."""
    import mmap

    plan = ctx.plan
    cfg = plan.cfg
    out = {}
    block = max(1, (1 << 26) // plan.n)   # masks at a time (64 MB as bool): never a whole set in memory
    for mask_set, count in (("train", int(cfg.masks.n_train)), ("eval", int(cfg.masks.n_eval))):
        # the .npy (np.save's header, then the rows) goes to a local scratch file block by block,
        # then to the store from a read-only mapping of it (file pages, not the driver's heap)
        path = os.path.join(ctx.scratch, f"masks-{mask_set}.npy")
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": (count, (plan.n + 7) // 8)})
            for a in range(0, count, block):
                f.write(M.make_packed_masks(int(cfg.exp.seed), mask_set, np.arange(a, min(a + block, count)),
                                            plan.n, float(cfg.masks.alpha), block=block).data)
        with open(path, "rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                plan.store.write_bytes(Layout.masks(mask_set), view)   # writes any buffer
        os.unlink(path)
        out[mask_set] = count
    out["size"] = M.mask_size(plan.n, float(cfg.masks.alpha))
    return out
