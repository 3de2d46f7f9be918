"""Checkpoints in the store: train model i's weights, with a digest and their identity
(workers.checkpoints), verified before anything is unpickled. A checkpoint that fails is
missing to the train stage (quarantined, its model retrained) and one line to a reader.
"""
from __future__ import annotations

import logging

from orchestrator.storage.scores import BaselinesError
from orchestrator.storage.store import Layout

log = logging.getLogger(__name__)


def check_checkpoint(store, i: int, config_hash: str) -> tuple[str | None, str]:
    """(digest, "") of train model i's checkpoint when its bytes match its digest and it is this
    experiment's (`config_hash`) model i; (None, why) when it is missing or fails. Nothing is
    unpickled (workers.checkpoints.verify)."""
    from workers.checkpoints import CheckpointError, checkpoint_identity, verify
    rel = Layout.checkpoint("train", i, 0)
    try:
        blob = store.read_bytes(rel)
    except FileNotFoundError:
        return None, "missing"
    try:
        return verify(blob, checkpoint_identity(config_hash, "train", i, 0)), ""
    except CheckpointError as err:
        return None, err.reason


def quarantine_checkpoint(store, i: int, reason: str) -> None:
    """Move train model i's checkpoint to checkpoints/_quarantine/ (named by its content, so
    nothing quarantined before is overwritten), with one log line."""
    import hashlib
    rel = Layout.checkpoint("train", i, 0)
    try:
        blob = store.read_bytes(rel)
    except FileNotFoundError:      # another driver moved it first
        return
    name = rel.rsplit("/", 1)[1]
    dest = f"{Layout.quarantine(Layout.CHECKPOINTS)}/{name[:-3]}-{hashlib.sha256(blob).hexdigest()[:12]}.pt"
    try:
        store.move(rel, dest)
    except FileNotFoundError:
        return
    log.error("checkpoints: %s quarantined to %s: %s; it will be retrained", store.where(rel),
              store.where(dest), reason)


def missing_checkpoints(store, count: int, config_hash: str) -> list[int]:
    """Ids among the first `count` train models without a good checkpoint: missing, or failing
    verification (its digest, or the identity of experiment `config_hash` and model i). Those
    that fail are moved to checkpoints/_quarantine/ (one log line each); the train stage
    trains their models again."""
    out = []
    for i in range(max(0, count)):
        digest, why = check_checkpoint(store, i, config_hash)
        if digest is None:
            if why != "missing":
                quarantine_checkpoint(store, i, why)
            out.append(i)
    return out


def bad_checkpoint(store, rel: str, reason: str) -> BaselinesError:
    """The one line for a checkpoint the baselines cannot use: its path, why, and the fix."""
    if reason == "missing":
        return BaselinesError(f"checkpoint {store.where(rel)} is missing; run stage=train (it saves "
                              f"baselines.checkpoints of them)")
    return BaselinesError(f"checkpoint {store.where(rel)} fails verification ({reason}); run stage=train to "
                          f"retrain it (the bad file is moved to {Layout.CHECKPOINTS}/_quarantine/)")


def checkpoint_digests(store, k: int, config_hash: str) -> list[str]:
    """The digests of the first k train-set checkpoints, each verified (its bytes, and the
    identity of this experiment's model i) without unpickling; BaselinesError (one line naming
    the file) at the first that is missing or fails."""
    out = []
    for i in range(k):
        digest, why = check_checkpoint(store, i, config_hash)
        if digest is None:
            raise bad_checkpoint(store, Layout.checkpoint("train", i, 0), why)
        out.append(digest)
    return out


def read_checkpoints(store, k: int, config_hash: str | None = None,
                     digests: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """(state dicts, digests) of the first k train-set checkpoints, each verified before it is
    loaded with weights_only: its digest, the identity of experiment `config_hash`'s model i
    (when given), and the digest the caller saw (`digests`, when given: the files are the ones
    it checked). BaselinesError (one line naming the file) when one is missing or fails."""
    from workers.checkpoints import CheckpointError, checkpoint_identity, from_bytes, verify
    states, seen = [], []
    for i in range(k):
        rel = Layout.checkpoint("train", i, 0)
        try:
            blob = store.read_bytes(rel)
        except FileNotFoundError:
            raise bad_checkpoint(store, rel, "missing") from None
        expect = checkpoint_identity(config_hash, "train", i, 0) if config_hash is not None else None
        try:
            digest = verify(blob, expect)
            if digests is not None and digest != digests[i]:
                raise CheckpointError("it changed since the stage checked it (another run retrained it?)")
            states.append(from_bytes(blob, expect))
        except CheckpointError as err:
            raise bad_checkpoint(store, rel, err.reason) from None
        seen.append(digest)
    return states, seen


def load_checkpoints(store, k: int, config_hash: str | None = None) -> list[dict]:
    """The first k train-set checkpoints, verified (read_checkpoints), loaded with weights_only."""
    return read_checkpoints(store, k, config_hash)[0]
