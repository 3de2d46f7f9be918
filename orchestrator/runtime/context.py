"""The contract between the pipeline and its stages: a `Stage` (its name, its `run(ctx) ->
dict`, optional `check(plan)`, what it needs) and the `Context` a stage gets (the plan, the
tracker, the summary so far, the ledger's index once built).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.runtime.artifacts import Artifacts


@dataclass
class Context:
    """What a stage gets: the validated plan (config, store, ledger, handles), the MLflow
    tracker, the redacted resolved config, the code version, and the summary so far."""
    plan: Any
    tracker: Any
    resolved: dict
    version: str
    summary: dict
    scratch: str                      # a local directory for files on their way to the store/MLflow
    index: Any = None                 # the ledger's verified index, once a stage has built it

    @property
    def artifacts(self) -> Artifacts:
        """The writer of this stage's results (store, MLflow, through `scratch`)."""
        return Artifacts(self.plan.store, self.tracker, self.scratch)

    def ledger_index(self):
        if self.index is None:
            self.index = self.plan.ledger.index()
        return self.index


@dataclass(frozen=True)
class Stage:
    """A step of the pipeline: `run(ctx)` returns its entry of summary.json."""
    name: str
    run: Callable[[Context], dict]
    params: str | None = None         # the config section logged as its MLflow run's parameters
    needs_ray: bool | Callable[[Any], bool] = False   # its work runs on Ray (or: given the config, whether)
    in_all: bool = True               # stage=all runs it (the analyses run when asked by name)
    check: Callable[[Any], None] | None = None   # given the plan, before anything is written
    merged: tuple[str, ...] = ()      # its entry's keys go to summary.json's top level (else under its name)
    after: Callable[[Context, dict], None] | None = None   # once its MLflow run has ended, in the parent run

    def uses_ray(self, cfg) -> bool:
        """Whether the pipeline connects to Ray before this stage runs with `cfg`."""
        return bool(self.needs_ray(cfg)) if callable(self.needs_ray) else self.needs_ray
