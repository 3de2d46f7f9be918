"""`ray job submit` on a cluster whose nodes share nothing but Ray and the store.

One cluster for the module (tests/cluster.py): a head with 0 CPUs on 127.0.0.1 and worker
nodes in their own mount namespaces. The store is the head's local disk (served to the
workers by the driver's node) or a real S3 server (moto) on 127.0.0.1. Faults: a worker
node killed mid-training while another joins, the S3 server stopped mid-training, the
driver killed and the job submitted again. Each reports models lost, models trained twice
and the wall-time cost.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

import psutil
import pytest

from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Store
from tests.cluster import Cluster, S3Server, is_loopback, listening_addresses

pytestmark = pytest.mark.slow          # a multi-node Ray cluster: minutes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TINY = 300 + 30 * 2          # experiment=tiny: 300 train models, 30 eval masks x 2 replicas
# a slower tiny run (more, smaller units) so that faults land in the middle of training
SLOW = ["experiment=tiny", "stage=train", "train.epochs=200", "train.models_per_unit=10", "train.models_per_step=10"]
RESULTS: dict = {}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3")))
    server.make_bucket("cluster")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    import shutil
    import tempfile
    root = tempfile.mkdtemp(prefix="dmc-", dir="/tmp")     # short: Ray's socket paths must fit 107 bytes
    c = Cluster(root, env_extra=S3Server.env)
    try:
        c.start_head()
        c.add_worker()
        c.add_worker()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def entry(cluster: Cluster, args: list[str], tag: str) -> str:
    quoted = " ".join(shlex.quote(a) for a in args)
    return (f"echo RAY_ADDRESS=$RAY_ADDRESS; cd {REPO} && {PY} -m orchestrator {quoted} "
            f"exp.root={cluster.exp_root}/{tag} tracking.uri=sqlite:///{cluster.root}/mlflow-{tag}.db")


def s3_store(s3: S3Server, prefix: str, **opts) -> str:
    return f"store.uri='{s3.uri('cluster', prefix, **opts)}'"


def summary_of(store: Store) -> dict:
    return json.loads(store.read_bytes("summary.json"))


def experiment(root: str) -> Store:
    (name,) = [d for d in os.listdir(root) if d.startswith("tiny-")]
    return Store(os.path.join(root, name))


def s3_experiment(s3: S3Server, prefix: str) -> Store:
    base = Store(s3.uri("cluster", prefix))
    (name,) = base.list_dirs("")
    return Store(s3.uri("cluster", f"{prefix}/{name}"))


def hosts_in_ledger(store: Store) -> dict[str, int]:
    led = Ledger(store)
    index = led.index()
    import numpy as np
    table = led.read_columns(index, np.arange(len(index.model_id)), ["host"])
    out: dict[str, int] = {}
    for h in table["host"].to_pylist():
        out[h] = out.get(h, 0) + 1
    return out


def report(name: str, **figures) -> None:
    print(f"CLUSTER {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def test_job_with_the_store_on_the_heads_disk(cluster):
    """The workers' disks are private: every artifact reaches the head's store through Ray."""
    t0 = time.time()
    r = cluster.submit(entry(cluster, ["experiment=tiny"], "local"))
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "RAY_ADDRESS=127.0.0.1:" in r.stdout          # the job's driver stays on loopback
    store = experiment(os.path.join(cluster.exp_root, "local"))
    led = Ledger(store)
    assert led.count("train") == 300 and led.count("eval") == 60
    s = summary_of(store)
    assert set(s["lds"]) == {"datamodels", "trak", "tracin", "representer", "if_cg"}
    assert s["lds"]["datamodels"]["mean"] > 0.15
    for rel in s["plots"].values():
        assert store.exists(rel)
    assert len(s["train"]["hosts"]) == 2                  # both worker nodes trained
    RESULTS["local"] = s
    RESULTS["local_wall"] = wall
    # every listening socket of the cluster is on loopback
    exposed = [row for row in listening_addresses(cluster.processes()) if not is_loopback(row[0])]
    assert not exposed, exposed
    # a client without the token is refused
    import subprocess
    bad = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    bad["RAY_AUTH_MODE"] = "disabled"
    denied = subprocess.run([os.path.join(os.path.dirname(PY), "ray"), "job", "list", "--address", cluster.url],
                            env=bad, capture_output=True, text=True)
    assert denied.returncode != 0
    report("tiny, store on the head's disk", wall_s=round(wall, 1), models=TINY,
           lds=round(s["lds"]["datamodels"]["mean"], 3))


def readme_tiny_job() -> str:
    """The README's `ray job submit` of the tiny preset, as written (continuations joined)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = f.read().split("```")
    for block in blocks[1::2]:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            if "ray job submit" in line and "experiment=tiny" in line:
                return " ".join(line.split())
    raise AssertionError("README.md has no `ray job submit` of experiment=tiny")


