"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Only the driver talks to MLflow (workers return small summaries). The default store is
`sqlite:///mlflow.db`; concurrent drivers create it under a file lock (MLflow's schema
migration is not safe to race), and its artifacts go beside it (`mlartifacts/`), never into
the working directory. An HTTP server that does not answer within seconds is an error
before any work starts (`check_reachable`); one that fails mid-run is a one-line
`TrackingError`, or, with `tracking.required=false`, a warning after which tracking is off.
With tracking disabled every call is a no-op, so the stages never test for it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger(__name__)


# The experiment tag MLflow 3's UI reads to choose an experiment's first page: a classic
# training experiment opens on its runs, not on the GenAI "Traces" page.
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"


class TrackingError(RuntimeError):
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
    return os.path.abspath(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless the MLflow store at `uri` can be used: an HTTP server
    answers within `timeout` seconds; a sqlite or file store's directory is writable."""
    from orchestrator.store import redact
    path = sqlite_path(uri) or (urllib.parse.urlsplit(uri).path if uri.startswith("file:") else None)
    if path is not None:
        from orchestrator.config import _writable_dir
        why = _writable_dir(os.path.dirname(os.path.abspath(path)))
        if why:
            raise TrackingError(f"{redact(uri)} cannot be written ({why})")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
        except urllib.error.HTTPError:
            return          # it answered
        except (TimeoutError, urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"{redact(uri)} is unreachable ({reason}) within {timeout:g} s") from None


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
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
        self.uri = uri
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
        db = sqlite_path(uri)
        lock = _file_lock(db + ".lock") if db else contextlib.nullcontext()
        try:
            with lock:
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
        from orchestrator.store import redact
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
    def parent(self, run_name: str, params: dict, tags: dict):
        if not self.enabled:
            yield None
            return
        run = self._do("start a run", "start_run", run_name=run_name, tags=tags)
        try:
            if run is not None:
                self.parent_id = run.info.run_id
                self.log_params(params)
            yield run
        except BaseException:
            self._end("FAILED")
            raise
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self.enabled and self.mlflow.active_run() is not None:
            self._do("end a run", "end_run", status=status)

    @contextlib.contextmanager
    def stage(self, name: str, params: dict | None = None):
        if not self.enabled:
            yield None
            return
        run = self._do("start a run", "start_run", run_name=name, nested=True, tags={"stage": name})
        try:
            if run is not None and params:
                self.log_params(params)
            yield run
        except BaseException:
            if run is not None:
                self._end("FAILED")
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
            from orchestrator.store import redact
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
