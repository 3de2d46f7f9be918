"""The allowed values of every setting, and the checks that need more than one: `RULES`
(from the schema's fields and the shipped tasks' parameters), `check_rules`, the schema's
refusals as one line (`schema_error`), GPU requests a local instance could never hold.
"""
from __future__ import annotations

import os
import re

from omegaconf import DictConfig, OmegaConf

from orchestrator.errors import ConfigError
from orchestrator.settings import budget, schema
from workers.settings import Rule, SettingError, rules, shown


# ----------------------------------------------------------------------------- rules
def _positive(example=1, null=False):
    return Rule(int, 1, null=null, example=example)


def _count(example=0):
    return Rule(int, 0, example=example)


SEED = Rule(int, 0, 2 ** 63 - 1, example=0)
# Every setting's allowed values, from the schema's fields (orchestrator/settings/schema.py), plus those
# of the shipped tasks' parameters (task/ is the user's class, so it is not in the schema).
RULES: dict[str, Rule] = {
    **rules(schema.Config),
    "task.n_train": Rule(int, 2, example=1000),
    "task.n_targets": _positive(200),
    "task.subset_seed": SEED,
    "task.label_noise": Rule(float, 0, 1, hi_open=True, example=0.1),
    "task.noise_seed": SEED,
    "task.targets": Rule(str, choices=("test", "train", "both"), example="both"),
    "task.model.width": Rule(float, 0, lo_open=True, example=1.0),
}
# Method parameters of the baselines that are numbers (workers.attribution).
BASELINE_PARAM_RULES = {
    "proj_dim": _positive(512), "cg_iters": _positive(30), "hessian_samples": _positive(300),
    "damping": Rule(float, 0, example=0.01), "cg_tol": Rule(float, 0, lo_open=True, example=1e-3),
    "scale": Rule(float, 0, lo_open=True, example=1.0), "recursion_depth": _positive(100),
    "l2": Rule(float, 0, example=0.01), "factor_max_rows": _positive(8192), "target_chunk": _positive(64),
    "max_params": _positive(20000), "lissa_depth": _positive(1000), "lissa_batch": _positive(256),
    "lissa_repeats": _positive(1), "batch_size": _positive(128), "lam": Rule(float, 0, example=0.0),
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")


def check_rules(cfg: DictConfig) -> None:
    """The allowed values of every setting (their types are the schema's, checked when Hydra
    composes the config), then the checks that need more than one value's rule."""
    try:
        _check_values(cfg)
    except ConfigError:
        raise
    except SettingError as err:
        raise ConfigError(str(err)) from None


def schema_error(err: BaseException) -> ConfigError | None:
    """The schema's refusal (a value of the wrong type, a key it does not have), found in a
    composition error's chain, as one line naming the setting, and the config file when one
    holds it; None if the chain holds no such refusal."""
    from omegaconf.errors import ConfigKeyError, ValidationError
    top = str(err).strip()
    where = ""
    if top.startswith("In '") and "'" in top[4:]:      # Hydra names the file being merged
        where = f" (in {top[4:].split(chr(39), 1)[0]}.yaml)"
    seen = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConfigKeyError) and getattr(cur, "full_key", None):
            return ConfigError(f"unknown config key '{cur.full_key}'{where}: check its spelling "
                               f"(`datamodels --cfg job` lists the keys)")
        if isinstance(cur, ValidationError) and cur.full_key:
            key = re.sub(r"\[\d+\]$", "", str(cur.full_key))
            if key in RULES:
                try:
                    RULES[key].check(key, cur.value)
                except SettingError as bad:
                    return ConfigError(f"{bad}{where}")
            lines = str(cur).strip().splitlines()
            what = " ".join(lines[0].split()) if lines else type(cur).__name__
            return ConfigError(f"{key}{where}: {what}; `datamodels --cfg job` shows its type and default")
        cur = cur.__cause__ or cur.__context__
    return None


