"""A Ray cluster whose nodes share nothing but Ray and the store, on one machine.

The head is a real `ray start --head` on 127.0.0.1 with token auth and 0 CPUs (every task
and actor runs on a worker node). Each worker node is a real `ray start --address ...`
inside its own mount namespace (`unshare --mount`), with a private tmpfs over the
experiment root, over its Ray temporary directory and over /dev/shm, so no file passes
between nodes except through the store (or Ray). Every process group started here is
stopped here, and only those: `ray stop` would kill every Ray on the machine.

Loopback: Ray 2.60 on Linux swaps a 127.0.0.1 node address for the machine's external one
unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see orchestrator/scheduling/cluster.py), and with that
variable `ray start --address` refuses to join. The worker launcher below therefore runs
Ray's own `ray start` entry point with Ray's join check passed and its loopback rewrite
off, in that one process (its children get the variable); everything else is stock Ray.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

WORKER_LAUNCHER = r"""
import os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from ray._private import ray_constants, services
ray_constants.ENABLE_RAY_CLUSTER = True          # pass `ray start`'s join check ...
services.resolve_ip_for_localhost = lambda address: address   # ... and keep 127.0.0.1
from ray.scripts.scripts import main
sys.argv = ["ray"] + sys.argv[1:]
main()
"""


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


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL, wait: float = 30) -> None:
    """Signal a process group and every descendant (in case one left the group)."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for pid in family:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp: str
    node_id: str = ""


