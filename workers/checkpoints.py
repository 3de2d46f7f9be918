"""Model weight files: plain state dicts of tensors, with a digest and an identity.

A checkpoint file is

    MAGIC (b"DMCKPT1\\n") | header length (4 bytes, big-endian) | header (JSON) | payload

where the payload is torch.save of {name: CPU tensor} (so it loads with
torch.load(..., weights_only=True), which refuses arbitrary pickled objects) and the header is
{"identity": {...}, "bytes": len(payload), "sha256": digest}. The digest is sha256 over a
domain tag, the identity (canonical JSON) and the payload, so a change to any byte of the
payload or of the identity is seen before anything is unpickled. The identity says what the
weights are: the train stage writes {config_hash, mask_set, model_id, replica}, and every
reader passes the identity it expects, so a file of another experiment or another model is
refused like a corrupt one. `to_bytes` / `from_bytes` are the one serialisation (`verify`
checks without unpickling); the train stage writes those bytes through the store (local or
s3:// / gs://), `save_weights` / `load_weights` to a local path.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile

import torch

__all__ = ["CheckpointError", "MAGIC", "checkpoint_identity", "from_bytes", "load_weights", "save_weights",
           "to_bytes", "verify"]

MAGIC = b"DMCKPT1\n"
_TAG = b"datamodels checkpoint v1\x00"
_MAX_HEADER = 1 << 16


class CheckpointError(ValueError):
    """A checkpoint that fails verification: `reason` says why (one line)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def checkpoint_identity(config_hash: str, mask_set: str, model_id: int, replica: int) -> dict:
    """What a checkpoint of the train stage is: its experiment and its model."""
    return {"config_hash": str(config_hash), "mask_set": str(mask_set), "model_id": int(model_id),
            "replica": int(replica)}


def _canonical(identity: dict) -> bytes:
    return json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()


def _digest(identity: dict, payload: bytes) -> str:
    h = hashlib.sha256(_TAG)
    ident = _canonical(identity)
    h.update(len(ident).to_bytes(8, "big"))
    h.update(ident)
    h.update(payload)
    return h.hexdigest()


def to_bytes(state_dict: dict, identity: dict | None = None) -> bytes:
    """{name: tensor} -> the bytes of a checkpoint file of CPU, contiguous tensors carrying
    `identity` (a JSON object; checkpoint_identity for the train stage's) and the digest;
    anything but tensors is refused."""
    clean = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is {type(value).__name__}, not a tensor")
        clean[str(key)] = value.detach().to("cpu").contiguous()
    identity = dict(identity or {})
    buf = io.BytesIO()
    torch.save(clean, buf)
    payload = buf.getvalue()
    header = json.dumps({"identity": identity, "bytes": len(payload), "sha256": _digest(identity, payload)},
                        sort_keys=True).encode()
    return MAGIC + len(header).to_bytes(4, "big") + header + payload


def _split(blob: bytes, expect: dict | None) -> tuple[dict, bytes]:
    """(header, payload) of a checkpoint whose digest, and identity if `expect`, check out."""
    blob = bytes(blob)
    if not blob.startswith(MAGIC):
        if blob[:2] == b"PK":
            raise CheckpointError("no digest (a checkpoint written before checkpoints carried one)")
        raise CheckpointError("not a checkpoint file (no header)")
    start = len(MAGIC) + 4
    size = int.from_bytes(blob[len(MAGIC):start], "big")
    if len(blob) < start or not 0 < size <= _MAX_HEADER or len(blob) < start + size:
        raise CheckpointError("truncated or damaged header")
    try:
        header = json.loads(blob[start:start + size])
        identity, length, digest = header["identity"], header["bytes"], header["sha256"]
        if not isinstance(identity, dict) or not isinstance(length, int) or not isinstance(digest, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError("unreadable header") from None
    payload = blob[start + size:]
    if len(payload) != length:
        raise CheckpointError(f"{len(payload)} bytes of weights where its header says {length} (truncated?)")
    if _digest(identity, payload) != digest:
        raise CheckpointError("its bytes do not match its digest (corrupted)")
    if expect is not None and identity != expect:
        diff = sorted(k for k in set(identity) | set(expect) if identity.get(k) != expect.get(k))
        got = ", ".join(f"{k}={identity.get(k)!r}" for k in diff)
        want = ", ".join(f"{k}={expect.get(k)!r}" for k in diff)
        raise CheckpointError(f"a checkpoint of something else ({got}; this one must have {want})")
    return header, payload


def verify(blob: bytes, expect: dict | None = None) -> str:
    """The digest of a checkpoint file whose bytes match it (and whose identity is `expect`, if
    given), without unpickling anything; CheckpointError says why not."""
    return _split(blob, expect)[0]["sha256"]


def from_bytes(blob: bytes, expect: dict | None = None) -> dict:
    """The state dict of a checkpoint file, on the CPU, after its digest (and identity, if
    `expect`) is checked; loaded with weights_only (tensors only). CheckpointError says why not."""
    _, payload = _split(blob, expect)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an UnpicklingError, RuntimeError, ...: refused, one line
        raise CheckpointError(f"its weights do not load ({' '.join(str(err).split())[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("its payload is not a dict of tensors")
    return state


def save_weights(state_dict: dict, path: str | os.PathLike, identity: dict | None = None) -> None:
    """Write {name: tensor} to `path` (temporary file + rename, so readers never see half a file)."""
    blob = to_bytes(state_dict, identity)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_weights(path: str | os.PathLike, expect: dict | None = None) -> dict:
    """Read a file written by save_weights onto the CPU, verified (weights_only: tensors only)."""
    with open(os.fspath(path), "rb") as f:
        return from_bytes(f.read(), expect)
