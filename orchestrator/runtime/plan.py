"""The validated plan of a run: `validate` turns a composed config into a `Plan` (task,
sizes, store, ledger) or raises ConfigError with one line naming the setting; `check_outputs`
checks, before anything is written, that every place the run writes can be written.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from orchestrator.errors import ConfigError
from orchestrator.scheduling import cluster as raycluster
from orchestrator.settings.analyses import check_settings
from orchestrator.settings.budget import Rounds
from orchestrator.settings.budget import rounds as budget_rounds
from orchestrator.settings.identity import config_hash, experiment_uri, store_setting
from orchestrator.settings.names import budget_sizes
from orchestrator.settings.rules import check_devices, check_rules, setting_number
from orchestrator.storage import store as S
from orchestrator.storage.ledger import Identity, Ledger, limits
from orchestrator.storage.store import writable_dir
from orchestrator.tracking import TrackingError, absolute_uri, check_reachable, check_uri
from orchestrator.uris import redact


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    cfg: DictConfig
    task: Any
    n: int
    n_targets: int
    exp_uri: str                 # where the experiment lives (local path or URI)
    config_hash: str
    tracking_uri: str | None
    store: Any = None            # orchestrator.storage.store.Store of exp_uri
    ledger: Any = None           # orchestrator.storage.ledger.Ledger, verified against `identity`
    handle: Any = None           # StoreHandle for tasks (set once Ray is connected)
    claims: Any = None           # orchestrator.storage.claims.Claims (set by the pipeline)
    artifact_root: str | None = None   # tracking.artifact_root as a URI (file:// for a local path)
    models_per_unit: int | None = None  # the experiment's unit size (orchestrator.storage.experiment.check)
    marker: dict | None = None          # the directory's experiment.json, as check found it
    rounds: Rounds | None = None        # training in rounds (settings.budget), or None: masks.n_train at once
    n_self: int = 0                     # training examples whose own margins the ledger holds (task.targets=both)

    def use_models(self, n_train: int) -> None:
        """Make this run one of n_train train models: masks.n_train and the ledger's view of it
        (a round of orchestrator.stages.rounds, and the run after the last round)."""
        self.cfg.masks.n_train = int(n_train)
        self.ledger.limits = limits(int(n_train), int(self.cfg.masks.n_eval), int(self.cfg.eval.replicas))

    @property
    def identity(self):
        return Identity(self.config_hash, float(self.cfg.masks.alpha), int(self.cfg.exp.seed), self.n,
                        self.n_targets, self.n_self)


def _task_error(target, err: BaseException) -> str:
    """Why task._target_ could not be built, from the deepest error of the chain (Hydra wraps
    the user's own error, or the import's, in its InstantiationException)."""
    seen, cur = set(), err
    while (cur.__cause__ or cur.__context__) is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in str(cur).strip().splitlines() if ln.strip()]
    why = f"{type(cur).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if isinstance(cur, ImportError):
        return (f"task._target_={target}: cannot import it ({why}); put its module in the directory you run "
                f"from or on PYTHONPATH, or install it")
    return f"task: cannot build {target!r}: {why}"


def validate(cfg: DictConfig, check_data: bool = True) -> Plan:
    """Check the config and the task's data; build nothing remote, write nothing."""
    from orchestrator.settings.task import build_task, n_self

    check_rules(cfg)
    rounds = budget_rounds(cfg)
    if OmegaConf.select(cfg, "baselines") is not None:
        budget_sizes(cfg)          # a malformed baselines.budget_checkpoints, before any work
    alpha = setting_number(cfg, "masks.alpha")
    methods = list(cfg.baselines.get("methods") or [])
    if methods:
        from workers.attribution import METHODS
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"baselines.methods: {unknown[0]!r} is not one of {sorted(METHODS)}")
        from workers.attribution import check_params
        params = OmegaConf.to_container(cfg.baselines.params, resolve=True) if cfg.baselines.get("params") else {}
        for m in methods:
            try:
                check_params(m, (params or {}).get(m))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if setting_number(cfg, "baselines.checkpoints", int) < 1:
            raise ConfigError("baselines.checkpoints must be at least 1 when baselines.methods is not empty")
        most = rounds.cap if rounds is not None else setting_number(cfg, "masks.n_train", int)
        if most is not None and setting_number(cfg, "baselines.checkpoints", int) > most:
            raise ConfigError("baselines.checkpoints must not exceed masks.n_train")
    if cfg.stage in ("all", "evaluate") and int(cfg.masks.n_eval) < 3:
        raise ConfigError(f"masks.n_eval={cfg.masks.n_eval}: LDS needs at least 3 eval masks (e.g. masks.n_eval=100)")
    if cfg.train.get("loader", "resident") == "ffcv":
        from workers import ffcv_loader
        if not ffcv_loader.available():
            raise ConfigError(f"train.loader=ffcv needs the optional ffcv extra: {ffcv_loader.INSTALL_HINT}; "
                              "or use train.loader=resident")
    check_devices(cfg)

    try:
        task = build_task(cfg.task)
    except Exception as err:  # noqa: BLE001 - user classes can raise anything
        raise ConfigError(_task_error(cfg.task.get("_target_"), err)) from None
    if check_data:
        try:
            task.check()
        except ValueError as err:
            raise ConfigError(str(err).strip().splitlines()[0]) from None
    n, n_targets = int(task.n), int(task.n_targets)
    k = round(alpha * n)
    if not 1 <= k < n:
        raise ConfigError(f"masks.alpha={alpha} gives {k} of {n} training examples per mask; "
                          f"raise masks.alpha or task.n_train")

    if cfg.stage in ("counterfactual", "brittleness"):
        check_settings(cfg, n, n_targets)

    chash = config_hash(cfg)
    uri = experiment_uri(cfg, chash)
    try:
        store = S.Store(uri, float(cfg.store.retry_seconds))
    except S.StoreError as err:
        key, value = store_setting(cfg)
        raise ConfigError(f"{key}={redact(value)}: {err}") from None
    tracking = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if not cfg.tracking.enabled:
        tracking = None
    plan = Plan(cfg, task, n, n_targets, uri, chash, tracking, store, rounds=rounds,
                n_self=n_self(OmegaConf.to_container(cfg.task, resolve=True), n))
    first = rounds.sizes(1)[0] if rounds is not None else int(cfg.masks.n_train)
    plan.ledger = Ledger(store, plan.identity,
                         limits=limits(first, int(cfg.masks.n_eval), int(cfg.eval.replicas)))
    root = cfg.tracking.get("artifact_root")
    if root:
        root = str(root)
        plan.artifact_root = root if "://" in root else "file://" + os.path.abspath(root)
    return plan


