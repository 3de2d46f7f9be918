"""Evaluation's numbers against values computed by hand: the per-target Spearman correlation
(LDS), the replica average of the eval set, the bootstrap interval over targets, and the
scoring of a method (predicted = masks @ weights + intercept)."""
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from orchestrator.metrics import lds as E
from orchestrator.storage import evalset as E_evalset
from orchestrator.storage import masks as M
from orchestrator.storage.ledger import Identity, Ledger, LedgerError
from orchestrator.storage.store import Store
from workers import bits

# ----------------------------------------------------------------------------- lds_per_target

# Three targets over five eval masks.
#   target 0, no ties: pred ranks 1..5, actual ranks [2, 1, 4, 3, 5]; d = [-1, 1, -1, 1, 0],
#     Σd² = 4, rho = 1 - 6·4 / (5·24) = 0.8.
#   target 1, ties on both sides (average ranks): pred ranks [1.5, 1.5, 3, 4, 5], actual
#     [5, 1, 2, 2, 9] ranks [4, 1, 2.5, 2.5, 5]; centred (mean 3) [-1.5, -1.5, 0, 1, 2] and
#     [1, -2, -0.5, -0.5, 2], each with Σ² = 9.5, cross products Σ = 5: rho = 5 / 9.5 = 10/19.
#     (The no-ties formula 1 - 6Σd²/(n(n²-1)) would give 0.55 here.)
#   target 2, constant actual margins: no correlation (NaN).
PRED = np.array([[1.0, 0.5, 1.0],
                 [2.0, 0.5, 2.0],
                 [3.0, 1.0, 3.0],
                 [4.0, 2.0, 4.0],
                 [5.0, 3.0, 5.0]])
ACTUAL = np.array([[2.0, 5.0, 7.0],
                   [1.0, 1.0, 7.0],
                   [4.0, 2.0, 7.0],
                   [3.0, 2.0, 7.0],
                   [5.0, 9.0, 7.0]])
LDS = [0.8, 10 / 19, math.nan]


def test_lds_per_target_hand_computed_with_ties_and_a_constant_column():
    got = E.lds_per_target(PRED, ACTUAL)
    assert got.shape == (3,)
    assert got[:2] == pytest.approx(LDS[:2], abs=1e-12)
    assert np.isnan(got[2])


def test_lds_per_target_agrees_with_scipy_spearmanr():
    got = E.lds_per_target(PRED, ACTUAL)
    for t in range(2):
        assert got[t] == pytest.approx(spearmanr(PRED[:, t], ACTUAL[:, t]).statistic, abs=1e-12)


def test_lds_per_target_sign_and_constant_prediction():
    up = np.arange(5.0)
    pred = np.stack([up, np.full(5, 3.0), up ** 3], 1)          # constant prediction in column 1
    actual = np.stack([-up, up, np.exp(up)], 1)                  # reversed; any; monotone transform
    got = E.lds_per_target(pred, actual)
    assert got[0] == pytest.approx(-1.0)
    assert np.isnan(got[1])
    assert got[2] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- score_method

# Five eval masks over n = 4 training examples, three targets.
X = np.array([[1, 0, 0, 0],
              [1, 1, 0, 0],
              [0, 1, 1, 0],
              [0, 0, 1, 1],
              [1, 0, 1, 1]], dtype=bool)
W = np.array([[1.0, 2.0, 3.0, 4.0],     # X @ w0 = [1, 3, 5, 7, 8]
              [4.0, 0.0, -1.0, 0.0],    # X @ w1 = [4, 4, -1, -1, 3]
              [1.0, 0.0, 0.0, 0.0]])    # X @ w2 = [1, 1, 0, 0, 1]
B = np.array([0.5, -1.0, 0.0])
# predicted with the intercept: [1.5, 3.5, 5.5, 7.5, 8.5], [3, 3, -2, -2, 2], [1, 1, 0, 0, 1]
Y = np.array([[2.0, 3.0, 1.0],
              [3.0, 4.0, 1.0],
              [6.0, -2.0, 1.0],
              [7.0, -1.0, 1.0],
              [9.0, 1.0, 1.0]], dtype=np.float32)
