"""Tests for workers.data: each loader reads tiny files written in the real published format
(idx / idx.gz, CIFAR-10 binary records, CIFAR-10 python pickles) back exactly; broken
files, hostile pickles and impossible selections raise a one-line DataError."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from workers.data import (
    DataError,
    ImageData,
    check_available,
    load_dataset,
    read_idx,
    safe_load_pickle,
    select,
)

FASHION_REAL = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------
# writers for the real formats
# --------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """idx: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 dims, then the data."""
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)


def make_fashion(root: Path, gz: bool = True, n_train: int = 6, n_test: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(root / (stem + (".gz" if gz else "")), arr, gz)
    return arrays


N_PER_BATCH = 20


def make_cifar_arrays(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Six batches (5 train + test) of N_PER_BATCH images: (data uint8 [n, 3072], labels)."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(0, 256, (N_PER_BATCH, 3072), dtype=np.uint8),
            rng.integers(0, 10, N_PER_BATCH).astype(np.int64),
        )
        for _ in range(6)
    ]


BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def make_cifar_bin(folder: Path, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    batches = make_cifar_arrays(seed)
    for name, (data, labels) in zip(BATCH_NAMES, batches):
        records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    return batches


def cifar_dict(name: str, data: np.ndarray, labels: np.ndarray) -> dict:
    """The dict CIFAR-10's python batches hold (bytes keys, labels as a list of ints)."""
    return {
        b"batch_label": f"{name} of 5".encode("latin1"),
        b"labels": [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode("latin1") for i in range(len(labels))],
    }


def make_cifar_py(folder: Path, seed: int = 0, pickler=None):
    folder.mkdir(parents=True, exist_ok=True)
    batches = make_cifar_arrays(seed)
    for name, (data, labels) in zip(BATCH_NAMES, batches):
        with open(folder / name, "wb") as f:
            if pickler is None:
                pickle.dump(cifar_dict(name, data, labels), f, protocol=2)
            else:
                pickler(f).dump(cifar_dict(name, data, labels))
    return batches


class Py2StylePickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for CIFAR-10: bytes as (SHORT_)BINSTRING and
    ndarrays reconstructed via 'numpy.core.multiarray _reconstruct'."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f):
        super().__init__(f, protocol=2)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is np.zeros(1).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def expected_cifar(batches):
    x_train = np.concatenate([d for d, _ in batches[:5]]).reshape(-1, 3, 32, 32)
    y_train = np.concatenate([y for _, y in batches[:5]])
    return x_train, y_train, batches[5][0].reshape(-1, 3, 32, 32), batches[5][1]


def assert_cifar_equal(data: ImageData, batches) -> None:
    x_tr, y_tr, x_te, y_te = expected_cifar(batches)
    assert data.name == "cifar10" and data.num_classes == 10
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert data.x_train.shape == (5 * N_PER_BATCH, 3, 32, 32)
    assert data.x_test.shape == (N_PER_BATCH, 3, 32, 32)
    np.testing.assert_array_equal(data.x_train, x_tr)
    np.testing.assert_array_equal(data.y_train, y_tr)
    np.testing.assert_array_equal(data.x_test, x_te)
    np.testing.assert_array_equal(data.y_test, y_te)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------
# Fashion-MNIST / idx
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx_roundtrip(tmp_path, gz):
    arrays = make_fashion(tmp_path, gz=gz)
    check_available("fashion_mnist", str(tmp_path))
    data = load_dataset("fashion_mnist", str(tmp_path))
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    np.testing.assert_array_equal(data.x_train[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.x_test[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert data.x_train.flags.writeable


def test_idx_header_dims_are_honoured(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_fashion_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError) as e:
        check_available("fashion_mnist", str(tmp_path / "nope"))
    msg = one_line(e)
    assert "task.data.root=" in msg and "dataset-fashion-mnist" in msg
    make_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", str(tmp_path))


def test_fashion_truncated_gz(tmp_path):
    make_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz is corrupt" in one_line(e)


def test_fashion_uncompressed_short_data(tmp_path):
    arrays = make_fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-1])
    with pytest.raises(DataError, match="header says"):
        load_dataset("fashion_mnist", str(tmp_path))


def test_fashion_bad_magic(tmp_path):
    arrays = make_fashion(tmp_path)
    bad = bytearray(idx_bytes(arrays["train-labels-idx1-ubyte"]))
    bad[2] = 0x0D  # float32 type code: not what Fashion-MNIST ships
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(bad)))
    with pytest.raises(DataError, match="magic"):
        check_available("fashion_mnist", str(tmp_path))
    with pytest.raises(DataError, match="magic"):
        load_dataset("fashion_mnist", str(tmp_path))


