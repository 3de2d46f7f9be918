"""The store: every artifact of an experiment under one URI (a local directory, s3://, gs://).

This module alone knows the experiment's layout (`Layout`: where each kind of artifact
lives) and how to write atomically, list and read through pyarrow filesystems. Parquet
artifacts carry a digest of every column in their metadata, checked on every read; a file
that fails the check is `CorruptFile`. Faults of the environment (disk full, permission
denied, a server that does not answer after retries with backoff) are `StoreError`: one
line naming the URI (credentials redacted) and what to do.

A local store on a cluster is served to the other nodes by `StoreServer`, an actor pinned
to the driver's node (`StoreHandle.open()` picks it when a task runs elsewhere), so a task
never writes to the disk of the node it runs on.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import logging
import os
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.errors import UserError
from orchestrator.uris import is_remote, join, local_path, redact, uri_problem, uri_scheme

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
PROBE_SECONDS = 10.0     # how long the probe before a run retries a store that does not answer
DIGESTS_KEY = b"datamodels.digests"


class StoreError(UserError):
    """The store cannot be reached, written or read (one line: URI, reason, fix)."""


class CorruptFile(UserError):
    """A file in the store that fails verification (footer, pages, schema, digest, identity)."""

    def __init__(self, rel: str, reason: str):
        super().__init__(f"{rel}: {reason}")
        self.rel, self.reason = rel, reason


def _seconds(uri: str, opts: dict, key: str, default: float) -> float:
    raw = opts.pop(key, default)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise StoreError(f"{redact(uri)}: {key}={raw} must be a positive number of seconds")
    return value


def open_filesystem(uri: str):
    """(pyarrow filesystem, root path inside it) for a local path or a URI (`uri_problem`
    says which: anything else is a StoreError, never taken for a local path).

    s3:// URIs take the query options endpoint_override, scheme, region, access_key,
    secret_key, session_token, anonymous (better: credentials from the environment or the
    instance role; AWS_ENDPOINT_URL is honoured). gs:// URIs take endpoint_override, scheme,
    project_id, anonymous and retry_limit_seconds (credentials: GOOGLE_APPLICATION_CREDENTIALS
    or the instance's service account). Connections time out in seconds (S3: connect 5 s,
    request 30 s, 2 attempts; GCS: the client gives up retrying after retry_limit_seconds, 5 s),
    so an unreachable server is an error, never a hang; `Store` retries on top of that for
    store.retry_seconds."""
    uri = str(uri)
    problem = uri_problem(uri)
    if problem:
        raise StoreError(f"{redact(uri)} {problem}")
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    parts = urllib.parse.urlsplit(uri)
    opts = dict(urllib.parse.parse_qsl(parts.query))
    bucket = parts.netloc.rsplit("@", 1)[-1]
    if parts.scheme.lower() == "s3":
        kwargs = {"connect_timeout": _seconds(uri, opts, "connect_timeout", 5),
                  "request_timeout": _seconds(uri, opts, "request_timeout", 30),
                  "allow_delayed_open": True,      # small objects: one PUT, not a multipart upload
                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
        for key in ("endpoint_override", "scheme", "region", "access_key", "secret_key", "session_token"):
            if key in opts:
                kwargs[key] = opts.pop(key)
        if opts.pop("anonymous", "").lower() in ("1", "true", "yes"):
            kwargs["anonymous"] = True
        if opts:
            raise StoreError(f"{redact(uri)}: unknown S3 option(s) {sorted(opts)}; allowed: endpoint_override, "
                             f"scheme, region, connect_timeout, request_timeout, anonymous")
        make = pafs.S3FileSystem
    else:
        import datetime
        kwargs = {"retry_time_limit": datetime.timedelta(seconds=_seconds(uri, opts, "retry_limit_seconds", 5))}
        for key in ("endpoint_override", "scheme", "project_id"):
            if key in opts:
                kwargs[key] = opts.pop(key)
        if opts.pop("anonymous", "").lower() in ("1", "true", "yes"):
            kwargs["anonymous"] = True
        if opts:
            raise StoreError(f"{redact(uri)}: unknown GCS option(s) {sorted(opts)}; allowed: endpoint_override, "
                             f"scheme, project_id, retry_limit_seconds, anonymous")
        make = pafs.GcsFileSystem
    try:
        fs = make(**kwargs)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as err:
        raise StoreError(f"{redact(uri)}: {_reason(err)}") from None
    return fs, f"{bucket}{parts.path}".rstrip("/")


# ----------------------------------------------------------------------------- errors
_PERMANENT = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY", "InvalidAccessKeyId", "SIGNATURE",
              "NO_SUCH_BUCKET", "NoSuchBucket", "Forbidden", "credentials")
# HTTP 403 as a number of its own: not the digits of a port (":49403", "port 8403") or an address
_HTTP_403 = re.compile(r"(?<!port )(?<![\d:.])403(?!\d)")


def _permanent(text: str) -> bool:
    """An object store's reply that retrying cannot change (credentials, a missing bucket)."""
    return any(p in text for p in _PERMANENT) or _HTTP_403.search(text) is not None


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return "read-only file system"
    text = " ".join(str(err).split())
    gcs = re.match(r"google::cloud::Status\((\w+): (.*)", text)
    if gcs:            # the Google client's status: its code, last message and underlying error
        code, rest = gcs.group(1), re.split(r"\s+error_info=", gcs.group(2))[0]
        last = re.search(r"last message of (.*?)(?:\. |$)", rest)
        under = re.search(r"underlying error message was: (.*)", rest)
        text = ": ".join([code, last.group(1) if last else rest[:200]] + ([under.group(1)[:120]] if under else []))
    return text[:300] if text else type(err).__name__


