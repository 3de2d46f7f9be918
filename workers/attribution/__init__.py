"""Attribution baselines scored against datamodels by LDS: influence functions (exact,
CG, LiSSA), TRAK, TracIn and representer points. One entry point, `compute_scores`.

Sign convention shared by every method: score[i, t] > 0 means including training example
i INCREASES target t's margin (the sign of a datamodel weight), so LDS is comparable.
"""
from __future__ import annotations

import numpy as np

from .influence import if_cg, if_exact, if_lissa
from .representer import representer_scores
from .tracin import tracin_scores
from .trak import trak_scores

METHODS = {
    "if_exact": if_exact,
    "if_cg": if_cg,
    "if_lissa": if_lissa,
    "trak": trak_scores,
    "tracin": tracin_scores,
    "representer": representer_scores,
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
