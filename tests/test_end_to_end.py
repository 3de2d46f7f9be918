"""A tiny real experiment (digits, an MLP) through every stage, read back from MLflow."""
from __future__ import annotations

import os

import pytest

from mlflow.tracking import MlflowClient

from orchestrator import pipeline
from tests.conftest import compose


def test_tiny_real_run_all_stages_tracked(tmp_path, ray_local):
    cfg = compose(["experiment=tiny"], tmp_path)
    summary = pipeline.run(cfg)
    lds = summary["lds"]["datamodels"]
    assert summary["models"] == {"train": 300, "eval": 60}
    assert lds["mean"] > 0.15, lds            # clearly above zero
    assert lds["ci95"][0] > 0.05
    acc = summary["accuracy"]["train.target_acc"]
    assert acc["mean"] > 0.6                  # the models actually learned digits
    assert os.path.exists(os.path.join(summary["experiment_dir"], "lds.png"))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    stages = {r.data.tags["stage"] for r in children}
    assert {"masks", "train", "fit", "baselines", "evaluate"} <= stages
    assert {s for s in stages if s.startswith("method:")} >= {"method:datamodels", "method:trak"}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    ev = [r for r in children if r.data.tags["stage"] == "evaluate"][0]
    assert abs(ev.data.metrics["lds_datamodels"] - lds["mean"]) < 1e-9
    tr = [r for r in children if r.data.tags["stage"] == "train"][0]
    hist = client.get_metric_history(tr.info.run_id, "models_done")
    assert max(m.value for m in hist) == 360
    assert parents[0].data.params["masks.alpha"] == "0.5"
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.json", "config.yaml"} <= arts

    # a baseline whose scores vanished is an error at evaluate, never a silent omission
    from orchestrator.baselines_stage import BaselinesError
    trak = [f for f in os.listdir(os.path.join(summary["experiment_dir"], "scores")) if f.startswith("trak-")]
    os.remove(os.path.join(summary["experiment_dir"], "scores", trak[0]))
    with pytest.raises(BaselinesError, match="trak"):
        pipeline.run(compose(["experiment=tiny", "stage=evaluate"], tmp_path))
