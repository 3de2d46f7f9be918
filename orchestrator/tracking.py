"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Only the driver talks to MLflow (workers return small summaries). The default store is
`sqlite:///mlflow.db`, created here before anything else can write to it. With tracking
disabled every call is a no-op, so the stages never test for it.
"""
from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    def __init__(self, uri: str | None, experiment: str):
        self.enabled = uri is not None
        self.uri = uri
        self.parent_id = None
        if not self.enabled:
            return
        import mlflow
        self.mlflow = mlflow
        if uri.startswith("sqlite:///"):
            db_dir = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
            os.makedirs(db_dir, exist_ok=True)
        # The mlflow logger is chatty about database migrations on first use.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)

    @contextlib.contextmanager
    def parent(self, run_name: str, params: dict, tags: dict):
        if not self.enabled:
            yield None
            return
        with self.mlflow.start_run(run_name=run_name, tags=tags) as run:
            self.parent_id = run.info.run_id
            self.log_params(params)
            yield run

    @contextlib.contextmanager
    def stage(self, name: str, params: dict | None = None):
        if not self.enabled:
            yield None
            return
        with self.mlflow.start_run(run_name=name, nested=True, tags={"stage": name}) as run:
            if params:
                self.log_params(params)
            yield run

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self.mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled and os.path.exists(path):
            self.mlflow.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self.mlflow.set_tags(tags)