def test_the_readme_job_runs_as_written(cluster, tmp_path):
    """The README's tiny job, from the repository root, with only the head's address and the
    experiment directory replaced: it ships the code with --working-dir and finishes."""
    command = readme_tiny_job()
    assert "RAY_AUTH_MODE=token" in command and "--working-dir ." in command
    where = os.path.join(cluster.exp_root, "readme")
    command = command.replace("http://127.0.0.1:8265", cluster.url).replace("/srv/datamodels", where)
    env = dict(cluster.env, PATH=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RAY_AUTH_MODE", None)                         # the command sets it itself
    import subprocess
    r = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    store = experiment(where)
    s = summary_of(store)
    assert s["models"] == {"train": 300, "eval": 60}
    assert set(s["lds"]) == {"datamodels", "trak", "tracin", "representer", "if_cg"}
    assert os.path.exists(os.path.join(where, "mlflow.db"))
    report("the README's tiny job as written", lds=round(s["lds"]["datamodels"]["mean"], 3))


def test_job_with_the_store_on_s3(cluster, s3):
    t0 = time.time()
    r = cluster.submit(entry(cluster, ["experiment=tiny", s3_store(s3, "full")], "s3"))
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    store = s3_experiment(s3, "full")
    led = Ledger(store)
    assert led.count("train") == 300 and led.count("eval") == 60
    s = summary_of(store)
    assert set(s["lds"]) == {"datamodels", "trak", "tracin", "representer", "if_cg"}
    assert "secret" not in json.dumps(s).lower() and "testing" not in json.dumps(s)
    if "local" in RESULTS:       # same experiment, other store: the same numbers
        for method, r0 in RESULTS["local"]["lds"].items():
            assert s["lds"][method]["mean"] == pytest.approx(r0["mean"], abs=1e-9)
    report("tiny, store on S3", wall_s=round(wall, 1), models=TINY)


def test_data_debugging_stages_with_the_store_on_s3(cluster, s3):
    """stage=memorization's check by retraining and stage=mislabel (self-weights and TRAK's
    self-influence in Ray tasks, the repair models on the actors) on nodes that share no disk:
    everything they write reaches the S3 store, and the numbers are read back from there."""
    base = ["experiment=tiny", "task.targets=both", "task.label_noise=0.1", "baselines.methods=[trak]",
            "fit.prefixes=[]", s3_store(s3, "debug")]
    for extra in ([], ["stage=memorization", "memorization.verify=5", "memorization.verify_masks=4"],
                  ["stage=mislabel", "mislabel.models=4"]):
        r = cluster.submit(entry(cluster, base + extra, "debug"))
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    store = s3_experiment(s3, "debug")
    mem = json.loads(store.read_bytes("memorization.json"))
    assert mem["verify"]["models"]["models_trained"] == 6 * 4 and mem["verify"]["pairs"] == [4] * 5
    mis = json.loads(store.read_bytes("mislabel.json"))
    assert set(mis["methods"]) == {"memorization", "self_weight", "loss", "trak"}
    assert mis["methods"][mis["best"]]["found"]["0.2"] >= 0.8
    assert store.list("mislabel/self", ".parquet")
    assert store.list(f"{mis['repair']['models']['dir']}/ledger", ".parquet")
    assert len(mis["repair"]["models"]["hosts"]) == 2          # both worker nodes trained repair models
    report("tiny, memorization verify and mislabel, store on S3", best=mis["best"],
           found20=mis["methods"][mis["best"]]["found"]["0.2"])


def test_slow_run_without_faults(cluster, s3):
    """The fault tests' configuration, undisturbed: the baseline of their wall-time cost."""
    t0 = time.time()
    r = cluster.submit(entry(cluster, SLOW + [s3_store(s3, "calm")], "calm"))
    RESULTS["slow_wall"] = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:]
    index = Ledger(s3_experiment(s3, "calm")).index()
    assert index.count("train") == 300 and index.count("eval") == 60 and index.duplicates == 0
    report("slow tiny train stage, no faults", wall_s=round(RESULTS["slow_wall"], 1))