def test_fashion_count_mismatch(tmp_path):
    make_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="6 vs 5|6 images but 5 labels"):
        check_available("fashion_mnist", str(tmp_path))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        load_dataset("fashion_mnist", str(tmp_path))


@pytest.mark.skipif(
    not FASHION_REAL.is_dir(),
    reason=f"{FASHION_REAL} absent: install Debian package dataset-fashion-mnist to run this",
)
def test_real_fashion_mnist():
    check_available("fashion_mnist")
    data = load_dataset("fashion_mnist")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.y_train.shape == (60000,) and data.y_test.shape == (10000,)
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(data.y_train, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_test, minlength=10), [1000] * 10)
    assert data.x_train.max() == 255 and data.x_train.min() == 0


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


def test_digits():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_test.shape == (359, 1, 8, 8)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert data.x_train.max() == 255 and data.x_train.min() == 0
    # the split is a partition of the 1797 images, and fixed
    ref = load_digits()
    ref_x = np.rint(ref.images * 255 / 16).astype(np.uint8)
    both = np.concatenate([data.x_train[:, 0], data.x_test[:, 0]])
    both_y = np.concatenate([data.y_train, data.y_test])
    order = np.lexsort(both.reshape(len(both), -1).T)
    ref_order = np.lexsort(ref_x.reshape(len(ref_x), -1).T)
    np.testing.assert_array_equal(both[order], ref_x[ref_order])
    np.testing.assert_array_equal(np.sort(both_y), np.sort(ref.target))
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.x_test, data.x_test)
    check_available("digits")


# --------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_cifar_bin_roundtrip(tmp_path, point_at):
    batches = make_cifar_bin(tmp_path / "cifar-10-batches-bin")
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-bin"
    check_available("cifar10", str(root))
    assert_cifar_equal(load_dataset("cifar10", str(root)), batches)


@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_cifar_py_roundtrip(tmp_path, point_at):
    batches = make_cifar_py(tmp_path / "cifar-10-batches-py")
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    check_available("cifar10", str(root))
    assert_cifar_equal(load_dataset("cifar10", str(root)), batches)


