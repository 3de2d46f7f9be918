"""Masks: exact-size α-subsets of the training set, regenerable anywhere.

Mask i of mask set s is a function of (experiment seed, s, i) alone, so any node can rebuild
any mask and the ledger can be checked against it. Model seeds are derived the same way from
(experiment seed, s, i, replica).
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np

from orchestrator.settings.names import mask_size  # noqa: F401  (M.mask_size: the masks' size)

MASK_SETS = ("train", "eval")


def set_code(mask_set: str) -> int:
    """A stable integer for a mask set's name (crc32), so new sets need no registry."""
    return zlib.crc32(mask_set.encode())


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


class MaskSets:
    """The mask sets of one ledger and how each mask and model seed is regenerated from
    (experiment seed, mask set, model id, replica): the experiment's own `train` and `eval`.
    Ledgers of other experiments on the same training set (orchestrator.analyses.removal) subclass it."""

    names: tuple[str, ...] = MASK_SETS

    def describe(self) -> dict:
        """What decides these sets' masks and seeds besides the experiment's identity (a key
        for records of checks made against them)."""
        return {"sets": type(self).__name__, "names": list(self.names)}

    def masks(self, seed: int, mask_set: str, ids, n: int, alpha: float) -> np.ndarray:
        return make_masks(seed, mask_set, ids, n, alpha)

    def seeds(self, seed: int, mask_set: str, ids, replicas) -> np.ndarray:
        return np.array([model_seed(seed, mask_set, int(i), int(r)) for i, r in zip(ids, replicas)],
                        dtype=np.int64)

    def labels(self, mask_set: str, task) -> np.ndarray | None:
        """The training labels the models of `mask_set` train with, None: the task's own."""
        return None


class RemovalSets(MaskSets):
    """One mask set `name` of removal experiments: model id r·base + j is the fresh α-mask j of
    `name` with the examples `removed[r]` taken out, trained with the seed of (name, j,
    replica) whatever r is, so that every removal is paired with the same seed and the same
    mask without it (r = 0 removes nothing, by convention of orchestrator.analyses.removal).

    toggle: model r·base + j is mask j with the membership of every example of `removed[r]`
    flipped (out if it was in, in if it was out), and as many other examples flipped the
    other way, drawn from (seed, name, j, r): every mask keeps its size, so a model and its
    pair train the same number of SGD steps and differ in those examples alone. Removing
    one example from a mask of 150 at batch 30 (the partial batch is dropped) would train 4
    steps an epoch instead of 5, an effect far larger than the example's own.
    """

    def __init__(self, name: str, base: int, removed: list[np.ndarray], toggle: bool = False):
        self.names = (name,)
        self.base = int(base)
        self.removed = [np.asarray(r, dtype=np.int64) for r in removed]
        self.toggle = bool(toggle)

    def describe(self) -> dict:
        removed = hashlib.sha256()
        for r in self.removed:
            removed.update(len(r).to_bytes(8, "little"))
            removed.update(np.ascontiguousarray(r, dtype=np.int64).tobytes())
        return {**super().describe(), "base": self.base, "removed": removed.hexdigest()[:32],
                **({"toggle": True} if self.toggle else {})}

    def model_id(self, r: int, j: int) -> int:
        return int(r) * self.base + int(j)

    def masks(self, seed: int, mask_set: str, ids, n: int, alpha: float) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if mask_set not in self.names or np.any(ids < 0) or np.any(ids >= self.base * len(self.removed)):
            raise ValueError(f"mask set {mask_set!r} ids {ids.min()}..{ids.max()} are not removal masks "
                             f"of {self.names[0]!r} ({self.base} x {len(self.removed)})")
        out = make_masks(seed, mask_set, ids % self.base, n, alpha)
        for row, (j, r) in enumerate(zip(ids % self.base, ids // self.base)):
            chosen = self.removed[int(r)]
            if self.toggle and len(chosen):
                out[row] = toggled(out[row], chosen, np.random.default_rng([seed, set_code(mask_set), int(j), int(r),
                                                                            0x7066]))
            else:
                out[row, chosen] = False
        return out

    def seeds(self, seed: int, mask_set: str, ids, replicas) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return super().seeds(seed, mask_set, ids % self.base, replicas)


def toggled(mask: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`mask` with the membership of `chosen` flipped and the size kept: as many examples
    outside `chosen` flipped the other way (members dropped for those added, non-members
    added for those dropped), drawn by `rng`."""
    out = mask.copy()
    was_in = out[chosen]
    out[chosen] = ~was_in
    net = int((~was_in).sum()) - int(was_in.sum())      # members gained
    free = np.ones(len(out), bool)
    free[chosen] = False
    pool = np.flatnonzero(free & (out if net > 0 else ~out))
    if abs(net) > len(pool):
        raise ValueError(f"cannot keep the mask's size: {abs(net)} examples to flip, {len(pool)} available")
    out[rng.choice(pool, size=abs(net), replace=False)] = net < 0
    return out


class RepairSets(MaskSets):
    """The mask sets of stage=mislabel's repair check, one per variant: `base` models each on
    the whole training set less the variant's `removed` examples, trained with the task's
    labels except at the variant's `restored` examples, which get their true labels back
    (the task's true_labels()). Model j of every variant has the seed of ("repair", j,
    replica), so the variants are paired model by model."""

    SEEDS = "repair"

    def __init__(self, variants: dict[str, tuple[np.ndarray, np.ndarray]], base: int):
        self.variants = {name: (np.asarray(rem, np.int64), np.asarray(res, np.int64))
                         for name, (rem, res) in variants.items()}
        self.names = tuple(self.variants)
        self.base = int(base)

    def describe(self) -> dict:
        h = hashlib.sha256()
        for name, (rem, res) in self.variants.items():
            h.update(name.encode() + b"\0")
            for ids in (rem, res):
                h.update(len(ids).to_bytes(8, "little") + np.ascontiguousarray(ids).tobytes())
        return {**super().describe(), "base": self.base, "variants": h.hexdigest()[:32]}

    def masks(self, seed: int, mask_set: str, ids, n: int, alpha: float) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if mask_set not in self.variants or np.any(ids < 0) or np.any(ids >= self.base):
            raise ValueError(f"mask set {mask_set!r} ids {ids.min()}..{ids.max()} are not repair models "
                             f"({', '.join(self.names)} x {self.base})")
        out = np.ones((len(ids), n), dtype=bool)
        out[:, self.variants[mask_set][0]] = False
        return out

    def seeds(self, seed: int, mask_set: str, ids, replicas) -> np.ndarray:
        return super().seeds(seed, self.SEEDS, ids, replicas)

    def labels(self, mask_set: str, task) -> np.ndarray | None:
        restored = self.variants[mask_set][1]
        if not len(restored):
            return None
        from workers.tasks import member
        truth, arrays = member(task, "true_labels"), member(task, "arrays")
        known = truth() if truth is not None else None
        if known is None or arrays is None:
            raise ValueError(f"repair variant {mask_set!r} restores true labels: the task has none "
                             f"(task.label_noise=0, or a task without true_labels())")
        y = np.array(arrays()[1], dtype=np.int64)
        y[restored] = known[0][restored]
        return y

