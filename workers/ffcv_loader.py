"""FFCV as an optional input pipeline for training sets that do not fit on the device.

Install with `pip install '.[ffcv]'` (ffcv 1.0.2 compiles against libturbojpeg and OpenCV:
`apt-get install pkg-config libturbojpeg0-dev libopencv-dev` first). Nothing else in the
project imports ffcv; `train.loader=ffcv` selects this path and the config check refuses it
with one line when ffcv is missing.

The dataset is written once as a .beton file (raw uint8 images, labels and the example's
index), named by a fingerprint of the arrays, so every training actor on a machine shares
one file and a second call finds it instead of rewriting it. Each model then reads only its
mask's examples: `mask_loader` hands FFCV the mask's indices, and FFCV shuffles them with
its own seeded order each epoch and yields uint8 batches on the device; normalisation and
augmentation stay the engine's batched tensor ops (workers.train).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os

import numpy as np

INSTALL_HINT = ("pip install '.[ffcv]' (after apt-get install pkg-config libturbojpeg0-dev "
                "libopencv-dev)")

__all__ = ["INSTALL_HINT", "available", "beton_path", "default_dir", "fingerprint", "mask_loader",
           "require", "retarget", "write_beton"]


def available() -> bool:
    try:
        import ffcv  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken native build is "not available" too
        return False
    return True


def require() -> None:
    """Raise ImportError with the install line if ffcv cannot be imported."""
    if not available():
        raise ImportError(f"train.loader=ffcv needs the optional ffcv extra: {INSTALL_HINT}")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "datamodels", "ffcv")


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 over shape, dtype and bytes of images and labels (first 16 hex digits)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y, dtype=np.int64)):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))  # type: ignore[arg-type]  # ndarray has the buffer protocol
    return h.hexdigest()[:16]


def beton_path(x: np.ndarray, y: np.ndarray, directory: str | None = None) -> str:
    return os.path.join(directory or default_dir(), f"images-{fingerprint(x, y)}.beton")


class _Indexed:
    """The indexed dataset FFCV's writer reads: item i -> (image [C,H,W] uint8, label, i)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, np.asarray(y, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return np.ascontiguousarray(self.x[i]), int(self.y[i]), int(i)


def write_beton(x: np.ndarray, y: np.ndarray, directory: str | None = None, num_workers: int = 1) -> str:
    """Write images uint8 [N, C, H, W] and labels [N] as a .beton once; return its path.

    Safe under concurrency: writers take an exclusive lock on `<path>.lock`, write to a
    temporary name and rename, so readers see either no file or a complete one, and a file
    written by another actor (same fingerprint) is reused as is.
    """
    require()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"ffcv: images must be uint8 [N, C, H, W], got {x.dtype} {x.shape}")
    if len(y) != len(x):
        raise ValueError(f"ffcv: {len(x)} images but {len(y)} labels")
    path = beton_path(x, y, directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path):
                return path
            tmp = f"{path}.tmp-{os.getpid()}"
            fields = {"image": NDArrayField(dtype=np.dtype("uint8"), shape=tuple(x.shape[1:])),
                      "label": IntField(), "index": IntField()}
            try:
                DatasetWriter(tmp, fields, num_workers=max(1, int(num_workers)),
                              page_size=_page_size(x)).from_indexed_dataset(_Indexed(x, y))
                meta = {"n": int(len(x)), "shape": list(x.shape[1:]), "fingerprint": fingerprint(x, y)}
                with open(path + ".json", "w") as f:
                    json.dump(meta, f)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _page_size(x: np.ndarray) -> int:
    """FFCV pages must hold at least one sample: the default 8 MiB, or more for huge images."""
    need = int(np.prod(x.shape[1:])) + 4096
    size = 1 << 23
    while size < need:
        size <<= 1
    return size


def mask_loader(path: str, indices: np.ndarray, batch_size: int, seed: int, device, num_workers: int = 2,
                drop_last: bool = True, shuffle: bool = True):
    """An FFCV Loader over `indices` of the .beton at `path`.

    Yields (images uint8 [B, C, H, W], labels int64 [B], example indices int64 [B]) on
    `device`. With shuffle, each epoch is a fresh seeded permutation of the indices
    (OrderOption.RANDOM); without, the indices in order (OrderOption.SEQUENTIAL).
    FFCV writes batches into a few buffers it reuses: copy what must outlive the next batch.
    """
    require()
    import torch
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    dev = torch.device(device)
    indices = _check_indices(indices)
    to_dev = [ToDevice(dev, non_blocking=True)] if dev.type != "cpu" else []

    def ints():
        return [IntDecoder(), ToTensor(), Squeeze(1), *to_dev]

    return Loader(path, batch_size=int(batch_size), num_workers=max(1, int(num_workers)),
                  order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL,
                  seed=int(seed), indices=indices, drop_last=drop_last, os_cache=True,
                  pipelines={"image": [NDArrayDecoder(), ToTensor(), *to_dev],
                             "label": ints(), "index": ints()})


def _check_indices(indices) -> np.ndarray:
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    if len(indices) == 0:
        raise ValueError("ffcv: the mask selects no examples")
    return indices


def retarget(loader, indices, seed: int):
    """Point an existing Loader at another mask and seed, restarting its epoch count.

    FFCV compiles a Loader's pipeline on its first epoch (about a second on a CPU); a
    training actor keeps one Loader per model slot and retargets it for every new model
    instead of paying that again. Relies on ffcv 1.0.2's Loader / TraversalOrder
    attributes (indices, seed, next_epoch, first_traversal_order); the extra pins that
    version and tests/test_ffcv.py checks the result epoch by epoch.
    """
    indices = _check_indices(indices)
    if len(indices) != len(loader.indices):
        raise ValueError(f"ffcv: retarget keeps the mask size ({len(loader.indices)}), got {len(indices)}")
    loader.indices = indices
    loader.seed = int(seed)
    loader.traversal_order.indices = indices
    loader.traversal_order.seed = int(seed)
    loader.next_epoch = 0
    loader.first_traversal_order = loader.next_traversal_order()
    return loader