def _hint(err: BaseException, remote: bool | str) -> str:
    """What to do about `err`; `remote` is the object store's scheme (or True for S3)."""
    text = str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space there or set store.uri to a location with room; finished work is kept"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make it writable or set store.uri to a writable location"
    creds = ("GOOGLE_APPLICATION_CREDENTIALS or the instance's service account" if remote in ("gs", "gcs") else
             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role")
    if remote and _permanent(text):
        return f"check the credentials ({creds}) and that the bucket exists"
    if remote:
        return f"check the endpoint, the network and the credentials ({creds}), then re-run to resume"
    if isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
        return "set store.uri to a directory that can be created and written"
    return "check the path"


def _transient(err: BaseException, remote: bool) -> bool:
    """Worth retrying: network and server-side errors of an object store, not a full disk,
    a permission or a missing bucket."""
    if not remote or isinstance(err, FileNotFoundError):
        return False
    return not _permanent(str(err))


# ----------------------------------------------------------------------------- digests
def type_name(t: pa.DataType) -> str:
    """A type's name without its list field names (writers name them item or element)."""
    return str(t).replace("element: ", "").replace("item: ", "")


def column_digest(col) -> str:
    """sha256 (32 hex) of a column's logical values, independent of chunking and encoding."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    h = hashlib.sha256()
    t = col.type
    h.update(type_name(t).encode())
    h.update(len(col).to_bytes(8, "little"))
    if pa.types.is_fixed_size_binary(t):
        width = t.byte_width
        buf = col.buffers()[1]
        h.update(memoryview(buf)[col.offset * width:(col.offset + len(col)) * width])
    elif pa.types.is_fixed_size_list(t):
        h.update(np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False)).tobytes())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        for value in col.to_pylist():
            data = value.encode()
            h.update(len(data).to_bytes(4, "little"))
            h.update(data)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        h.update(np.ascontiguousarray(col.to_numpy(zero_copy_only=False)).tobytes())
    else:
        h.update(json.dumps(col.to_pylist(), default=str).encode())
    return h.hexdigest()[:32]


def table_digests(table: pa.Table) -> dict[str, str]:
    return {name: column_digest(table[name]) for name in table.column_names}


def content_digest(digests: dict[str, str]) -> str:
    """One digest for a whole table: names files by their content."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def verify_table(rel: str, table: pa.Table, digests: dict[str, str]) -> None:
    """Raise CorruptFile unless every column of `table` is non-null and matches its digest."""
    for name in table.column_names:
        if name not in digests:
            raise CorruptFile(rel, f"no digest for column {name!r}")
        if table[name].null_count:
            raise CorruptFile(rel, f"column {name!r} has nulls")
        if column_digest(table[name]) != digests[name]:
            raise CorruptFile(rel, f"column {name!r} does not match its digest")


def file_digests(rel: str, schema: pa.Schema) -> dict[str, str]:
    """The column digests a file was written with (its footer's); CorruptFile without them."""
    meta = schema.metadata or {}
    if DIGESTS_KEY not in meta:
        raise CorruptFile(rel, "no column digests in its metadata (not written by this project)")
    try:
        return json.loads(meta[DIGESTS_KEY])
    except ValueError:
        raise CorruptFile(rel, "unreadable column digests") from None


# ----------------------------------------------------------------------------- layout
class Layout:
    """Where each kind of artifact lives, relative to the experiment's root."""

    LEDGER = "ledger"
    CHECKPOINTS = "checkpoints"
    DATAMODELS = "datamodels"
    SCORES = "scores"
    MASKS = "masks"
    CLAIMS = "claims"
    SUMMARY = "summary.json"
    CONFIG = "config.yaml"
    EXPERIMENT = "experiment.json"     # which experiment the directory holds (orchestrator.storage.experiment)
    LDS_PER_TARGET = "lds_per_target.npz"

    @staticmethod
    def unit(name: str, digest: str, root: str = LEDGER) -> str:
        return f"{root}/{name}-{digest}.parquet"

    @staticmethod
    def quarantine(root: str = LEDGER) -> str:
        """Where the unreadable files of the ledger in `root` are moved."""
        return f"{root}/_quarantine"

    @staticmethod
    def checked(key: str, root: str = LEDGER) -> str:
        """The record of the ledger's files whose rows passed the checks against the
        experiment of `key` (Ledger.index skips regenerating their masks)."""
        return f"{root}/_checked/{key}.json"

    @staticmethod
    def checkpoint(mask_set: str, model_id: int, replica: int) -> str:
        return f"checkpoints/{mask_set}-{model_id:07d}-r{replica}.pt"

    @staticmethod
    def datamodels(m: int, backend: str, settings_hash: str) -> str:
        return f"datamodels/m{m}-{backend}-{settings_hash}"

    @staticmethod
    def chunk(datamodels_dir: str, start: int, stop: int) -> str:
        return f"{datamodels_dir}/chunk-{start:06d}-{stop:06d}.parquet"

    @staticmethod
    def scores(method: str, checkpoints: int, params_hash: str) -> str:
        return f"scores/{method}-k{checkpoints}-{params_hash}.parquet"

    @staticmethod
    def masks(mask_set: str) -> str:
        return f"masks/{mask_set}.npy"

    @staticmethod
    def plot(name: str) -> str:
        return f"{name}.png"


@dataclass(frozen=True)
class Entry:
    name: str       # base name
    rel: str        # path relative to the store root
    size: int
    mtime: float    # seconds since the epoch, as the store records it


# ----------------------------------------------------------------------------- the store
class Store:
    """The experiment at `uri`: atomic writes, listings and verified reads, retried with
    backoff for up to `retry_seconds` when an object store does not answer."""

    def __init__(self, uri: str, retry_seconds: float = 60.0):
        self.uri = str(uri)
        self.remote = is_remote(self.uri)
        self.fs, self.root = open_filesystem(self.uri)
        self.retry_seconds = float(retry_seconds)
        self._probing = False        # the probe retries quietly: its outcome is one line either way

    def __reduce__(self):
        return (Store, (self.uri, self.retry_seconds))

    def __repr__(self) -> str:
        return f"Store({redact(self.uri)!r})"

    # ------------------------------------------------------------------ paths
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str = "") -> str:
        """The redacted URI (or absolute path) of `rel`, for messages and summaries."""
        return redact(join(self.uri, rel)) if rel else redact(self.uri if self.remote else self.root)

    def _guard(self, rel: str) -> None:
        """A local store writes, moves, deletes and lists only inside its root: a symbolic
        link at or above `rel` inside the root (the root itself may be one) is refused as a
        StoreError naming it, so that nothing is ever written outside the store through it."""
        if self.remote or not rel:
            return
        path = self.root
        for part in rel.strip("/").split("/"):
            path = os.path.join(path, part)
            if os.path.islink(path):
                raise StoreError(f"{path} is a symbolic link inside the store {self.where()}: the store never "
                                 f"writes through links; replace it with a real directory or file (or set "
                                 f"store.uri to where it points)")
            if not os.path.lexists(path):
                return

    def _call(self, what: str, rel: str, fn):
        delay, deadline, warned = 0.5, time.monotonic() + self.retry_seconds, self._probing
        while True:
            try:
                return fn()
            except FileNotFoundError:
                raise
            except OSError as err:
                if not _transient(err, self.remote) or time.monotonic() + delay > deadline:
                    raise StoreError(f"{self.where(rel)}: cannot {what}: {_reason(err)}; "
                                     f"{_hint(err, self.remote and (uri_scheme(self.uri) or True))}") from None
                if not warned:
                    log.warning("store: %s %s failed (%s); retrying for up to %.0f s",
                                what, self.where(rel), _reason(err)[:120], self.retry_seconds)
                    warned = True
                time.sleep(delay)
                delay = min(2 * delay, 8.0)

    # ------------------------------------------------------------------ bytes
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `data` at `rel` so that no reader ever sees part of it: a temporary name,
        fsync and rename on a local disk; one PUT (or a completed multipart upload) on an
        object store. Nothing is left behind when the write fails."""
        path = self.path(rel)
        if not self.remote:
            self._guard(rel)
            try:
                self._call("write", rel, lambda: self._write_local(path, data))
            except FileNotFoundError as err:      # a directory that cannot be created (e.g. under /proc)
                where = err.filename or os.path.dirname(path)
                raise StoreError(f"{self.where(rel)}: cannot write: {where} cannot be created ({err.strerror}); "
                                 f"set store.uri to a directory that can be created and written") from None
        else:
            def put():
                with self.fs.open_output_stream(path) as out:
                    out.write(data)
            self._call("write", rel, put)

    @staticmethod
    def _write_local(path: str, data: bytes) -> None:
        parent, base = os.path.split(path)
        tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{base}")
        for attempt in range(3):
            os.makedirs(parent, exist_ok=True)
            try:
                f = open(tmp, "xb")
                break
            except FileNotFoundError:     # the directory went away (another driver's probe removed it empty)
                if attempt == 2:
                    raise
        try:
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def read_bytes(self, rel: str) -> bytes:
        """The whole object; FileNotFoundError if it is not there. On an object store the
        length is checked against the object's size, so a reply cut short is retried."""
        def get():
            path = self.path(rel)
            size = None
            if self.remote:
                info = self.fs.get_file_info(path)
                if info.type == pafs.FileType.NotFound:
                    raise FileNotFoundError(path)
                size = info.size
            with self.fs.open_input_stream(path) as f:
                data = f.read()
            if size is not None and len(data) != size:
                raise OSError(f"short read: {len(data)} of {size} bytes (connection cut?)")
            return data
        return self._call("read", rel, get)

    def exists(self, rel: str) -> bool:
        info = self._call("stat", rel, lambda: self.fs.get_file_info(self.path(rel)))
        return info.type == pafs.FileType.File

    def list(self, rel_dir: str, suffix: str = "") -> list[Entry]:
        """Finished files directly under `rel_dir` (not temporary or `_`/`.` names), sorted."""
        self._guard(rel_dir)

        def ls():
            try:
                return self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), recursive=False))
            except FileNotFoundError:
                return []
        out = []
        for info in self._call("list", rel_dir, ls):
            if info.type != pafs.FileType.File or info.base_name.startswith((".", "_")):
                continue
            if suffix and not info.base_name.endswith(suffix):
                continue
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            out.append(Entry(info.base_name, f"{rel_dir}/{info.base_name}", int(info.size or 0), mtime))
        return sorted(out, key=lambda e: e.name)

    def list_dirs(self, rel_dir: str) -> builtins.list[str]:
        self._guard(rel_dir)

        def ls():
            try:
                return self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), recursive=False))
            except FileNotFoundError:
                return []
        return sorted(i.base_name for i in self._call("list", rel_dir, ls)
                      if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_")))

    def delete(self, rel: str) -> None:
        self._guard(rel)
        try:
            self._call("delete", rel, lambda: self.fs.delete_file(self.path(rel)))
        except FileNotFoundError:
            pass

    def move(self, rel: str, dest_rel: str) -> None:
        self._guard(rel)
        self._guard(dest_rel)
        if not self.remote:
            def mkdir():
                os.makedirs(os.path.dirname(self.path(dest_rel)), exist_ok=True)
            self._call("move", dest_rel, mkdir)
        self._call("move", rel, lambda: self.fs.move(self.path(rel), self.path(dest_rel)))

    # ------------------------------------------------------------------ Parquet
    def write_table(self, rel: str, table: pa.Table, digests: dict[str, str] | None = None) -> None:
        """A verified Parquet file: column digests in its metadata, page checksums on."""
        digests = digests or table_digests(table)
        meta = dict(table.schema.metadata or {})
        meta[DIGESTS_KEY] = json.dumps(digests, sort_keys=True).encode()
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd", write_page_checksum=True)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: builtins.list[str] | None = None) -> pa.Table:
        """The columns asked (all by default), verified: a footer, page, checksum, null or
        digest failure raises CorruptFile; FileNotFoundError if the file is gone. On an
        object store a file that does not parse is fetched whole once more before it is
        called corrupt, so that a connection cut mid-read is retried, never quarantined."""
        def parse(source):
            pf = pq.ParquetFile(source, page_checksum_verification=True)
            return pf.read(columns=columns), file_digests(rel, pf.schema_arrow)

        def get():
            try:
                table, digests = parse(self.fs.open_input_file(self.path(rel)))
            except (CorruptFile, FileNotFoundError):
                raise
            except _PARSE_ERRORS as err:
                if not self.remote:
                    raise CorruptFile(rel, f"unreadable Parquet ({_reason(err)[:160]})") from None
                data = self.read_bytes(rel)          # network faults: retried, then StoreError
                try:
                    table, digests = parse(pa.BufferReader(data))
                except _PARSE_ERRORS as err2:
                    raise CorruptFile(rel, f"unreadable Parquet ({_reason(err2)[:160]})") from None
            verify_table(rel, table, digests)
            return table
        return self._call("read", rel, get)

    def read_schema(self, rel: str) -> pa.Schema:
        """The Parquet schema (with metadata) of `rel`; CorruptFile if the footer does not
        parse (on an object store, after fetching the whole file once more)."""
        def get():
            try:
                return pq.read_schema(self.fs.open_input_file(self.path(rel)))
            except FileNotFoundError:
                raise
            except _PARSE_ERRORS as err:
                if not self.remote:
                    raise CorruptFile(rel, f"unreadable Parquet footer ({_reason(err)[:160]})") from None
                data = self.read_bytes(rel)
                try:
                    return pq.read_schema(pa.BufferReader(data))
                except _PARSE_ERRORS as err2:
                    raise CorruptFile(rel, f"unreadable Parquet footer ({_reason(err2)[:160]})") from None
        return self._call("read", rel, get)

    # ------------------------------------------------------------------ checks
    def probe(self) -> None:
        """Check, before any work starts, that the store can be written, listed and read
        back (a small probe object, deleted again); StoreError otherwise. A local store is
        also checked for symbolic links inside it (`_guard`), and the directories the probe
        had to create are removed again (while empty), so that a run refused afterwards
        leaves nothing behind."""
        created: builtins.list[str] = []
        if not self.remote:
            existing = self.root
            while not os.path.exists(existing):
                created.append(existing)
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing):
                raise StoreError(f"{self.where()}: {existing} is not a directory; set store.uri to a directory")
            if not created:
                self._no_links()
        rel = f"_probe-{uuid.uuid4().hex[:12]}"
        patience, self.retry_seconds = self.retry_seconds, min(self.retry_seconds, PROBE_SECONDS)
        self._probing = True
        try:
            self.write_bytes(rel, b"probe")
            try:
                if self.read_bytes(rel) != b"probe":
                    raise StoreError(f"{self.where()}: a probe object read back differently; check the store "
                                     f"and its credentials")
            finally:
                self.delete(rel)
        finally:
            self.retry_seconds, self._probing = patience, False
            for path in created:            # deepest first; one that is not empty (another driver) stays
                try:
                    os.rmdir(path)
                except OSError:
                    break

    def _no_links(self) -> None:
        """StoreError naming the first symbolic link found inside a local store's root."""
        stack = [self.root]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for entry in entries:
                if entry.is_symlink():
                    self._guard(os.path.relpath(entry.path, self.root))
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


_PARSE_ERRORS = (pa.ArrowException, OSError, KeyError, ValueError, IndexError, TypeError)


def writable_dir(path: str) -> str | None:
    """None if `path` (a directory, created or not yet) can be written; else why not. Found
    out by doing it where nobody else works: a directory of a name of its own is made (and
    removed) in `path`, or, when `path` does not exist yet, in its nearest existing parent,
    so that nothing the setting names is created or removed here (two drivers that start at
    once must not remove each other's directories). Permissions alone do not tell: root may
    write anywhere, yet nothing can be created under /proc."""
    import tempfile
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    try:
        st = os.statvfs(probe)
        if st.f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only file system"
    except OSError:
        pass
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".datamodels-probe-", dir=probe))
    except OSError as err:
        verb = "written" if probe == path else "created"
        return f"{path} cannot be {verb} ({err.strerror or err})"
    return None