# target 0: same order as its prediction, rho = 1; residuals ±0.5, Σ² = 1.25.
# target 1: pred ranks [4.5, 4.5, 1.5, 1.5, 3], actual ranks [4, 5, 1, 2, 3]; centred
#   [1.5, 1.5, -1.5, -1.5, 0] (Σ² = 9) and [1, 2, -2, -1, 0] (Σ² = 10), cross Σ = 9:
#   rho = 9 / sqrt(90) = 3 / sqrt(10); residuals [0, -1, 0, -1, 1], Σ² = 3.
# target 2: constant actual margins, rho NaN (excluded); residuals [0, 0, -1, -1, 0], Σ² = 2.
SCORE_LDS = [1.0, 3 / math.sqrt(10)]
MSE = (1.25 + 3 + 2) / 15
# population variances of the actual margins: 33.2/5 = 6.64, 26/5 = 5.2, 0
MARGIN_VAR = (6.64 + 5.2 + 0.0) / 3


def test_score_method_with_intercept_hand_computed():
    out, per_target = E.score_method(X, Y, W, B, n_boot=200, seed=0)
    assert per_target[:2] == pytest.approx(SCORE_LDS, abs=1e-6)
    assert np.isnan(per_target[2])
    assert out["targets"] == 2                          # the constant target is counted out
    assert out["mean"] == pytest.approx((1 + 3 / math.sqrt(10)) / 2, abs=1e-6)
    assert out["median"] == pytest.approx((1 + 3 / math.sqrt(10)) / 2, abs=1e-6)
    assert out["mse"] == pytest.approx(MSE, rel=1e-6)
    assert out["margin_var"] == pytest.approx(MARGIN_VAR, rel=1e-6)
    assert out["ci95"] == pytest.approx(list(E.bootstrap_ci(per_target, 200, 0)))
    lo, hi = out["ci95"]
    assert SCORE_LDS[1] - 1e-6 <= lo <= out["mean"] <= hi <= 1.0 + 1e-6


def test_score_method_without_intercept_has_no_mse():
    with_b, pt_with_b = E.score_method(X, Y, W, B, n_boot=200, seed=0)
    out, per_target = E.score_method(X, Y, W, None, n_boot=200, seed=0)
    assert "mse" not in out and "margin_var" not in out
    # a per-target intercept shifts a whole column: the ranks, hence the LDS, do not change
    assert np.array_equal(np.isnan(per_target), np.isnan(pt_with_b))
    assert per_target[:2] == pytest.approx(SCORE_LDS, abs=1e-6)
    assert {k: out[k] for k in ("mean", "median", "targets", "ci95")} == \
        {k: with_b[k] for k in ("mean", "median", "targets", "ci95")}


