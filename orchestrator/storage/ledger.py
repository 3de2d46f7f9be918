"""The ledger: the durable record of every trained model, one Parquet file per work unit.

Unit files live in the store's `ledger/` and are named by their content digest, written
atomically, and verified before anything in them is used: the footer, page checksums, the
schema column by column, a digest of every column, and each row against the experiment
(config hash, α, the seed of each model, and every mask regenerated from the seed). The
regeneration, most of the work, is done in full once per file content and experiment: the
files that passed are recorded in `ledger/_checked/<key>-<signer>.json`, a record signed with
HMAC-SHA256 under a key kept outside the store (`key_path()`: on the machine that runs the
driver, 0600), covering the experiment's identity, the mask sets and each file's name and
footer digests. A later reader that can verify the record regenerates, for a recorded file
whose footer is unchanged, only a few rows picked at random (`SPOT_ROWS`), and every other
check still runs; a record that does not verify is ignored (one warning) and every file is
checked in full, as is every file when a spot check fails. A
file that fails any check is moved to `ledger/_quarantine/` with one log line, and its
models count as missing (they are retrained). A model whose margins are not finite is kept
as failed, with its reason: counted, never fitted. Duplicate rows for one model (a retried
unit) are resolved by content, the same way on every reader.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import socket
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from orchestrator.errors import UserError
from orchestrator.storage import masks as M
from orchestrator.storage.store import (
    CorruptFile,
    Layout,
    StoreError,
    content_digest,
    file_digests,
    table_digests,
    type_name,
)
from workers import bits

log = logging.getLogger(__name__)

MARGIN_BLOCK = 1024          # targets per margins column: a reader of one target block reads one column
SETS = M.MASK_SETS           # the experiment's own mask sets
FAILED_NONFINITE = "non-finite margins (the model diverged)"
KEY_ENV = "DATAMODELS_KEY_FILE"   # the file of the key that signs the records of checked files
SPOT_ROWS = 2                     # rows of a recorded file regenerated at random by every reader
_SPOT = random.SystemRandom()     # a reader's own choice: not predictable from the store
_KEYS: dict[str, tuple[str, bytes] | None] = {}


class LedgerError(UserError):
    """A ledger that cannot be read as asked (wrong shapes, no models yet)."""


class _SpotCheckFailed(CorruptFile):
    """A file the signed record vouches for fails the rows regenerated at random."""


def key_path() -> str:
    """Where this machine's key for the records of checked files is: $DATAMODELS_KEY_FILE, else
    $XDG_CONFIG_HOME/datamodels/ledger.key (~/.config/datamodels/ledger.key). Outside the store,
    so that whoever can write the store cannot sign a record."""
    if os.environ.get(KEY_ENV):
        return os.path.expanduser(os.environ[KEY_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "datamodels", "ledger.key")


def _read_or_create_key(path: str) -> bytes:
    """The key in `path` (hex, 32 bytes), created 0600 with fresh random bytes if absent; two
    processes creating it at once end up with the one that was linked first."""
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(6)}-{os.path.basename(path)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)        # never replaces a key another process created meanwhile
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise PermissionError(f"other users may read or write it (mode {mode & 0o777:o}); run chmod 600 {path}")
    with open(path) as f:
        key = bytes.fromhex(f.read().strip())
    if len(key) < 16:
        raise ValueError("fewer than 16 bytes")
    return key


def record_key() -> tuple[str, bytes] | None:
    """(key id, key) that signs this machine's records of checked files (key_path(), created on
    first use), or None when it cannot be read or created (one warning per process; then no
    record is trusted or written, and every file is checked in full)."""
    path = key_path()
    if path not in _KEYS:
        try:
            key = _read_or_create_key(path)
            _KEYS[path] = (hmac.new(key, b"datamodels ledger key id", hashlib.sha256).hexdigest()[:12], key)
        except (OSError, ValueError) as err:
            _KEYS[path] = None
            log.warning("ledger: no key for the records of checked files at %s (%s); every ledger file's "
                        "masks are regenerated on every read (set %s to a writable path)",
                        path, str(err)[:160], KEY_ENV)
    return _KEYS[path]


def _footer_digest(digests: dict) -> str:
    """sha256 of a file's footer column digests (each checked against its column on read)."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def margin_columns(n_targets: int, prefix: str = "margins") -> list[tuple[str, int, int]]:
    """(column name, first target, end) of each block of MARGIN_BLOCK targets. The scores
    files of the baselines use the same blocks (prefix "scores")."""
    return [(f"{prefix}_{b}", a, min(a + MARGIN_BLOCK, n_targets))
            for b, a in enumerate(range(0, n_targets, MARGIN_BLOCK))]


