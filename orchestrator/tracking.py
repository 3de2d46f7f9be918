"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Only the driver talks to MLflow (workers return small summaries). The default store is
`sqlite:///mlflow.db`, made absolute (`sqlite:////abs/path/mlflow.db`) before it is used,
printed or written to summary.json, so it means the same store from any directory. Its
directory must exist, or be a new directory inside an existing one (nothing else is created);
an empty (0-byte) database file is refused, not silently started anew. Concurrent drivers
create the database under a file lock (MLflow's schema migration is not safe to race), and
its artifacts go beside it (`mlartifacts/`), never into the working directory. An HTTP server
that does not answer within seconds, or a URI MLflow has no store for, is an error before any
work starts (`check_uri`, `check_reachable`); a store that fails mid-run is a one-line
`TrackingError`, or, with `tracking.required=false`, a warning after which tracking is off.
With tracking disabled every call is a no-op, so the stages never test for it.

A run ends FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM (the handler installed for
the parent run turns SIGTERM into an exception, so every open run is ended). A driver killed
outright (SIGKILL, a lost node) cannot end its runs: each parent run records its driver
(`driver.host`, `driver.pid`, `driver.started`), and the next driver on the same experiment
ends the RUNNING parent runs whose driver is dead, with their nested runs, as KILLED. Dead
means what it means for claims (orchestrator/storage/claims.py): on this host, the process is gone;
on another host, its claims heartbeat in the experiment's store is older than
`store.lease_seconds`. A driver on another host without a heartbeat is left alone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from orchestrator.errors import UserError
from orchestrator.storage.claims import pid_alive
from orchestrator.storage.store import Layout, writable_dir
from orchestrator.uris import redact

log = logging.getLogger(__name__)


# The experiment tag MLflow 3's UI reads to choose an experiment's first page: a classic
# training experiment opens on its runs, not on the GenAI "Traces" page.
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"


class TrackingError(UserError):
    """The MLflow store cannot be used (one line: URI, reason, fix)."""


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def sqlite_path(uri: str) -> str | None:
    """The absolute path of a `sqlite:///PATH` store's database (PATH relative to this
    directory unless it starts with /), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return os.path.abspath(uri[len("sqlite:///"):].split("?", 1)[0])


def absolute_uri(uri: str) -> str:
    """`uri` with a relative sqlite path made absolute (`sqlite:///mlflow.db` →
    `sqlite:////cwd/mlflow.db`): the same store from any working directory, and a URI that
    MLflow and SQLAlchemy parse. Other URIs are returned unchanged."""
    path = sqlite_path(uri)
    if path is None:
        return uri
    query = uri.split("?", 1)[1] if "?" in uri[len("sqlite:///"):] else ""
    return "sqlite:///" + path + (f"?{query}" if query else "")


# Schemes that MLflow 3 has a tracking store for without plugins; others are looked up in
# MLflow's registry (plugins add theirs there).
SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def check_uri(uri: str) -> None:
    """Raise TrackingError unless `uri` is a tracking URI MLflow can open: a mistake in the
    setting itself (refused even with tracking.required=false)."""
    if "://" not in uri:
        if ":" in uri.split("/", 1)[0] and not os.path.exists(uri):
            raise TrackingError(f"{redact(uri)} is not a URI MLflow can use; use sqlite:///PATH/mlflow.db, "
                                f"http://HOST:PORT or a directory")
        return              # a local directory (MLflow's file store)
    scheme = uri.split("://", 1)[0].lower().split("+", 1)[0]
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise TrackingError(f"{redact(uri)} is not a sqlite database path; use sqlite:///relative/path/mlflow.db "
                            f"or sqlite:////absolute/path/mlflow.db")
    if scheme in SCHEMES:
        return
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        known = set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):       # a different MLflow: let it decide
        return
    if scheme not in known:
        raise TrackingError(f"{redact(uri)}: MLflow has no tracking store for scheme {scheme!r} (it has "
                            f"{', '.join(sorted(k for k in known if k))}); use sqlite:///PATH/mlflow.db or "
                            f"http://HOST:PORT")


def _wait_for_creator(db: str, seconds: float = 60.0) -> None:
    """Wait (up to `seconds`) while another driver holds the database's creation lock: a
    database being created is empty for a moment. Reads the lock file only; creates nothing."""
    import fcntl
    try:
        f = open(db + ".lock")
    except OSError:
        return
    with f:
        deadline = time.time() + seconds
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except OSError:
                if time.time() > deadline:
                    return
                time.sleep(0.2)


def _empty_database(db: str) -> str | None:
    """Why the sqlite database at `db` must not be used, when it exists and is empty."""
    try:
        if os.path.getsize(db) != 0:
            return None
    except OSError:
        return None
    return (f"{db} is empty (0 bytes: truncated?); MLflow would start a new history in it. Restore it from a "
            f"backup, or delete it to start anew")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless the MLflow store at `uri` can be used: an HTTP server
    answers within `timeout` seconds; a sqlite database is not an empty file and its
    directory exists, or can be made inside an existing one, and can be written; a file
    store's directory is writable. Writes nothing."""
    check_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        if os.path.isdir(db):
            raise TrackingError(f"{redact(uri)}: {db} is a directory; name the database file in it, "
                                f"e.g. sqlite:///{os.path.join(db, 'mlflow.db')}")
        folder = os.path.dirname(db)
        if not os.path.isdir(folder) and not os.path.isdir(os.path.dirname(folder)):
            raise TrackingError(f"{redact(uri)}: the directory {os.path.dirname(folder)} does not exist (only the "
                                f"database's own directory is created); create it, or use a path in an existing "
                                f"directory")
        why = writable_dir(folder)
        if why:
            raise TrackingError(f"{redact(uri)} cannot be written ({why}); use a writable path")
        if _empty_database(db):
            _wait_for_creator(db)
            why = _empty_database(db)
            if why:
                raise TrackingError(f"{redact(uri)}: {why}")
        return
    if "://" not in uri or uri.startswith("file:"):
        path = urllib.parse.urlsplit(uri).path if uri.startswith("file:") else uri
        why = writable_dir(os.path.abspath(path))
        if why:
            raise TrackingError(f"{redact(uri)} cannot be written ({why}); use a writable path")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
        except urllib.error.HTTPError:
            return          # it answered
        except (TimeoutError, urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"{redact(uri)} is unreachable ({reason}) within {timeout:g} s; start the MLflow "
                                f"server") from None


# ----------------------------------------------------------------------------- drivers
class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that open runs (and the pipeline's `finally`
    blocks) are closed before the process exits with 128 + SIGTERM."""


class _Signals:
    """While a parent run is open, SIGTERM raises `Terminated` and Ctrl-C KeyboardInterrupt
    in the main thread, and either is remembered: Ray's driver turns an exception raised by a
    signal handler during `ray.get` into SystemExit(1), so the exception alone does not say
    that the run was killed. `ray.init` installs its own SIGTERM handler; `install()` runs
    again as each stage starts, after Ray is connected."""

    received: list[int] = []
    replaced: dict[int, object] = {}

    @classmethod
    def handler(cls, signum, frame):
        cls.received.append(signum)
        if signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)     # a second SIGTERM ends the process at once
        raise Terminated(128 + signum)

    @classmethod
    def install(cls) -> None:
        if threading.current_thread() is not threading.main_thread() or cls.received:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            now = signal.getsignal(sig)
            if now == cls.handler or (sig == signal.SIGINT and now is not signal.default_int_handler):
                continue      # ours already, or someone else's Ctrl-C handling: left alone
            cls.replaced[sig] = now
            signal.signal(sig, cls.handler)

    @classmethod
    def restore(cls) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, before in cls.replaced.items():
            if signal.getsignal(sig) == cls.handler:
                signal.signal(sig, before)  # type: ignore[arg-type]  # a handler getsignal returned
        cls.replaced.clear()

    @classmethod
    @contextlib.contextmanager
    def raising(cls):
        cls.received.clear()
        cls.install()
        try:
            yield
        finally:
            cls.restore()


def signal_received() -> int | None:
    """The signal (SIGINT, SIGTERM) that stopped the open run, if one did."""
    return _Signals.received[-1] if _Signals.received else None


def ended_status(err: BaseException) -> str:
    """KILLED for Ctrl-C and SIGTERM (ours, Ray's `sys.exit(15)`, or whatever Ray made of the
    exception our handler raised), FAILED for any other error."""
    if _Signals.received or isinstance(err, (KeyboardInterrupt, Terminated)):
        return "KILLED"
    if isinstance(err, SystemExit) and err.code in (signal.SIGTERM, 128 + signal.SIGTERM):
        return "KILLED"
    return "FAILED"


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if unknown or gone."""
    try:
        import psutil
        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - psutil missing, no such process, no permission
        return None


def driver_tags() -> dict:
    """Who drives this run: what the next driver needs to tell whether it is still alive."""
    pid = os.getpid()
    started = _started(pid)
    tags = {"driver.host": socket.gethostname(), "driver.pid": str(pid)}
    if started is not None:
        tags["driver.started"] = f"{started:.2f}"
    return tags


def driver_dead(tags: dict, store=None, lease: float = 60.0) -> str | None:
    """Why the driver that `tags` (a run's tags) name is dead, or None if it may be alive.
    The notion of orchestrator/storage/claims.py: on this host the process is gone (or its pid is
    another process's now); on another host its claims heartbeat (`claims/owners/HOST.PID.*`
    in the experiment's store) is older than the lease. No heartbeat: not known dead."""
    host, pid = tags.get("driver.host"), tags.get("driver.pid", "")
    if not host or not pid.isdigit():
        return None                # a run from before drivers were recorded: not ours to judge
    pid_n = int(pid)
    if host == socket.gethostname():
        if not pid_alive(pid_n):
            return f"its driver {host}.{pid} is gone"
        started, now_started = tags.get("driver.started"), _started(pid_n)
        if started and now_started is not None and abs(float(started) - now_started) > 2:
            return f"its driver {host}.{pid} is gone (the pid is another process's now)"
        return None
    if store is None:
        return None
    try:
        beats = [e for e in store.list(f"{Layout.CLAIMS}/owners") if e.name.startswith(f"{host}.{pid}.")]
    except Exception:  # noqa: BLE001 - the store's faults surface where the store is used
        return None
    if not beats:
        return None
    age = time.time() - max(e.mtime for e in beats)
    if age > lease:
        return f"its driver {host}.{pid} stopped its heartbeat {age:.0f} s ago (store.lease_seconds={lease:g})"
    return None


def _same_store(before: str | None, now: str) -> bool:
    """Whether summary.json's `tracking_uri` (possibly written by an older version, which
    printed `sqlite:/rel` for sqlite:///rel and `sqlite://abs` for sqlite:////abs) names the
    store at `now`."""
    if not before:
        return False
    if before.startswith("sqlite:") and not before.startswith("sqlite:///"):
        rest = before[len("sqlite:"):]
        if rest.startswith("//"):       # sqlite://abs/path: was sqlite:////abs/path
            before = "sqlite:////" + rest[2:]
        elif rest.startswith("/"):      # sqlite:/rel/path: was sqlite:///rel/path
            before = "sqlite:///" + rest[1:]
    return absolute_uri(before) == redact(now)


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)     # the database's own directory, in an existing one (check_reachable); no more
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, uri: str | None, experiment: str, required: bool = True, timeout: float = 5.0,
                 artifact_root: str | None = None):
        self.enabled = uri is not None
        self.uri = absolute_uri(uri) if uri is not None else None
        self.required = required
        self.parent_id = None
        self.experiment_id = None
        if uri is None:            # not self.enabled
            return
        if uri.startswith(("http://", "https://")):
            # fail in seconds, not after MLflow's default 7 retries with backoff (minutes)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout * 2))))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        import mlflow
        self.mlflow = mlflow
        from workers.logs import quiet_libraries
        quiet_libraries()          # database migrations are debug-level detail for our users
        uri = absolute_uri(uri)    # = self.uri
        db = sqlite_path(uri)
        try:
            lock = _file_lock(db + ".lock") if db else contextlib.nullcontext()
            with lock:
                empty = _empty_database(db) if db else None
                if empty:
                    raise TrackingError(empty)
                mlflow.set_tracking_uri(uri)
                if mlflow.get_experiment_by_name(experiment) is None:
                    artifacts = artifact_root
                    if artifacts is None and db:
                        artifacts = "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
                    try:
                        mlflow.create_experiment(experiment, artifact_location=artifacts)
                    except mlflow.exceptions.MlflowException:
                        pass      # created meanwhile by another driver
                exp = mlflow.set_experiment(experiment)
                self.experiment_id = exp.experiment_id
                if artifact_root and exp.artifact_location.rstrip("/") != artifact_root.rstrip("/"):
                    log.warning("MLflow experiment %r keeps its artifacts in %s (set when it was created); "
                                "tracking.artifact_root applies to new experiments only", experiment,
                                exp.artifact_location)
                if KIND_TAG not in (exp.tags or {}):
                    # MLflow 3 opens an experiment without this tag on its GenAI traces page
                    mlflow.set_experiment_tag(KIND_TAG, KIND_TRAINING)
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds
            self._failed("open the tracking store", err)

    def _failed(self, what: str, err: BaseException) -> None:
        line = " ".join(str(err).split())[:300]
        msg = f"tracking.uri={redact(self.uri)}: cannot {what} ({line})"  # type: ignore[arg-type]  # enabled
        if self.required:
            raise TrackingError(msg + "; fix the MLflow store, or set tracking.required=false to continue "
                                      "without it") from None
        log.warning("%s; tracking is off for the rest of this run", msg)
        self.enabled = False

    def _do(self, what: str, fn: str, *args, **kwargs):
        """mlflow.<fn>(*args, **kwargs), unless tracking is off (or has just failed)."""
        if not self.enabled:
            return None
        try:
            return getattr(self.mlflow, fn)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._failed(what, err)
            return None

    @contextlib.contextmanager
    def parent(self, run_name: str, params: dict, tags: dict, store=None, lease: float = 60.0,
               previous: dict | None = None):
        """The parent run, named `run_name` (with ` (resume N)` when this experiment has N
        runs in MLflow already). Before it starts: a warning if the store no longer holds
        `previous` (summary.json's `mlflow` entry from this experiment's last run), and the
        RUNNING runs of this experiment whose driver is dead are ended KILLED (`store` and
        `lease` are the experiment's store and store.lease_seconds, for drivers on other hosts)."""
        if not self.enabled:
            yield None
            return
        try:
            self._check_history(previous)
            earlier = self._earlier_runs(tags)
            self._end_orphans(earlier, store, lease)
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds
            self._failed("read this experiment's earlier runs", err)
            earlier = []
        if earlier:
            run_name = f"{run_name} (resume {len(earlier)})"
        run = self._do("start a run", "start_run", run_name=run_name, tags={**tags, **driver_tags()})
        with _Signals.raising():
            try:
                if run is not None:
                    self.parent_id = run.info.run_id
                    self.log_params(params)
                yield run
            except BaseException as err:
                log.debug("the run ends %s: %r", ended_status(err), err)
                self._end(ended_status(err))
                raise
            self._end("FINISHED")

    def _client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(tracking_uri=self.uri)

    def _check_history(self, previous: dict | None) -> None:
        """Warn (one line) when the store no longer holds the run this experiment logged last."""
        if not isinstance(previous, dict) or not previous.get("run_id"):
            return
        if not _same_store(previous.get("tracking_uri"), self.uri):  # type: ignore[arg-type]  # enabled
            return                  # logged elsewhere: another store by choice
        from mlflow.exceptions import MlflowException
        try:
            run = self._client().get_run(str(previous["run_id"]))
            moved = str(run.info.experiment_id) != str(previous.get("experiment_id"))
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            moved = True
        if moved:
            log.warning("tracking.uri=%s no longer holds MLflow run %s (experiment %s), which this experiment "
                        "logged before: the store was emptied or replaced, and this run starts a new history "
                        "in it; restore the store from a backup to keep the old one", redact(self.uri),  # type: ignore[arg-type]
                        previous["run_id"], previous.get("experiment_id"))

    def _earlier_runs(self, tags: dict) -> list:
        """This experiment's parent runs (same experiment_dir) in the MLflow experiment."""
        if not tags.get("config_hash") or not tags.get("experiment_dir") or self.experiment_id is None:
            return []
        client, out, token = self._client(), [], None
        while True:
            page = client.search_runs([self.experiment_id], f"tags.config_hash = '{tags['config_hash']}'",
                                      max_results=1000, page_token=token)
            out += [r for r in page if r.data.tags.get("experiment_dir") == tags["experiment_dir"]
                    and "mlflow.parentRunId" not in r.data.tags]
            token = page.token
            if not token:
                return out

    def _end_orphans(self, runs: list, store, lease: float) -> None:
        """End KILLED the RUNNING runs among `runs` whose driver is dead, and their nested runs."""
        client = None
        for r in runs:
            if r.info.status != "RUNNING":
                continue
            why = driver_dead(r.data.tags, store, lease)
            if why is None:
                continue
            client = client or self._client()
            me = f"{socket.gethostname()}.{os.getpid()}"
            client.set_tag(r.info.run_id, "ended_by", f"driver {me}: {why}")
            children = client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
            for c in children:
                if c.info.status == "RUNNING":
                    client.set_terminated(c.info.run_id, "KILLED")
            client.set_terminated(r.info.run_id, "KILLED")
            log.info("MLflow: run %s (%s) left RUNNING by a driver that died: %s; marked KILLED",
                     r.info.run_id, r.info.run_name, why)

    def _end(self, status: str) -> None:
        if self.enabled and self.mlflow.active_run() is not None:
            self._do("end a run", "end_run", status=status)

    @contextlib.contextmanager
    def stage(self, name: str, params: dict | None = None):
        if not self.enabled:
            yield None
            return
        _Signals.install()         # again: ray.init (in the run, before the stages) installs its own
        run = self._do("start a run", "start_run", run_name=name, nested=True, tags={"stage": name})
        try:
            if run is not None and params:
                self.log_params(params)
            yield run
        except BaseException as err:
            if run is not None:
                self._end(ended_status(err))
            raise
        if run is not None:
            self._end("FINISHED")

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self._do("log parameters", "log_params", dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._do("log metrics", "log_metrics", clean, step=step)

    def ui_page(self) -> str | None:
        """This run's page in the MLflow UI (relative to the server's address). MLflow 3.17's
        UI starts in its GenAI view whatever the experiment's kind; the query selects the
        model-training view, where an experiment opens on its runs."""
        if not self.enabled or self.experiment_id is None:
            return None
        run = f"/runs/{self.parent_id}" if self.parent_id else ""
        return f"#/experiments/{self.experiment_id}{run}?workflowType=machine_learning"

    def ui_hint(self) -> str | None:
        """The command that opens this run in the MLflow UI, and the page to open."""
        page = self.ui_page()
        if page is None:
            return None
        if self.uri.startswith(("http://", "https://")):  # type: ignore[union-attr]  # a page: enabled
            return f"open {redact(self.uri).rstrip('/')}/{page}"  # type: ignore[arg-type]
        import shutil
        import sys
        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        exe = exe if os.path.exists(exe) else (shutil.which("mlflow") or "mlflow")
        return f"{exe} ui --backend-store-uri {self.uri}   then open http://127.0.0.1:5000/{page}"

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if os.path.exists(path):
            self._do("log an artifact", "log_artifact", path, artifact_path)

    def set_tags(self, tags: dict) -> None:
        self._do("set tags", "set_tags", tags)
