"""Dataset loaders for the shipped image tasks: Fashion-MNIST, scikit-learn's digits, CIFAR-10.

Each returns an `ImageData` (uint8 images [N, C, H, W], int64 labels) read from the
datasets' own file formats: idx, CIFAR binary, CIFAR python pickles (restricted unpickler).
`select` draws a task's seeded training subset and targets; user mistakes raise DataError.
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DATASETS = ("fashion_mnist", "digits", "cifar10")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR10_ROOT = "~/data/cifar10"
DATA_ENV = "DATAMODELS_DATA"
# Class names of the shipped datasets, by label index.
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "digits": ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
}
TRAIN_SUBSETS = ("random", "first")
TARGET_SPLITS = ("test", "train")


class DataError(ValueError):
    """A dataset is missing, malformed, or asked for in a way it cannot serve.

    The message is one line naming the config setting and the fix.
    """


@dataclass
class ImageData:
    """A labelled image classification dataset, held in memory as uint8."""

    name: str
    x_train: np.ndarray  # uint8 [N, C, H, W]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray  # uint8 [M, C, H, W]
    y_test: np.ndarray  # int64 [M]
    num_classes: int


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def load_dataset(name: str, root: str | None = None) -> ImageData:
    """Load dataset `name` (one of DATASETS) from `root`, or from its default location."""
    if name == "fashion_mnist":
        data = _load_fashion_mnist(root)
    elif name == "digits":
        data = _load_digits(root)
    elif name == "cifar10":
        data = _load_cifar10(root)
    else:
        raise _unknown_name(name)
    log.info("loaded %s: train %s, test %s", name, data.x_train.shape, data.x_test.shape)
    return data


def check_available(name: str, root: str | None = None) -> None:
    """Raise DataError unless dataset `name` looks loadable from `root`.

    Cheap: checks that the files exist under the expected names and reads only their
    headers (idx) or sizes (CIFAR binary); it does not decode the images.
    """
    if name == "fashion_mnist":
        files = _fashion_mnist_files(root)
        counts = {key: _read_idx_header(path)[1][0] for key, path in files.items()}
        for split in ("train", "test"):
            if counts[f"{split}_images"] != counts[f"{split}_labels"]:
                raise DataError(
                    f"task.data.root={files[f'{split}_images'].parent}: "
                    f"{split} images and labels disagree in count ({counts[f'{split}_images']} "
                    f"vs {counts[f'{split}_labels']}); re-download Fashion-MNIST"
                )
    elif name == "digits":
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError as e:
            raise DataError(
                "task.data.name=digits needs scikit-learn; pip install scikit-learn"
            ) from e
    elif name == "cifar10":
        fmt, folder = _find_cifar10(root)
        for path in _cifar10_files(fmt, folder):
            if fmt == "bin":
                _check_cifar_bin_size(path)
    else:
        raise _unknown_name(name)


def select(
    data: ImageData,
    n_train: int,
    n_targets: int,
    seed: int = 0,
    train_subset: str = "random",
    target_split: str = "test",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training subset and the targets a task works on: (x_tr, y_tr, x_tg, y_tg).

    `train_subset` "random" takes n_train training examples by a permutation seeded with
    `seed`, "first" the first n_train; the chosen indices keep the dataset's order.
    Targets are n_targets examples of `target_split`: the test split, or ("train") the
    chosen training subset itself; they are drawn by the same rule (seeded random, or the
    first n_targets). Returned arrays are copies.
    """
    if train_subset not in TRAIN_SUBSETS:
        raise DataError(
            f"task.train_subset={train_subset!r} is not one of {TRAIN_SUBSETS}; "
            "set task.train_subset=random or task.train_subset=first"
        )
    if target_split not in TARGET_SPLITS:
        raise DataError(
            f"task.target_split={target_split!r} is not one of {TARGET_SPLITS}; "
            "set task.target_split=test or task.target_split=train"
        )
    n_avail = len(data.y_train)
    if not 1 <= n_train <= n_avail:
        raise DataError(
            f"task.n_train={n_train} but {data.name} has {n_avail} training examples; "
            f"set task.n_train between 1 and {n_avail}"
        )
    rng = np.random.default_rng(seed)
    train_idx = _draw(rng, n_avail, n_train, train_subset)
    x_tr, y_tr = data.x_train[train_idx], data.y_train[train_idx]

    if target_split == "test":
        pool_x, pool_y = data.x_test, data.y_test
        what = f"{data.name} has {len(pool_y)} test examples"
    else:
        pool_x, pool_y = x_tr, y_tr
        what = f"the training subset has task.n_train={n_train} examples"
    if not 1 <= n_targets <= len(pool_y):
        fix = "lower task.n_targets" if n_targets > 0 else "set task.n_targets >= 1"
        if n_targets > 0 and target_split == "train" and n_train < n_avail:
            fix += " or raise task.n_train"
        raise DataError(f"task.n_targets={n_targets} but {what}; {fix}")
    target_idx = _draw(rng, len(pool_y), n_targets, train_subset)
    return x_tr, y_tr, pool_x[target_idx], pool_y[target_idx]


