"""Attribution baselines scored against datamodels by LDS: influence functions (exact,
CG, LiSSA), TRAK, TracIn and representer points. One entry point, `compute_scores`, and
`budget_scores` for the checkpoint ensembles (TRAK, TracIn): the scores of the first k
checkpoints for several k from one pass over the checkpoints, with each checkpoint's seconds.

Sign convention shared by every method: score[i, t] > 0 means including training example
i INCREASES target t's margin (the sign of a datamodel weight), so LDS is comparable.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import influence, representer, tracin, trak
from .common import COMMON_DEFAULTS, DTYPES
from .influence import if_cg, if_exact, if_lissa
from .representer import representer_scores
from .tracin import tracin_scores, tracin_steps
from .trak import trak_scores, trak_steps

METHODS: dict[str, Callable[..., np.ndarray]] = {
    "if_exact": if_exact,
    "if_cg": if_cg,
    "if_lissa": if_lissa,
    "trak": trak_scores,
    "tracin": tracin_scores,
    "representer": representer_scores,
}

# Each method's settings and their defaults (what resolve_params accepts, beside COMMON_DEFAULTS).
DEFAULTS: dict[str, dict] = {
    "if_exact": influence.DEFAULTS["exact"], "if_cg": influence.DEFAULTS["cg"],
    "if_lissa": influence.DEFAULTS["lissa"], "trak": trak.DEFAULTS, "tracin": tracin.DEFAULTS,
    "representer": representer.DEFAULTS,
}
# The settings that take one of a few words (or true/false), as the methods read them
# (layer may also be a list of parameter names, checked against the model when it is built).
CHOICES: dict[str, tuple] = {
    "hessian": ("exact", "ggn"), "inverse": ("auto", "cg", "woodbury"), "layer": ("all", "last"),
    "proj_type": ("gaussian", "rademacher"), "direction": ("margin", "class"),
    "dtype": tuple(DTYPES), "factored": (True, False),
}


def accepted_params(method: str) -> set[str]:
    """Every setting `method` accepts (its DEFAULTS and COMMON_DEFAULTS); empty for an unknown
    method."""
    return set(COMMON_DEFAULTS) | set(DEFAULTS.get(method, {}))


def check_params(method: str, params: dict | None) -> None:
    """The settings of `method` that can be checked without a model or data: unknown keys and
    the worded ones (CHOICES). Raises ValueError, one line naming the setting; the numbers'
    bounds are the config's (orchestrator.settings.rules.BASELINE_PARAM_RULES)."""
    accepted = accepted_params(method)
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        raise ValueError(f"baselines.params.{method}.{unknown[0]} is not a setting of {method}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    for key, value in (params or {}).items():
        allowed = CHOICES.get(key)
        if allowed is None or (key == "layer" and not isinstance(value, str)):   # a list of names
            continue
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            shown = "true|false" if key == "factored" else "|".join(map(str, allowed))
            raise ValueError(f"baselines.params.{method}.{key}={value!r} must be one of {shown}")


# Methods whose score over K checkpoints is a running combination (sum, mean) of one term per
# checkpoint: their step generators yield after each checkpoint the scores of those so far.
STEPS = {
    "trak": trak_steps,
    "tracin": tracin_steps,
}


def compute_scores(method: str, model_fn, checkpoints: list[dict], x_train, y_train,
                   x_target, y_target, params: dict, margin_kind="logsumexp") -> np.ndarray:
    """Attribution scores float32 [n_train, n_targets] of `method` (a key of METHODS).

    model_fn() builds the architecture; each checkpoint (a state dict) supplies every
    parameter and buffer; x_* are normalized float tensors, y_* int64 labels; params are
    the method's settings (see each module's DEFAULTS; unknown keys raise).
    """
    if method not in METHODS:
        raise ValueError(f"attribution method {method!r} is not one of {sorted(METHODS)}")
    if not checkpoints:
        raise ValueError(f"attribution method {method!r}: no checkpoints given")
    scores = METHODS[method](model_fn, checkpoints, x_train, y_train, x_target, y_target,
                             params, margin_kind)
    assert scores.shape == (len(x_train), len(x_target)), scores.shape
    return scores


@dataclass
class BudgetScores:
    """Scores of the first k checkpoints for each asked k (budget), from one pass.

    scores[k]: float32 [n_train, n_targets], equal to compute_scores(checkpoints[:k]).
    checkpoint_seconds[c]: wall seconds of checkpoint c's share of the work (the first also
    carries the method's setup). seconds[k] = sum(checkpoint_seconds[:k]) + the seconds of
    forming budget k's scores from the running sums.
    """

    scores: dict[int, np.ndarray]
    seconds: dict[int, float]
    checkpoint_seconds: list[float]


def budget_scores(method: str, model_fn, checkpoints: list[dict], x_train, y_train,
                  x_target, y_target, params: dict, budgets, margin_kind="logsumexp") -> BudgetScores:
    """Scores of `method` (a key of STEPS) with the first k checkpoints for every k in
    `budgets` (1 <= k <= len(checkpoints)); checkpoints after max(budgets) are not touched.
    Scores with k = len(checkpoints) are exactly compute_scores' (the same code path)."""
    if method not in STEPS:
        raise ValueError(f"attribution method {method!r} has no per-checkpoint budgets; "
                         f"only {sorted(STEPS)} have")
    if not checkpoints:
        raise ValueError(f"attribution method {method!r}: no checkpoints given")
    wanted = sorted({int(k) for k in budgets})
    if not wanted or wanted[0] < 1 or wanted[-1] > len(checkpoints):
        raise ValueError(f"{method}: checkpoint budgets {wanted} must lie in [1, {len(checkpoints)}]")
    out = BudgetScores({}, {}, [])
    steps = STEPS[method](model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
                          margin_kind)
    t = time.perf_counter()
    for k, finish in enumerate(steps, 1):
        _sync()     # GPU work is asynchronous: charge it to the checkpoint that queued it
        out.checkpoint_seconds.append(time.perf_counter() - t)
        if k in wanted:
            t0 = time.perf_counter()
            scores = np.array(finish(), dtype=np.float32, copy=True)  # the running sum moves on
            out.seconds[k] = sum(out.checkpoint_seconds) + time.perf_counter() - t0
            assert scores.shape == (len(x_train), len(x_target)), scores.shape
            out.scores[k] = scores
        if k == wanted[-1]:
            steps.close()
            break
        t = time.perf_counter()
    return out


def _sync() -> None:
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