def block_columns(a: int, b: int, prefix: str = "margins") -> list[str]:
    """The columns that hold targets [a, b): one when [a, b) lies in one MARGIN_BLOCK."""
    return [f"{prefix}_{k}" for k in range(a // MARGIN_BLOCK, -(-b // MARGIN_BLOCK))]


def block_array(values: np.ndarray, prefix: str = "margins") -> dict[str, pa.Array]:
    """The {prefix}_k columns (fixed-size lists of float32, MARGIN_BLOCK targets each) that
    hold the float32 array `values` [rows, targets]."""
    return {name: pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(values[:, a:b], np.float32).reshape(-1), pa.float32()), b - a)
        for name, a, b in margin_columns(values.shape[1], prefix)}


def decode_masks(table: pa.Table) -> np.ndarray:
    """The `mask` column of a ledger table as uint8 [rows, n_bytes] (a copy, still packed)."""
    col = table["mask"].combine_chunks()
    n_bytes = col.type.byte_width
    return np.frombuffer(col.buffers()[1], dtype=np.uint8, count=len(col) * n_bytes,
                         offset=col.offset * n_bytes).reshape(len(col), n_bytes).copy()


def list_matrix(col) -> np.ndarray:
    """A fixed-size-list column (an Array or a ChunkedArray) as a 2-D array [rows, list size]:
    the decoding of block_array's columns, of the datamodels' weights and of the old scores."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size)


def decode_margins(table: pa.Table, a: int, b: int, prefix: str = "margins") -> np.ndarray:
    """float32 [rows, b - a]: the margins (or another blocked array) of targets [a, b) from the
    table's `block_columns(a, b, prefix)`."""
    out = np.empty((table.num_rows, b - a), np.float32)
    for name in block_columns(a, b, prefix):
        start = int(name.rsplit("_", 1)[1]) * MARGIN_BLOCK
        block = list_matrix(table[name])
        lo, hi = max(a, start), min(b, start + block.shape[1])
        out[:, lo - a:hi - a] = block[:, lo - start:hi - start]
    return out


SELF = "self"                 # prefix of the blocks of margins on the training examples themselves


