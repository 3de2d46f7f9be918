"""Removal experiments: models retrained without chosen training examples, the ground truth
that datamodels and attribution scores predict (stage=counterfactual, stage=brittleness),
and, with `toggle`, the same-size swaps that check memorization (stage=memorization verify).

A removal experiment is `base` fresh α-masks of its own mask set (named after the stage), each
trained once as drawn and once without each removal set, with the same seed: model id
r·base + j of orchestrator.storage.masks.RemovalSets is mask j without `removed[r]` (r = 0 removes
nothing). It is a ledger of its own, `<stage>/<digest>/ledger/` in the experiment's store, with
the same identity as the experiment's ledger (config hash, α, seed, n, T) and verified the same
way: every mask is regenerated from the seed and the removal sets, so a unit file of another
removal experiment, or one that was tampered with, is quarantined and retrained. The digest
names the removal sets, so the same stage asked again resumes, and new removal sets (other
datamodels, other k) get a directory of their own. Training goes through the train stage's
work pool and actors: resumable and distributed like the train stage.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from orchestrator.stages.train import train_models
from orchestrator.storage import masks as M
from orchestrator.storage.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass
class Removals:
    """The removal sets of one experiment; `add` returns the index r of a set (deduplicated)."""
    name: str                 # the mask set's name: the stage's
    base: int                 # fresh α-masks, each trained with and without every removal
    toggle: bool = False      # flip each set's membership at the mask's size (masks.RemovalSets)

    def __post_init__(self):
        self.removed: list[np.ndarray] = [np.zeros(0, np.int64)]
        self._index: dict[bytes, int] = {b"": 0}

    def add(self, ids) -> int:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        key = ids.tobytes()
        if key not in self._index:
            self._index[key] = len(self.removed)
            self.removed.append(ids)
        return self._index[key]

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, self.base, *(["toggle"] if self.toggle else [])]).encode())
        for r in self.removed:
            h.update(len(r).to_bytes(8, "little") + r.tobytes())
        return h.hexdigest()[:10]

    def root(self) -> str:
        return f"{self.name}/{self.digest()}"

    def sets(self) -> M.MaskSets:
        return M.RemovalSets(self.name, self.base, self.removed, self.toggle)

    def base_masks(self, seed: int, n: int, alpha: float) -> np.ndarray:
        """bool [base, n]: the masks as drawn (removal r = 0)."""
        return M.make_masks(seed, self.name, np.arange(self.base), n, alpha)


def train(ctx, removals: Removals) -> tuple[np.ndarray, dict]:
    """Train what the removal experiment's ledger lacks; return (margins float32 [R, base, T],
    NaN for a model that failed, and the train statistics). The removal sets are written
    beside the ledger (`removed.npz`) for whoever inspects it."""
    plan = ctx.plan
    store = plan.store
    root = removals.root()
    ledger = Ledger(store, plan.identity, f"{root}/ledger", removals.sets())
    R, J = len(removals.removed), removals.base
    expected = {removals.name: [(removals.name, r * J + j, 0) for r in range(R) for j in range(J)]}
    have = ledger.index().keys()
    pending = {k for k in expected[removals.name] if k not in have}
    buf = io.BytesIO()
    arrays = {f"r{r}": ids for r, ids in enumerate(removals.removed)}
    np.savez(buf, base=np.int64(J), **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle in **kwds
    store.write_bytes(f"{root}/removed.npz", buf.getvalue())
    stats = {"dir": root, "models_expected": R * J, "models_present": R * J - len(pending), "models_trained": 0}
    if pending:
        stats.update(train_models(plan, ctx.tracker, ctx.version, ledger, expected, pending,
                                  R * J - len(pending), name=f"{removals.name}-{removals.digest()}"))
    else:
        log.info("%s: all %d models are in %s", removals.name, R * J, store.where(root))
    data = ledger.load(removals.name, n=plan.n, n_targets=plan.n_targets)
    margins = np.full((R * J, plan.n_targets), np.nan, np.float32)
    margins[data.model_id] = data.margins
    stats["models_failed"] = int(R * J - len(data))
    return margins.reshape(R, J, plan.n_targets), stats


def own_margins(ctx, removals: Removals, ids) -> np.ndarray:
    """float32 [R, base, len(ids)]: each model of the removal experiment's margins on the
    training examples `ids` themselves (the experiment records them: task.targets=both), NaN
    for a model that failed."""
    plan = ctx.plan
    ids = np.asarray(ids, np.int64)
    ledger = Ledger(plan.store, plan.identity, f"{removals.root()}/ledger", removals.sets())
    index = ledger.index()
    pos, _, _ = ledger.good_models(removals.name, index)
    R, J = len(removals.removed), removals.base
    out = np.full((R * J, len(ids)), np.nan, np.float32)
    if len(ids) and len(pos):
        lo, hi = int(ids.min()), int(ids.max()) + 1
        _, margins, _ = ledger.read_self(index, pos, lo, hi)
        out[index.model_id[pos]] = margins[:, ids - lo]
    return out.reshape(R, J, len(ids))

