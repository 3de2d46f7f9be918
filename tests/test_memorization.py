"""The memorization estimator and the detection metrics (orchestrator.metrics.memorization),
and the planted label noise they are measured on (workers.data.flip_labels): arrays in, numbers
out, checked against planted truths and brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from orchestrator.metrics.memorization import auc, detection, found_at, found_curve, memorization, order
from workers.data import flip_labels


def exact_masks(m: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.zeros((m, n), bool)
    for j in range(m):
        X[j, rng.permutation(n)[: n // 2]] = True
    return X


def test_memorization_recovers_planted_effects_and_its_interval_covers_them():
    rng = np.random.default_rng(0)
    m, n = 2000, 300
    X = exact_masks(m, n, 1)
    w = rng.uniform(0, 2, n)                       # example i's own effect on its value
    V = 0.5 + X * w + rng.normal(0, 1, (m, n))
    r = memorization(X, V, n_boot=400, seed=0)
    assert np.abs(r["value"] - w).max() < 0.25
    covered = np.mean((r["ci95"][:, 0] <= w) & (w <= r["ci95"][:, 1]))
    assert 0.88 <= covered <= 0.99, covered
    assert (r["in_models"] + r["out_models"] == m).all()
    np.testing.assert_array_equal(r["in_models"], X.sum(0))


def test_memorization_equals_the_direct_means_and_is_nan_where_undefined():
    rng = np.random.default_rng(3)
    X = rng.random((40, 6)) < 0.5
    X[:, 0] = True                                  # in every model: no models without it
    V = rng.normal(size=(40, 6))
    r = memorization(X, V, n_boot=50, seed=1)
    assert np.isnan(r["value"][0]) and np.isnan(r["ci95"][0]).all()
    for i in range(1, 6):
        assert r["value"][i] == pytest.approx(V[X[:, i], i].mean() - V[~X[:, i], i].mean())
    with pytest.raises(ValueError, match="masks"):
        memorization(X, V[:, :5])


def test_auc_equals_the_pairwise_count_with_ties_counted_half():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, 60).astype(float)        # many ties
    t = rng.random(60) < 0.3
    pairs = [(a, b) for a, b in itertools.product(np.flatnonzero(t), np.flatnonzero(~t))]
    brute = np.mean([1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0 for a, b in pairs])
    assert auc(s, t) == pytest.approx(brute)
    assert auc(s, np.zeros(60, bool)) != auc(s, np.zeros(60, bool))      # NaN without positives


def test_found_at_follows_the_score_order_ties_by_id():
    s = np.array([0.9, 0.1, 0.9, 0.5, np.nan, 0.2, 0.3, 0.0, 0.8, 0.4])
    np.testing.assert_array_equal(order(s), [0, 2, 8, 3, 9, 6, 5, 1, 7, 4])
    t = np.zeros(10, bool)
    t[[2, 8, 4]] = True
    curve = found_curve(s, t)
    assert curve[0] == 0 and curve[-1] == 1
    assert found_at(s, t, [0.2, 0.3, 0.9]) == {0.2: pytest.approx(1 / 3), 0.3: pytest.approx(2 / 3),
                                               0.9: pytest.approx(2 / 3)}


def test_detection_intervals_contain_the_estimates():
    rng = np.random.default_rng(5)
    t = rng.random(500) < 0.1
    s = t * 1.5 + rng.normal(size=500)
    d = detection(s, t, fractions=(0.1, 0.2), n_boot=200, seed=0)
    assert 0.8 < d["auc"] < 0.95
    assert d["auc_ci95"][0] <= d["auc"] <= d["auc_ci95"][1]
    for q in (0.1, 0.2):
        lo, hi = d["found_ci95"][q]
        assert lo <= d["found"][q] <= hi


def test_flip_labels_is_seeded_exact_and_never_keeps_the_label():
    y = np.arange(1000) % 10
    noisy, flipped = flip_labels(y, 10, 0.1, seed=7)
    assert flipped.sum() == 100
    assert (noisy[flipped] != y[flipped]).all() and (noisy[~flipped] == y[~flipped]).all()
    assert ((noisy >= 0) & (noisy < 10)).all()
    again, flipped_again = flip_labels(y, 10, 0.1, seed=7)
    np.testing.assert_array_equal(again, noisy)
    np.testing.assert_array_equal(flipped_again, flipped)
    other, _ = flip_labels(y, 10, 0.1, seed=8)
    assert not np.array_equal(other, noisy)
    same, none = flip_labels(y, 10, 0.0, seed=7)
    np.testing.assert_array_equal(same, y)
    assert not none.any()
    with pytest.raises(ValueError, match="rate"):
        flip_labels(y, 10, 1.0, seed=0)


# --------------------------------------------------------------------------- the stage, on tiny
@pytest.mark.slow
def test_memorization_stage_on_tiny_with_planted_label_noise(tmp_path, ray_local, capsys):
    """experiment=tiny with task.targets=both and 10% flipped labels, then stage=memorization
    with its defaults: its files, its headline, the same numbers from api, the flipped labels
    found better than chance; and one line on an experiment without the margins it needs."""
    import csv
    import os

    from orchestrator import api, pipeline
    from orchestrator.errors import UserError
    from tests.conftest import compose
    base = ["experiment=tiny", "task.targets=both", "task.label_noise=0.1", "baselines.methods=[]",
            "fit.prefixes=[]"]
    pipeline.run(compose(base, tmp_path))
    capsys.readouterr()
    out = pipeline.run(compose(base + ["stage=memorization"], tmp_path))
    printed = capsys.readouterr().out
    entry, root = out["memorization"], out["experiment_dir"]
    for rel in entry["files"]:
        assert os.path.getsize(os.path.join(root, rel)) > 0, rel
    assert f"memorization:\n  {entry['headline'][0]}" in printed
    assert entry["models"] == 300 and entry["estimated"] == 300
    assert entry["margin"]["q50"] > 0                       # a model is surer of what it trained on
    noise = entry["label_noise"]
    assert noise["flipped"] == 30
    assert noise["mean_margin_flipped"] > noise["mean_margin_clean"]
    auc = noise["detection"]["margin"]["auc"]
    assert auc > 0.7 and noise["detection"]["margin"]["auc_ci95"][0] < auc, noise
    with open(os.path.join(root, entry["csv"])) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300 and sum(r["flipped"] == "True" for r in rows) == 30
    mine = api.open(root).memorization()
    np.testing.assert_allclose([float(r["mem_margin"]) for r in rows], mine["margin"]["value"], atol=1e-5)
    np.testing.assert_allclose([float(r["mem_correct_lo"]) for r in rows], mine["correct"]["ci95"][:, 0],
                               atol=1e-5)
    # the datamodel self-weights beside it, from the same files stage=mislabel reads
    w = pipeline.run(compose(base + ["stage=memorization", "memorization.self_weight=true"], tmp_path))["memorization"]
    assert w["self_weight"]["spearman_with_margin"] > 0.5 and "self_weight" in w["label_noise"]["detection"]
    assert "datamodel self-weights" in capsys.readouterr().out
    # the check by retraining: 20 examples at evenly spaced ranks, each toggled in 20 fresh
    # masks at the same size; the direct estimate agrees with the ledger's in rank
    more = base + ["stage=memorization", "memorization.verify=20", "memorization.verify_masks=20"]
    v = pipeline.run(compose(more, tmp_path))["memorization"]["verify"]
    assert v["examples"] == 20 and v["pairs"] == [20] * 20 and v["models"]["models_trained"] == 21 * 20
    assert v["spearman"] >= 0.8, v
    assert "Spearman" in capsys.readouterr().out
    again = pipeline.run(compose(more, tmp_path))["memorization"]["verify"]
    assert again["models"]["models_trained"] == 0 and again["direct"] == v["direct"]      # resumed, the same numbers
    # an experiment without the margins on the training examples: one line, before any work
    with pytest.raises(UserError) as err:
        pipeline.run(compose(["experiment=tiny", "stage=memorization"], tmp_path / "plain"))
    assert "task.targets=both" in str(err.value) and "\n" not in str(err.value)