def _schema_keys(cfg: DictConfig) -> None:
    """A key that `+key=value` added to a typed section, which no code reads: refused."""
    import dataclasses
    for f in dataclasses.fields(schema.Config):
        node = cfg.get(f.name)
        kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if kind is None or not dataclasses.is_dataclass(kind) or not isinstance(node, DictConfig):
            continue
        known = {g.name for g in dataclasses.fields(kind)}
        extra = sorted(set(node.keys()) - known)
        if extra:
            raise ConfigError(f"{f.name}.{extra[0]} is not a setting of {f.name} (orchestrator/settings/schema.py "
                              f"{kind.__name__}): check its spelling, and drop the + that added it")


def _check_values(cfg: DictConfig) -> None:
    _schema_keys(cfg)
    budget.rounds(cfg)              # masks.n_train (a number or auto) and the budget. rules
    for key, rule in RULES.items():
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            continue
        rule.check(key, OmegaConf.select(cfg, key))
    name = cfg.exp.name
    if not isinstance(name, str) or not NAME.match(name) or ".." in name or len(name) > 100:
        raise ConfigError(f"exp.name={shown(name)} must be a plain name (letters, digits, _ . = , + -; no '/' "
                          f"or '..'), e.g. exp.name=fmnist_mlp")
    hidden = OmegaConf.select(cfg, "task.model.hidden", default=None)
    if hidden is not None:
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ConfigError(f"task.model.hidden={list(hidden)} must be a list of positive widths, "
                              f"e.g. task.model.hidden=[64]")
    prefixes = OmegaConf.select(cfg, "fit.prefixes", default=None) or []
    for f in prefixes:
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f < 1:
            raise ConfigError(f"fit.prefixes={list(prefixes)} must hold fractions in (0, 1), "
                              f"e.g. fit.prefixes=[0.25,0.5]")
    params = OmegaConf.to_container(cfg.baselines.params, resolve=True) if cfg.baselines.get("params") else {}
    for method, p in (params or {}).items():
        for key, value in (p or {}).items():
            if key in BASELINE_PARAM_RULES:
                BASELINE_PARAM_RULES[key].check(f"baselines.params.{method}.{key}", value)
    for key in ("train.device", "fit.device"):
        dev = OmegaConf.select(cfg, key, default=None)
        if dev is not None and not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", str(dev)):
            raise ConfigError(f"{key}={shown(dev)} is not auto|cpu|cuda|cuda:N|mps")


def _local_gpus(cfg: DictConfig) -> int | None:
    """GPUs a local Ray instance would have (None when joining a cluster: not known here)."""
    if cfg.cluster.get("address") or os.environ.get("RAY_ADDRESS"):
        return None
    if cfg.cluster.get("num_gpus") is not None:
        return int(cfg.cluster.num_gpus)
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def check_devices(cfg: DictConfig) -> None:
    """GPU requests that a local instance could never satisfy are refused here, not left
    pending forever in Ray."""
    wanted = {k: float(OmegaConf.select(cfg, k) or 0) for k in
              ("train.gpus_per_worker", "fit.gpus_per_task", "baselines.gpus_per_task")}
    cuda_dev = {k: OmegaConf.select(cfg, k) for k in ("train.device", "fit.device")}
    if not any(wanted.values()) and not any(str(v).startswith("cuda") for v in cuda_dev.values()):
        return
    gpus = _local_gpus(cfg)
    if gpus is None:
        return
    for key, value in wanted.items():
        if value > gpus:
            raise ConfigError(f"{key}={value:g} but this machine has {gpus} GPU(s) for a local run; "
                              f"set {key}=0 or run on a cluster with GPUs (cluster.address)")
    for key, value in cuda_dev.items():
        if str(value).startswith("cuda") and gpus == 0:
            raise ConfigError(f"{key}={value} but this machine has no GPU; set {key}=cpu (or auto)")


def setting_number(cfg, key: str, kind=float):
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a {kind.__name__}; set {key}=<{kind.__name__}>") from None
