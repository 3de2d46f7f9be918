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
    # values that used to pass validation and make no sense
    (["train.lr=nan"], "train.lr"),
    (["train.workers=-1"], "train.workers"),
    (["exp.seed=-1"], "exp.seed"),
    (["eval.bootstrap=-1"], "eval.bootstrap"),
    (["train.cpus_per_worker=-1"], "train.cpus_per_worker"),
    (["train.max_retries=-1"], "train.max_retries"),
    (["task.model.hidden=[-5]"], "task.model.hidden"),
    (["exp.name=../up"], "exp.name"),
    (["train.gpus_per_worker=1"], "train.gpus_per_worker"),
    (["experiment=tinyy"], "experiment=tinyy"),
    (["ledger.path=/tmp/x"], "store.uri"),
    (["store.uri=s3://bucket/x?bogus=1"], "store.uri"),
    # refused by the schema (orchestrator/schema.py) as Hydra composes: a value of the wrong type
    # (every typed setting: tests/test_config.py), a key it lacks, even when + adds it
    (["train.epochs=abc"], "train.epochs"),
    (["exp.name=[1]"], "exp.name"),
    (["+train.foo=1"], "train.foo"),
    # a method's setting that the shipped params do not set needs +; its words are checked
    (["baselines.params.if_cg.inverse=cg"], "+baselines.params.if_cg.inverse"),
    (["+baselines.params.if_cg.inverse=chol"], "baselines.params.if_cg.inverse"),
    (["+baselines.params.tracin.factored=maybe"], "baselines.params.tracin.factored"),
    (["+baselines.params.if_cg.factor_max_rows=0"], "baselines.params.if_cg.factor_max_rows"),
    (["+baselines.params.if_cg.bogus=1"], "baselines.params.if_cg.bogus"),
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


@pytest.mark.slow
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
    # the parent runs alone compare the points: names and tags say what differs, metrics hold LDS
    assert sorted(r.info.run_name for r in parents) == ["sweep α=0.3 m=60", "sweep α=0.6 m=60"]
    assert sorted(r.data.tags["sweep.masks.alpha"] for r in parents) == ["0.3", "0.6"]
    assert len({r.data.tags["sweep"] for r in parents}) == 1
    assert all("sweep.masks.n_train" not in r.data.tags for r in parents)      # not varied
    for r in parents:
        assert {"lds.datamodels", "lds.datamodels.ci_lo", "lds.datamodels.ci_hi", "models.train"} <= set(r.data.metrics)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # not a terminal: no colour codes, no library chatter, and the run ends saying where things are
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert "Token authentication is enabled" not in proc.stdout + proc.stderr
    assert proc.stdout.count("results:  ") == 2 and proc.stdout.count("MLflow:   ") == 2


def test_help_and_version(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    help_ = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert help_.returncode == 0, help_.stderr
    for text in ("stage=", "baselines", "experiment: fmnist_10k, tiny", "counterfactual", "fit: glmnet, torch",
                 "task: cifar10_resnet9",
                 "store.uri=", "tracking.uri=", "summary.json", "MLflow"):
        assert text in help_.stdout, text
    version = subprocess.run([sys.executable, "-m", "orchestrator", "--version"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=120)
    from importlib.metadata import version as installed
    assert version.returncode == 0 and version.stdout.startswith(f"datamodels {installed('datamodels')}")
    assert os.listdir(tmp_path) == []


PRESET = """# @package _global_
defaults:
  - override /task: digits_mlp
exp:
  name: mine
masks:
  n_train: 20
  n_eval: 4
"""


@pytest.mark.parametrize("spelling", ["space", "equals"])
def test_config_dir_in_both_spellings_goes_through_the_same_checks(spelling, tmp_path):
    extra = tmp_path / "extra"
    (extra / "experiment").mkdir(parents=True)
    (extra / "experiment" / "mine.yaml").write_text(PRESET)
    (extra / "experiment" / "broken.yaml").write_text("masks: {alpha: [unclosed\n")
    (extra / "experiment" / "impossible.yaml").write_text("# @package _global_\nmasks:\n  alpha: 2.0\n")
    (extra / "experiment" / "mistyped.yaml").write_text("# @package _global_\ntrain:\n  epochs: many\n")
    (extra / "train").mkdir()
    (extra / "train" / "misspelt.yaml").write_text("epoch: 3\n")
    flag = ["--config-dir", str(extra)] if spelling == "space" else [f"--config-dir={extra}"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)

    def cli(args, cwd):     # Hydra's flags come before the overrides
        return subprocess.run([sys.executable, "-m", "orchestrator", *flag, f"exp.root={cwd}/runs",
                               f"tracking.uri=sqlite:///{cwd}/mlflow.db", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)

    work = tmp_path / "work"
    work.mkdir()
    ok = cli(["experiment=mine", "stage=masks", "tracking.enabled=false"], work)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert any(d.startswith("mine-") for d in os.listdir(work / "runs"))
    for preset, needle in (("experiment=broken", "broken"), ("experiment=impossible", "masks.alpha"),
                           ("experiment=mistyped", "train.epochs"), ("train=misspelt", "epoch")):
        bad = tmp_path / f"bad-{preset.split('=')[1]}"
        bad.mkdir()
        proc = cli([preset], bad)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("datamodels: error:") and needle in lines[0], proc.stderr
        assert os.listdir(bad) == []