def overhead(wall: float) -> str:
    base = RESULTS.get("slow_wall")
    return f"{wall - base:+.1f} s" if base else "n/a"


def test_worker_node_lost_and_another_joins_mid_training(cluster, s3):
    """SIGKILL one worker node's process group while it trains; a new node joins: the job
    finishes with every model once, and the new node trains some of them."""
    store_arg = s3_store(s3, "nodes")
    sid = cluster.submit(entry(cluster, SLOW + [store_arg], "nodes"), wait=False)
    t0 = time.time()
    base = Store(s3.uri("cluster", "nodes"))
    while time.time() - t0 < 300:                 # a few units in, kill a node
        dirs = base.list_dirs("")
        if dirs and len(Store(s3.uri("cluster", f"nodes/{dirs[0]}")).list("ledger", ".parquet")) >= 3:
            break
        time.sleep(0.5)
    victim = cluster.nodes[-1]
    killed_at = time.time() - t0
    cluster.kill_node(victim)
    joined = cluster.add_worker()
    status = cluster.wait_job(sid, timeout=600)
    wall = time.time() - t0
    logs = cluster.job_logs(sid)
    assert status == "SUCCEEDED", logs[-4000:]
    store = s3_experiment(s3, "nodes")
    index = Ledger(store).index()
    hosts = hosts_in_ledger(store)
    on_new = sum(c for h, c in hosts.items() if h.endswith("/" + joined.node_id[:8]))
    s = summary_of(store)
    report("worker node SIGKILLed mid-training + a node joins", killed_at_s=round(killed_at, 1),
           models_lost=TINY - index.count("train") - index.count("eval"), duplicate_rows=index.duplicates,
           worker_deaths=s["train"]["pool"]["worker_deaths"], models_on_new_node=on_new, wall_s=round(wall, 1),
           overhead=overhead(wall))
    assert index.count("train") == 300 and index.count("eval") == 60
    assert index.duplicates == 0
    assert on_new > 0, hosts
    assert joined in cluster.nodes


def test_s3_endpoint_down_mid_training(cluster, s3):
    """The S3 endpoint refuses every connection for 8 s while units are being written, then
    the server is also frozen (SIGSTOP) for 6 s: writes are retried with backoff, the job
    finishes, and nothing partial is ever read as a unit."""
    store_arg = s3_store(s3, "outage")
    sid = cluster.submit(entry(cluster, SLOW + [store_arg], "outage"), wait=False)
    t0 = time.time()
    base = Store(s3.uri("cluster", "outage"))
    while time.time() - t0 < 300:
        dirs = base.list_dirs("")
        if dirs and len(Store(s3.uri("cluster", f"outage/{dirs[0]}")).list("ledger", ".parquet")) >= 3:
            break
        time.sleep(0.5)
    s3.proxy.down()
    time.sleep(8)
    s3.proxy.up()
    time.sleep(2)
    s3.pause()
    time.sleep(6)
    s3.resume()
    status = cluster.wait_job(sid, timeout=600)
    wall = time.time() - t0
    logs = cluster.job_logs(sid)
    assert status == "SUCCEEDED", logs[-4000:]
    store = s3_experiment(s3, "outage")
    led = Ledger(store)
    index = led.index()
    s = summary_of(store)
    report("S3 endpoint down 8 s, then frozen 6 s, mid-training",
           models_lost=TINY - index.count("train") - index.count("eval"), duplicate_rows=index.duplicates,
           quarantined=len(led.quarantined) + len(s.get("quarantined", [])),
           retry_warnings=logs.count("retrying for up to"), wall_s=round(wall, 1), overhead=overhead(wall))
    assert index.count("train") == 300 and index.count("eval") == 60
    assert not led.quarantined and not s.get("quarantined")
    assert "retrying for up to" in logs              # the outage was seen, and ridden out


