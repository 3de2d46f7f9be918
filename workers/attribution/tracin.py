"""TracIn-CP (Pruthi et al., NeurIPS 2020): gradient dot products summed over checkpoints.

One SGD step of size η on z_i moves θ by −η∇L(z_i), changing f(z_t) by ≈ −η ∇f(z_t)·∇L(z_i).
With the package's sign convention (score > 0: including i raises the target's margin)

    score[i, t] = −Σ_c η_c ∇_θ f(z_t; θ_c) · ∇_θ L(z_i; θ_c),   f = margin, L = cross-entropy,

η_c = params.lrs[c] (1 for every checkpoint if not given). Since ∇f ≈ −∇L for the target's
own label, this is TracIn's "proponent > 0" sign. params.proj_dim projects both gradients
with the same seeded matrix per checkpoint (an unbiased estimate of the dot product). Without
it, a model whose selected parameters are all affine layers (an MLP) takes the dot products
from factored gradients (common.linear_factors): the same numbers at Σ(in + out) instead of
P multiply-adds per (train, target) pair.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from .common import (
    batches,
    factor_dots,
    linear_factors,
    load_checkpoint,
    make_projector,
    output_fn,
    per_example_grads,
    resolve_params,
    stacked_grads,
    to_numpy_scores,
)

# factored: take the dot products from factored gradients when the model allows, and build the
# projected path's gradients from them (false: always vmap's dense per-example gradients; the
# same scores up to rounding, for cross-checks and timing)
DEFAULTS = {"layer": "all", "lrs": None, "proj_dim": None, "proj_type": "gaussian", "factored": True}


def tracin_steps(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
                 margin_kind="logsumexp"):
    """Yields once per checkpoint, in order: after checkpoint c (1-based), a function that
    returns the sum of the first c checkpoints' terms, float32 [n_train, n_targets] — what
    tracin_scores(checkpoints[:c]) with params.lrs[:c] returns. The array it returns may
    share memory with the running sum: copy it before asking for the next checkpoint."""
    p = resolve_params("tracin", params, DEFAULTS)
    lrs = p["lrs"] if p["lrs"] is not None else [1.0] * len(checkpoints)
    if len(lrs) != len(checkpoints):
        raise ValueError(f"tracin: params.lrs has {len(lrs)} entries for {len(checkpoints)} checkpoints")
    total = None
    for c, (state, lr) in enumerate(zip(checkpoints, lrs)):
        fm = load_checkpoint(model_fn, state, p["layer"], p["device"])
        proj = make_projector(p, fm.num_params, c)
        ft = None if proj is not None or not p["factored"] else linear_factors(
            fm, x_target, output_fn(fm, y_target, "margin", margin_kind), p["batch_size"])
        if ft is not None:      # affine layers only: the exact dot products from factored gradients
            f = linear_factors(fm, x_train, output_fn(fm, y_train, "loss", margin_kind), p["batch_size"])
            assert f is not None
            if total is None:
                total = torch.zeros(len(x_train), len(x_target), dtype=ft[0][0].dtype, device=fm.device)
            for rows in batches(len(x_train), 1024):
                total[rows] -= float(lr) * factor_dots([(a[rows], d[rows]) for a, d in f], ft)
            yield partial(to_numpy_scores, total)
            continue
        Gt = stacked_grads(fm, x_target, y_target, "margin", margin_kind, p["batch_size"], proj,
                           p["factored"])
        if total is None:
            total = torch.zeros(len(x_train), len(Gt), dtype=Gt.dtype, device=fm.device)
        for rows, G in per_example_grads(fm, x_train, y_train, "loss", margin_kind,
                                         p["batch_size"], "train grads", p["factored"]):
            total[rows] -= float(lr) * ((proj(G) if proj is not None else G) @ Gt.T)
        yield partial(to_numpy_scores, total)


def tracin_scores(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
                  margin_kind="logsumexp") -> np.ndarray:
    """TracIn-CP scores float32 [n_train, n_targets]."""
    finish: Any = None
    for finish in tracin_steps(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,  # noqa: B007
                               margin_kind):
        pass
    return finish()