def test_cifar_py_python2_style_pickle(tmp_path):
    batches = make_cifar_py(tmp_path / "cifar-10-batches-py", pickler=Py2StylePickler)
    raw = (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw
    assert_cifar_equal(load_dataset("cifar10", str(tmp_path)), batches)


# The opcodes Python 2's cPickle wrote for CIFAR-10's batches (cf. the opening of the real
# data_batch_1), for a 2x3 uint8 array and two labels: dtype args as ints, strings as 'U'.
PY2_CIFAR_STYLE = (
    b"\x80\x02}q\x01(U\x04dataq\x02cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\n"
    b"ndarray\nq\x04K\x00\x85U\x01b\x87Rq\x05(K\x01K\x02K\x03\x86cnumpy\ndtype\nq\x06U\x02u1"
    b"K\x00K\x01\x87Rq\x07(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x06"
    b"\x00\x01\x02\x03\x04\x05tbU\x06labelsq\x08]q\t(K\x01K\x02eu."
)


def test_safe_unpickler_reads_python2_bytes(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(PY2_CIFAR_STYLE)
    out = safe_load_pickle(path)
    assert out[b"labels"] == [1, 2]
    np.testing.assert_array_equal(out[b"data"], np.arange(6, dtype=np.uint8).reshape(2, 3))


def test_cifar_pixel_layout(tmp_path):
    """Row layout is R plane, G plane, B plane, each 32x32 row-major."""
    folder = tmp_path / "cifar-10-batches-bin"
    make_cifar_bin(folder)
    rec = np.zeros((1, 3073), dtype=np.uint8)
    rec[0, 0] = 7
    rec[0, 1 + 1024 + 32 * 2 + 5] = 200  # green, row 2, column 5
    (folder / "test_batch.bin").write_bytes(rec.tobytes())
    data = load_dataset("cifar10", str(tmp_path))
    assert data.y_test.tolist() == [7]
    assert data.x_test[0, 1, 2, 5] == 200 and int(data.x_test.sum()) == 200


def test_cifar_prefers_binary_when_both_exist(tmp_path, caplog):
    bin_batches = make_cifar_bin(tmp_path / "cifar-10-batches-bin", seed=1)
    make_cifar_py(tmp_path / "cifar-10-batches-py", seed=2)
    with caplog.at_level("INFO", logger="workers.data"):
        data = load_dataset("cifar10", str(tmp_path))
    assert_cifar_equal(data, bin_batches)
    assert "bin format" in caplog.text


def test_cifar_default_root_from_env(tmp_path, monkeypatch):
    batches = make_cifar_bin(tmp_path / "cifar10" / "cifar-10-batches-bin")
    monkeypatch.setenv("DATAMODELS_DATA", str(tmp_path))
    assert_cifar_equal(load_dataset("cifar10"), batches)
    monkeypatch.setenv("DATAMODELS_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError) as e:
        check_available("cifar10")
    msg = one_line(e)
    assert "task.data.root=" in msg and "DATAMODELS_DATA" in msg


def test_cifar_missing_batch(tmp_path):
    make_cifar_bin(tmp_path / "cifar-10-batches-bin")
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(DataError) as e:
        check_available("cifar10", str(tmp_path))
    assert "data_batch_3.bin" in one_line(e)


def test_cifar_bin_truncated(tmp_path):
    make_cifar_bin(tmp_path / "cifar-10-batches-bin")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="data_batch_2.bin is corrupt"):
        check_available("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="data_batch_2.bin is corrupt"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar_bin_bad_label(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    make_cifar_bin(folder)
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[3073] = 10  # label of the second record
    (folder / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="label outside 0..9"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar_py_truncated_and_malformed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = make_cifar_py(folder)
    path = folder / "data_batch_1"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path))
    assert "data_batch_1 is corrupt" in one_line(e)

    data, labels = batches[0]
    bad = cifar_dict("x", data.reshape(-1, 3, 32, 32), labels)  # wrong shape
    path.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"expected uint8 \[n, 3072\]"):
        load_dataset("cifar10", str(tmp_path))

    bad = cifar_dict("x", data, labels[:-1])  # one label short
    path.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="labels of shape"):
        load_dataset("cifar10", str(tmp_path))


