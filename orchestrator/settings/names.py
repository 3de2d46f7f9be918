"""Counts derived from settings: the prefix sizes of the LDS-against-models curve
(fit.prefixes) and the checkpoint budgets of the checkpoint ensembles
(baselines.budget_checkpoints).
"""
from __future__ import annotations

from orchestrator.errors import ConfigError


def prefix_sizes(fit_cfg: dict, m: int) -> list[int]:
    """Sizes of the train-model prefixes fit for the LDS-versus-models curve."""
    return sorted({max(10, int(round(f * m))) for f in (fit_cfg.get("prefixes") or []) if 0 < f < 1} - {m})


def budget_sizes(cfg) -> list[int]:
    """The checkpoint budgets k < baselines.checkpoints (K) at which the checkpoint ensembles
    are also scored: baselines.budget_checkpoints, sorted, values >= K left out (K itself is
    the method's own file)."""
    from omegaconf import OmegaConf
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    raw = bcfg.get("budget_checkpoints") or []
    if not isinstance(raw, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                            for k in raw):
        raise ConfigError(f"baselines.budget_checkpoints={raw!r} must be a list of checkpoint counts >= 1, "
                          f"e.g. baselines.budget_checkpoints=[1,2]")
    return sorted({k for k in raw if k < int(bcfg["checkpoints"])})


def mask_size(n: int, alpha: float) -> int:
    """round(α·n), the exact number of examples in every mask."""
    return int(round(alpha * n))
