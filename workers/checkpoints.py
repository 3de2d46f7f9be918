"""Model weight files: plain state dicts of tensors, serialised with torch.save.

A file holds only tensors (keys -> CPU tensors), so it loads with
torch.load(..., weights_only=True), which refuses arbitrary pickled objects. `to_bytes` /
`from_bytes` are the one serialisation; the train stage writes those bytes through the
ledger's filesystem (local or s3:// / gs://), `save_weights` / `load_weights` to a local path.
"""
from __future__ import annotations

import io
import os
import tempfile

import torch

__all__ = ["from_bytes", "load_weights", "save_weights", "to_bytes"]


def to_bytes(state_dict: dict) -> bytes:
    """{name: tensor} -> torch.save bytes of CPU, contiguous tensors; anything else is refused."""
    clean = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is {type(value).__name__}, not a tensor")
        clean[str(key)] = value.detach().to("cpu").contiguous()
    buf = io.BytesIO()
    torch.save(clean, buf)
    return buf.getvalue()


def from_bytes(blob: bytes) -> dict:
    """The state dict in bytes written by to_bytes, on the CPU (weights_only: tensors only)."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def save_weights(state_dict: dict, path: str | os.PathLike) -> None:
    """Write {name: tensor} to `path` (temporary file + rename, so readers never see half a file)."""
    blob = to_bytes(state_dict)
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


def load_weights(path: str | os.PathLike) -> dict:
    """Read a file written by save_weights onto the CPU (weights_only: tensors only)."""
    with open(os.fspath(path), "rb") as f:
        return from_bytes(f.read())
