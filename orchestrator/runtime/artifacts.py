"""The one writer of a run's results: JSON, CSV, arrays and plots go to the experiment's store
(at their path there) and onto the MLflow run open at the time, by way of the run's scratch
directory (a local directory the pipeline removes when the run ends).
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from orchestrator.storage.store import Layout


class Artifacts:
    """Writes into `store` and logs to `tracker` (None: not logged) through `scratch`."""

    def __init__(self, store, tracker, scratch: str):
        self.store, self.tracker, self.scratch = store, tracker, scratch

    def local(self, name: str) -> str:
        """A path in the scratch directory, to draw a plot or write a file into before it is stored."""
        path = os.path.join(self.scratch, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _put(self, rel: str, data: bytes, keep_in: str | None, mlflow_dir: str | None, log: bool) -> str:
        self.store.write_bytes(rel, data)
        if keep_in:
            self.store.write_bytes(f"{keep_in}/{rel}", data)
        path = self.local(rel)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        if log and self.tracker is not None:
            self.tracker.log_artifact(path, mlflow_dir)
        return rel

    def json(self, name: str, obj: dict, keep_in: str | None = None) -> str:
        """<name>.json at the experiment's top (the last run's), and a copy in `keep_in` (e.g. a
        removal experiment's directory, whose results it holds)."""
        return self._put(f"{name}.json", json.dumps(obj, indent=1, default=float).encode(), keep_in, None, True)

    def text(self, rel: str, text: str, log: bool = True) -> str:
        """A text file (a config, a summary) at `rel`."""
        return self._put(rel, text.encode(), None, None, log)

    def csv(self, rel: str, header: list[str], rows: list[list]) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        return self._put(rel, buf.getvalue().encode(), None, None, True)

    def arrays(self, rel: str, arrays: dict[str, np.ndarray], log: bool = False) -> str:
        """A .npz of the named arrays."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub takes allow_pickle for **kwds
        return self._put(rel, buf.getvalue(), None, None, log)

    def plot(self, name: str, path: str, log: bool = True) -> str:
        """The plot drawn at `path` (a `local` path), stored as <name>.png and logged under plots/."""
        with open(path, "rb") as f:
            data = f.read()
        rel = Layout.plot(name)
        self.store.write_bytes(rel, data)
        if log and self.tracker is not None:
            self.tracker.log_artifact(path, "plots")
        return rel
