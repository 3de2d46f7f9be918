"""MLflow faults: a driver killed (SIGTERM, Ctrl-C, SIGKILL) leaves no run RUNNING forever; an
emptied, replaced or unusable tracking store is reported, never silently restarted or created;
the tracking URI in summary.json and in the printed `mlflow ui` command works from any
directory; run names tell recipes and resumes apart. Real MLflow sqlite stores throughout."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.storage.store import Store
from orchestrator.uris import redact
from tests.conftest import REPO, compose

DATAMODELS = os.path.join(os.path.dirname(sys.executable), "datamodels")


def installed(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    """The installed `datamodels` command, run from `cwd`, the repository not on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return subprocess.run([DATAMODELS, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("datamodels: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def parents_and_children(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


# ----------------------------------------------------------------------------- URIs
def test_redact_returns_a_uri_without_credentials_unchanged():
    for uri in ("sqlite:////tmp/x/mlflow.db", "sqlite:///mlflow.db", "file:///a/b",
                "s3://b/p?endpoint_override=http://h:9000&x=a%20b", "http://h:5000/", "sqlite:////a@b/c.db"):
        assert redact(uri) == uri
    assert redact("http://u:p@h:5000/x?token=abc&a=1") == "http://***@h:5000/x?token=***&a=1"
    assert redact("s3://b/p?Secret_Key=S%2FK&scheme=http") == "s3://b/p?Secret_Key=***&scheme=http"


@pytest.mark.parametrize("uri,needle", [
    ("foo://bar", "no tracking store for scheme 'foo'"),
    ("sqlite:///{tmp}/nonexistent/dir/mlflow.db", "{tmp}/nonexistent does not exist"),
    ("sqlite://mlflow.db", "not a sqlite database path"),
])
def test_an_unusable_tracking_uri_is_one_line_exit_2_and_nothing_is_written(tmp_path, uri, needle):
    uri, needle = uri.format(tmp=tmp_path), needle.format(tmp=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    proc = installed(["experiment=tiny", "stage=masks", f"tracking.uri={uri}"], work)
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"tracking.uri={uri}" in line and needle in line, line     # the URI as given: four slashes kept
    assert os.listdir(work) == [] and sorted(os.listdir(tmp_path)) == ["work"]    # nothing created anywhere


@pytest.mark.slow       # seconds of timeouts and commands: not in the fast lane
def test_the_databases_own_directory_is_created_inside_an_existing_one(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = installed(["experiment=tiny", "stage=masks", "tracking.uri=sqlite:///db/mlflow.db"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (work / "db" / "mlflow.db").stat().st_size > 0


def test_an_empty_tracking_database_is_refused_not_restarted(tmp_path):
    """`mlflow.db` truncated to 0 bytes: one line naming it, exit 2, before any work; the file
    is left as it was (MLflow would have created a new, empty history in it)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mlflow.db").write_bytes(b"")
    proc = installed(["experiment=tiny", "stage=masks", "tracking.uri=sqlite:///mlflow.db"], work)
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2
    assert f"{work}/mlflow.db is empty" in line and "Restore it" in line and "delete it" in line, line
    assert (work / "mlflow.db").stat().st_size == 0
    assert os.listdir(work) == ["mlflow.db"]             # no experiment, no lock, no artifacts


@pytest.mark.slow       # seconds of timeouts and commands: not in the fast lane
def test_summary_uri_opens_from_anywhere_and_a_replaced_store_is_reported(tmp_path):
    """A relative `sqlite:///mlflow.db`: summary.json holds the absolute URI, which MLflow opens
    from another directory, and the printed `mlflow ui` command names it. A resume is quiet;
    once the database is deleted, the next run says the store no longer holds the run before."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    args = ["experiment=tiny", "stage=masks", "tracking.uri=sqlite:///mlflow.db"]
    first = installed(args, work)
    assert first.returncode == 0, first.stderr[-2000:]
    (exp_dir,) = (work / "runs").glob("tiny-*")
    summary = json.loads((exp_dir / "summary.json").read_text())
    uri = summary["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{work}/mlflow.db" and uri.startswith("sqlite:////")
    assert f"mlflow ui --backend-store-uri {uri} " in first.stdout
    code = ("import json, sys; from mlflow.tracking import MlflowClient; m = json.load(open(sys.argv[1]))['mlflow']; "
            "r = MlflowClient(tracking_uri=m['tracking_uri']).get_run(m['run_id']); print(r.info.status)")
    opened = subprocess.run([sys.executable, "-c", code, str(exp_dir / "summary.json")], cwd=elsewhere,
                            capture_output=True, text=True, timeout=120)
    assert opened.stdout.strip() == "FINISHED", opened.stderr[-2000:]

    resumed = installed(args, work)
    assert resumed.returncode == 0 and "no longer holds" not in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    (work / "mlflow.db").unlink()
    replaced = installed(args, work)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    warned = [ln for ln in (replaced.stdout + replaced.stderr).splitlines() if "no longer holds" in ln]
    second = json.loads((exp_dir / "summary.json").read_text())["mlflow"]
    assert len(warned) == 1, replaced.stderr[-3000:]
    assert summary["mlflow"]["run_id"] != second["run_id"]
    assert f"tracking.uri={uri}" in warned[0] and "emptied or replaced" in warned[0]
    resumed_id = [ln for ln in resumed.stdout.splitlines() if "MLflow:" in ln][0].split("/runs/")[1].split("?")[0]
    assert resumed_id in warned[0]                      # the run this experiment logged last


def test_run_names_tell_recipes_and_resumes_apart(tmp_path):
    """Another recipe (train.epochs=6) and each resume get their own name (in-process)."""
    from orchestrator import pipeline
    runs = [pipeline.run(compose(["experiment=tiny", "stage=masks", *extra], tmp_path))
            for extra in ([], [], ["train.epochs=6"], [])]
    parents, _ = parents_and_children(f"sqlite:///{tmp_path}/mlflow.db", "tiny")
    names = {r.info.run_id: r.info.run_name for r in parents}
    got = [names[s["mlflow"]["run_id"]] for s in runs]
    h, h6 = runs[0]["config_hash"], runs[2]["config_hash"]
    assert h != h6
    assert got == [f"tiny-{h} α=0.5 m=300 stage=masks", f"tiny-{h} α=0.5 m=300 stage=masks (resume 1)",
                   f"tiny-{h6} α=0.5 m=300 stage=masks", f"tiny-{h} α=0.5 m=300 stage=masks (resume 2)"]


# ----------------------------------------------------------------------------- drivers that die
DRIVER = """
import sys, time
sys.path.insert(0, {repo!r})
from orchestrator.storage.store import Store
from orchestrator.tracking import Tracker
tracker = Tracker({uri!r}, "drivers")
tags = {{"experiment_dir": {exp!r}, "config_hash": "c0ffee"}}
with tracker.parent("driver", {{}}, tags, store=Store({exp!r}), lease=5):
    with tracker.stage("train"):
        print(tracker.parent_id, flush=True)
        time.sleep(600)
"""


def start_driver(tmp_path) -> tuple[subprocess.Popen, str]:
    """A driver (the tracker of a pipeline run) inside its parent and a nested run: (process, run id)."""
    code = DRIVER.format(repo=REPO, uri=f"sqlite:///{tmp_path}/mlflow.db", exp=str(tmp_path / "exp"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()      # type: ignore[union-attr]
    assert run_id, proc.communicate(timeout=60)[1][-3000:]
    return proc, run_id


def statuses(tmp_path, run_id) -> tuple[str, list[str]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    return run.info.status, [c.info.status for c in children]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_driver_stopped_by_sigterm_or_ctrl_c_ends_its_runs_killed(tmp_path, sig):
    proc, run_id = start_driver(tmp_path)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert statuses(tmp_path, run_id) == ("KILLED", ["KILLED"]), err[-3000:]
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]


def test_a_failing_run_ends_failed(tmp_path):
    from orchestrator.tracking import Tracker
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "drivers")
    with pytest.raises(ValueError):
        with tracker.parent("fails", {}, {"experiment_dir": str(tmp_path / "exp"), "config_hash": "c0ffee"}):
            with tracker.stage("train"):
                raise ValueError("boom")
    assert statuses(tmp_path, tracker.parent_id) == ("FAILED", ["FAILED"])


@pytest.mark.slow       # seconds of timeouts and commands: not in the fast lane
def test_the_next_driver_ends_a_dead_drivers_runs_and_leaves_live_ones(tmp_path):
    """SIGKILL leaves a parent and a nested run RUNNING; the next driver on the experiment
    ends both KILLED, saying why. A live driver's runs on this host, and those of a driver on
    another host whose claims heartbeat is fresh (or absent), stay RUNNING; one whose
    heartbeat is older than the lease is ended too."""
    from orchestrator.tracking import Tracker
    uri, exp = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "exp")
    dead, dead_id = start_driver(tmp_path)
    live, live_id = start_driver(tmp_path)
    try:
        dead.kill()
        dead.communicate(timeout=60)
        client = MlflowClient(tracking_uri=uri)
        exp_id = client.get_experiment_by_name("drivers").experiment_id
        store = Store(exp)
        remote = {}
        for pid, beat_age in ((4242, 3600), (4343, 0), (4444, None)):     # another host's drivers
            tags = {"experiment_dir": exp, "config_hash": "c0ffee", "driver.host": "other-host",
                    "driver.pid": str(pid)}
            remote[pid] = client.create_run(exp_id, tags=tags, run_name=f"other {pid}").info.run_id
            if beat_age is not None:
                store.write_bytes(f"claims/owners/other-host.{pid}.abcdef", b"{}")
                then = time.time() - beat_age
                os.utime(os.path.join(exp, "claims", "owners", f"other-host.{pid}.abcdef"), (then, then))
        assert statuses(tmp_path, dead_id) == ("RUNNING", ["RUNNING"])        # what SIGKILL leaves

        tracker = Tracker(uri, "drivers")
        with tracker.parent("next", {}, {"experiment_dir": exp, "config_hash": "c0ffee"}, store=store, lease=5):
            pass
        assert statuses(tmp_path, dead_id) == ("KILLED", ["KILLED"])
        why = client.get_run(dead_id).data.tags["ended_by"]
        assert f"{dead.pid} is gone" in why, why
        assert statuses(tmp_path, live_id) == ("RUNNING", ["RUNNING"])
        assert client.get_run(remote[4242]).info.status == "KILLED"
        assert "heartbeat" in client.get_run(remote[4242]).data.tags["ended_by"]
        assert client.get_run(remote[4343]).info.status == "RUNNING"
        assert client.get_run(remote[4444]).info.status == "RUNNING"
        assert client.get_run(tracker.parent_id).info.status == "FINISHED"
    finally:
        live.terminate()
        live.communicate(timeout=120)
    assert statuses(tmp_path, live_id) == ("KILLED", ["KILLED"])


# ----------------------------------------------------------------------------- the command, on Ray
def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_pipeline_driver_killed_mid_training_leaves_no_run_running(tmp_path):
    """`datamodels stage=train` on a local Ray instance: SIGTERM mid-training ends the parent
    and the train run KILLED; after a SIGKILL, the next driver on the experiment marks the
    dead one's runs KILLED and finishes its own."""
    from orchestrator.tracking import _file_lock
    from tests.test_pipeline import planted_overrides
    over = planted_overrides(tmp_path, extra=["stage=train", "train.models_per_unit=20", "+task.delay=0.05",
                                              "cluster.num_cpus=1"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from tests.test_cli import user_command
    cmd, env = user_command([f"exp.root={tmp_path}/runs", f"tracking.uri={uri}", *over], tmp_path)
    started: list[psutil.Process] = []

    def training_run() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        started.append(psutil.Process(proc.pid))
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            started.extend(_descendants(proc.pid))
            with _file_lock(f"{tmp_path}/mlflow.db.lock"):       # not while a driver creates the database
                exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("planted")
            if exp is not None:         # this driver's parent run, and its train run under way
                running = MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id],
                                                                     "attributes.status = 'RUNNING'")
                mine = [r.info.run_id for r in running if r.data.tags.get("driver.pid") == str(proc.pid)]
                if mine and any(r.data.tags.get("mlflow.parentRunId") == mine[0] for r in running):
                    time.sleep(2)       # a few models in
                    started.extend(_descendants(proc.pid))
                    return proc, mine[0]
            time.sleep(1)
        raise AssertionError("the driver never started training")

    try:
        term, term_id = training_run()
        term.send_signal(signal.SIGTERM)
        _, err = term.communicate(timeout=180)
        assert term.returncode != 0
        assert statuses(tmp_path, term_id) == ("KILLED", ["KILLED"]), err[-3000:]      # the parent, train

        killed, killed_id = training_run()
        for p in started:             # the driver, and the Ray processes it started
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        killed.communicate(timeout=60)
        status, children = statuses(tmp_path, killed_id)
        assert status == "RUNNING" and "RUNNING" in children
        # the next driver on the experiment (a quick stage of it: the marking is done as any run starts)
        done = subprocess.run([*cmd, "stage=masks"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        status, children = statuses(tmp_path, killed_id)
        assert status == "KILLED" and "RUNNING" not in children
        parents, _ = parents_and_children(uri, "planted")
        assert [r.info.status for r in parents if r.info.run_id not in (term_id, killed_id)] == ["FINISHED"]
        assert all(r.info.status != "RUNNING" for r in parents)
    finally:
        for p in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