def check_outputs(plan: Plan, hydra_dir: str | None = None, *, needs_ray: bool = True,
                  inputs: Callable[[Plan], None] | None = None) -> None:
    """Every place this run will write can be written: the store (a probe object, written,
    read back and deleted), the MLflow store, and Hydra's output directory; a cluster to join
    answers (raycluster.check_address, when a stage needs Ray: `needs_ray`); the stages' inputs
    are there (`inputs`, the pipeline's check of what the asked stages read). One line each."""
    cfg = plan.cfg
    if plan.tracking_uri:      # first: these checks write nothing (the store's probe below does)
        try:            # a URI MLflow cannot open is a mistake in the setting, whatever tracking.required says
            check_uri(plan.tracking_uri)
        except TrackingError as err:
            raise ConfigError(f"tracking.uri={err}, or set tracking.enabled=false") from None
        plan.tracking_uri = absolute_uri(plan.tracking_uri)    # the same store from any directory
        try:
            check_reachable(plan.tracking_uri, float(cfg.tracking.timeout_seconds))
        except TrackingError as err:
            if cfg.tracking.required:
                raise ConfigError(f"tracking.uri={err}; or set tracking.enabled=false, or tracking.required=false "
                                  f"to run without it") from None
            import logging
            logging.getLogger(__name__).warning("tracking.uri=%s; running without tracking (tracking.required=false)",
                                                err)
            plan.tracking_uri = None
    key, value = store_setting(cfg)
    if needs_ray:       # before anything is written
        raycluster.check_address(cfg.cluster)
    try:
        plan.store.probe()
    except S.StoreError as err:
        raise ConfigError(f"{key}={redact(value)}: {str(err).replace('set store.uri', f'set {key}')}") from None
    if hydra_dir is not None:
        why = writable_dir(hydra_dir)
        if why:
            raise ConfigError(f"exp.root={cfg.exp.root}: Hydra's output directory {hydra_dir} cannot be written "
                              f"({why}); set exp.root to a writable directory")
    if inputs is not None:
        inputs(plan)      # the stages' inputs are there (read-only; before Hydra's or MLflow's writes)
    if plan.tracking_uri and plan.artifact_root and plan.artifact_root.startswith("file://"):
        why = writable_dir(plan.artifact_root[len("file://"):])
        if why:
            raise ConfigError(f"tracking.artifact_root={cfg.tracking.artifact_root}: cannot be written ({why}); "
                              f"set it to a writable directory, or null for the default beside the MLflow store")
