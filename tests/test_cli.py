"""The command line: bad input is one line on stderr, exit 2, nothing written, no Ray."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The entry points as `make` installs them: the console script beside this interpreter, and
# `python -m orchestrator`. Every command below runs them as a user does: from a directory
# outside the repository, with no PYTHONPATH leading to it (which would hide what the install
# itself does not provide, as it hid the sweep launcher that the editable install left out).
DATAMODELS = os.path.join(os.path.dirname(sys.executable), "datamodels")
ENTRIES = {"datamodels": [DATAMODELS], "python -m orchestrator": [sys.executable, "-m", "orchestrator"]}

# tests/test_pipeline.py's planted task, run by a command as a user runs their own task: its
# source in a module of the user's, USER_TASK.py in the directory the command runs from.
PLANTED = "tests.test_pipeline.PlantedTask"
USER_TASK = "my_planted_task"
USER_TASK_HEADER = "import os\nimport time\nfrom types import SimpleNamespace\n\nimport numpy as np\n\n\n"


def outside_repo(path) -> str:
    path = os.path.realpath(str(path))
    assert os.path.commonpath([path, os.path.realpath(REPO)]) != os.path.realpath(REPO), \
        f"{path} is inside the repository: run the command from elsewhere"
    return path


def user_env(extra: dict | None = None) -> dict:
    """The user's environment: no PYTHONPATH, no RAY_ADDRESS of this machine's tests."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", **(extra or {}))
    return env


def as_user(args, cwd) -> list[str]:
    """args with the planted task as the user's own module, written to <cwd>/USER_TASK.py
    when args name it. In this process that module's name is the test suite's module, so
    that compose() here sees the command's config (and experiment)."""
    args = [str(a) for a in args]
    if any(PLANTED in a for a in args):
        suite = importlib.import_module(PLANTED.rsplit(".", 1)[0])
        sys.modules.setdefault(USER_TASK, suite)
        with open(os.path.join(str(cwd), f"{USER_TASK}.py"), "w") as f:
            f.write(USER_TASK_HEADER + inspect.getsource(suite.PlantedTask))
    return [a.replace(PLANTED, f"{USER_TASK}.PlantedTask") for a in args]


def user_command(args, cwd, entry: str | list[str] = "python -m orchestrator",
                 env_extra: dict | None = None) -> tuple[list[str], dict]:
    """argv and environment of an installed entry point (a key of ENTRIES, or its argv) run
    from cwd (outside the repository) with args (Hydra's flags first); a planted task becomes
    the user's own module."""
    outside_repo(cwd)
    exe = ENTRIES[entry] if isinstance(entry, str) else list(entry)
    assert os.access(exe[0], os.X_OK), f"{exe[0]}: not installed (make install)"
    args = as_user(args, cwd)
    flags = [a for a in args if a in ("-m", "--multirun")]
    return exe + flags + [a for a in args if a not in flags], user_env(env_extra)


