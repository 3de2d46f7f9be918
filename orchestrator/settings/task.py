"""Building the task from its config, with the task settings the pipeline itself knows.

A task is the user's class, built from `task._target_` with the other `task.*` keys as its
arguments. The shipped presets also carry settings that every experiment has, at values that
change nothing (TASK_SETTINGS): the label noise to plant and its seed. At those values a
setting is not part of the experiment's identity (its hash stays what it was before the
setting existed) and is not passed to a class that does not take it, so a user's task class
and the commands that built it keep working. Set to anything else, it is both: a noisy
experiment is another experiment, and so is one that records each model's margins on the
training examples (task.targets=both); a class that cannot do it is refused in one line.
"""
from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

# setting -> the value that changes nothing. targets: test (margins on the targets only) or both
# (also each model's margins on the training examples themselves, storage.ledger's `self_*`)
TASK_SETTINGS: dict[str, Any] = {"label_noise": 0.0, "noise_seed": 0, "targets": "test"}


def neutral(task: dict, key: str) -> bool:
    """Whether task setting `key` is absent or at its neutral value (noise_seed is neutral
    while there is no label noise: it seeds nothing)."""
    if key == "noise_seed" and neutral(task, "label_noise"):
        return True
    value, plain = task.get(key, TASK_SETTINGS[key]), TASK_SETTINGS[key]
    if isinstance(plain, str):
        return value == plain
    try:
        return float(value) == float(plain)
    except (TypeError, ValueError):
        return False


def identity_part(task: dict) -> dict:
    """The task config as the experiment's identity sees it: the task settings at their
    neutral values left out."""
    return {k: v for k, v in task.items() if not (k in TASK_SETTINGS and neutral(task, k))}


def n_self(task: dict, n: int) -> int:
    """How many training examples' own margins each ledger row holds: all n with
    task.targets=both (beside the targets), else none."""
    return n if task.get("targets", TASK_SETTINGS["targets"]) == "both" else 0


def _takes(cls, key: str) -> bool:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == key or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_task(task_cfg: DictConfig | dict):
    """The task object of `task_cfg` (hydra's instantiate). A task setting its class does not
    take is dropped at its neutral value; set otherwise, it is a ValueError naming it."""
    from hydra.utils import get_class, instantiate
    cfg = OmegaConf.to_container(task_cfg, resolve=True) if isinstance(task_cfg, DictConfig) else dict(task_cfg)
    assert isinstance(cfg, dict)
    target = cfg.get("_target_")
    present = [k for k in TASK_SETTINGS if k in cfg]
    if present and isinstance(target, str):
        try:
            cls = get_class(target)
        except Exception:  # noqa: BLE001 - instantiate below names the problem
            cls = None
        if cls is not None:
            for key in present:
                if _takes(cls, key):
                    continue
                if not neutral(cfg, key):
                    raise ValueError(f"task.{key}={cfg[key]}: {target} does not take it (the shipped "
                                     f"workers.tasks.ImageClassificationTask does); remove it or set it back "
                                     f"to {TASK_SETTINGS[key]}")
                cfg.pop(key)
    return instantiate(cfg, _convert_="all")
