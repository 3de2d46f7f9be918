"""Faults on one machine: workers killed, two drivers at once, a full disk, a read-only
store, an object store without credentials, an MLflow server that does not answer, models
that diverge. Each counts models lost, models trained twice and what the user saw."""
from __future__ import annotations

import collections
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from orchestrator import pipeline
from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Store
from tests.conftest import compose
from tests.test_cli import run_cli, user_command, user_env
from tests.test_pipeline import planted_overrides, trained_seeds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = 400 + 40 * 2      # planted_overrides: masks.n_train=400, n_eval=40, eval.replicas=2


def report(name: str, **figures) -> None:
    print(f"FAULT {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def train_workers() -> list[psutil.Process]:
    """The training actors of this test's own Ray instance (descendants of this process),
    never those of another Ray on the machine."""
    out, me = [], os.getpid()
    for p in psutil.process_iter(["cmdline"]):
        cl = p.info["cmdline"] or []
        try:
            if cl and cl[0].startswith("ray::TrainWorker") and me in {q.pid for q in p.parents()}:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def one_line_error(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("datamodels: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_training_actor_killed_every_few_seconds(tmp_path, ray_local):
    """SIGKILL a training actor every 4 s throughout the run: it finishes with every model
    in the ledger exactly once."""
    over = planted_overrides(tmp_path, extra=["stage=train", "train.models_per_unit=20", "+task.delay=0.05"])
    stop = threading.Event()
    kills = []

    def killer():
        rng = random.Random(0)
        while not stop.wait(4.0):
            victims = train_workers()
            if victims:
                v = rng.choice(victims)
                try:
                    v.send_signal(signal.SIGKILL)
                    kills.append(v.pid)
                except psutil.NoSuchProcess:
                    pass

    t = threading.Thread(target=killer, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        s = pipeline.run(compose(over, tmp_path))
    finally:
        stop.set()
        t.join()
    wall = time.perf_counter() - t0
    index = Ledger(Store(s["experiment_dir"])).index()
    seeds = trained_seeds(tmp_path / "count")
    twice = sum(1 for c in collections.Counter(seeds).values() if c > 1)
    report("actor SIGKILL every 4 s", kills=len(kills), worker_deaths=s["train"]["pool"]["worker_deaths"],
           models_lost=EXPECTED - index.count("train") - index.count("eval"), duplicate_rows=index.duplicates,
           models_trained_twice=twice, trainings=len(seeds), wall_s=round(wall, 1))
    assert len(kills) >= 3
    assert s["train"]["pool"]["worker_deaths"] >= 1
    assert index.count("train") == 400 and index.count("eval") == 80
    assert index.duplicates == 0
    assert s["models"] == {"train": 400, "eval": 80}


@pytest.mark.slow
def test_diverged_models_are_counted_and_never_fitted(tmp_path, ray_local):
    over = planted_overrides(tmp_path, extra=["+task.diverge_every=7"])
    s = pipeline.run(compose(over, tmp_path))
    index = Ledger(Store(s["experiment_dir"])).index()
    failed = index.failed_models()
    assert s["models_failed"] == len(failed) > 20
    assert all(f["reason"].startswith("non-finite margins") for f in failed)
    assert s["models"]["train"] + sum(f["mask_set"] == "train" for f in failed) == 400
    assert np.isfinite(s["lds"]["datamodels"]["mean"]) and s["lds"]["datamodels"]["mean"] > 0.9
    # a re-run does not retrain them (they would diverge again)
    before = len(trained_seeds(tmp_path / "count"))
    s2 = pipeline.run(compose(over, tmp_path))
    assert s2["train"]["models_trained"] == 0 and len(trained_seeds(tmp_path / "count")) == before


def _drivers(tmp_path, extra, env_extra=None, n=2):
    over = planted_overrides(tmp_path, extra=["stage=all", "train.models_per_unit=20", "+task.delay=0.03",
                                              "cluster.num_cpus=1", "fit.prefixes=[]", *extra])
    base = [f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    argv, env = user_command([*base, *over], tmp_path, env_extra=env_extra)
    over = argv[-len(over):]             # the planted task as the user's module (compose() here sees the same)
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    return procs, outs, over


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_at_once_share_the_work(tmp_path, where, request):
    """Two drivers started together on one experiment (and one fresh MLflow store): both
    finish, every model is in the ledger once, and under 10% of the work is done twice."""
    extra, env = [], {}
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        s3.make_bucket("twodrivers")
        extra = [f"store.uri='{s3.uri('twodrivers', 'runs')}'"]
        env = s3.env
    procs, outs, over = _drivers(tmp_path, extra, env)
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    seeds = trained_seeds(tmp_path / "count")
    counts = collections.Counter(seeds)
    twice = sum(1 for c in counts.values() if c > 1)
    from orchestrator.runtime.plan import validate
    plan = validate(compose(over, tmp_path))
    index = plan.ledger.index()
    report(f"two drivers ({where} store)", models_lost=EXPECTED - index.count("train") - index.count("eval"),
           models_trained_twice=twice, duplicated_work=f"{100 * (len(seeds) - EXPECTED) / EXPECTED:.1f}%",
           duplicate_rows=index.duplicates)
    assert index.count("train") == 400 and index.count("eval") == 80
    assert len(counts) == EXPECTED
    assert len(seeds) - EXPECTED < 0.10 * EXPECTED
    # both saw the same results and MLflow holds both parent runs
    assert all("datamodels" in out for out, _ in outs)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("planted")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2


def _in_namespace(script: str, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                          env=user_env(), capture_output=True, text=True, timeout=timeout)


def _cli(tmp_path, args) -> str:
    """The command as a shell line, run from tmp_path (_in_namespace gives it the user's environment)."""
    base = [f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/db/mlflow.db"]
    argv, _ = user_command([*base, *args], tmp_path)
    return " ".join([f"cd {shlex.quote(str(tmp_path))} &&", *map(shlex.quote, argv)])


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_resume_is_bitwise_correct(tmp_path):
    """The experiment's disk fills during training: one line naming the path, exit 1; after
    space is freed the same command finishes, and the ledger equals an uninterrupted run's."""
    over = planted_overrides(tmp_path, extra=["stage=train", "train.models_per_unit=20", "cluster.num_cpus=1",
                                              "fit.prefixes=[]"])
    runs = tmp_path / "runs"
    runs.mkdir()
    script = f"""
mount -t tmpfs -o size=1m tmpfs {runs}
dd if=/dev/zero of={runs}/filler bs=1k count=940 status=none
{_cli(tmp_path, over)} > {tmp_path}/out1 2> {tmp_path}/err1; echo "rc1=$?"
rm {runs}/filler
{_cli(tmp_path, over)} > {tmp_path}/out2 2> {tmp_path}/err2; echo "rc2=$?"
cp -r {runs} {tmp_path}/kept
"""
    r = _in_namespace(script)
    assert "rc1=1" in r.stdout, r.stdout + r.stderr
    err1 = (tmp_path / "err1").read_text()
    line = one_line_error(err1)
    assert "no space left on device" in line and str(runs) in line, line
    assert "rc2=0" in r.stdout, (tmp_path / "err2").read_text()[-3000:]
    (exp,) = [d for d in os.listdir(tmp_path / "kept") if d.startswith("planted-")]
    resumed = Ledger(Store(str(tmp_path / "kept" / exp)))
    # the same experiment, never interrupted
    clean = tmp_path / "clean"
    over_clean = [o.replace(str(tmp_path), str(clean)) for o in over]
    clean.mkdir()
    proc = run_cli(over_clean, clean, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (exp2,) = [d for d in os.listdir(clean / "runs") if d.startswith("planted-")]
    ref = Ledger(Store(str(clean / "runs" / exp2)))
    seeds = trained_seeds(tmp_path / "count")
    report("disk full during training", user_saw=line[:160], models_lost=EXPECTED - resumed.count("train")
           - resumed.count("eval"), models_trained_twice=len(seeds) - len(set(seeds)),
           duplicate_rows=resumed.index().duplicates)
    for mask_set in ("train", "eval"):
        a, b = resumed.load(mask_set), ref.load(mask_set)
        assert np.array_equal(a.model_id, b.model_id) and np.array_equal(a.replica, b.replica)
        assert np.array_equal(a.packed, b.packed)
        assert a.margins.tobytes() == b.margins.tobytes()
    assert resumed.index().duplicates == 0


def test_read_only_store_is_refused_before_ray_starts(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    over = planted_overrides(tmp_path, extra=["stage=train", f"store.uri={ro}"])
    script = f"""
mount -t tmpfs -o ro tmpfs {ro}
{_cli(tmp_path, over)} > {tmp_path}/out 2> {tmp_path}/err; echo "rc=$?"
"""
    t0 = time.time()
    r = _in_namespace(script)
    assert "rc=2" in r.stdout, r.stdout + r.stderr
    err = (tmp_path / "err").read_text()
    line = one_line_error(err)
    assert "store.uri" in line and str(ro) in line and ("read-only" in line or "permission" in line), line
    assert "Ray" not in err and "ray" not in (tmp_path / "out").read_text().lower()
    report("read-only store", user_saw=line[:160], seconds=round(time.time() - t0, 1))


@pytest.mark.slow
def test_s3_without_credentials_is_one_line(tmp_path):
    """An S3 server that checks credentials (as AWS does), a client that has none."""
    from tests.cluster import S3Server
    s3_server = S3Server(str(tmp_path), enforce_auth=True)
    request_cleanup = s3_server.stop
    over = planted_overrides(tmp_path, extra=["stage=train", f"store.uri='{s3_server.uri('nocreds', 'runs')}'"])
    base = [f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    argv, env = user_command([*base, *over], tmp_path)
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    t0 = time.time()
    try:
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        request_cleanup()
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2 and "store.uri" in line and "s3://nocreds" in line, line
    assert "credentials" in line
    report("S3 without credentials", user_saw=line[:200], seconds=round(time.time() - t0, 1))


def test_mlflow_unreachable_fails_in_seconds_or_runs_without_it(tmp_path):
    over = planted_overrides(tmp_path, extra=["stage=masks"])
    t0 = time.time()
    cmd, env = user_command([f"exp.root={tmp_path}/runs", *over], tmp_path)
    proc = subprocess.run(cmd + ["tracking.uri=http://127.0.0.1:9"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    seconds = time.time() - t0
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2 and "tracking.uri" in line and "127.0.0.1:9" in line, line
    assert seconds < 60
    report("MLflow unreachable", user_saw=line[:160], seconds=round(seconds, 1))
    proc = subprocess.run(cmd + ["tracking.uri=http://127.0.0.1:9", "tracking.required=false"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running without tracking" in proc.stdout + proc.stderr


LISTENERS = r"""
import os, sys, time, json
sys.path.insert(0, {repo!r})
import psutil, ray
from omegaconf import OmegaConf
from orchestrator.scheduling import cluster as raycluster
raycluster.connect(OmegaConf.create({{"address": None, "num_cpus": 1, "num_gpus": None}}))
@ray.remote
class A:
    def ping(self): return "pong"
@ray.remote
def f(): return 1
ray.get(f.remote()); a = A.remote(); ray.get(a.ping.remote())
time.sleep(1)
session = ray._private.worker._global_node.get_session_dir_path()
procs = {{}}
for p in [psutil.Process()] + psutil.Process().children(recursive=True):
    procs[p.pid] = p
for p in psutil.process_iter(["cmdline"]):
    if session in " ".join(p.info["cmdline"] or []):
        procs[p.pid] = p
        for c in p.children(recursive=True):
            procs[c.pid] = c
rows = [(c.laddr.ip, c.laddr.port, procs[c.pid].name()) for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in procs]
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_local_ray_instance_listens_on_loopback_only(tmp_path):
    from tests.cluster import is_loopback
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", LISTENERS.format(repo=REPO)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {r[2] for r in rows}
    assert {"gcs_server", "raylet"} <= names, rows
    exposed = [r for r in rows if not is_loopback(r[0])]
    assert not exposed, exposed
    report("local Ray exposure", listening_sockets=len(rows), non_loopback=len(exposed))