def run_cli(args, tmp_path, timeout=120, entry="python -m orchestrator"):
    base = [f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    argv, env = user_command([*base, *args], tmp_path, entry)
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


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
    (["masks.n_train=auto"], "budget.gain_per_doubling"),
    (["masks.n_train=many"], "masks.n_train"),
    (["masks.n_train=auto", "budget.lds=2"], "budget.lds"),
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
    # refused by the schema (orchestrator/settings/schema.py) as Hydra composes: a value of the wrong type
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
    named = {d: json.load(open(tmp_path / "runs" / d / "summary.json"))["alpha"] for d in dirs}     # dir: its α
    assert sorted(r.info.run_name for r in parents) == sorted(f"{d} α={a:g} m=60" for d, a in named.items())
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


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_sweep_launcher_is_registered_for_the_installed_command(entry, tmp_path):
    """Hydra finds plugins by scanning the hydra_plugins namespace, which the editable install
    leaves empty: the launcher is there only because the command registers it."""
    proc = subprocess.run([*ENTRIES[entry], "--info", "plugins"], capture_output=True, text=True,
                          env=user_env(), cwd=outside_repo(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    launchers = proc.stdout.split("Launcher:")[1].split("Sweeper:")[0].split()
    assert "ParallelLauncher" in launchers, proc.stdout
    assert os.listdir(tmp_path) == []


def sweep_of_two_points(tmp_path, entry) -> None:
    """`-m` over two values of masks.alpha (the masks stage of the tiny preset): both points
    run to the end, each in its own experiment."""
    proc = run_cli(["-m", "experiment=tiny", "masks.alpha=0.4,0.5", "stage=masks", "tracking.enabled=false"],
                   tmp_path, timeout=600, entry=entry)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unknown plugin class" not in proc.stderr
    assert "sweep: 2 points" in proc.stdout, proc.stdout[-2000:]
    dirs = sorted(d for d in os.listdir(tmp_path / "runs") if d.startswith("tiny-"))
    assert len(dirs) == 2, dirs
    alphas = set()
    for d in dirs:
        with open(tmp_path / "runs" / d / "summary.json") as f:
            alphas.add(json.load(f)["alpha"])
        assert {"train.npy", "eval.npy"} <= set(os.listdir(tmp_path / "runs" / d / "masks")), d
    assert alphas == {0.4, 0.5}, alphas


@pytest.mark.slow
def test_sweep_from_the_installed_command(tmp_path):
    """`datamodels -m` as `make` installs it (editable), outside the repository, without
    PYTHONPATH (`python -m orchestrator -m`: test_sweep_runs_one_pipeline_per_point)."""
    sweep_of_two_points(tmp_path, "datamodels")


def regular_install(root) -> str:
    """`pip install .`, not editable, of the package files pyproject.toml lists, into a new
    virtualenv whose dependencies are this one's (a .pth file: this environment's editable
    finder stays out); returns its `datamodels`."""
    import tomllib
    import venv
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    src = os.path.join(root, "src")
    tops = {setuptools.get("package-dir", {}).get(p, p.replace(".", "/")).split("/")[0]
            for p in setuptools["packages"]}
    for top in sorted(tops):
        shutil.copytree(os.path.join(REPO, top), os.path.join(src, top),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    env_dir = os.path.join(root, "venv")
    venv.create(env_dir, with_pip=False)
    py = os.path.join(env_dir, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--disable-pip-version-check",
                          "--no-deps", "--no-build-isolation", "--no-index", src],
                         capture_output=True, text=True, timeout=600, env=user_env())
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    where = subprocess.run([py, "-c", "import orchestrator, hydra_plugins.datamodels_launcher as h; "
                                      "print(orchestrator.__file__); print(h.__file__)"],
                           capture_output=True, text=True, cwd=root, env=user_env(), check=True).stdout.split()
    assert all(w.startswith(site) for w in where), where          # the installed copy, not the repository
    return os.path.join(env_dir, "bin", "datamodels")


@pytest.mark.slow
def test_sweep_from_a_regular_install(tmp_path):
    """The same sweep from `datamodels` of a regular (non-editable) `pip install .`."""
    datamodels = regular_install(tmp_path / "install")
    work = tmp_path / "work"
    work.mkdir()
    # Hydra's scan finds the launcher here too: it is listed once, not once per registration
    info = subprocess.run([datamodels, "--info", "plugins"], capture_output=True, text=True, env=user_env(),
                          cwd=work, timeout=120)
    assert info.stdout.split("Launcher:")[1].split("Sweeper:")[0].split().count("ParallelLauncher") == 1, info.stdout
    sweep_of_two_points(work, [datamodels])


@pytest.mark.parametrize("entry", ENTRIES)
def test_help_and_version(entry, tmp_path):
    env = user_env()
    help_ = subprocess.run([*ENTRIES[entry], "--help"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert help_.returncode == 0, help_.stderr
    for text in ("stage=", "baselines", "experiment: fmnist_10k, fmnist_mislabel, tiny", "counterfactual",
                 "fit: glmnet, torch", "task: cifar10_resnet9",
                 "store.uri=", "tracking.uri=", "summary.json", "MLflow"):
        assert text in help_.stdout, text
    version = subprocess.run([*ENTRIES[entry], "--version"], capture_output=True, text=True,
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
    env = user_env()

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