def schema(n_bytes: int, n_targets: int, n_self: int = 0) -> pa.Schema:
    """One row per trained model; the mask bit-packed (workers.bits), the margins float32
    in blocks of MARGIN_BLOCK targets, `failure` empty for a good model. With n_self > 0
    (task.targets=both) also each model's margins on the n training examples themselves, in
    the same blocks (`self_<b>`), and whether it classifies each one right (`self_correct`,
    bit-packed); without, the schema is the one every ledger had before."""
    fields = [
        pa.field("mask_set", pa.string(), nullable=False),
        pa.field("model_id", pa.int64(), nullable=False),
        pa.field("replica", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("alpha", pa.float64(), nullable=False),
        pa.field("mask", pa.binary(n_bytes), nullable=False),
    ]
    fields += [pa.field(name, pa.list_(pa.float32(), b - a), nullable=False)
               for name, a, b in margin_columns(n_targets)]
    if n_self:
        fields += [pa.field(name, pa.list_(pa.float32(), b - a), nullable=False)
                   for name, a, b in margin_columns(n_self, SELF)]
        fields.append(pa.field(f"{SELF}_correct", pa.binary((n_self + 7) // 8), nullable=False))
    fields += [pa.field(name, kind, nullable=False) for name, kind in (
        ("train_acc", pa.float32()), ("target_acc", pa.float32()), ("loss", pa.float32()),
        ("seconds", pa.float32()), ("host", pa.string()), ("unit", pa.string()),
        ("code_version", pa.string()), ("config_hash", pa.string()), ("failure", pa.string()))]
    return pa.schema(fields)


@dataclass(frozen=True)
class Identity:
    """What every row of this experiment's ledger must agree with."""
    config_hash: str
    alpha: float
    seed: int
    n: int
    n_targets: int
    n_self: int = 0       # training examples whose own margins each row holds (task.targets=both), or 0


def unit_table(unit: str, rows: dict, n_targets: int | None = None, n_self: int = 0) -> pa.Table:
    """One work unit's rows as a table of the ledger schema. `rows` maps column names to
    sequences; `mask` is uint8 [k, n_bytes] (packed), `margins` float32 [k, T]; with n_self,
    `self_margins` float32 [k, n_self] and `self_correct` bool [k, n_self] too."""
    packed = np.ascontiguousarray(rows["mask"], dtype=np.uint8)
    margins = np.ascontiguousarray(rows["margins"], dtype=np.float32)
    k, n_bytes = packed.shape
    if margins.ndim != 2 or margins.shape[0] != k:
        raise LedgerError(f"unit {unit}: margins shape {margins.shape} does not match {k} masks")
    T = margins.shape[1] if n_targets is None else n_targets
    if margins.shape[1] != T:
        raise LedgerError(f"unit {unit}: margins have {margins.shape[1]} targets, expected {T}")
    sch = schema(n_bytes, T, n_self)
    failure = rows.get("failure")
    if failure is None:
        failure = np.where(np.isfinite(margins).all(1), "", FAILED_NONFINITE)
    cols = {}
    blocks = block_array(margins)
    if n_self:
        own = np.ascontiguousarray(rows.get("self_margins", np.zeros((0, 0))), dtype=np.float32)
        right = np.asarray(rows.get("self_correct", np.zeros((0, 0))), dtype=bool)
        if own.shape != (k, n_self) or right.shape != (k, n_self):
            raise LedgerError(f"unit {unit}: margins on the training examples of shape {own.shape} and "
                              f"correctness {right.shape}, expected ({k}, {n_self}) each")
        blocks.update(block_array(own, SELF))
        right_packed = bits.pack(right)
    for f in sch:
        if f.name == "mask":
            cols[f.name] = pa.FixedSizeBinaryArray.from_buffers(f.type, k, [None, pa.py_buffer(packed.tobytes())])
        elif f.name == f"{SELF}_correct":
            cols[f.name] = pa.FixedSizeBinaryArray.from_buffers(f.type, k, [None, pa.py_buffer(right_packed.tobytes())])
        elif f.name.startswith("margins_") or f.name.startswith(f"{SELF}_"):
            cols[f.name] = blocks[f.name]
        elif f.name == "host":
            cols[f.name] = pa.array(list(rows.get("host", [socket.gethostname()] * k)), pa.string())
        elif f.name == "unit":
            cols[f.name] = pa.array([unit] * k, pa.string())
        elif f.name == "failure":
            cols[f.name] = pa.array([str(x) for x in failure], pa.string())
        else:
            cols[f.name] = pa.array(np.asarray(rows[f.name]).tolist(), f.type)
    return pa.Table.from_pydict(cols, schema=sch)


def limits(n_train: int, n_eval: int, replicas: int) -> dict[str, tuple[int, int]]:
    """The models a run with these counts (masks.n_train, masks.n_eval, eval.replicas) uses,
    as Index.limited takes them: train models 0..n_train-1 (replica 0), eval masks
    0..n_eval-1 with replicas 0..replicas-1."""
    return {"train": (int(n_train), 1), "eval": (int(n_eval), int(replicas))}


@dataclass
class MaskSetData:
    """What the fit and evaluate stages read: one row per distinct good model, sorted by key."""
    packed: np.ndarray          # uint8 [m, ceil(n/8)]
    margins: np.ndarray         # float32 [m, T]
    model_id: np.ndarray        # int64 [m]
    replica: np.ndarray         # int32 [m]
    extra: dict = field(default_factory=dict)  # train_acc, target_acc, loss, seconds

    def __len__(self) -> int:
        return len(self.model_id)


@dataclass
class _FileKeys:
    digest: str
    set_code: np.ndarray     # int8: index into the ledger's mask set names
    model_id: np.ndarray
    replica: np.ndarray
    failure: list            # str per row
    footer: str = ""         # _footer_digest of the file: what the record of checked files signs
    spot: bool = False       # its seeds and masks were spot-checked (the record vouched for it)


@dataclass
class Index:
    """The verified ledger as metadata: which file and row holds each model (no masks or
    margins). Duplicates are resolved by the smallest content digest."""
    files: list[str]                 # rel paths, in digest order
    set_code: np.ndarray             # per chosen model
    model_id: np.ndarray
    replica: np.ndarray
    file: np.ndarray                 # index into files (int32)
    row: np.ndarray                  # row inside that file (int32)
    failed: np.ndarray               # bool
    failures: dict                   # position -> reason, for the failed models only
    duplicates: int                  # rows beyond the first for some model
    sets: tuple[str, ...] = SETS     # the mask set names that set_code indexes

    def select(self, mask_set: str, good: bool = True) -> np.ndarray:
        """Positions of the models of `mask_set` (good ones only by default), sorted by key."""
        sel = self.set_code == self.sets.index(mask_set)
        if good:
            sel &= ~self.failed
        return np.flatnonzero(sel)

    def keys(self, mask_set: str | None = None) -> set[tuple[str, int, int]]:
        """Every (mask_set, model_id, replica) present, failed models included."""
        sel = np.ones(len(self.model_id), bool) if mask_set is None else self.set_code == self.sets.index(mask_set)
        return {(self.sets[c], int(i), int(r)) for c, i, r in
                zip(self.set_code[sel], self.model_id[sel], self.replica[sel])}

    def count(self, mask_set: str) -> int:
        return int(len(self.select(mask_set)))

    def failed_models(self) -> list[dict]:
        return [{"mask_set": self.sets[int(self.set_code[p])], "model_id": int(self.model_id[p]),
                 "replica": int(self.replica[p]), "reason": self.failures[p]}
                for p in np.flatnonzero(self.failed)]

    def limited(self, limits: dict[str, tuple[int, int]]) -> Index:
        """The view of the models this run asks for: of each mask set in `limits`, the models
        with model_id < its count and replica < its replicas (masks.n_train, masks.n_eval and
        eval.replicas); mask sets not named are kept whole. A ledger that holds more (an
        experiment run before with larger counts) is read as if it held only these."""
        keep = np.ones(len(self.model_id), bool)
        for name, (count, replicas) in limits.items():
            if name not in self.sets:
                continue
            in_set = self.set_code == self.sets.index(name)
            keep &= ~in_set | ((self.model_id < count) & (self.replica < replicas))
        if keep.all():
            return self
        pos = np.flatnonzero(keep)
        new_of_old = np.full(len(keep), -1, np.int64)
        new_of_old[pos] = np.arange(len(pos))
        return Index(self.files, self.set_code[pos], self.model_id[pos], self.replica[pos], self.file[pos],
                     self.row[pos], self.failed[pos],
                     {int(new_of_old[p]): why for p, why in self.failures.items() if keep[p]},
                     self.duplicates, self.sets)


class Ledger:
    """The ledger of the experiment in `store` (a Store or the RemoteStore of a worker).

    With an `identity`, every file is checked against the experiment before use; without
    one (a reader exploring a ledger) only integrity is checked."""

    def __init__(self, store, identity: Identity | None = None, root: str = Layout.LEDGER,
                 sets: M.MaskSets | None = None, limits: dict[str, tuple[int, int]] | None = None):
        self.store = store
        self.identity = identity
        self.root = root                  # its directory in the store
        self.sets = sets or M.MaskSets()  # its mask sets, and how their masks and seeds are regenerated
        self.limits = limits              # the models this run asks for (Index.limited); None: all
        self.quarantined: list[dict] = []
        self._verified: dict[str, _FileKeys] = {}
        self._checked: dict[str, str] | None = None   # file name -> footer digest, of the signed record

    @property
    def where(self) -> str:
        return self.store.where(self.root)

    # ---------------------------------------------------------------- writing
    def write_unit(self, unit: str, rows: dict) -> str:
        """Write one work unit's rows as one file named by its content; returns its path in
        the store. The same content written twice is the same file."""
        if self.identity:
            table = unit_table(unit, rows, self.identity.n_targets, self.identity.n_self)
        else:
            table = unit_table(unit, rows, None, np.shape(rows["self_margins"])[1] if "self_margins" in rows else 0)
        digests = table_digests(table)
        rel = Layout.unit(unit, content_digest(digests), self.root)
        self.store.write_table(rel, table, digests)
        return rel

    # ---------------------------------------------------------------- reading
    def files(self) -> list[str]:
        return [e.rel for e in self.store.list(self.root, ".parquet")]

    def quarantine(self, rel: str, reason: str) -> None:
        name = rel.rsplit("/", 1)[-1]
        dest = f"{Layout.quarantine(self.root)}/{name}"
        try:
            self.store.move(rel, dest)
        except FileNotFoundError:   # another reader moved it first
            pass
        self._verified.pop(rel, None)
        self.quarantined.append({"file": name, "reason": reason})
        log.error("ledger: %s quarantined to %s: %s; its models will be retrained",
                  name, self.store.where(dest), reason)

    def _verify(self, rel: str, recorded: str | None = None) -> _FileKeys:
        """Read a whole unit file and check it; CorruptFile says why not. `recorded`: the footer
        digest that the signed record of files whose seeds and masks were regenerated and matched
        gives for it; if the file's footer still has it, only SPOT_ROWS rows picked at random are
        regenerated (a failure then is _SpotCheckFailed)."""
        table = self.store.read_table(rel)
        ident = self.identity
        names = table.column_names
        if "mask" not in names or not pa.types.is_fixed_size_binary(table.schema.field("mask").type):
            raise CorruptFile(rel, "no fixed-size binary 'mask' column: not a ledger unit of this version")
        n_bytes = table.schema.field("mask").type.byte_width
        T = ident.n_targets if ident else sum(table.schema.field(c).type.list_size
                                              for c in names if c.startswith("margins_"))
        n_self = ident.n_self if ident else sum(table.schema.field(c).type.list_size for c in names
                                                if c.startswith(f"{SELF}_") and c != f"{SELF}_correct")
        want = schema(n_bytes, T, n_self)
        if ident and n_bytes != (ident.n + 7) // 8:
            raise CorruptFile(rel, f"masks of {n_bytes} bytes, the experiment has n={ident.n}")
        for f in want:
            if f.name not in names:
                raise CorruptFile(rel, f"column {f.name!r} is missing")
            got = table.schema.field(f.name).type
            if got != f.type:
                raise CorruptFile(rel, f"column {f.name!r} is {type_name(got)}, expected {type_name(f.type)}")
        extra = [c for c in names if c not in want.names]
        if extra:
            raise CorruptFile(rel, f"unexpected column(s) {extra}")
        sets = table["mask_set"].to_pylist()
        names = self.sets.names
        bad = sorted(set(sets) - set(names))
        if bad:
            raise CorruptFile(rel, f"unknown mask set {bad[0]!r}")
        set_code = np.array([names.index(s) for s in sets], dtype=np.int8)
        ids = table["model_id"].to_numpy()
        reps = table["replica"].to_numpy()
        name = rel.rsplit("/", 1)[-1][:-len(".parquet")]
        unit, _, digest = name.rpartition("-")
        if set(table["unit"].to_pylist()) != {unit}:
            raise CorruptFile(rel, "its rows name another unit than its file name")
        footer = _footer_digest(file_digests(rel, table.schema))
        spot = recorded is not None and hmac.compare_digest(recorded, footer)
        if ident:
            hashes = set(table["config_hash"].to_pylist())
            if hashes != {ident.config_hash}:
                raise CorruptFile(rel, f"rows of another experiment (config_hash {sorted(hashes)[0]}, "
                                       f"this experiment is {ident.config_hash})")
            alphas = table["alpha"].to_numpy()
            if not np.all(alphas == ident.alpha):
                raise CorruptFile(rel, f"rows with alpha {alphas[alphas != ident.alpha][0]}, "
                                       f"this experiment has {ident.alpha}")
            if np.any(ids < 0) or np.any(reps < 0):
                raise CorruptFile(rel, "negative model id or replica")
        if ident:
            fail = _SpotCheckFailed if spot else CorruptFile
            note = " (in rows spot-checked in a file the record of checked files vouches for)" if spot else ""
            rows = (np.sort(np.array(_SPOT.sample(range(len(ids)), min(SPOT_ROWS, len(ids))), np.int64))
                    if spot else np.arange(len(ids)))
            seeds = table["seed"].to_numpy()
            col = table["mask"].combine_chunks()
            packed = np.frombuffer(col.buffers()[1], np.uint8, count=len(ids) * n_bytes,
                                   offset=col.offset * n_bytes).reshape(-1, n_bytes)
            for code, mask_set in enumerate(names):
                sel = rows[set_code[rows] == code]
                if not len(sel):
                    continue
                if not np.array_equal(seeds[sel], self.sets.seeds(ident.seed, mask_set, ids[sel], reps[sel])):
                    raise fail(rel, "model seeds that exp.seed does not give" + note)
                try:
                    regen = bits.pack(self.sets.masks(ident.seed, mask_set, ids[sel], ident.n, ident.alpha))
                except ValueError as err:
                    raise fail(rel, str(err) + note) from None
                if not np.array_equal(packed[sel], regen):
                    raise fail(rel, "masks that exp.seed and masks.alpha do not give" + note)
        return _FileKeys(digest, set_code, ids, reps, table["failure"].to_pylist(), footer, spot)

    def index(self) -> Index:
        """Verify the files not verified yet (quarantining those that fail) and index every
        model. Metadata only: masks and margins are read to check them, then dropped. Every
        file is read and checked whole; the regeneration of its seeds and masks (most of the
        work) is done in full once per file content and experiment, and recorded in a signed
        record (`_load_checked`); a recorded file has SPOT_ROWS random rows regenerated. A
        recorded file that fails its spot check discredits the record: it is dropped, and every
        file spot-checked so far is checked again in full."""
        files = self.files()
        checked = self._load_checked()
        added = False
        pending = [rel for rel in files if rel not in self._verified]
        while pending:
            rel = pending.pop(0)
            name = rel.rsplit("/", 1)[-1]
            try:
                self._verified[rel] = fk = self._verify(rel, checked.get(name))
            except FileNotFoundError:
                continue
            except CorruptFile as err:
                self.quarantine(rel, err.reason)
                checked.pop(name, None)
                if isinstance(err, _SpotCheckFailed):
                    log.warning("ledger: the record of checked files %s vouched for %s, which fails its spot "
                                "check; the record is dropped and every file is checked in full",
                                self.store.where(self._checked_rel() or ""), name)
                    again = [r for r, k in self._verified.items() if k.spot]
                    for r in again:
                        del self._verified[r]
                    pending = again + pending
                    checked.clear()
                    added = True
                continue
            if self.identity is not None and checked.get(name) != fk.footer:
                checked[name] = fk.footer
                added = True
        present = set(files)
        if added:
            self._save_checked({rel.rsplit("/", 1)[-1]: self._verified[rel].footer
                                for rel in present if rel in self._verified})
        for rel in [r for r in self._verified if r not in present]:
            del self._verified[rel]
        order = sorted(self._verified, key=lambda r: (self._verified[r].digest, r))
        parts = [self._verified[r] for r in order]
        if not parts:
            z = np.zeros(0, np.int64)
            return Index([], z.astype(np.int8), z, z.astype(np.int32), z.astype(np.int32), z.astype(np.int32),
                         z.astype(bool), {}, 0, self.sets.names)
        set_code = np.concatenate([p.set_code for p in parts])
        model_id = np.concatenate([p.model_id for p in parts]).astype(np.int64)
        replica = np.concatenate([p.replica for p in parts]).astype(np.int32)
        file = np.concatenate([np.full(len(p.model_id), i, np.int64) for i, p in enumerate(parts)])
        row = np.concatenate([np.arange(len(p.model_id)) for p in parts])
        failures = [f for p in parts for f in p.failure]
        # one row per key: the first in (set, id, replica, file-digest order)
        o = np.lexsort((file, replica, model_id, set_code))
        keys = np.stack([set_code[o], model_id[o], replica[o]], 1)
        first = np.ones(len(o), bool)
        first[1:] = np.any(keys[1:] != keys[:-1], axis=1)
        c = o[first]
        failed = np.array([bool(failures[i]) for i in c], dtype=bool)
        # about 22 B per model: the driver's index is the one thing it holds per model
        index = Index(order, set_code[c], model_id[c], replica[c], file[c].astype(np.int32),
                      row[c].astype(np.int32), failed, {int(p): failures[c[p]] for p in np.flatnonzero(failed)},
                      int(len(o) - len(c)), self.sets.names)
        return index.limited(self.limits) if self.limits else index

    def _scope(self) -> dict:
        """What a record of checked files is about: the experiment's identity and the mask sets
        (n_self only where it is not 0, so the records written before it existed still hold)."""
        assert self.identity is not None
        ident = asdict(self.identity)
        if not ident.get("n_self"):
            ident.pop("n_self", None)
        return json.loads(json.dumps({**ident, **self.sets.describe()}, sort_keys=True, default=str))

    def _checked_rel(self) -> str | None:
        """Where this machine's signed record of checked files of this experiment and these mask
        sets is (one per signer, so that drivers on two machines do not overwrite each other's);
        None without a key."""
        signer = record_key()
        if signer is None:
            return None
        scope = hashlib.sha256(json.dumps(self._scope(), sort_keys=True).encode()).hexdigest()[:16]
        return Layout.checked(f"{scope}-{signer[0]}", self.root)

    def _sign(self, files: dict[str, str]) -> str:
        signer = record_key()
        assert signer is not None
        body = json.dumps({"format": 2, "key_id": signer[0], "scope": self._scope(), "files": files},
                          sort_keys=True, separators=(",", ":"))
        return hmac.new(signer[1], body.encode(), hashlib.sha256).hexdigest()

    def _load_checked(self) -> dict[str, str]:
        """{file name: footer digest} of this machine's signed record (read once per Ledger);
        empty without an identity, a key or a record, and with a record that does not parse or
        whose signature does not verify (one warning; then every file is checked in full)."""
        if self._checked is None:
            self._checked = {}
            rel = self._checked_rel() if self.identity is not None else None
            if rel is not None:
                try:
                    doc = json.loads(self.store.read_bytes(rel))
                    files = doc["files"]
                    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in files.items()):
                        raise TypeError("not a map of file names to digests")
                    if not isinstance(doc.get("mac"), str) or not hmac.compare_digest(doc["mac"], self._sign(files)):
                        raise ValueError("its signature does not verify with this machine's key: forged, "
                                         "or about another experiment")
                    self._checked = files
                except FileNotFoundError:
                    pass
                except (ValueError, KeyError, TypeError, AttributeError, StoreError) as err:
                    log.warning("ledger: %s is unreadable or not authentic (%s); every file's masks are "
                                "regenerated and checked again", self.store.where(rel), str(err)[:160])
        return self._checked

    def _save_checked(self, files: dict[str, str]) -> None:
        """Replace this machine's record with `files` (name -> footer digest), signed; a store
        that refuses only costs the next reader the checks again (one warning)."""
        self._checked = dict(files)
        rel = self._checked_rel()
        if rel is None:
            return
        doc = {"format": 2, "key_id": rel.rsplit("-", 1)[1][:-len(".json")], "files": self._checked,
               "mac": self._sign(self._checked)}
        try:
            self.store.write_bytes(rel, json.dumps(doc, sort_keys=True, indent=0).encode())
        except (OSError, StoreError) as err:
            log.warning("ledger: could not record the checked files at %s (%s); the next run "
                        "checks them again", self.store.where(rel), str(err)[:160])

    def keys(self, mask_set: str | None = None) -> set[tuple[str, int, int]]:
        return self.index().keys(mask_set)

    def count(self, mask_set: str) -> int:
        return self.index().count(mask_set)

    def iter_columns(self, index: Index, positions: np.ndarray, columns: list[str]):
        """(where, table) per ledger file holding models at `positions` of the index: `where`
        the indices into `positions` of that file's models, `table` their `columns`, in that
        order. Each file is read once (projected to those columns) and checked against its
        digests again; a file that changed since it was verified is quarantined and LedgerError
        raised. Holds one file's rows at a time, for summaries over every model."""
        files = np.asarray(index.file[positions])
        order = np.argsort(files, kind="stable")
        sorted_files = files[order]
        starts = np.flatnonzero(np.r_[True, sorted_files[1:] != sorted_files[:-1]]) if len(order) else np.zeros(0, int)
        for a, b in zip(starts, [*starts[1:], len(order)]):
            sel = order[a:b]
            rel = index.files[int(files[sel[0]])]
            try:
                table = self.store.read_table(rel, columns)
            except (CorruptFile, FileNotFoundError) as err:
                self.quarantine(rel, getattr(err, "reason", "the file is gone"))
                raise LedgerError(f"{self.where}: {rel.rsplit('/', 1)[-1]} changed after it was verified; "
                                  f"re-run to retrain its models") from None
            yield sel, table.take(pa.array(index.row[positions[sel]]))

    def read_columns(self, index: Index, positions: np.ndarray, columns: list[str]) -> pa.Table:
        """`columns` of the models at `positions` of the index, in that order (iter_columns'
        reads, put together)."""
        parts, where = [], []
        for sel, table in self.iter_columns(index, positions, columns):
            parts.append(table)
            where.append(sel)
        if not parts:
            return pa.table({c: pa.array([], pa.null()) for c in columns})
        out = pa.concat_tables(parts)
        inverse = np.empty(len(positions), np.int64)
        inverse[np.concatenate(where)] = np.arange(len(positions))
        return out.take(pa.array(inverse))

    def seconds(self, mask_set: str, index: Index | None = None) -> np.ndarray:
        """Training seconds of every good model of `mask_set` (no masks or margins read)."""
        index = index or self.index()
        pos = index.select(mask_set)
        if not len(pos):
            return np.zeros(0, np.float32)
        return self.read_columns(index, pos, ["seconds"])["seconds"].to_numpy()

    def good_models(self, mask_set: str, index: Index, n: int | None = None,
                    n_targets: int | None = None) -> tuple[np.ndarray, int, int]:
        """(positions in `index` of the good models of `mask_set`, sorted by (model_id,
        replica); bytes per packed mask; T), from one file's footer: LedgerError when there
        are none, or when the shapes differ from n and T given."""
        pos = index.select(mask_set)
        if not len(pos):
            raise LedgerError(f"ledger {self.where} has no models of mask set '{mask_set}'; run stage=train first")
        first = self.store.read_schema(index.files[int(index.file[pos[0]])])
        schema_T = sum(first.field(c).type.list_size for c in first.names if c.startswith("margins_"))
        n_bytes = first.field("mask").type.byte_width
        if n is not None and n_bytes != (n + 7) // 8:
            raise LedgerError(f"ledger {self.where}: masks have {n_bytes} bytes, the task has n={n} "
                              f"training examples; point store.uri at this experiment's store")
        if n_targets is not None and schema_T != n_targets:
            raise LedgerError(f"ledger {self.where}: margins have T={schema_T}, the task has {n_targets} targets; "
                              f"point store.uri at this experiment's store")
        return pos, n_bytes, schema_T

    def read_block(self, index: Index, positions: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(packed masks uint8 [k, n_bytes], margins float32 [k, b - a] of targets [a, b)) of
        the models at `positions`, in that order. Only the mask column and the margins
        columns of those targets are read (read_columns: digests checked again), so a fit
        task reads its own block of the ledger, not the ledger. One file at a time, decoded
        into the result: the peak is the result and one file's part, not copies of the result."""
        if not len(positions):
            raise LedgerError(f"ledger {self.where}: no models asked for targets {a}-{b}")
        files = index.file[positions]
        order = np.argsort(files, kind="stable")
        packed = np.empty((len(positions), 0), np.uint8)          # its width once a file is read
        margins = np.empty((len(positions), b - a), np.float32)
        for sel in np.split(order, np.flatnonzero(np.diff(files[order])) + 1):
            part = self.read_columns(index, positions[sel], ["mask"] + block_columns(a, b))
            masks = decode_masks(part)
            if not packed.shape[1]:
                packed = np.empty((len(positions), masks.shape[1]), np.uint8)
            packed[sel] = masks
            margins[sel] = decode_margins(part, a, b)
        return packed, margins

    def read_self(self, index: Index, positions: np.ndarray, a: int,
                  b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(packed masks uint8 [k, n_bytes], margins float32 [k, b - a], correct bool [k, b - a])
        of the models at `positions` on training examples [a, b) themselves (task.targets=both).
        LedgerError when the ledger does not hold them."""
        if not len(positions):
            raise LedgerError(f"ledger {self.where}: no models asked for training examples {a}-{b}")
        files = index.file[positions]
        first = self.store.read_schema(index.files[int(files[0])])
        if f"{SELF}_correct" not in first.names:
            raise LedgerError(f"ledger {self.where} holds no margins on the training examples: they are recorded "
                              f"with task.targets=both (a new experiment)")
        order = np.argsort(files, kind="stable")
        packed = np.empty((len(positions), 0), np.uint8)
        margins = np.empty((len(positions), b - a), np.float32)
        correct = np.empty((len(positions), b - a), bool)
        for sel in np.split(order, np.flatnonzero(np.diff(files[order])) + 1):
            part = self.read_columns(index, positions[sel], ["mask", f"{SELF}_correct"] + block_columns(a, b, SELF))
            masks = decode_masks(part)
            if not packed.shape[1]:
                packed = np.empty((len(positions), masks.shape[1]), np.uint8)
            packed[sel] = masks
            margins[sel] = decode_margins(part, a, b, SELF)
            col = part[f"{SELF}_correct"].combine_chunks()
            width = col.type.byte_width
            raw = np.frombuffer(col.buffers()[1], np.uint8, count=len(col) * width,
                                offset=col.offset * width).reshape(len(col), width)
            correct[sel] = bits.unpack(raw, b)[:, a:b]
        return packed, margins, correct

    def load(self, mask_set: str, n: int | None = None, n_targets: int | None = None,
             index: Index | None = None) -> MaskSetData:
        """(packed masks, margins) of every good model of `mask_set`, sorted by (model_id,
        replica); checks the shapes against n and T when given."""
        index = index or self.index()
        pos, _, schema_T = self.good_models(mask_set, index, n, n_targets)
        extra_cols = ["train_acc", "target_acc", "loss", "seconds"]
        table = self.read_columns(index, pos, ["mask"] + block_columns(0, schema_T) + extra_cols)
        extra = {c: table[c].to_numpy() for c in extra_cols}
        return MaskSetData(decode_masks(table), decode_margins(table, 0, schema_T), index.model_id[pos],
                           index.replica[pos], extra)
