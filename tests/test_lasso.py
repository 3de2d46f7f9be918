"""workers.lasso: the batched torch solver against python-glmnet and sklearn, KKT conditions,
λ selection, recovery, packed input, mask-space predictions and the memory budget."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from workers import bits
from workers.lasso import (
    LassoConfig,
    column_std,
    fit_lasso,
    lambda_max,
    lambda_ratios,
    lasso_objective,
    lasso_path_torch,
    memory_bytes,
    plan_blocks,
    select_lambda,
    split_fit_val,
)
from workers.lasso.per_target import glmnet_path, sklearn_path
from workers.lasso.synthetic import make_planted


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small problems: one intra-op thread (2 threads on a loaded 2-core box spin 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(m, n, T, k=5, snr=1.0, seed=0):
    P, Y, W = make_planted(m, n, T, k=k, snr=snr, seed=seed)
    return P.numpy(), Y.numpy(), W.numpy()


def kkt_violation(X, y, w, b, lam, pf):
    """Largest violation of the lasso optimality conditions, relative to lam:
    intercept: mean residual = 0; w_j != 0: g_j = lam pf_j sign(w_j); w_j = 0: |g_j| <= lam pf_j,
    with g = X^T (y - X w - b) / m in float64 on raw masks."""
    X = X.astype(np.float64)
    r = y - X @ w - b
    g = X.T @ r / len(y)
    nz = w != 0
    v_nz = np.abs(g[nz] - lam * pf[nz] * np.sign(w[nz]))
    v_z = np.maximum(np.abs(g[~nz]) - lam * pf[~nz], 0.0)
    return max(v_nz.max(initial=0.0), v_z.max(initial=0.0)) / lam, abs(r.mean()) / y.std()


def test_split_fit_val_is_seeded_disjoint_and_complete():
    f, v = split_fit_val(1000, 0.1, seed=3)
    assert len(v) == 100 and len(f) == 900
    assert np.array_equal(np.sort(np.concatenate([f, v])), np.arange(1000))
    f2, v2 = split_fit_val(1000, 0.1, seed=3)
    assert np.array_equal(v, v2) and np.array_equal(f, f2)
    _, v3 = split_fit_val(1000, 0.1, seed=4)
    assert not np.array_equal(v, v3)
    with pytest.raises(ValueError, match="val_fraction"):
        split_fit_val(10, 0.0, 0)


def test_select_lambda_rule():
    assert select_lambda(np.array([5, 4, 3, 3.5, 3.6, 3.7, 2.0]), patience=3) == (2, 6)
    assert select_lambda(np.array([5, 4, 3, 3.5, 3.6, 3.7, 2.0]), patience=0) == (6, 7)
    assert select_lambda(np.array([5, 4, 4, 4]), patience=5) == (1, 4)   # ties keep the larger λ


@pytest.mark.parametrize("standardize", [False, True])
def test_path_objective_matches_glmnet_and_sklearn(standardize):
    m, n, T = 300, 60, 3
    P, Y, _ = planted(m, n, T, k=6, snr=2.0, seed=1)
    X = bits.unpack(P, n)
    pf = column_std(X) if standardize else np.ones(n)
    lmax = np.array([lambda_max(X, Y[:, t], pf) for t in range(T)])
    lams = lambda_ratios(25, 1e-3)[:, None] * lmax[None]
    W, b = lasso_path_torch(P, Y, lams, LassoConfig(standardize=standardize), n=n)
    worst = {"torch-glmnet": 0.0, "torch-sklearn": 0.0, "glmnet-sklearn": 0.0, "kkt": 0.0}
    for t in range(T):
        y = Y[:, t].astype(np.float64)
        cg, ig = glmnet_path(X.astype(np.float64), y, lams[:, t],
                             LassoConfig(tol=1e-12, standardize=standardize))
        cs, is_ = sklearn_path(X.astype(np.float64), y, lams[:, t],
                               LassoConfig(tol=1e-12, max_iter=10**6, standardize=standardize))
        for k in range(1, len(lams)):
            lam = lams[k, t]
            ot = lasso_objective(X, y, W[k, t], b[k, t], lam, pf)
            og = lasso_objective(X, y, cg[:, k], ig[k], lam, pf)
            os_ = lasso_objective(X, y, cs[:, k], is_[k], lam, pf)
            worst["torch-glmnet"] = max(worst["torch-glmnet"], abs(ot - og) / og)
            worst["torch-sklearn"] = max(worst["torch-sklearn"], abs(ot - os_) / os_)
            worst["glmnet-sklearn"] = max(worst["glmnet-sklearn"], abs(og - os_) / os_)
            worst["kkt"] = max(worst["kkt"], kkt_violation(X, y, W[k, t].astype(np.float64),
                                                           b[k, t], lam, pf)[0])
    assert worst["torch-glmnet"] < 1e-5, worst
    assert worst["torch-sklearn"] < 1e-5, worst
    assert worst["glmnet-sklearn"] < 1e-7, worst
    assert worst["kkt"] < 2e-2, worst          # KKT residual relative to λ (float32 weights)
    # at lam_max the solution is zero (up to float32 rounding of lam), just below it it is not
    W0, _ = lasso_path_torch(P, Y, np.stack([lmax * (1 + 1e-5), 0.95 * lmax]),
                             LassoConfig(standardize=standardize), n=n)
    assert np.all(W0[0] == 0) and np.all((W0[1] != 0).sum(1) >= 1)


def test_kkt_holds_along_the_path_at_default_tolerance():
    m, n, T = 800, 120, 4
    P, Y, _ = planted(m, n, T, k=8, seed=2)
    X = bits.unpack(P, n)
    lmax = np.array([lambda_max(X, Y[:, t]) for t in range(T)])
    lams = lambda_ratios(40, 1e-3)[:, None] * lmax[None]
    W, b = lasso_path_torch(P, Y, lams, LassoConfig(), n=n)
    for t in range(T):
        for k in range(1, len(lams)):
            rel, icpt = kkt_violation(X, Y[:, t].astype(np.float64), W[k, t].astype(np.float64),
                                      b[k, t], lams[k, t], np.ones(n))
            assert rel < 2e-2 and icpt < 1e-5, (t, k, rel, icpt)


def test_torch_chooses_the_same_lambda_as_glmnet_and_fits_in_mask_space():
    m, n, T = 600, 80, 40
    P, Y, _ = planted(m, n, T, k=5, snr=1.0, seed=4)
    X = bits.unpack(P, n)
    cfg = LassoConfig(n_lambdas=50, lambda_min_ratio=1e-3, val_fraction=0.2, split_seed=7)
    rt = fit_lasso(P, Y, LassoConfig(**{**cfg.__dict__, "backend": "torch"}), n=n)
    rg = fit_lasso(P, Y, LassoConfig(**{**cfg.__dict__, "backend": "glmnet"}), n=n)
    same = np.isclose(rt.lam, rg.lam, rtol=1e-5)   # same path index (lam_max: float32 vs float64)
    assert same.mean() >= 0.95, same.mean()
    np.testing.assert_allclose(rt.val_mse[same], rg.val_mse[same], rtol=1e-4)
    # refit on all rows: mask @ w + b are the lasso fits there (raw-space KKT), and they match
    # glmnet's fits at the same λ
    pf = np.ones(n)
    for t in np.flatnonzero(same):
        y = Y[:, t].astype(np.float64)
        rel, icpt = kkt_violation(X, y, rt.weights[t].astype(np.float64), float(rt.intercept[t]),
                                  rt.lam[t], pf)
        assert rel < 2e-2 and icpt < 1e-5, (t, rel, icpt)
        ot = lasso_objective(X, y, rt.weights[t], rt.intercept[t], rt.lam[t])
        og = lasso_objective(X, y, rg.weights[t], rg.intercept[t], rg.lam[t])
        assert abs(ot - og) / og < 1e-5
        pt = X @ rt.weights[t].astype(np.float64) + rt.intercept[t]
        pg = X @ rg.weights[t].astype(np.float64) + rg.intercept[t]
        assert np.abs(pt - pg).max() < 1e-2 * y.std()
    assert rt.weights.dtype == np.float32 and rt.intercept.dtype == np.float32
    assert rt.lam.dtype == np.float64 and rt.nnz.dtype == np.int64
    np.testing.assert_array_equal(rt.nnz, (rt.weights != 0).sum(1))


def test_standardize_folds_back_to_mask_space():
    m, n, T = 500, 60, 4
    P, Y, _ = planted(m, n, T, k=5, snr=2.0, seed=5)
    X = bits.unpack(P, n)
    X[:, 0] = True                       # a constant column: never selected, no NaN
    P = bits.pack(X)
    res = fit_lasso(P, Y, LassoConfig(backend="torch", standardize=True, n_lambdas=40), n=n)
    pf = column_std(X)                   # refit is on all rows, so all rows' column std
    assert np.all(res.weights[:, 0] == 0)
    for t in range(T):
        rel, icpt = kkt_violation(X, Y[:, t].astype(np.float64), res.weights[t].astype(np.float64),
                                  float(res.intercept[t]), res.lam[t], pf)
        assert rel < 2e-2 and icpt < 1e-5, (t, rel, icpt)


def test_planted_sparse_weights_are_recovered():
    m, n, T, k = 2000, 150, 8, 5
    P, Y, Wt = planted(m, n, T, k=k, snr=4.0, seed=6)
    res = fit_lasso(P, Y, LassoConfig(backend="torch"), n=n)
    for t in range(T):
        strong = set(np.flatnonzero(np.abs(Wt[:, t]) >= 0.3))
        top = set(np.argsort(-np.abs(res.weights[t]))[:k])
        assert strong <= top, t
        assert np.corrcoef(res.weights[t], Wt[:, t])[0, 1] > 0.97
    np.testing.assert_allclose(res.intercept, 1.0, atol=0.3)   # make_planted's offset


def test_packed_input_gives_the_same_result_as_bool():
    m, n, T = 400, 53, 5                 # n not a multiple of 8
    P, Y, _ = planted(m, n, T, seed=8)
    X = bits.unpack(P, n)
    cfg = LassoConfig(backend="torch", n_lambdas=30)
    a = fit_lasso(P, Y, cfg, n=n)
    b = fit_lasso(X, Y, cfg)
    for f in ("weights", "intercept", "lam", "val_mse", "nnz"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    with pytest.raises(ValueError, match="need n"):
        fit_lasso(P, Y, cfg)


def test_constant_target_gets_intercept_only():
    m, n = 300, 40
    P, Y, _ = planted(m, n, 2, seed=9)
    Y[:, 1] = 2.5
    for backend in ("torch", "glmnet"):
        for debias, phi in (("none", 1.0), ("refit", 0.0), ("relaxed", 1.0)):
            res = fit_lasso(P, Y, LassoConfig(backend=backend, n_lambdas=20, debias=debias), n=n)
            assert res.nnz[1] == 0 and res.lam[1] == 0 and res.intercept[1] == pytest.approx(2.5)
            assert res.nnz[0] > 0 and res.phi[1] == phi


def _peak_bytes(fn):
    """(result, peak torch CPU allocation, peak numpy/Python allocation) of fn(), measured by
    the torch profiler's allocation events and tracemalloc."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()
        out = fn()
        _, host_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage != 0)
    cur = peak = 0
    for _, b in events:
        cur += b
        peak = max(peak, cur)
    return out, peak, host_peak