class Cluster:
    def __init__(self, root: str, env_extra: dict | None = None):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.exp_root = os.path.join(root, "runs")           # the driver's; private on workers
        os.makedirs(self.exp_root, exist_ok=True)
        token = os.path.join(root, "auth_token")
        with open(token, "w") as f:
            f.write(secrets.token_hex(32))
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN_PATH=token, **LOOPBACK, **(env_extra or {}))
        self.env.pop("RAY_ADDRESS", None)
        # every node imports the project as `make` installed it, as a user's nodes do: no
        # PYTHONPATH to the repository (a job that needs more ships it with --working-dir)
        self.env.pop("PYTHONPATH", None)
        # `python` and `ray` on every node's PATH are this virtualenv's, as in the image
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        self.nodes: list[Node] = []
        self.head = None
        self.url = None
        self.gcs = None
        self._launcher = os.path.join(root, "ray_worker_node.py")
        with open(self._launcher, "w") as f:
            f.write(WORKER_LAUNCHER)

    # ------------------------------------------------------------------ nodes
    def start_head(self) -> None:
        gcs, dash, agent_http, agent_grpc, runtime_env, metrics, client = free_ports(7)
        temp = os.path.join(self.root, "head-tmp")
        env = dict(self.env, RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5")
        self.head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--port={gcs}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
             "--num-cpus=0", "--disable-usage-stats", f"--temp-dir={temp}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.gcs = f"127.0.0.1:{gcs}"
        self.url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 180
        while time.time() < deadline:
            r = subprocess.run([RAY, "job", "list", "--address", self.url], env=self.env, capture_output=True,
                               text=True)
            if r.returncode == 0:
                return
            if self.head.poll() is not None:
                raise RuntimeError(f"ray start --head failed: {self.head.stderr.read()[-2000:]}")
            time.sleep(2)
        raise RuntimeError("the Ray head's dashboard did not come up in 180 s")

    def add_worker(self, cpus: int = 1, wait: bool = True) -> Node:
        self._count = getattr(self, "_count", 0) + 1
        name = f"worker{self._count}"
        temp = os.path.join(self.root, f"{name}-tmp")
        os.makedirs(temp, exist_ok=True)
        nm, om, metrics, agent_http, agent_grpc, runtime_env = free_ports(6)
        start = [sys.executable, self._launcher, "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1",
                 "--block", f"--num-cpus={cpus}", f"--temp-dir={temp}", f"--node-manager-port={nm}",
                 f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
                 f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                 f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats"]
        # private: the experiment root, this node's Ray temp dir, and shared memory
        script = (f"mount -t tmpfs tmpfs {self.exp_root} && mount -t tmpfs tmpfs {temp} && "
                  f"mount -t tmpfs -o size=4g tmpfs /dev/shm && exec " + " ".join(start))
        before = self.alive_workers()
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        node = Node(name, proc, temp)
        self.nodes.append(node)
        if wait:
            deadline = time.time() + 120
            while not self.alive_workers() - before:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} failed to start: {proc.stderr.read()[-2000:]}")
                if time.time() > deadline:
                    raise RuntimeError(f"{name} did not join in 120 s")
                time.sleep(1)
            node.node_id = sorted(self.alive_workers() - before)[0]
        return node

    def alive_workers(self) -> set[str]:
        """Ids of the worker nodes the head counts as alive (CPU nodes; the head has 0 CPUs),
        from the dashboard's state API."""
        import urllib.request
        with open(self.env["RAY_AUTH_TOKEN_PATH"]) as f:
            token = f.read().strip()
        req = urllib.request.Request(f"{self.url}/api/v0/nodes?limit=1000&detail=true",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = json.loads(r.read())
        except OSError:
            return set()
        return {n["node_id"] for n in data["data"]["result"]["result"]
                if n.get("state") == "ALIVE" and (n.get("resources_total") or {}).get("CPU", 0) > 0}

    def kill_node(self, node: Node) -> None:
        kill_group(node.proc, signal.SIGKILL)
        self.nodes.remove(node)

    def stop(self) -> None:
        for node in list(self.nodes):
            kill_group(node.proc, signal.SIGKILL)
        self.nodes.clear()
        if self.head is not None:
            kill_group(self.head, signal.SIGTERM, wait=30)
            self.head = None

    # ------------------------------------------------------------------ jobs
    def submit(self, entry: str, wait: bool = True, timeout: int = 900) -> subprocess.CompletedProcess | str:
        """`ray job submit` of a shell command; with wait, the finished process (logs in
        stdout), else the submission id."""
        deadline = time.time() + 120
        args = [RAY, "job", "submit", "--address", self.url] + ([] if wait else ["--no-wait"]) + \
               ["--", "bash", "-c", entry]
        while True:
            r = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
            if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
                break
            time.sleep(3)
        if wait:
            return r
        for line in (r.stdout + r.stderr).splitlines():
            if "raysubmit_" in line:
                return line[line.index("raysubmit_"):].split()[0].strip("'\".,")
        raise RuntimeError(f"no submission id in: {r.stdout[-2000:]} {r.stderr[-2000:]}")

    def job_status(self, sid: str) -> str:
        r = subprocess.run([RAY, "job", "status", "--address", self.url, sid], env=self.env,
                           capture_output=True, text=True)
        text, sid = (r.stdout + r.stderr).lower(), sid.lower()
        for word in ("succeeded", "failed", "stopped", "running", "pending"):
            if f"job '{sid}' {word}" in text or f"status for job '{sid}': {word}" in text:
                return word.upper()
        return "UNKNOWN"

    def job_logs(self, sid: str) -> str:
        return subprocess.run([RAY, "job", "logs", "--address", self.url, sid], env=self.env,
                              capture_output=True, text=True).stdout

    def wait_job(self, sid: str, timeout: int = 900) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.job_status(sid)
            if st in ("SUCCEEDED", "FAILED", "STOPPED"):
                return st
            time.sleep(2)
        raise TimeoutError(f"job {sid} still running after {timeout} s")

    def processes(self):
        """Every process of this cluster (head and worker nodes, with descendants)."""
        roots = ([self.head] if self.head else []) + [n.proc for n in self.nodes]
        out = {}
        for proc in roots:
            try:
                p = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                continue
            out[p.pid] = p
            for c in p.children(recursive=True):
                out[c.pid] = c
        return out


def listening_addresses(procs) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every listening socket of `procs`."""
    rows = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.NoSuchProcess:
                name = "?"
            rows.append((c.laddr.ip, c.laddr.port, name))
    return rows


def is_loopback(ip: str) -> bool:
    import ipaddress
    a = ipaddress.ip_address(ip.split("%")[0])
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_loopback


class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of a server, that a test can take down (the listener
    closed and every connection cut: clients see "connection refused") and bring back."""

    def __init__(self, target_port: int):
        import threading
        self.target = target_port
        self.port = free_ports(1)[0]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = None
        self._cuts: list[int] = []      # byte budgets of the next connections' replies
        self.up()

    def cut_next(self, after_bytes: int, connections: int = 1) -> None:
        """Cut the next `connections` connections after `after_bytes` bytes of the server's
        reply have been relayed (a connection reset in the middle of a download)."""
        with self._lock:
            self._cuts += [after_bytes] * connections

    def up(self) -> None:
        import threading
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def down(self) -> None:
        lst, self._listener = self._listener, None
        if lst is not None:
            try:
                lst.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lst.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, lst: socket.socket) -> None:
        import threading
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
                budget = self._cuts.pop(0) if self._cuts else None
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, budget), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget is not None:
                    if len(data) >= budget:
                        dst.sendall(data[:budget])
                        break
                    budget -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class S3Server:
    """moto's standalone S3 server on 127.0.0.1 (a real process speaking HTTP), reached
    through a TcpProxy so that a test can take the endpoint down without losing its data."""

    def __init__(self, root: str, enforce_auth: bool = False, relay: bool = True):
        self.port = free_ports(1)[0]
        self.log = open(os.path.join(root, f"moto-{self.port}.log"), "w")
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0") if enforce_auth else None
        self.proc = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.3)
        self.proxy = TcpProxy(self.port) if relay else None
        self.endpoint = f"127.0.0.1:{self.proxy.port if relay else self.port}"

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, bucket: str, prefix: str = "", **opts) -> str:
        q = "&".join([f"endpoint_override={self.endpoint}", "scheme=http"] + [f"{k}={v}" for k, v in opts.items()])
        return f"s3://{bucket}/{prefix}?{q}" if prefix else f"s3://{bucket}?{q}"

    def make_bucket(self, bucket: str) -> None:
        import pyarrow.fs as pafs
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True, access_key="testing", secret_key="testing")
        fs.create_dir(bucket)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        try:
            self.resume()
        except ProcessLookupError:
            pass
        if self.proxy is not None:
            self.proxy.down()
        kill_group(self.proc, signal.SIGTERM, wait=10)
        self.log.close()


def cleanup(root: str) -> None:
    shutil.rmtree(root, ignore_errors=True)
