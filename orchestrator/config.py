"""Config checks and the experiment's identity, before any Ray work starts.

`validate` turns a resolved Hydra config into a `Plan` (task, sizes, paths) or raises
`ConfigError` with one line naming the setting and the fix. The experiment directory is
keyed by a hash of what determines the ledger's contents, so re-running the same experiment
finds its ledger and a sweep point gets its own.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

STAGES = ("all", "masks", "train", "fit", "baselines", "evaluate")
# Settings that change what a trained model is (and so what the ledger holds). Scheduling
# and speed settings (workers, engine, models_per_step, device, compile, ...) do not.
RECIPE_KEYS = ("epochs", "batch_size", "lr", "lr_peak_epoch", "momentum", "nesterov",
               "weight_decay", "label_smoothing", "flip", "translate", "cutout", "precision")


class ConfigError(ValueError):
    """A user mistake in the config: one line, naming the setting and the fix."""


@dataclass
class Plan:
    cfg: DictConfig
    task: object
    n: int
    n_targets: int
    exp_dir: str
    ledger_path: str
    config_hash: str
    tracking_uri: str | None


def ledger_identity(cfg: DictConfig) -> dict:
    """The config parts that define the ledger's rows (not how many, not how fast)."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    task.get("data", {}).pop("root", None)
    return {
        "task": task,
        "recipe": {k: cfg.train.get(k) for k in RECIPE_KEYS},
        "alpha": float(cfg.masks.alpha),
        "seed": int(cfg.exp.seed),
    }


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(ledger_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _number(cfg, key: str, kind=float):
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a {kind.__name__}; set {key}=<{kind.__name__}>") from None


def validate(cfg: DictConfig, check_data: bool = True) -> Plan:
    """Check the config and the task's data; build nothing remote."""
    from hydra.utils import instantiate

    stage = cfg.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r} is not one of {'|'.join(STAGES)}")
    alpha = _number(cfg, "masks.alpha")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"masks.alpha={alpha} must lie strictly between 0 and 1 (e.g. masks.alpha=0.5)")
    for key in ("masks.n_train", "masks.n_eval", "eval.replicas"):
        if _number(cfg, key, int) < 1:
            raise ConfigError(f"{key} must be a positive integer")
    if _number(cfg, "masks.n_train", int) < 10:
        raise ConfigError("masks.n_train must be at least 10 to split fit/validation masks")
    val_fraction = _number(cfg, "fit.val_fraction")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"fit.val_fraction={val_fraction} must lie strictly between 0 and 1")
    if cfg.fit.backend not in ("glmnet", "torch", "sklearn"):
        raise ConfigError(f"fit.backend={cfg.fit.backend!r} is not one of glmnet|torch|sklearn")
    for key in ("train.epochs", "train.batch_size", "train.models_per_unit", "train.models_per_step",
                "train.max_in_flight", "fit.targets_per_task", "fit.n_lambdas"):
        if _number(cfg, key, int) < 1:
            raise ConfigError(f"{key} must be a positive integer")
    methods = list(cfg.baselines.get("methods") or [])
    if methods:
        from workers.attribution import METHODS
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"baselines.methods: {unknown[0]!r} is not one of {sorted(METHODS)}")
        if _number(cfg, "baselines.checkpoints", int) < 1:
            raise ConfigError("baselines.checkpoints must be at least 1 when baselines.methods is not empty")
        if _number(cfg, "baselines.checkpoints", int) > _number(cfg, "masks.n_train", int):
            raise ConfigError("baselines.checkpoints must not exceed masks.n_train")
    if _number(cfg, "train.lr") <= 0:
        raise ConfigError("train.lr must be positive")
    loader = cfg.train.get("loader", "resident")
    if loader not in ("resident", "ffcv"):
        raise ConfigError(f"train.loader={loader!r} is not one of resident|ffcv")
    if loader == "ffcv":
        from workers import ffcv_loader
        if not ffcv_loader.available():
            raise ConfigError(f"train.loader=ffcv needs the optional ffcv extra: {ffcv_loader.INSTALL_HINT}; "
                              "or use train.loader=resident")
        if _number(cfg, "train.ffcv_workers", int) < 1:
            raise ConfigError("train.ffcv_workers must be a positive integer")

    try:
        task = instantiate(cfg.task, _convert_="all")
    except Exception as err:  # noqa: BLE001 - user classes can raise anything
        msg = str(err).strip().splitlines()
        raise ConfigError(f"task: cannot build {cfg.task.get('_target_')!r}: {msg[-1] if msg else err}") from None
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

    chash = config_hash(cfg)
    root = cfg.exp.root
    exp_dir = cfg.exp.dir or os.path.join(root, f"{cfg.exp.name}-{chash}")
    ledger_path = cfg.ledger.path or os.path.join(exp_dir, "ledger")
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if not cfg.tracking.enabled:
        uri = None
    return Plan(cfg, task, n, n_targets, exp_dir, ledger_path, chash, uri)