def test_memory_budget_chooses_small_blocks_with_identical_results():
    m, n, T = 1200, 200, 24
    P, Y, _ = planted(m, n, T, k=5, seed=10)
    base = LassoConfig(backend="torch", n_lambdas=12, lambda_min_ratio=0.1)
    full, full_peak, _ = _peak_bytes(lambda: fit_lasso(P, Y, base, n=n))
    budget = 500_000
    cfg = LassoConfig(**{**base.__dict__, "memory_budget_bytes": budget})
    plan = plan_blocks(m, n, T, 120, cfg, "cpu")
    assert plan.rows_per_block < m and plan.targets_per_block < T and not plan.cache_val
    assert plan.bytes == memory_bytes(n, plan.targets_per_block, plan.rows_per_block, 120, False) <= budget
    small, peak, host_peak = _peak_bytes(lambda: fit_lasso(P, Y, cfg, n=n))
    print(f"unblocked peak {full_peak} B; budget {budget} B: plan {plan}, peak {peak} + {host_peak} B")
    assert full_peak > 2 * budget                   # unblocked really needs more
    assert peak + host_peak <= budget, (peak, host_peak, budget)
    np.testing.assert_allclose(small.lam, full.lam, rtol=1e-6)      # same path index
    np.testing.assert_allclose(small.weights, full.weights, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(small.intercept, full.intercept, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        plan_blocks(m, n, T, 120, LassoConfig(memory_budget_bytes=4 * n * n), "cpu")


def test_bf16_gram_path_gives_the_same_counts(monkeypatch):
    """The CUDA Gram path (bf16 0/1 inputs, float32 output in row chunks), run on the CPU."""
    import workers.lasso.gram as L
    m, n = 700, 90
    P, Y, _ = planted(m, n, 3, seed=11)
    rows = L.Rows(P, True, n, "cpu")
    idx = np.arange(0, m, 2)
    ref = L.Gram(rows, idx, 64)
    monkeypatch.setattr(L, "gram_in_bf16", lambda device: True)
    g = L.Gram(rows, idx, 64)
    torch.testing.assert_close(g.G, ref.G, rtol=0, atol=0)
    X = bits.unpack(P, n)[idx].astype(np.float64)
    Xc = X - X.mean(0)
    np.testing.assert_allclose(g.G.numpy(), Xc.T @ Xc / len(idx), atol=1e-7)


def test_unknown_backend_is_one_clear_error():
    P, Y, _ = planted(50, 16, 1)
    with pytest.raises(ValueError, match="fit.backend"):
        fit_lasso(P, Y, LassoConfig(backend="nope"), n=16)


# ----------------------------------------------------------------------------- debiasing

def _slope(W, Wt):
    """Least-squares slope of fitted against planted weights on the planted support (1: unbiased)."""
    on = Wt != 0
    return float((W[on] * Wt[on]).sum() / (Wt[on] ** 2).sum())


@pytest.mark.parametrize("backend", ["torch", "glmnet"])
def test_debias_refit_undoes_the_lasso_shrinkage_on_its_support(backend):
    m, n, T = 600, 100, 8
    P, Y, Wt = planted(m, n, T, k=5, snr=0.5, seed=3)
    X = bits.unpack(P, n).astype(np.float64)
    fits = {d: fit_lasso(P, Y, LassoConfig(backend=backend, debias=d, n_lambdas=50), n=n)
            for d in ("none", "refit", "relaxed")}
    none, refit, relaxed = fits["none"], fits["refit"], fits["relaxed"]
    slopes = {d: _slope(r.weights, Wt.T) for d, r in fits.items()}
    print(backend, slopes, "phi", relaxed.phi)
    assert slopes["none"] < 0.9 and 0.95 < slopes["refit"] < 1.05, slopes
    assert slopes["none"] <= slopes["relaxed"] <= slopes["refit"], slopes
    for r in (refit, relaxed):                           # same λ, same support
        np.testing.assert_array_equal(r.lam, none.lam)
        np.testing.assert_array_equal(r.weights != 0, none.weights != 0)
    assert np.all(none.phi == 1) and np.all(refit.phi == 0) and set(relaxed.phi) <= {1.0, 0.75, 0.5, 0.25, 0.0}
    # relaxed picks the blend with the least validation MSE, the ends included
    assert np.all(relaxed.val_mse <= np.minimum(none.val_mse, refit.val_mse))
    # the refit is least squares on the support, intercept included, on all rows
    for t in range(T):
        S = np.flatnonzero(none.weights[t])
        A = np.column_stack([X[:, S], np.ones(m)])
        coef = np.linalg.lstsq(A, Y[:, t].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(refit.weights[t, S], coef[:-1], rtol=1e-3, atol=1e-4)
        assert refit.intercept[t] == pytest.approx(coef[-1], abs=1e-3)


@pytest.mark.parametrize("backend", ["torch", "glmnet"])
def test_relaxed_at_phi_one_is_the_lasso_bitwise(backend):
    m, n, T = 400, 40, 4
    P, Y, _ = planted(m, n, T, k=4, snr=1.0, seed=12)
    cfg = LassoConfig(backend=backend, n_lambdas=20)
    a = fit_lasso(P, Y, cfg, n=n)
    b = fit_lasso(P, Y, LassoConfig(**{**cfg.__dict__, "debias": "relaxed", "debias_phi": 1.0}), n=n)
    for f in ("weights", "intercept", "lam", "val_mse", "nnz", "phi"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_bad_debias_is_one_clear_error(tmp_path):
    from orchestrator.errors import ConfigError
    from orchestrator.settings.rules import check_rules
    from tests.conftest import compose
    from workers.settings import SettingError
    P, Y, _ = planted(50, 16, 1)
    with pytest.raises(SettingError, match=r"^fit.debias='lasso' is not one of none\|refit\|relaxed$"):
        fit_lasso(P, Y, LassoConfig(debias="lasso"), n=16)
    with pytest.raises(SettingError, match=r"fit.debias_phi=0.5 applies only to fit.debias=relaxed"):
        fit_lasso(P, Y, LassoConfig(debias="refit", debias_phi=0.5), n=16)
    with pytest.raises(SettingError, match=r"fit.debias_phi=2"):
        fit_lasso(P, Y, LassoConfig(debias="relaxed", debias_phi=2.0), n=16)
    with pytest.raises(ConfigError, match="fit.debias") as err:      # refused before any work
        check_rules(compose(["fit.debias=lasso"], tmp_path))
    assert "\n" not in str(err.value)


def test_store_dir_of_the_default_fit_is_unchanged_by_debias():
    """The default fit's datamodels directory is the one written before fit.debias existed
    (runs/fmnist_mlp-6693add97e/datamodels/m4000-torch-a969545d); a debiased fit gets its own."""
    from omegaconf import OmegaConf

    from orchestrator.settings.schema import FitConf
    from orchestrator.storage.datamodels import store_dir
    fit_cfg = OmegaConf.to_container(OmegaConf.structured(FitConf), resolve=True)
    assert fit_cfg["debias"] == "none"
    assert store_dir(4000, fit_cfg) == "datamodels/m4000-torch-a969545d"
    dirs = {store_dir(4000, {**fit_cfg, **d}) for d in ({"debias": "refit"}, {"debias": "relaxed"},
                                                        {"debias": "relaxed", "debias_phi": 0.5})}
    assert len(dirs) == 3 and "datamodels/m4000-torch-a969545d" not in dirs
