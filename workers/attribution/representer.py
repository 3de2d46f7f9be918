"""Representer points (Yeh et al., NeurIPS 2018) on the final linear layer.

With the last layer W trained to a stationary point of (1/n) Σ_i L(z_i) + (λ/2)‖W‖²,
W = Σ_i α_i f_iᵀ with α_i = −(1/(λn)) ∂L(z_i)/∂Φ_i ∈ R^C (Φ_i = logits of z_i, f_i = the
input features of the last layer), so the target's logits decompose as Φ_t = Σ_i α_i (f_i·f_t).
(The paper writes λ‖W‖², hence its 1/(2λn).) Training example i's contribution to the
target's margin, to first order, is that term projected on the margin's direction:

    score[i, t] = (f_i·f_t) · (α_i · d_t),   d_t = ∂ margin(Φ_t) / ∂Φ_t   (direction="margin")
                                               d_t = e_{y_t}                  (direction="class",
                                                                              the paper's α_{i,y_t})

Positive = including i raises the target's margin. λ = params.l2 only scales all scores.
No last-layer refit is done (the paper fine-tunes it to reach the stationary point); a
bias of the last layer is not represented. Scores are averaged over checkpoints.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .common import forward_all, load_checkpoint, output_values, resolve_params, to_numpy_scores

DEFAULTS = {"l2": 1.0, "direction": "margin"}


def margin_direction(logits: torch.Tensor, labels: torch.Tensor, margin_kind: str) -> torch.Tensor:
    """∂ margin / ∂ logits, [T, C]."""
    z = logits.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(output_values(z, labels, "margin", margin_kind).sum(), z)
    return g


def representer_scores(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
                       margin_kind="logsumexp") -> np.ndarray:
    """Representer-point scores float32 [n_train, n_targets]."""
    p = resolve_params("representer", params, DEFAULTS)
    if p["direction"] not in ("margin", "class"):
        raise ValueError(f"representer: params.direction={p['direction']!r} is not 'margin' or 'class'")
    n = len(x_train)
    total: Any = None
    for state in checkpoints:
        fm = load_checkpoint(model_fn, state, "last", p["device"])
        z_tr, f_tr = forward_all(fm, x_train, p["batch_size"], features=True)
        z_t, f_t = forward_all(fm, x_target, p["batch_size"], features=True)
        y_tr = y_train.to(fm.device).long()
        y_t = y_target.to(fm.device).long()
        dL = torch.softmax(z_tr, -1) - F.one_hot(y_tr, z_tr.shape[1]).to(z_tr.dtype)
        alpha = -dL / (float(p["l2"]) * n)
        if p["direction"] == "margin":
            d = margin_direction(z_t, y_t, margin_kind).to(z_tr.dtype)
        else:
            d = F.one_hot(y_t, z_t.shape[1]).to(z_tr.dtype)
        scores = (f_tr @ f_t.T) * (alpha @ d.T)  # type: ignore[operator,union-attr]  # features=True
        total = scores if total is None else total + scores
    return to_numpy_scores(total / len(checkpoints))
