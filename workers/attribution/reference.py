"""Ground truth for checking influence functions: exact (re)training of L2-regularised
multinomial logistic regression, where leave-one-out retraining is cheap and exact.

Used by tests/test_attribution.py and bench/if_loo.py; not by the pipeline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_logreg(x, y, C: int, l2: float, weights=None, init=None, bias: bool = True,
               gtol: float = 1e-12) -> tuple[torch.Tensor, float]:
    """argmin_θ (1/n) Σ w_i CE(θ; z_i) + (l2/2)‖θ‖² in float64.

    LBFGS (strong Wolfe line search), then up to 10 Newton steps on the exact Hessian until
    ‖∇R‖ < gtol. θ is flat: the weight [C, d] row-major, then the bias [C] if `bias`.
    `weights` [n] (default all ones; 0 leaves an example out); `init` a flat θ to start from.
    Returns (θ, ‖∇R‖ at θ); see `logreg_state` for the nn.Linear state dict.
    """
    d = x.shape[1]
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights

    def objective(flat):
        z = x @ flat[:C * d].view(C, d).T + (flat[C * d:] if bias else 0)
        return (F.cross_entropy(z, y, reduction="none") * w).sum() / len(x) + l2 / 2 * flat.pow(2).sum()

    P = C * d + (C if bias else 0)
    flat = torch.zeros(P, dtype=torch.float64) if init is None else init.detach().double()
    flat = flat.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([flat], lr=1, max_iter=1000, history_size=50, tolerance_grad=1e-9,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(flat)
        loss.backward()
        return loss

    opt.step(closure)
    flat = flat.detach()
    g = torch.func.grad(objective)(flat)
    for _ in range(10):
        if g.norm() < gtol:
            break
        flat = flat - torch.linalg.solve(torch.func.hessian(objective)(flat), g)
        g = torch.func.grad(objective)(flat)
    return flat, float(g.norm())


def logreg_state(flat: torch.Tensor, d: int, C: int, bias: bool = True) -> dict:
    """The nn.Linear(d, C) state dict of a flat θ from `fit_logreg`."""
    state = {"weight": flat[:C * d].view(C, d).clone()}
    if bias:
        state["bias"] = flat[C * d:].clone()
    return state
