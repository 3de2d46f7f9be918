"""The ledger: the durable record of every trained model, one Parquet file per work unit.

Files are written under a temporary name and renamed (a single PUT on object stores), so a
reader never sees half a file. Readers ignore temporary files, keep one row per
(mask set, model id, replica), load (X, Y) for a mask set without a Python loop per row, and
move a corrupt file to `_quarantine/` with an error in the log instead of dropping it.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

QUARANTINE = "_quarantine"
TMP_PREFIX = ".tmp-"


class LedgerError(RuntimeError):
    """A ledger that cannot be read as asked (wrong shapes, not a ledger)."""


def schema(n_bytes: int, n_targets: int) -> pa.Schema:
    """One row per trained model; the mask is bit-packed (workers.bits), margins float32 [T]."""
    return pa.schema([
        ("mask_set", pa.string()),
        ("model_id", pa.int64()),
        ("replica", pa.int32()),
        ("seed", pa.int64()),
        ("alpha", pa.float64()),
        ("mask", pa.binary(n_bytes)),
        ("margins", pa.list_(pa.float32(), n_targets)),
        ("train_acc", pa.float32()),
        ("target_acc", pa.float32()),
        ("loss", pa.float32()),
        ("seconds", pa.float32()),
        ("host", pa.string()),
        ("unit", pa.string()),
        ("code_version", pa.string()),
        ("config_hash", pa.string()),
    ])


@dataclass
class MaskSetData:
    """What the fit and evaluate stages read: one row per distinct model, sorted by key."""
    packed: np.ndarray          # uint8 [m, ceil(n/8)]
    margins: np.ndarray         # float32 [m, T]
    model_id: np.ndarray        # int64 [m]
    replica: np.ndarray         # int32 [m]
    extra: dict = field(default_factory=dict)  # train_acc, target_acc, loss, seconds

    def __len__(self) -> int:
        return len(self.model_id)


def atomic_write(table: pa.Table, fs, final: str, local: bool) -> None:
    """Write `table` to `final` so that no reader ever sees a partial file: a temporary
    name plus rename on a local disk; on object stores the object appears only when its
    upload completes."""
    parent = final.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if local:
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}.parquet"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:
        pq.write_table(table, final, filesystem=fs, compression="zstd")


def filesystem(path: str):
    """(pyarrow filesystem, root path, is_local) for a local path or a URI."""
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
        return fs, root, False
    return pafs.LocalFileSystem(), os.path.abspath(path), True


class Ledger:
    """A Parquet dataset of trained models at `path` (local directory or pyarrow URI)."""

    def __init__(self, path: str):
        self.path = path
        self.fs, self.root, self.local = filesystem(path)
        self.quarantined: list[str] = []

    # ---------------------------------------------------------------- writing
    def write_unit(self, unit: str, rows: dict) -> str:
        """Write one work unit's rows as one file, atomically; returns the final path.

        `rows` maps column name to a sequence; `mask` is uint8 [k, n_bytes], `margins`
        float32 [k, T]. A retried unit writes a second file with the same keys; readers keep
        one row per key.
        """
        packed = np.ascontiguousarray(rows["mask"], dtype=np.uint8)
        margins = np.ascontiguousarray(rows["margins"], dtype=np.float32)
        k, n_bytes = packed.shape
        if margins.ndim != 2 or margins.shape[0] != k:
            raise LedgerError(f"unit {unit}: margins shape {margins.shape} does not match {k} masks")
        sch = schema(n_bytes, margins.shape[1])
        cols = {}
        for name in sch.names:
            if name == "mask":
                cols[name] = pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(n_bytes), k, [None, pa.py_buffer(packed.tobytes())])
            elif name == "margins":
                cols[name] = pa.FixedSizeListArray.from_arrays(
                    pa.array(margins.reshape(-1), pa.float32()), margins.shape[1])
            elif name == "host":
                cols[name] = pa.array(rows.get("host", [socket.gethostname()] * k), pa.string())
            elif name == "unit":
                cols[name] = pa.array([unit] * k, pa.string())
            else:
                cols[name] = pa.array(np.asarray(rows[name]).tolist(), sch.field(name).type)
        table = pa.Table.from_pydict(cols, schema=sch)
        final = f"{self.root}/{unit}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write(table, self.fs, final, self.local)
        return final

    # ---------------------------------------------------------------- reading
    def files(self) -> list[str]:
        """Finished unit files (temporary and quarantined files are not listed)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        except FileNotFoundError:
            return []
        return sorted(
            i.path for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
            and not i.base_name.startswith((".", "_"))
        )

    def _quarantine(self, path: str, err: Exception) -> None:
        qdir = f"{self.root}/{QUARANTINE}"
        self.fs.create_dir(qdir, recursive=True)
        dest = f"{qdir}/{path.rsplit('/', 1)[-1]}"
        self.fs.move(path, dest)
        self.quarantined.append(dest)
        log.error("ledger: corrupt file %s moved to %s (%s); its models will be retrained",
                  path, dest, str(err).splitlines()[0])

    def read_table(self, columns: list[str] | None = None, mask_set: str | None = None) -> pa.Table | None:
        """All rows (duplicates included), quarantining unreadable files first."""
        files = self.files()
        if not files:
            return None
        good = []
        for path in files:
            try:
                meta = pq.read_metadata(path, filesystem=self.fs)
                names = meta.schema.to_arrow_schema().names
                if "margins" not in names or "model_id" not in names:
                    raise LedgerError("not a ledger file (no margins/model_id columns)")
                good.append(path)
            except Exception as err:  # noqa: BLE001 - any unreadable file is quarantined
                self._quarantine(path, err)
        if not good:
            return None
        dataset = ds.dataset(good, format="parquet", filesystem=self.fs)
        flt = ds.field("mask_set") == mask_set if mask_set is not None else None
        try:
            return dataset.to_table(columns=columns, filter=flt)
        except (pa.ArrowInvalid, OSError) as err:
            # A file whose footer is fine but whose pages are not: find it one by one.
            for path in good:
                try:
                    pq.read_table(path, filesystem=self.fs, columns=columns)
                except Exception as err2:  # noqa: BLE001
                    self._quarantine(path, err2)
            if len(self.quarantined) == 0:
                raise LedgerError(f"ledger {self.path}: {err}") from err
            return self.read_table(columns, mask_set)

    def keys(self, mask_set: str | None = None) -> set[tuple[str, int, int]]:
        """The distinct (mask_set, model_id, replica) keys present."""
        table = self.read_table(["mask_set", "model_id", "replica"], mask_set)
        if table is None:
            return set()
        return set(zip(table["mask_set"].to_pylist(), table["model_id"].to_pylist(),
                       table["replica"].to_pylist()))

    def count(self, mask_set: str) -> int:
        return len(self.keys(mask_set))

    def _distinct(self, columns: list[str], mask_set: str) -> pa.Table:
        """`columns` of one row per distinct (model_id, replica) of mask_set, sorted by that key."""
        table = self.read_table(columns, mask_set)
        if table is None or table.num_rows == 0:
            raise LedgerError(f"ledger {self.path} has no models of mask set '{mask_set}'; run stage=train first")
        mid = table["model_id"].to_numpy()
        rep = table["replica"].to_numpy()
        order = np.lexsort((rep, mid))
        mid_s, rep_s = mid[order], rep[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (mid_s[1:] != mid_s[:-1]) | (rep_s[1:] != rep_s[:-1])
        return table.take(pa.array(order[first]))

    def seconds(self, mask_set: str) -> np.ndarray:
        """Training seconds of every distinct model of mask_set (no masks or margins read)."""
        return self._distinct(["model_id", "replica", "seconds"], mask_set)["seconds"].to_numpy()

    def load(self, mask_set: str, n: int | None = None, n_targets: int | None = None) -> MaskSetData:
        """(packed masks, margins) of every distinct model of `mask_set`, sorted by
        (model_id, replica); checks the shapes against n and T when given."""
        cols = ["model_id", "replica", "mask", "margins", "train_acc", "target_acc", "loss", "seconds"]
        table = self._distinct(cols, mask_set)
        rows = table.num_rows
        mask_col = table["mask"].combine_chunks()
        n_bytes = mask_col.type.byte_width
        packed = np.frombuffer(mask_col.buffers()[1], dtype=np.uint8,
                               count=rows * n_bytes, offset=mask_col.offset * n_bytes)
        packed = packed.reshape(rows, n_bytes).copy()
        marg_col = table["margins"].combine_chunks()
        T = marg_col.type.list_size
        margins = marg_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        margins = margins.reshape(rows, T)
        if n is not None and n_bytes != (n + 7) // 8:
            raise LedgerError(f"ledger {self.path}: masks have {n_bytes} bytes, the task has n={n} "
                              f"training examples; point ledger.path at this experiment's ledger")
        if n_targets is not None and T != n_targets:
            raise LedgerError(f"ledger {self.path}: margins have T={T}, the task has {n_targets} targets; "
                              f"point ledger.path at this experiment's ledger")
        extra = {c: table[c].to_numpy() for c in ("train_acc", "target_acc", "loss", "seconds")}
        return MaskSetData(packed, margins, table["model_id"].to_numpy(), table["replica"].to_numpy(), extra)