def test_score_method_prediction_is_masks_times_weights_plus_intercept():
    """MSE pins the prediction itself: with Y set to masks @ W.T + b it is exactly 0, and an
    intercept off by 1 on one of three targets makes it 1/3."""
    pred = X.astype(np.float32) @ W.T.astype(np.float32) + B.astype(np.float32)
    out, _ = E.score_method(X, pred, W, B, n_boot=10, seed=0)
    assert out["mse"] == 0.0
    assert out["mean"] == pytest.approx(1.0)
    off = B + np.array([0.0, 1.0, 0.0])
    out, _ = E.score_method(X, pred, W, off, n_boot=10, seed=0)
    assert out["mse"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- bootstrap_ci

def direct_bootstrap(v: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """The percentile bootstrap of the mean over targets, written out."""
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    for b in range(n_boot):
        means[b] = np.mean([v[i] for i in idx[b]])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_bootstrap_ci_drops_nans_and_matches_a_direct_computation():
    values = np.array([0.2, np.nan, 0.5, 0.9, np.nan, 0.4, np.inf])
    lo, hi = E.bootstrap_ci(values, n_boot=500, seed=3)
    want = direct_bootstrap(np.array([0.2, 0.5, 0.9, 0.4]), 500, 3)
    assert (lo, hi) == pytest.approx(want, abs=1e-12)
    assert 0.2 <= lo < np.mean([0.2, 0.5, 0.9, 0.4]) < hi <= 0.9
    assert E.bootstrap_ci(values, 500, 3) == (lo, hi)            # the seed fixes it


def test_bootstrap_ci_hand_values():
    # two targets 0 and 1: a resample's mean is 0 (p = 1/4), 0.5 (1/2) or 1 (1/4), so the
    # 2.5th and 97.5th percentiles of 1000 resamples are 0 and 1
    assert E.bootstrap_ci(np.array([0.0, np.nan, 1.0]), 1000, 0) == (0.0, 1.0)
    # one finite target, or all equal: every resample's mean is that value
    assert E.bootstrap_ci(np.array([np.nan, 0.7, np.nan]), 100, 0) == pytest.approx((0.7, 0.7))
    assert E.bootstrap_ci(np.full(4, 0.25), 100, 0) == pytest.approx((0.25, 0.25))


def test_bootstrap_ci_all_nan_or_empty_is_nan():
    for values in (np.full(3, np.nan), np.zeros(0)):
        lo, hi = E.bootstrap_ci(values, 100, 0)
        assert math.isnan(lo) and math.isnan(hi)


# ----------------------------------------------------------------------------- eval_set

IDENT = Identity(config_hash="h-eval", alpha=0.5, seed=11, n=10, n_targets=2)


def eval_rows(ids, replicas, margins, ident=IDENT, mask_set="eval", masks=None):
    """Ledger rows as the train stage writes them; masks regenerated from the identity
    unless given."""
    ids = np.asarray(ids, dtype=np.int64)
    k = len(ids)
    if masks is None:
        masks = M.make_masks(ident.seed, mask_set, ids, ident.n, ident.alpha)
    return {
        "mask_set": [mask_set] * k, "model_id": ids, "replica": list(replicas),
        "seed": [M.model_seed(ident.seed, mask_set, int(i), int(r)) for i, r in zip(ids, replicas)],
        "alpha": [ident.alpha] * k, "mask": bits.pack(masks), "margins": np.asarray(margins, np.float32),
        "train_acc": np.ones(k), "target_acc": np.ones(k), "loss": np.zeros(k), "seconds": np.ones(k),
        "code_version": ["t"] * k, "config_hash": [ident.config_hash] * k,
    }


def test_eval_set_averages_replicas_of_each_mask(tmp_path):
    """Model 0 has three replicas (one in another unit), model 1 one good replica and one
    that diverged (never averaged), model 2 two; a train-set model is not an eval mask."""
    led = Ledger(Store(str(tmp_path)), IDENT)
    led.write_unit("eval-a", eval_rows([2, 0, 0, 1, 1], [0, 0, 1, 0, 1],
                                       [[0, 1], [1, 2], [2, 4], [5, 5], [np.nan, 1]]))
    led.write_unit("eval-b", eval_rows([2, 0], [1, 2], [[1, 0], [6, 0]]))
    led.write_unit("train-a", eval_rows([0], [0], [[100, 100]], mask_set="train"))
    X, Y, counts = E_evalset.eval_set(Ledger(Store(str(tmp_path)), IDENT), n=10, n_targets=2)
    # model 0: mean of [1, 2], [2, 4], [6, 0] = [3, 2]; model 1: [5, 5]; model 2: mean of [0, 1], [1, 0]
    assert Y.dtype == np.float32
    assert np.array_equal(Y, np.array([[3, 2], [5, 5], [0.5, 0.5]], np.float32))
    assert list(counts) == [3, 1, 2]
    assert X.dtype == bool and X.shape == (3, 10)
    assert np.array_equal(X, M.make_masks(IDENT.seed, "eval", [0, 1, 2], 10, 0.5))


def test_eval_set_refuses_replicas_with_different_masks(tmp_path):
    """Two replicas of one eval model id that carry different masks (two experiments mixed,
    read without an identity to check them against) raise instead of being averaged."""
    masks = M.make_masks(IDENT.seed, "eval", [0, 1, 1], 10, 0.5)
    masks[2] = M.make_mask(99, "eval", 1, 10, 0.5)              # replica 1 of model 1: another mask
    assert not np.array_equal(masks[1], masks[2])
    led = Ledger(Store(str(tmp_path)))
    led.write_unit("eval-a", eval_rows([0, 1, 1], [0, 0, 1], [[1, 1], [2, 2], [3, 3]], masks=masks))
    with pytest.raises(LedgerError, match="differ between replicas"):
        E_evalset.eval_set(led, n=10, n_targets=2)