def test_driver_killed_and_job_submitted_again(cluster):
    """SIGKILL the job's driver mid-training, submit the same job again: it trains only what
    the ledger lacks and ends with the numbers of an uninterrupted run."""
    root = os.path.join(cluster.exp_root, "resume")
    args = entry(cluster, ["experiment=tiny", "train.models_per_unit=10"], "resume")
    sid = cluster.submit(args, wait=False)
    t0 = time.time()
    ledger_dir = None
    while time.time() - t0 < 300:
        if os.path.isdir(root):
            dirs = [d for d in os.listdir(root) if d.startswith("tiny-")]
            if dirs:
                ledger_dir = os.path.join(root, dirs[0], "ledger")
                if os.path.isdir(ledger_dir) and \
                        len([f for f in os.listdir(ledger_dir) if f.endswith(".parquet")]) >= 4:
                    break
        time.sleep(0.2)
    drivers = [p for p in psutil.process_iter(["cmdline"])
               if "orchestrator" in " ".join(p.info["cmdline"] or []) and root in " ".join(p.info["cmdline"] or [])
               and (p.info["cmdline"] or [""])[0].endswith("python")]
    assert drivers, "no driver process found"
    for p in drivers:
        p.kill()
    cluster.wait_job(sid, timeout=120)
    time.sleep(2)          # units its actors were finishing when the driver died land now, or never
    done_before = Ledger(Store(os.path.dirname(ledger_dir))).index()
    before = done_before.count("train") + done_before.count("eval")
    t1 = time.time()
    r = cluster.submit(args)
    wall = time.time() - t1
    total = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:]
    store = experiment(root)
    s = summary_of(store)
    index = Ledger(store).index()
    report("driver SIGKILLed, job submitted again", models_before_kill=before,
           trained_after=s["train"]["models_trained"], models_lost=TINY - index.count("train") - index.count("eval"),
           models_trained_twice=before + s["train"]["models_trained"] - TINY, duplicate_rows=index.duplicates,
           resubmit_wall_s=round(wall, 1), total_wall_s=round(total, 1),
           overhead=f"{total - RESULTS['local_wall']:+.1f} s" if "local_wall" in RESULTS else "n/a")
    assert index.count("train") == 300 and index.count("eval") == 60
    assert s["train"]["models_trained"] <= TINY - before + 20     # at most the units in flight at the kill
    assert index.duplicates == 0
    ref = RESULTS.get("local")
    if ref is not None:
        for method, r0 in ref["lds"].items():
            assert s["lds"][method]["mean"] == pytest.approx(r0["mean"], abs=1e-9), method


def test_sweep_points_run_concurrently_on_the_cluster(cluster):
    """`-m masks.alpha=0.25,0.5,0.75` as one job: three drivers at once, three ledgers, three
    MLflow parent runs."""
    small = ["experiment=tiny", "masks.n_train=60", "masks.n_eval=10", "baselines.methods=[]", "fit.prefixes=[]"]
    quoted = " ".join(shlex.quote(a) for a in small)
    cmd = (f"cd {REPO} && {PY} -m orchestrator -m masks.alpha=0.25,0.5,0.75 {quoted} "
           f"exp.root={cluster.exp_root}/sweep tracking.uri=sqlite:///{cluster.root}/mlflow-sweep.db")
    t0 = time.time()
    r = cluster.submit(cmd)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    root = os.path.join(cluster.exp_root, "sweep")
    dirs = sorted(d for d in os.listdir(root) if d.startswith("tiny-"))
    assert len(dirs) == 3
    alphas = sorted(summary_of(Store(os.path.join(root, d)))["alpha"] for d in dirs)
    assert alphas == [0.25, 0.5, 0.75]
    spans = []
    for line in r.stdout.splitlines():
        if line.startswith("sweep: point") and "finished in" in line:
            start = line.split("start ")[1].split(",")[0]
            end = line.split("end ")[1].rstrip(")")
            spans.append((start, end))
    assert len(spans) == 3
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans   # all three ran at the same time
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{cluster.root}/mlflow-sweep.db")
    exp = client.get_experiment_by_name("tiny")
    parents = [x for x in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in x.data.tags]
    assert sorted(x.data.params["masks.alpha"] for x in parents) == ["0.25", "0.5", "0.75"]
    report("sweep of 3 points", wall_s=round(wall, 1), spans=spans)