class _Evil:
    """Pickles as a call func(*args) at load time."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", [os.system, eval, __import__])
def test_malicious_pickle_refused(tmp_path, func):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar_py(folder)
    marker = tmp_path / "pwned"
    cmd = {
        os.system: f"touch {marker}",
        eval: f"open({str(marker)!r}, 'w').close()",
        __import__: "os",
    }[func]
    evil = {b"data": _Evil(func, cmd), b"labels": [0]}
    (folder / "data_batch_4").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path))
    msg = one_line(e)
    assert "refused by the safe unpickler" in msg and "is not allowed" in msg
    assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path):
    """The one non-numpy global allowed, _codecs.encode, accepts only (str, 'latin1')."""
    import codecs

    path = tmp_path / "p"
    path.write_bytes(pickle.dumps(_Evil(codecs.encode, "abc", "rot13"), protocol=2))
    with pytest.raises(DataError, match="refused by the safe unpickler"):
        safe_load_pickle(path)
    path.write_bytes(pickle.dumps({b"k": b"\xff\x00v"}, protocol=2))
    assert safe_load_pickle(path) == {b"k": b"\xff\x00v"}


def test_safe_unpickler_reads_numpy_pickles_of_any_protocol(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(4, 6)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps({"a": arr, "s": np.int64(3)}, protocol=protocol))
        out = safe_load_pickle(path)
        np.testing.assert_array_equal(out["a"], arr)
        assert out["s"] == 3


def test_unknown_dataset_name():
    for fn in (load_dataset, check_available):
        with pytest.raises(DataError) as e:
            fn("mnist")
        msg = one_line(e)
        assert "task.data.name='mnist'" in msg and "cifar10" in msg


# --------------------------------------------------------------------------------------
# select
# --------------------------------------------------------------------------------------


def toy_data(n_train: int = 100, n_test: int = 30) -> ImageData:
    """Each image's single pixel holds its index (mod 256), so selections are traceable."""
    x_train = (np.arange(n_train) % 256).astype(np.uint8).reshape(-1, 1, 1, 1)
    x_test = (np.arange(n_test) % 256).astype(np.uint8).reshape(-1, 1, 1, 1)
    return ImageData(
        "toy", x_train, np.arange(n_train, dtype=np.int64), x_test,
        np.arange(1000, 1000 + n_test, dtype=np.int64), num_classes=10,
    )


def test_select_sizes_and_reproducibility():
    data = toy_data()
    x_tr, y_tr, x_tg, y_tg = select(data, 40, 10, seed=3)
    assert x_tr.shape == (40, 1, 1, 1) and y_tr.shape == (40,)
    assert x_tg.shape == (10, 1, 1, 1) and y_tg.shape == (10,)
    assert len(np.unique(y_tr)) == 40 and np.all(np.diff(y_tr) > 0)  # a set, in order
    assert np.all(y_tg >= 1000)  # targets from the test split
    np.testing.assert_array_equal(x_tr[:, 0, 0, 0], y_tr)  # images travel with labels
    again = select(data, 40, 10, seed=3)
    for a, b in zip((x_tr, y_tr, x_tg, y_tg), again):
        np.testing.assert_array_equal(a, b)
    other = select(data, 40, 10, seed=4)
    assert not np.array_equal(other[1], y_tr)
    x_tr[:] = 0  # copies: the dataset is untouched
    assert data.x_train.any()


def test_select_first_and_train_targets():
    data = toy_data()
    _, y_tr, _, y_tg = select(data, 25, 5, train_subset="first")
    np.testing.assert_array_equal(y_tr, np.arange(25))
    np.testing.assert_array_equal(y_tg, 1000 + np.arange(5))
    _, y_tr, _, y_tg = select(data, 30, 12, seed=1, target_split="train")
    assert set(y_tg) <= set(y_tr) and len(set(y_tg)) == 12
    _, y_tr, _, y_tg = select(data, 100, 30)  # everything
    np.testing.assert_array_equal(y_tr, np.arange(100))
    np.testing.assert_array_equal(y_tg, 1000 + np.arange(30))


def test_select_errors():
    data = toy_data()
    with pytest.raises(DataError) as e:
        select(data, 10, 20000)
    assert one_line(e) == (
        "task.n_targets=20000 but toy has 30 test examples; lower task.n_targets"
    )
    with pytest.raises(DataError) as e:
        select(data, 101, 5)
    assert "task.n_train=101" in one_line(e) and "100 training examples" in str(e.value)
    with pytest.raises(DataError, match="raise task.n_train"):
        select(data, 10, 11, target_split="train")
    with pytest.raises(DataError, match="task.n_targets=0"):
        select(data, 10, 0)
    with pytest.raises(DataError, match="task.train_subset"):
        select(data, 10, 5, train_subset="last")
    with pytest.raises(DataError, match="task.target_split"):
        select(data, 10, 5, target_split="val")
