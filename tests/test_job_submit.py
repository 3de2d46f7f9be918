"""`ray job submit` of the tiny experiment to a real head node started here (token auth).

The head runs with `ray start --block` in its own process group, so tearing it down stops
exactly this cluster (not the session's local Ray instance used by other tests).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from orchestrator.ledger import Ledger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open while choosing, so no repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def head(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    # Every port the head binds is chosen here: the session's local Ray instance (other
    # tests) already holds the defaults, e.g. the dashboard agent's 52365, and a head whose
    # job agent cannot bind never registers it ("No available agent to submit job").
    gcs, dash, agent_http, agent_grpc, runtime_env, metrics, client = free_ports(7)
    temp = f"/tmp/ray-jobtest-{secrets.token_hex(3)}"
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
         "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        r = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None:
            pytest.fail(f"ray start failed: {proc.stderr.read()[-2000:]}")
        time.sleep(2)
    else:
        pytest.fail("the Ray head's dashboard did not come up in 120 s")
    try:
        yield url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_tiny_experiment(head, tmp_path):
    url, env = head
    root = tmp_path / "runs"
    entry = (f"cd {REPO} && {sys.executable} -m orchestrator experiment=tiny exp.root={root} "
             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    # A fresh head answers "No available agent to submit job" until its job agent has
    # registered (seconds, longer on a loaded machine): wait for that, nothing else.
    deadline = time.time() + 120
    while True:
        r = subprocess.run([RAY, "job", "submit", "--address", url, "--", "bash", "-c", entry],
                           env=env, capture_output=True, text=True, timeout=600)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    assert "datamodels" in r.stdout  # the results table came back through the job's logs
    dirs = [d for d in os.listdir(root) if d.startswith("tiny-")]
    assert len(dirs) == 1
    led = Ledger(str(root / dirs[0] / "ledger"))
    assert led.count("train") == 300 and led.count("eval") == 60

    # a client without the token is refused
    bad = dict(env)
    bad.pop("RAY_AUTH_TOKEN_PATH")
    bad["RAY_AUTH_MODE"] = "disabled"
    r2 = subprocess.run([RAY, "job", "list", "--address", url], env=bad, capture_output=True, text=True)
    assert r2.returncode != 0
