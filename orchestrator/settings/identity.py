"""The experiment's identity: the config parts that define its ledger's rows (task, recipe,
α, seed; not how many models, not how fast; the task settings of settings.task only when set
to something that changes the task), their hash, and where the experiment lives
(<store.uri or exp.root>/<exp.name>-<hash>, or exp.dir).
"""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from orchestrator import uris as S
from orchestrator.errors import ConfigError
from orchestrator.settings.task import identity_part

# Settings that change what a trained model is (and so what the ledger holds). Scheduling
# and speed settings (workers, engine, models_per_step, device, compile, ...) do not.
RECIPE_KEYS = ("epochs", "batch_size", "lr", "lr_peak_epoch", "momentum", "nesterov",
               "weight_decay", "label_smoothing", "flip", "translate", "cutout", "precision")


def ledger_identity(cfg: DictConfig) -> dict:
    """The config parts that define the ledger's rows (not how many, not how fast)."""
    task = identity_part(OmegaConf.to_container(cfg.task, resolve=True))
    task.get("data", {}).pop("root", None)
    return {
        "task": task,
        "recipe": {k: _as_hashed(k, cfg.train.get(k)) for k in RECIPE_KEYS},
        "alpha": float(cfg.masks.alpha),
        "seed": int(cfg.exp.seed),
    }


def _as_hashed(key: str, value):
    """A recipe value as the hash sees it. The presets wrote lr_peak_epoch as an integer before
    the schema typed it as a float: an integral value is hashed as that integer, so that the
    experiments written before keep their directory (and 4 and 4.0 are one experiment)."""
    if key == "lr_peak_epoch" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(ledger_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def store_setting(cfg: DictConfig) -> tuple[str, str]:
    """(the setting that places the experiment, its value): exp.dir, store.uri or exp.root."""
    for key in ("exp.dir", "store.uri"):
        value = OmegaConf.select(cfg, key, default=None)
        if value:
            return key, str(value)
    return "exp.root", str(OmegaConf.select(cfg, "exp.root", default=None))


def experiment_uri(cfg: DictConfig, chash: str) -> str:
    """exp.dir if set, else <store.uri or exp.root>/<exp.name>-<hash>. A value that is neither
    a local path nor a store URI (`store.uri_problem`: `s3://` without a bucket, an unknown
    scheme, a Windows path, ...) is a ConfigError naming its setting, never taken for a local
    path; exp.root, where Hydra's logs go too, must be a local directory."""
    root = OmegaConf.select(cfg, "exp.root", default=None)
    problem = "is not set; give a local directory, e.g. exp.root=runs" if root is None else S.uri_problem(str(root))
    if problem is None and S.uri_scheme(str(root)) is not None:
        problem = ("must be a local directory (Hydra's logs go there too); put the experiments on an object store "
                   "with store.uri=s3://BUCKET/prefix")
    if problem:
        raise ConfigError(f"exp.root={S.redact(str(root))} {problem}")
    key, value = store_setting(cfg)
    problem = S.uri_problem(value)
    if problem:
        raise ConfigError(f"{key}={S.redact(value)} {problem}")
    if key == "exp.dir":
        return value
    return S.join(value, f"{cfg.exp.name}-{chash}")
