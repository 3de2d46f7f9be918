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

import numpy as np
import torch
import torch.nn.functional as F

from .common import batches, forward_all, load_checkpoint, output_values, resolve_params, to_numpy_scores

# batch_size bounds a forward pass only (no per-example gradients are formed), so its default is
# larger than the other methods': fewer calls into the model, each a larger matrix product.
DEFAULTS = {"l2": 1.0, "direction": "margin", "batch_size": 2048}
block_bytes = 1 << 22     # the accumulated block of training rows (see representer_scores)


def margin_direction(logits: torch.Tensor, labels: torch.Tensor, margin_kind: str) -> torch.Tensor:
    """∂ margin / ∂ logits, [T, C]."""
    z = logits.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(output_values(z, labels, "margin", margin_kind).sum(), z)
    return g


def representer_scores(model_fn, checkpoints, x_train, y_train, x_target, y_target, params,
                       margin_kind="logsumexp") -> np.ndarray:
    """Representer-point scores float32 [n_train, n_targets].

    Each checkpoint's score matrix is the Hadamard product of two low-rank ones, (F_tr F_tᵀ) ∘
    (α Dᵀ); the mean over checkpoints is accumulated one block of training rows at a time
    (about 4 MB, `block_bytes`), so every product stays in the CPU's caches and the [n, T] result is
    written once: its cost per target is 2·n·(h + C) multiply-adds per checkpoint, with no
    pass over memory of result size per checkpoint."""
    p = resolve_params("representer", params, DEFAULTS)
    if p["direction"] not in ("margin", "class"):
        raise ValueError(f"representer: params.direction={p['direction']!r} is not 'margin' or 'class'")
    n, K = len(x_train), len(checkpoints)
    terms = []     # per checkpoint: (features of train, α / K, features of targets, directions)
    for state in checkpoints:
        fm = load_checkpoint(model_fn, state, "last", p["device"])
        z_tr, f_tr = forward_all(fm, x_train, p["batch_size"], features=True)
        z_t, f_t = forward_all(fm, x_target, p["batch_size"], features=True)
        y_tr = y_train.to(fm.device).long()
        y_t = y_target.to(fm.device).long()
        dL = torch.softmax(z_tr, -1) - F.one_hot(y_tr, z_tr.shape[1]).to(z_tr.dtype)
        alpha = -dL / (float(p["l2"]) * n * K)
        if p["direction"] == "margin":
            d = margin_direction(z_t, y_t, margin_kind).to(z_tr.dtype)
        else:
            d = F.one_hot(y_t, z_t.shape[1]).to(z_tr.dtype)
        assert f_tr is not None and f_t is not None   # features=True
        terms.append((f_tr, alpha, f_t, d))
    T = len(x_target)
    total = torch.empty(n, T, dtype=terms[0][0].dtype, device=terms[0][0].device)
    rows_per_block = max(1, block_bytes // (max(1, T) * total.element_size()))
    sim = torch.empty(min(n, rows_per_block), T, dtype=total.dtype, device=total.device)
    weight = torch.empty_like(sim)
    for rows in batches(n, rows_per_block):
        m = rows.stop - rows.start
        acc = total[rows]
        for k, (f_tr, alpha, f_t, d) in enumerate(terms):
            torch.matmul(f_tr[rows], f_t.T, out=sim[:m])
            torch.matmul(alpha[rows], d.T, out=weight[:m])
            if k == 0:
                torch.mul(sim[:m], weight[:m], out=acc)
            else:
                acc.addcmul_(sim[:m], weight[:m])
    return to_numpy_scores(total)
