"""Tests for workers.attribution: shapes and settings, exact influence against leave-one-out
retraining, CG / LiSSA against the exact inverse Hessian, TRAK / TracIn / representer
points against closed forms computed here with plain autograd, and the sign convention.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr
from sklearn.datasets import load_digits
from torch import nn

from workers.attribution import METHODS, compute_scores
from workers.attribution.common import (
    Projector,
    factor_dots,
    linear_factors,
    load_checkpoint,
    output_fn,
    output_values,
    per_example_grads,
    projection_seed,
    stacked_grads,
)
from workers.attribution.influence import GGNFactor, HessianOperator, influence_scores, inverse_hvp
from workers.attribution.reference import fit_logreg, logreg_state
from workers.margins import margin

CPU = {"device": "cpu"}


# --------------------------------------------------------------------------- helpers

def mlp(d=5, C=3, bn=True):
    layers = [nn.Linear(d, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, C)]
    return nn.Sequential(*layers)


def train_state(model_fn, x, y, seed, steps=60, l2=1e-3, dtype=torch.float32):
    """A few full-batch Adam steps (train mode, so BatchNorm running stats move)."""
    torch.manual_seed(seed)
    model = model_fn().to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=l2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x.to(dtype)), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def blobs(n, d=5, C=3, seed=0, sep=2.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, d, generator=g) * sep
    y = torch.randint(0, C, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def loop_grads(model_fn, state, x, y, what, dtype=torch.float64):
    """Per-example gradients one example at a time with plain autograd (eval mode)."""
    model = model_fn().to(dtype)
    model.load_state_dict(state)
    model.eval()
    rows = []
    for xi, yi in zip(x, y):
        logits = model(xi[None].to(dtype))
        out = output_values(logits, yi[None], what, "logsumexp")[0]
        gs = torch.autograd.grad(out, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


# --------------------------------------------------------------------------- API

@pytest.mark.parametrize("method,params", [
    ("if_exact", {"damping": 0.1}),
    ("if_cg", {"damping": 0.1, "hessian": "ggn", "cg_iters": 30}),
    ("if_lissa", {"damping": 0.1, "hessian": "ggn", "lissa_depth": 30, "lissa_batch": 16}),
    ("trak", {"proj_dim": 16}),
    ("tracin", {"lrs": [0.5, 0.1]}),
    ("representer", {}),
])
def test_every_method_returns_float32_n_by_t(method, params):
    x, y = blobs(60)
    xt, yt = blobs(5, seed=1)
    cks = [train_state(mlp, x, y, seed) for seed in (0, 1)]
    s = compute_scores(method, mlp, cks, x, y, xt, yt, {**CPU, **params})
    assert s.shape == (60, 5) and s.dtype == np.float32
    assert np.isfinite(s).all() and np.abs(s).max() > 0
    assert set(METHODS) == {"if_exact", "if_cg", "if_lissa", "trak", "tracin", "representer"}


def test_bad_settings_raise_one_clear_error():
    x, y = blobs(20)
    ck = [train_state(mlp, x, y, 0, steps=1)]
    with pytest.raises(ValueError, match="proj_dimm"):
        compute_scores("trak", mlp, ck, x, y, x[:2], y[:2], {**CPU, "proj_dimm": 8})
    with pytest.raises(ValueError, match="not one of"):
        compute_scores("datamodel", mlp, ck, x, y, x[:2], y[:2], CPU)


def test_float64_margin_equals_shared_margin():
    z = torch.randn(50, 7, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (50,))
    for kind in ("logsumexp", "max"):
        ours = output_values(z, y, "margin", kind)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours.float(), margin(z.float(), y, kind), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- influence

def test_exact_influence_predicts_leave_one_out_retraining():
    X, Y = load_digits(return_X_y=True)
    keep = np.isin(Y, [3, 5, 8])
    X, Y = X[keep], np.searchsorted([3, 5, 8], Y[keep])
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(X))
    tr, te = perm[:150], perm[150:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
    x = torch.tensor((X[tr] - mu) / sd)
    y = torch.tensor(Y[tr])
    xte, yte = torch.tensor((X[te] - mu) / sd), torch.tensor(Y[te])
    d, C, l2, n = 64, 3, 0.2, 150
    flat, _ = fit_logreg(x, y, C, l2)
    state = logreg_state(flat, d, C)
    with torch.no_grad():
        t = int(F.cross_entropy(xte @ state["weight"].T + state["bias"], yte, reduction="none").argmax())
    xt, yt = xte[t:t + 1], yte[t:t + 1]
    model_fn = lambda: nn.Linear(d, C)  # noqa: E731
    p = {**CPU, "l2": l2}
    pred_loss = influence_scores(model_fn, [state], x, y, xt, yt, p, solver="exact", output="loss")[:, 0]
    pred_margin = compute_scores("if_exact", model_fn, [state], x, y, xt, yt, p)[:, 0]

    def outputs(f):
        z = xt @ f[:C * d].view(C, d).T + f[C * d:]
        return float(F.cross_entropy(z, yt)), float(output_values(z, yt, "margin", "logsumexp")[0])

    base = outputs(flat)
    top = np.argsort(-np.abs(pred_margin))[:12]
    idx = np.concatenate([top, rng.choice(np.setdiff1d(np.arange(n), top), 12, replace=False)])
    actual = []
    for i in idx:
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0
        lo, ma = outputs(fit_logreg(x, y, C, l2, weights=w, init=flat)[0])
        actual.append((base[0] - lo, base[1] - ma))  # with i minus without i
    actual = np.array(actual)
    assert pearsonr(pred_loss[idx], actual[:, 0])[0] > 0.9
    assert pearsonr(pred_margin[idx], actual[:, 1])[0] > 0.9
    # the sign is right, not just the correlation: same sign on the large ones
    assert (np.sign(pred_margin[top]) == np.sign(actual[:12, 1])).all()
    # and so is the scale (the 1/n): least-squares slope of actual on predicted near 1
    slope = np.dot(pred_margin[idx], actual[:, 1]) / np.dot(pred_margin[idx], pred_margin[idx])
    assert 0.7 < slope < 1.5


def test_cg_and_lissa_match_the_exact_inverse():
    torch.manual_seed(0)
    x, y = blobs(80, d=4, C=3, sep=1.0)
    x = x.double()
    d, C, l2 = 4, 3, 0.5  # well conditioned, so LiSSA converges in ~100 steps
    flat, _ = fit_logreg(x, y, C, l2)
    state = logreg_state(flat, d, C)
    fm = load_checkpoint(lambda: nn.Linear(d, C), state, "all", "cpu")
    P = fm.num_params

    # the operator's dense matrix against autograd's Hessian of the objective, and GGN == exact
    def objective(f):
        z = x @ f[:C * d].view(C, d).T + f[C * d:]
        return F.cross_entropy(z, y) + l2 / 2 * f.pow(2).sum()
    H_ref = torch.autograd.functional.hessian(objective, flat)
    for kind in ("exact", "ggn"):
        H = HessianOperator(fm, x, y, l2, 32, kind).matrix(torch.float64)
        torch.testing.assert_close(H, H_ref, rtol=1e-9, atol=1e-12)

    B = torch.randn(3, P, dtype=torch.float64)
    ref = torch.linalg.solve(H_ref, B.T).T
    p = {"l2": l2, "damping": 0.0, "hessian": "exact", "batch_size": 32, "seed": 0,
         "max_params": 1000, "dtype": "float64", "target_chunk": 2, "cg_iters": 2 * P, "cg_tol": 1e-12,
         "lissa_depth": 100, "lissa_scale": None, "lissa_batch": None, "lissa_repeats": 1}

    def rel(X):
        return float((X - ref).norm() / ref.norm())
    assert rel(inverse_hvp("exact", fm, B, x, y, p)) < 1e-10
    assert rel(inverse_hvp("cg", fm, B, x, y, p)) < 1e-8
    assert rel(inverse_hvp("lissa", fm, B, x, y, p)) < 1e-3
    # stochastic LiSSA: minibatch Hessians, averaged over repeats -> close, not exact
    assert rel(inverse_hvp("lissa", fm, B, x, y, {**p, "lissa_batch": 16, "lissa_repeats": 2,
                                                  "lissa_scale": 3.0})) < 0.15


def test_cg_on_network_ggn_matches_dense_solve():
    x, y = blobs(64)
    state = train_state(lambda: mlp(bn=True), x, y, 0, dtype=torch.float64)
    fm = load_checkpoint(mlp, state, "all", "cpu")
    op = HessianOperator(fm, x, y, 0.05, 32, "ggn")
    H = op.matrix(torch.float64)
    assert torch.linalg.eigvalsh(H).min() > 0.05 - 1e-9  # GGN is PSD; + shift
    B = torch.randn(2, fm.num_params, dtype=torch.float64)
    ref = torch.linalg.solve(H, B.T).T
    p = {"l2": 0.0, "damping": 0.05, "hessian": "ggn", "batch_size": 32, "seed": 0,
         "cg_iters": 300, "cg_tol": 1e-10, "target_chunk": 8}
    X = inverse_hvp("cg", fm, B, x, y, p)
    assert float((X - ref).norm() / ref.norm()) < 1e-6


# --------------------------------------------------------------------------- TRAK / TracIn

def _trak_closed_form(states, x, y, xt, yt, lam, proj_dim=None, model_fn=mlp):
    """mean_k(1 − p) · mean_k Φ_k(Φ_kᵀΦ_k + λI)⁻¹φ_k, Φ_k = G_k R_k, in numpy float64."""
    S, Q = 0, 0
    for k, st in enumerate(states):
        G = loop_grads(model_fn, st, x, y, "margin").numpy()
        g = loop_grads(model_fn, st, xt, yt, "margin").numpy()
        if proj_dim is not None:
            R = Projector(G.shape[1], proj_dim, "gaussian", projection_seed(0, k), "cpu").matrix()
            G, g = G @ R.double().numpy(), g @ R.double().numpy()
        S = S + G @ np.linalg.solve(G.T @ G + lam * np.eye(G.shape[1]), g.T)
        model = model_fn().double()
        model.load_state_dict(st)
        model.eval()
        with torch.no_grad():
            p = torch.softmax(model(x.double()), -1)[torch.arange(len(y)), y].numpy()
        Q = Q + (1 - p)
    return (Q / len(states))[:, None] * (S / len(states))


def test_trak_equals_closed_form():
    x, y = blobs(150)
    xt, yt = blobs(4, seed=3)
    states = [train_state(mlp, x, y, s, dtype=torch.float64) for s in (0, 1)]
    P = load_checkpoint(mlp, states[0], "all", "cpu").num_params
    # the margin is blind to a common shift of the logits, so GᵀG over all parameters is
    # singular: without projection (or with proj_dim >= P) λ > 0 is needed
    for proj_dim, lam in ((None, 1e-2), (P, 1e-3), (16, 0.0)):
        want = _trak_closed_form(states, x, y, xt, yt, lam, proj_dim)
        got = compute_scores("trak", mlp, states, x, y, xt, yt,
                             {**CPU, "proj_dim": proj_dim, "lam": lam, "dtype": "float64"})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="not positive definite"):
        compute_scores("trak", mlp, states, x, y, xt, yt, {**CPU, "proj_dim": None, "dtype": "float64"})
    # soft-thresholding is S(τ, s) = sign(τ) max(|τ| − s, 0) of the same scores
    s = float(np.quantile(np.abs(want), 0.5))
    got = compute_scores("trak", mlp, states, x, y, xt, yt,
                         {**CPU, "proj_dim": 16, "dtype": "float64", "soft_threshold": s})
    np.testing.assert_allclose(got, np.sign(want) * np.maximum(np.abs(want) - s, 0),
                               rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_trak_on_factored_gradients_and_more_targets_than_rows_equals_closed_form():
    """An MLP without BatchNorm: the gradients are built from their factors, and with more
    targets than training rows the kernel is solved for the rows' side. Both equal the closed
    form, and the vmap path (factored=false)."""
    def net():
        return mlp(bn=False)
    x, y = blobs(30)
    xt, yt = blobs(45, seed=3)
    states = [train_state(net, x, y, s, dtype=torch.float64) for s in (0, 1)]
    want = _trak_closed_form(states, x, y, xt, yt, 0.0, 16, net)
    for factored in (True, False):
        got = compute_scores("trak", net, states, x, y, xt, yt,
                             {**CPU, "proj_dim": 16, "dtype": "float64", "factored": factored})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_per_example_grads_from_factors_equal_autograd():
    """per_example_grads builds an MLP's gradients from their factors into one reused buffer:
    every selection of weights and biases gives autograd's per-example gradients; a model that
    does not factor (BatchNorm selected) takes vmap's; stacked_grads keeps every batch."""
    def net():
        return mlp(bn=False)
    x, y = blobs(23)
    state = train_state(net, x, y, 0, dtype=torch.float64)
    full = loop_grads(net, state, x, y, "loss")
    names = [n for n, _ in net().named_parameters()]            # 0.weight 0.bias 2.weight 2.bias
    sizes = [int(np.prod(t.shape)) for t in net().state_dict().values()]
    cols = dict(zip(names, np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])))
    for layer in ("all", "last", ["0.weight"], ["2.bias", "0.bias"], ["0.weight", "2"]):
        fm = load_checkpoint(net, state, layer, "cpu")
        want = full[:, np.concatenate([cols[n] for n in fm.names])]
        at = fm.flat_slices()                                    # where G's columns come from
        assert list(at) == fm.names and at[fm.names[-1]].stop == fm.num_params
        for n, cols_n in at.items():
            torch.testing.assert_close(fm.theta_flat()[cols_n], fm.params[n].reshape(-1))
        steps = per_example_grads(fm, x, y, "loss", "logsumexp", 10)
        rows, G = next(steps)
        first = G.clone()
        for rows2, G2 in steps:
            torch.testing.assert_close(G2, want[rows2])
        assert G2.data_ptr() == G.data_ptr()                    # the buffer is reused
        torch.testing.assert_close(first, want[rows])
        torch.testing.assert_close(stacked_grads(fm, x, y, "loss", "logsumexp", 10), want)
        torch.testing.assert_close(stacked_grads(fm, x, y, "loss", "logsumexp", 10, factored=False), want)
    bn_state = train_state(mlp, x, y, 0, dtype=torch.float64)
    fm = load_checkpoint(mlp, bn_state, "all", "cpu")
    torch.testing.assert_close(stacked_grads(fm, x, y, "loss", "logsumexp", 10),
                               loop_grads(mlp, bn_state, x, y, "loss"))