def flip_labels(y: np.ndarray, num_classes: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: round(rate·n) examples, drawn without replacement from a generator
    seeded with `seed`, each get a label drawn uniformly from the other num_classes − 1 classes
    (a flipped label is never the true one). Returns (the noisy labels, flipped bool [n]); the
    input is not changed."""
    y = np.asarray(y)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate {rate} must be in [0, 1)")
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    rng = np.random.default_rng([int(seed), 0x4E01])      # its own stream: not the subset's draw
    k = int(round(rate * len(y)))
    ids = np.sort(rng.choice(len(y), size=k, replace=False))
    noisy = y.copy()
    noisy[ids] = (y[ids] + rng.integers(1, num_classes, size=k)) % num_classes
    flipped = np.zeros(len(y), bool)
    flipped[ids] = True
    return noisy, flipped


def _draw(rng: np.random.Generator, n: int, k: int, mode: str) -> np.ndarray:
    """k of range(n): the first k, or a seeded random k-subset in increasing order."""
    if mode == "first":
        return np.arange(k)
    return np.sort(rng.permutation(n)[:k])


def _unknown_name(name: str) -> DataError:
    return DataError(
        f"task.data.name={name!r} is not a known dataset; set task.data.name to one of "
        + "|".join(DATASETS)
    )


# ---------------------------------------------------------------------------------------
# Fashion-MNIST: idx files
# ---------------------------------------------------------------------------------------

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_FIX = "install Debian package dataset-fashion-mnist or set task.data.root=DIR"


def _fashion_mnist_files(root: str | None) -> dict[str, Path]:
    """Paths of the four idx files under `root`; accepts .gz or uncompressed, and the
    'train-images.idx3-ubyte' spelling some mirrors use."""
    folder = Path(root or FASHION_MNIST_ROOT).expanduser()
    if not folder.is_dir():
        raise DataError(f"task.data.root={folder} is not a directory; {_FASHION_FIX}")
    files = {}
    for key, stem in _FASHION_FILES.items():
        dotted = stem.replace("-idx", ".idx")
        for cand in (stem + ".gz", stem, dotted + ".gz", dotted):
            if (folder / cand).is_file():
                files[key] = folder / cand
                break
        else:
            raise DataError(
                f"task.data.root={folder} has no {stem}.gz (nor {stem}); {_FASHION_FIX}"
            )
    return files


def _open_maybe_gz(path: Path) -> io.BufferedIOBase:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _corrupt(path: Path, what: str) -> DataError:
    return DataError(
        f"task.data.root={path.parent}: {path.name} is corrupt ({what}); "
        "re-download it or set task.data.root=DIR"
    )


def _parse_idx_header(head: bytes, path: Path) -> tuple[int, tuple[int, ...]]:
    if len(head) < 4:
        raise _corrupt(path, "shorter than an idx header")
    zero, dtype, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
    if zero != 0 or dtype != 0x08:
        raise _corrupt(path, f"bad idx magic {head[:4].hex()}, expected 000008xx (uint8)")
    if not 1 <= ndim <= 4 or len(head) < 4 + 4 * ndim:
        raise _corrupt(path, f"bad idx header (ndim={ndim})")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return 4 + 4 * ndim, dims


def _read_idx_header(path: Path) -> tuple[int, tuple[int, ...]]:
    """(header length, dims) of an idx file, reading only its first bytes."""
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4 + 4 * 4)
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    return _parse_idx_header(head, path)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (optionally gzip-compressed) as a uint8 array of the header's shape.

    idx layout: two zero bytes, a type byte (0x08 = unsigned byte, the only type this
    reads), the number of dimensions d, d big-endian uint32 sizes, then the data in
    row-major order. Raises DataError if the data length disagrees with the header.
    """
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    offset, dims = _parse_idx_header(raw, path)
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise _corrupt(
            path, f"header says {dims} = {expected} bytes, file holds {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _load_fashion_mnist(root: str | None) -> ImageData:
    files = _fashion_mnist_files(root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        path = files[f"{split}_images"]
        if x.ndim != 3 or y.ndim != 1:
            raise _corrupt(path, f"images have shape {x.shape}, labels {y.shape}")
        if len(x) != len(y):
            raise _corrupt(path, f"{len(x)} images but {len(y)} labels")
        if len(y) and y.max() >= 10:
            raise _corrupt(files[f"{split}_labels"], f"label {y.max()} outside 0..9")
    return ImageData(
        name="fashion_mnist",
        x_train=arrays["train_images"][:, None].copy(),
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=arrays["test_images"][:, None].copy(),
        y_test=arrays["test_labels"].astype(np.int64),
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# ---------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _load_digits(root: str | None) -> ImageData:
    """scikit-learn's 1797 8x8 digits, 0..16 scaled to uint8 0..255 (round(v*255/16)),
    split 80/20 by a permutation seeded with DIGITS_SPLIT_SEED (digits has no split)."""
    if root:
        log.warning("task.data.root=%s is ignored for digits (bundled with scikit-learn)", root)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("task.data.name=digits needs scikit-learn; pip install scikit-learn") from e
    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return ImageData("digits", x[train], y[train], x[test], y[test], num_classes=10)


# ---------------------------------------------------------------------------------------
# CIFAR-10: binary and python formats
# ---------------------------------------------------------------------------------------

_CIFAR_DIRS = {"bin": "cifar-10-batches-bin", "py": "cifar-10-batches-py"}
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + R, G, B planes of 32x32
_CIFAR_FIX = (
    "download CIFAR-10 (binary or python version) from https://www.cs.toronto.edu/~kriz/cifar.html "
    f"and set task.data.root=DIR (or env {DATA_ENV})"
)


def _cifar10_files(fmt: str, folder: Path) -> list[Path]:
    """data_batch_1..5 then test_batch, with '.bin' for the binary format."""
    ext = ".bin" if fmt == "bin" else ""
    names = [f"data_batch_{i}{ext}" for i in range(1, 6)] + [f"test_batch{ext}"]
    return [folder / n for n in names]


def _cifar10_default_roots() -> list[Path]:
    env = os.environ.get(DATA_ENV)
    if env:
        return [Path(env).expanduser() / "cifar10", Path(env).expanduser()]
    return [Path(CIFAR10_ROOT).expanduser()]


def _find_cifar10(root: str | None) -> tuple[str, Path]:
    """(format, batches folder). `root` may hold cifar-10-batches-{bin,py}/ or be one.

    The binary format is preferred when both are present: it needs no unpickling.
    """
    roots = [Path(root).expanduser()] if root else _cifar10_default_roots()
    for base in roots:
        for fmt in ("bin", "py"):
            for folder in (base / _CIFAR_DIRS[fmt], base):
                files = _cifar10_files(fmt, folder)
                if any(p.is_file() for p in files):
                    missing = [p.name for p in files if not p.is_file()]
                    if missing:
                        raise DataError(
                            f"task.data.root={base}: CIFAR-10 folder {folder} lacks "
                            f"{', '.join(missing)}; re-download it or set task.data.root=DIR"
                        )
                    return fmt, folder
    where = " nor ".join(str(r) for r in roots)
    raise DataError(f"task.data.root={where} holds no CIFAR-10 batches; {_CIFAR_FIX}")


def _check_cifar_bin_size(path: Path) -> int:
    size = path.stat().st_size
    if size == 0 or size % _CIFAR_RECORD:
        raise _corrupt(path, f"{size} bytes is not a whole number of {_CIFAR_RECORD}-byte records")
    return size // _CIFAR_RECORD


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes (R, G, B planes, each 32x32 row-major)."""
    n = _check_cifar_bin_size(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != n * _CIFAR_RECORD:
        raise _corrupt(path, "file changed while reading")
    rec = raw.reshape(n, _CIFAR_RECORD)
    return rec[:, 1:].reshape(n, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global (or a call) that SafeUnpickler does not allow."""


class _Codecs:
    """Stand-in for `_codecs.encode` as Python 3 pickles bytes at protocol <= 2:
    encode(str, 'latin1'). Anything other than that exact call is refused."""

    @staticmethod
    def encode(obj: object, encoding: str = "utf-8") -> bytes:
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
            what = f"_codecs.encode({type(obj).__name__}, {encoding!r})"
            raise RefusedGlobal(f"{what} is not allowed")
        return obj.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled ndarray refers to, under numpy 1.x and 2.x module names."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _Codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts, lists and numpy arrays and nothing else.

    `find_class` resolves only the handful of numpy globals an ndarray pickle names (plus
    `_codecs.encode` restricted to latin1, for bytes pickled by Python 3 at protocol 2);
    any other global (os.system, builtins.eval, ...) raises RefusedGlobal, so loading a
    hostile file cannot run code.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"global {module}.{name} is not allowed") from None


def safe_load_pickle(path: str | os.PathLike) -> object:
    """Unpickle `path` with SafeUnpickler (encoding='bytes', as CIFAR's Python 2 files need)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(
            f"task.data.root={path.parent}: {path.name} refused by the safe unpickler ({e}); "
            "use the official CIFAR-10 files or the binary version"
        ) from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e


def _read_cifar_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A pickled dict with b'data' uint8 [n, 3072] and b'labels' (n ints in 0..9)."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise _corrupt(path, f"holds a {type(obj).__name__}, expected a dict")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise _corrupt(path, "no b'data' array or no b'labels'")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _corrupt(path, f"b'data' is {data.dtype} {data.shape}, expected uint8 [n, 3072]")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise _corrupt(path, f"b'labels' are not integers ({e})") from e
    if y.shape != (len(data),):
        raise _corrupt(path, f"{len(data)} images but labels of shape {y.shape}")
    return data.reshape(-1, 3, 32, 32).copy(), y


def _load_cifar10(root: str | None) -> ImageData:
    fmt, folder = _find_cifar10(root)
    read = _read_cifar_bin if fmt == "bin" else _read_cifar_py
    parts = [read(p) for p in _cifar10_files(fmt, folder)]
    for path, (_, y) in zip(_cifar10_files(fmt, folder), parts):
        if len(y) and (y.min() < 0 or y.max() >= 10):
            raise _corrupt(path, f"label outside 0..9 (min {y.min()}, max {y.max()})")
    log.info("CIFAR-10 %s format from %s", fmt, folder)
    x_train = np.concatenate([x for x, _ in parts[:5]])
    y_train = np.concatenate([y for _, y in parts[:5]])
    return ImageData("cifar10", x_train, y_train, parts[5][0], parts[5][1], num_classes=10)
