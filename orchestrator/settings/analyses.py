"""Settings of the opt-in analyses: the structured configs of leakage, embedding and
compare (`make_conf` builds one from its config section), and the k values of the removal
analyses (counterfactual, brittleness): their defaults, those that fit a mask, the checks.
"""
from __future__ import annotations

from orchestrator.errors import ConfigError
from orchestrator.settings import schema
from orchestrator.settings.names import mask_size

RANDOM = "random"


def default_ks(section: str) -> list[int]:
    """The shipped default of `<section>.ks` (orchestrator.settings.schema)."""
    conf = schema.CounterfactualConf() if section == "counterfactual" else schema.BrittlenessConf()
    return list(conf.ks)


def stage_ks(cfg, section: str, size: int) -> tuple[list[int], list[int]]:
    """(the k values the stage uses, the shipped defaults left out): a k above the mask size
    `size` cannot be removed from a mask. The shipped default grid (`<section>.ks` as the schema
    declares it) is cut to the mask size: its values above it are left out, and where none is
    left, the mask size itself is used. Values the user set are used as given (check_settings
    refuses an impossible one before any work)."""
    ks = sorted({int(k) for k in cfg[section].ks})
    if ks != sorted(set(default_ks(section))):
        return ks, []
    kept = [k for k in ks if k <= size]
    return kept or [size], [k for k in ks if k > size]


def check_settings(cfg, n: int, n_targets: int) -> None:
    """The removal stages' settings, before any Ray work: one line naming the setting. The
    shipped default ks are cut to the mask size (stage_ks); a k that the user set above it is
    refused."""
    size = mask_size(n, float(cfg.masks.alpha))
    for section in ("counterfactual", "brittleness"):
        if cfg.stage != section:
            continue
        c = cfg[section]
        for t in list(c.targets or []):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n_targets:
                raise ConfigError(f"{section}.targets: {t!r} is not a target id; this task has targets "
                                  f"0..{n_targets - 1}")
        for k in list(c.ks):
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError(f"{section}.ks: {k!r} must be a count of training examples from 1 to the "
                                  f"mask size {size} (round(masks.alpha * n)); e.g. {section}.ks=[10,20,50]")
        if not list(c.ks):
            raise ConfigError(f"{section}.ks is empty: give at least one count of training examples to remove, "
                              f"from 1 to the mask size {size}; e.g. {section}.ks=[10,20,50]")
        ks, _ = stage_ks(cfg, section, size)
        for k in ks:
            if k > size:
                raise ConfigError(f"{section}.ks: {k!r} must be a count of training examples from 1 to the "
                                  f"mask size {size} (round(masks.alpha * n)); e.g. {section}.ks=[10,20,50]")
        if section == "counterfactual":
            known = ["datamodels", RANDOM] + list(cfg.baselines.methods or [])
            for m in list(c.methods or []):
                if m not in known:
                    raise ConfigError(f"counterfactual.methods: {m!r} is not one of {known} "
                                      f"(a baseline must be in baselines.methods)")
