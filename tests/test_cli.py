"""The command line: bad input is one line on stderr, exit 2, nothing written, no Ray."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, tmp_path, timeout=120):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    base = [f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    flags = [a for a in args if a in ("-m", "--multirun")]  # Hydra's flags precede the overrides
    args = [a for a in args if a not in flags]
    return subprocess.run([sys.executable, "-m", "orchestrator", *flags, *base, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["masks.alpha=1.5"], "masks.alpha"),
    (["masks.alpha=0"], "masks.alpha"),
    (["masks.alpha=abc"], "masks.alpha"),
    (["task.data.root=/nonexistent/fmnist"], "task.data.root"),
    (["task=digits_mlp", "task.n_targets=100000"], "task.n_targets"),
    (["task=digits_mlp", "task.n_train=100000"], "task.n_train"),
    (["masks.alphaa=0.3"], "masks.alphaa"),
    (["task=fmnist_mpl"], "fmnist_mpl"),
    (["stage=trian"], "stage"),
    (["fit.backend=lars"], "fit.backend"),
    (["train.loader=dali"], "train.loader"),
])
def test_bad_input_one_line_nothing_written(args, needle, tmp_path):
    t0 = time.time()
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("datamodels: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    # nothing written: no experiment dir, no MLflow store, no Hydra output dir
    assert sorted(os.listdir(tmp_path)) == []
    assert "Ray" not in proc.stderr and time.time() - t0 < 60


def test_sweep_typo_caught_before_any_run(tmp_path):
    proc = run_cli(["-m", "masks.alpha=0.25,1.5", "task=digits_mlp", "masks.alphx=1"], tmp_path)
    assert proc.returncode == 2 and "masks.alphx" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_sweep_runs_one_pipeline_per_point(tmp_path):
    """`-m masks.alpha=0.3,0.6`: two pipelines, two ledgers, one MLflow experiment."""
    from mlflow.tracking import MlflowClient

    from tests.test_pipeline import planted_overrides
    over = [o for o in planted_overrides(tmp_path, n=40, T=4) if not o.startswith("masks.")]
    over += ["masks.n_train=60", "masks.n_eval=12", "exp.name=sweep", "cluster.num_cpus=2"]
    proc = run_cli(["-m", "masks.alpha=0.3,0.6", *over], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted(d for d in os.listdir(tmp_path / "runs") if d.startswith("sweep-"))
    assert len(dirs) == 2
    alphas = set()
    for d in dirs:
        import json
        with open(tmp_path / "runs" / d / "summary.json") as f:
            s = json.load(f)
        alphas.add(s["alpha"])
        assert s["models"] == {"train": 60, "eval": 24}
        assert os.path.isdir(tmp_path / "runs" / d / "ledger")
    assert alphas == {0.3, 0.6}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sweep")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.params["masks.alpha"] for r in parents) == ["0.3", "0.6"]
