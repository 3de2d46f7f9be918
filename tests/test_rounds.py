"""Training in rounds (masks.n_train=auto, budget.*): the settings' one-line refusals, the
curve and its forecast on a known power law, and whole runs of the planted task: each rule
stops the rounds where it first holds, nothing is trained after the stop, the parent MLflow
run holds lds.datamodels with the models as its step, and the same command again trains and
fits nothing while a higher cap trains only the new models."""
from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator import pipeline
from orchestrator.errors import ConfigError
from orchestrator.metrics.curve import curve_at, fit_curve, forecast, models_for
from orchestrator.runtime.plan import validate
from orchestrator.settings.budget import Rounds
from tests.conftest import compose
from tests.test_pipeline import planted_overrides, trained, trained_seeds


def _planted(tmp_path, *extra):
    # the planted task with a noisy margin, so that its LDS grows over a few doublings
    return compose(planted_overrides(tmp_path, extra=("+task.noise=0.6", "masks.n_eval=40", *extra)), tmp_path)


@pytest.mark.parametrize("overrides, said", [
    (["masks.n_train=auto"], "masks.n_train=auto needs a rule to stop on: set budget.lds=0.85"),
    (["masks.n_train=lots"], "masks.n_train='lots' must be an integer >= 10"),
    (["masks.n_train=5"], "masks.n_train=5 must be an integer >= 10"),
    (["masks.n_train=auto", "budget.lds=0.8", "stage=fit"],
     "masks.n_train=auto trains in rounds, which needs stage=all"),
    (["masks.n_train=auto", "budget.lds=1.5"], "budget.lds=1.5 must be a number in (0, 1]"),
    (["masks.n_train=auto", "budget.lds=0.8", "budget.growth=1"], "budget.growth=1.0 must be a number > 1"),
])
def test_settings_refused_in_one_line(tmp_path, overrides, said):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides, tmp_path), check_data=False)
    assert said in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_rounds_from_settings(tmp_path):
    plan = validate(compose(["masks.n_train=auto", "budget.lds=0.85", "budget.first=100"], tmp_path),
                    check_data=False)
    assert plan.rounds == Rounds(first=100, growth=2.0, cap=None, lds=0.85)
    assert plan.rounds.sizes(4) == [100, 200, 400, 800]
    # a number with a rule: the number is the cap; without one, one go as always
    plan = validate(compose(["masks.n_train=1000", "budget.gain_per_doubling=0.01", "budget.growth=3"], tmp_path),
                    check_data=False)
    assert plan.rounds.sizes() == [250, 750, 1000]
    assert validate(compose(["masks.n_train=1000"], tmp_path), check_data=False).rounds is None


def test_forecast_recovers_its_curve_and_its_interval_holds_it():
    a, d, c = 0.9, 300.0, 0.9
    models = [125, 250, 500, 1000]
    truth = curve_at((a, d, c), models)
    got = fit_curve(models, truth)
    assert got is not None and np.allclose(got, (a, d, c), rtol=1e-3), got
    assert math.isclose(float(curve_at((a, d, c), models_for((a, d, c), 0.85))), 0.85)
    assert models_for((a, d, c), 0.95) == math.inf
    rng = np.random.default_rng(0)
    per_target = truth[:, None] + rng.normal(0, 0.05, (len(models), 400))
    fc = forecast(models, per_target, at=(4000,), target=0.85, n_boot=200)
    lo, hi = fc["lds_at"]["4000"]["ci95"]
    assert lo < float(curve_at((a, d, c), 4000)) < hi and hi - lo < 0.08, fc["lds_at"]
    lo, hi = fc["models_for"]["ci95"]
    assert lo < models_for((a, d, c), 0.85) < hi
    assert forecast(models[:2], per_target[:2]) is None          # 3 rounds at least


def _parent_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient
    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def test_rounds_stop_where_the_gain_first_falls_and_train_nothing_after(tmp_path, ray_local):
    cfg = _planted(tmp_path, "masks.n_train=auto", "budget.first=20", "budget.gain_per_doubling=0.05",
                   "budget.models=1280")
    summary = pipeline.run(cfg)
    entry = summary["rounds"]
    rows = entry["rounds"]
    gains = [r["gain_per_doubling"] for r in rows[1:]]
    print("rounds:", [(r["models"], round(r["lds"], 4)) for r in rows], "stopped:", entry["stopped"])
    assert [r["asked"] for r in rows] == [20 * 2 ** i for i in range(len(rows))]
    # stopped at the first round whose gain per doubling fell below the rule (or at the cap)
    assert all(g >= 0.05 for g in gains[:-1]), gains
    assert gains[-1] < 0.05 or rows[-1]["asked"] == 1280, (gains, entry["stopped"])
    last = rows[-1]["asked"]
    assert entry["models"] == last and summary["models"]["train"] == last
    # every model trained once, none after the stop: the last round's train models and the eval models
    seeds = trained_seeds(tmp_path / "count")
    assert len(seeds) == len(set(seeds)) == last + 40 * 2
    # the curve in the parent run: lds.datamodels with the models as its step, one point a round
    hist = _parent_history(summary["mlflow"]["tracking_uri"], summary["mlflow"]["run_id"], "lds.datamodels")
    assert sorted({s for s, _ in hist}) == [r["models"] for r in rows], hist
    assert math.isclose(summary["lds"]["datamodels"]["mean"], rows[-1]["lds"], abs_tol=1e-12)
    assert (tmp_path / "runs").exists()

    # the same command again: every round walked from the store, nothing trained
    again = pipeline.run(_planted(tmp_path, "masks.n_train=auto", "budget.first=20", "budget.gain_per_doubling=0.05",
                                  "budget.models=1280"))
    assert trained(tmp_path / "count") == last + 80
    assert [r["lds"] for r in again["rounds"]["rounds"]] == [r["lds"] for r in rows]
    assert all(r["trained"] == 0 for r in again["rounds"]["rounds"])

    # a higher cap and no gain rule: only the models past the last round are trained
    more = pipeline.run(_planted(tmp_path, "masks.n_train=auto", "budget.first=20", f"budget.models={2 * last}"))
    assert more["rounds"]["models"] == 2 * last and "cap" in more["rounds"]["stopped"]
    assert trained(tmp_path / "count") == 2 * last + 80


def test_rounds_stop_on_the_lds_and_on_seconds(tmp_path, ray_local):
    summary = pipeline.run(_planted(tmp_path, "masks.n_train=auto", "budget.first=20", "budget.lds=0.8",
                                    "budget.models=2560"))
    rows = summary["rounds"]["rounds"]
    assert rows[-1]["lds"] >= 0.8 and len(rows) > 1 and all(r["lds"] < 0.8 for r in rows[:-1]), rows
    assert "reached budget.lds=0.8" in summary["rounds"]["stopped"]
    # a compute budget below what the first round costs: one round, then the stop
    tiny = pipeline.run(_planted(tmp_path, "masks.n_train=auto", "budget.first=20", "budget.seconds=1e-6"))
    assert len(tiny["rounds"]["rounds"]) == 1 and "budget.seconds" in tiny["rounds"]["stopped"]