def test_gradients_that_stop_factoring_mid_way_raise_never_fall_short():
    """A model whose layer is applied twice only on small batches: its first batches factor,
    its last does not. per_example_grads raises naming the rows, rather than yield fewer."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, x):
            return self.lin(self.lin(x)) if len(x) < 10 else self.lin(x)
    x, y = blobs(23, C=5)
    fm = load_checkpoint(Odd, Odd().state_dict(), "all", "cpu")
    with pytest.raises(RuntimeError, match="rows 20-23 do not factor"):
        list(per_example_grads(fm, x, y, "loss", "logsumexp", 10))
    assert len(stacked_grads(fm, x, y, "loss", "logsumexp", 10, factored=False)) == 23


def test_tracin_equals_weighted_gradient_dot_products():
    x, y = blobs(40)
    xt, yt = blobs(3, seed=2)
    states = [train_state(mlp, x, y, s, dtype=torch.float64) for s in (0, 1)]
    lrs = [0.3, 0.05]
    want = sum(-lr * loop_grads(mlp, st, x, y, "loss").numpy() @ loop_grads(mlp, st, xt, yt, "margin").numpy().T
               for st, lr in zip(states, lrs))
    got = compute_scores("tracin", mlp, states, x, y, xt, yt, {**CPU, "lrs": lrs})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_factored_gradients_give_the_dense_dot_products():
    """An MLP's per-example gradients as (input, output-gradient) factors per affine layer:
    their inner products (and TracIn, which uses them) equal the dense ones; a BatchNorm
    parameter among the selected ones means no factors (the dense path)."""
    x, y = blobs(40)
    xt, yt = blobs(3, seed=2)
    def net():
        return mlp(bn=False)
    state = train_state(net, x, y, 0, dtype=torch.float64)
    G, Gt = loop_grads(net, state, x, y, "loss"), loop_grads(net, state, xt, yt, "margin")
    for layer, cols in (("all", slice(None)), ("last", slice(-(8 * 3 + 3), None))):
        fm = load_checkpoint(net, state, layer, "cpu")
        f = linear_factors(fm, x, output_fn(fm, y, "loss", "logsumexp"), 16)
        ft = linear_factors(fm, xt, output_fn(fm, yt, "margin", "logsumexp"), 2)
        torch.testing.assert_close(factor_dots(f, ft), G[:, cols] @ Gt[:, cols].T)
    got = compute_scores("tracin", net, [state], x, y, xt, yt, {**CPU, "lrs": [0.3]})
    np.testing.assert_allclose(got, -0.3 * (G @ Gt.T).numpy(), rtol=1e-5, atol=1e-6 * float((G @ Gt.T).abs().max()))
    assert linear_factors(load_checkpoint(mlp, train_state(mlp, x, y, 0), "all", "cpu"), x,
                          lambda z, rows: z.sum(1), 16) is None


def test_projector_blocks_equal_cached_matrix_and_seed_matters():
    G = torch.randn(6, 1000)
    a = Projector(1000, 32, "rademacher", 7, "cpu", block_entries=32 * 100)
    b = Projector(1000, 32, "rademacher", 7, "cpu", cache_bytes=0, block_entries=32 * 100)
    assert a.cache is not None and b.cache is None and b.num_blocks == 10
    torch.testing.assert_close(a(G), b(G))
    assert not torch.allclose(a(G), Projector(1000, 32, "rademacher", 8, "cpu", block_entries=32 * 100)(G))
    torch.testing.assert_close(a.matrix().abs(), torch.full((1000, 32), 32 ** -0.5))
    R = Projector(1000, 4000, "gaussian", 0, "cpu").matrix()
    assert abs(float((R * R).sum(1).mean()) - 1.0) < 0.05  # E‖row‖² = 1: inner products unbiased


# --------------------------------------------------------------------------- representer

def test_representer_scores_decompose_the_target_logits():
    x, y = blobs(60, d=4, C=3, sep=1.0)
    x = x.double()
    xt, yt = blobs(5, d=4, C=3, seed=4)
    xt = xt.double()
    l2 = 0.1
    state = logreg_state(fit_logreg(x, y, 3, l2, bias=False)[0], 4, 3, bias=False)
    model_fn = lambda: nn.Linear(4, 3, bias=False)  # noqa: E731
    z = xt @ state["weight"].T  # logits of the targets
    got = compute_scores("representer", model_fn, [state], x, y, xt, yt,
                         {**CPU, "l2": l2, "direction": "class"})
    np.testing.assert_allclose(got.sum(0), z[torch.arange(5), yt].numpy(), rtol=1e-4, atol=1e-5)
    got = compute_scores("representer", model_fn, [state], x, y, xt, yt, {**CPU, "l2": l2})
    zz = z.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(output_values(zz, yt, "margin", "logsumexp").sum(), zz)
    np.testing.assert_allclose(got.sum(0), (d * z).sum(1).numpy(), rtol=1e-4, atol=1e-5)


def test_representer_row_blocks_equal_the_checkpoint_mean(monkeypatch):
    """The mean over checkpoints of (f_i·f_t)(α_i·d_t), accumulated in blocks of a few rows,
    equals the formula computed whole for each checkpoint."""
    from workers.attribution import representer
    def net():
        return mlp(bn=False)
    x, y = blobs(37)
    xt, yt = blobs(11, seed=5)
    states = [train_state(net, x, y, s, dtype=torch.float64) for s in (0, 1, 2)]
    want = 0
    for st in states:
        model = net().double()
        model.load_state_dict(st)
        model.eval()
        with torch.no_grad():
            f, ft = model[:2](x.double()), model[:2](xt.double())
            z, zt = model(x.double()), model(xt.double())
        alpha = -(torch.softmax(z, -1) - F.one_hot(y, 3)) / (0.5 * len(x))
        zz = zt.clone().requires_grad_(True)
        (d,) = torch.autograd.grad(output_values(zz, yt, "margin", "logsumexp").sum(), zz)
        want = want + ((f @ ft.T) * (alpha @ d.T)).numpy() / len(states)
    monkeypatch.setattr(representer, "block_bytes", 3 * len(xt) * 8)     # 3 rows a block
    got = compute_scores("representer", net, states, x, y, xt, yt, {**CPU, "l2": 0.5})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_representer_forward_runs_in_large_batches_with_the_same_scores():
    """Representer points only run the model forward (no per-example gradients), so their
    batch_size defaults to 2048, not the other methods' 128: 3000 targets and 300 training
    rows take 3 calls of the model per checkpoint, and the scores do not depend on it."""
    x, y = blobs(300)
    xt, yt = blobs(3000, seed=5)
    states = [train_state(lambda: mlp(bn=False), x, y, s) for s in (0, 1)]
    calls = []

    def net():
        model = mlp(bn=False)
        model.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
        return model
    got = compute_scores("representer", net, states, x, y, xt, yt, CPU)
    assert calls == [300, 2048, 952] * 2
    small = compute_scores("representer", net, states, x, y, xt, yt, {**CPU, "batch_size": 128})
    np.testing.assert_allclose(got, small, rtol=1e-5, atol=1e-6 * np.abs(small).max())


# --------------------------------------------------------------------------- sign

@pytest.mark.parametrize("method,params", [
    ("if_exact", {"l2": 1e-3, "damping": 1e-2, "hessian": "ggn"}),
    ("if_exact", {"l2": 1e-3, "layer": "last"}),
    ("if_cg", {"l2": 1e-3, "damping": 1e-2, "hessian": "ggn"}),
    ("if_lissa", {"l2": 1e-3, "damping": 1e-2, "hessian": "ggn", "lissa_depth": 200, "lissa_batch": None}),
    ("trak", {"proj_dim": 16}),
    ("tracin", {}),
    ("representer", {}),
])
def test_identical_training_example_with_same_label_helps(method, params):
    x, y = blobs(80, C=2, sep=3.0)
    state = train_state(lambda: mlp(bn=False), x, y, 0, steps=150)
    j = 5
    xt, yt = x[j:j + 1].clone(), y[j:j + 1].clone()
    s = compute_scores(method, lambda: mlp(bn=False), [state], x, y, xt, yt, {**CPU, **params})[:, 0]
    assert s[j] > 0
    same = (y == yt).numpy()
    assert s[same].mean() > s[~same].mean()


# --------------------------------------------------------------------------- Woodbury factor

@pytest.mark.parametrize("bn", [True, False])   # Jacobian-vector products / factored gradients
def test_ggn_factor_equals_dense_solve(bn):
    """AᵀA is the GGN, and the factorised scores are −(1/n) G (GGN + sI)⁻¹ Gtᵀ exactly."""
    x, y = blobs(50)
    xt, yt = blobs(4, seed=5)
    def net():
        return mlp(bn=bn)
    state = train_state(net, x, y, 0, dtype=torch.float64)
    fm = load_checkpoint(net, state, "all", "cpu")
    shift = 0.05
    H = HessianOperator(fm, x, y, shift, 16, "ggn").matrix(torch.float64)
    factor = GGNFactor(fm, x, y, shift, 16)
    assert (factor.fa is None) == bn
    V = torch.randn(3, fm.num_params, dtype=torch.float64)
    AV = factor.project(V)
    torch.testing.assert_close(AV @ AV.T, V @ (H - shift * torch.eye(len(H), dtype=H.dtype)) @ V.T)
    G = loop_grads(net, state, x, y, "loss")
    Gt = loop_grads(net, state, xt, yt, "margin")
    want = -(G @ torch.linalg.solve(H, Gt.T)) / len(x)
    p = {**CPU, "damping": shift, "hessian": "ggn", "batch_size": 16, "inverse": "woodbury"}
    got = influence_scores(net, [state], x, y, xt, yt, p, solver="cg")
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_ggn_factor_matches_converged_cg_on_digits():
    """float32 MLP on sklearn digits (the default's recipe in small): the factorised and the
    converged CG scores agree to solver tolerance, target by target."""
    from scipy.stats import spearmanr
    X, Y = load_digits(return_X_y=True)
    x = torch.tensor(X[:300] / 8 - 1, dtype=torch.float32)
    y = torch.tensor(Y[:300])
    xt, yt = torch.tensor(X[300:308] / 8 - 1, dtype=torch.float32), torch.tensor(Y[300:308])
    def net():
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    state = train_state(net, x, y, 0, steps=100)
    base = {**CPU, "hessian": "ggn", "damping": 0.1, "hessian_samples": 100}
    cg = compute_scores("if_cg", net, [state], x, y, xt, yt,
                        {**base, "inverse": "cg", "cg_iters": 500, "cg_tol": 1e-7})
    wb = compute_scores("if_cg", net, [state], x, y, xt, yt, base)   # inverse="auto": the factor
    assert np.linalg.norm(wb - cg) / np.linalg.norm(cg) < 1e-3
    assert min(spearmanr(wb[:, t], cg[:, t])[0] for t in range(len(xt))) > 0.999


def test_bad_inverse_settings_raise_one_line():
    x, y = blobs(20)
    ck = [train_state(mlp, x, y, 0, steps=1)]
    for params, msg in (({"inverse": "cholesky"}, r"params.inverse='cholesky' is not one of"),
                        ({"inverse": "woodbury", "hessian": "exact"}, "set params.hessian='ggn'"),
                        ({"inverse": "woodbury", "hessian": "ggn", "damping": 0.0}, "raise params.damping")):
        with pytest.raises(ValueError, match=msg) as err:
            compute_scores("if_cg", mlp, ck, x, y, x[:2], y[:2], {**CPU, **params})
        assert "\n" not in str(err.value)


def test_trak_kernel_with_fewer_training_rows_than_features():
    """n < proj_dim (task.n_train=5 with the default 512): ΦᵀΦ is singular at λ = 0, which used
    to fail after the whole training with advice to set a dtype already set. The n×n Gram form
    gives the pseudo-inverse's scores at λ = 0 and the kernel's own for λ > 0."""
    import torch

    from workers.attribution.trak import kernel_scores
    rng = np.random.default_rng(0)
    Phi = torch.tensor(rng.normal(size=(5, 64)))
    phi_t = torch.tensor(rng.normal(size=(7, 64)))
    got = kernel_scores(Phi, phi_t, 0.0, torch.float64).numpy()
    want = Phi.numpy() @ np.linalg.pinv(Phi.numpy().T @ Phi.numpy()) @ phi_t.numpy().T
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    lam = 0.3
    got = kernel_scores(Phi, phi_t, lam, torch.float64).numpy()
    K = Phi.numpy().T @ Phi.numpy() + lam * np.eye(64)
    np.testing.assert_allclose(got, Phi.numpy() @ np.linalg.solve(K, phi_t.numpy().T), rtol=1e-8, atol=1e-10)
