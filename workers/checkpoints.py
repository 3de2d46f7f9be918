"""Model weight files: plain state dicts of tensors, written atomically with torch.save.

A file holds only tensors (keys -> CPU tensors), so it loads with
torch.load(path, weights_only=True), which refuses arbitrary pickled objects.
"""
from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["load_weights", "save_weights"]


def save_weights(state_dict: dict, path: str | os.PathLike) -> None:
    """Write {name: tensor} to `path` (temporary file + rename, so readers never see half a file)."""
    clean = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is {type(value).__name__}, not a tensor")
        clean[str(key)] = value.detach().to("cpu").contiguous()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(clean, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_weights(path: str | os.PathLike) -> dict:
    """Read a file written by save_weights onto the CPU (weights_only: tensors only)."""
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
