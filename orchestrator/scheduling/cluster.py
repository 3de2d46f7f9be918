"""Connecting to Ray: a local instance by default, the job's cluster under `ray job submit`.

Only this module decides how Ray is started, so tests, the CLI and benchmarks agree. A
local instance listens on 127.0.0.1 only. Ray 2.60 on Linux replaces a loopback node
address with the machine's external one (services.resolve_ip_for_localhost, governed by
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER), so every service would listen on all interfaces;
`loopback_only()` turns that off for this process and the Ray processes it starts. A
single-machine `ray start` head needs the same variable in its environment (tests do this).
A cluster to join is checked first (`check_address`): one that does not answer is one line
naming cluster.address within seconds, not minutes of ray.init retrying.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Keep a local instance's node address, and so every listening socket, on 127.0.0.1:
    for this process (Ray's constant, read at call time) and its children (the variable)."""
    os.environ[LOOPBACK_ENV] = "0"
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


CONNECT_TIMEOUT = 5.0     # seconds to wait for a cluster's head to answer (check_address)


def _address(cluster_cfg) -> tuple[str, str] | None:
    """(the setting that names the cluster, its address), or None for a local instance."""
    if cluster_cfg.get("address"):
        return "cluster.address", str(cluster_cfg.address)
    if os.environ.get("RAY_ADDRESS"):
        return "RAY_ADDRESS (environment)", os.environ["RAY_ADDRESS"]
    return None


def check_address(cluster_cfg, timeout: float = CONNECT_TIMEOUT) -> None:
    """A cluster to join (cluster.address, else RAY_ADDRESS) answers at its address: a TCP
    connection to the head's GCS port (or a Ray Client server's, for ray://), then a gRPC
    channel made ready, each within `timeout` seconds. Otherwise ConfigError, one line
    naming the setting, before anything is written; ray.init itself would retry for minutes
    ("Failed to connect to GCS")."""
    import socket

    named = _address(cluster_cfg)
    if named is None:
        return
    key, address = named
    if address in ("auto", "local"):
        return                 # Ray finds (or starts) the local instance itself
    unset = ("leave cluster.address unset" if key == "cluster.address" else "unset RAY_ADDRESS") + \
        " to run on a local Ray instance"
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}={address} is not HOST:PORT (the head's GCS address, port 6379 by default, e.g. "
                          f"cluster.address=10.0.0.1:6379); fix it, or {unset}")
    why = None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        if isinstance(err, socket.gaierror):
            why = f"unknown host {host!r}"
        elif isinstance(err, TimeoutError):
            why = f"no answer within {timeout:g} s"
        else:
            why = (err.strerror or str(err) or type(err).__name__).lower()
    if why is None and os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        # something listens there; a Ray head speaks gRPC (HTTP/2): a port of anything else
        # would keep ray.init retrying as well
        import grpc
        channel = grpc.insecure_channel(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                                        options=[("grpc.enable_http_proxy", 0)])      # as Ray's own channels
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            why = f"something listens there, but no gRPC server answered within {timeout:g} s"
        finally:
            channel.close()
    if why is not None:
        raise ConfigError(f"{key}={address}: no Ray cluster answers at {host}:{port} ({why}); start it "
                          f"(`ray start --head`), fix the address, or {unset}")


def connect(cluster_cfg) -> None:
    """ray.init once per process: join `cluster.address` or RAY_ADDRESS if set, else start
    a local instance bound to 127.0.0.1 with the driver's import path."""
    import ray

    if ray.is_initialized():
        return
    from workers.logs import quiet_libraries
    quiet_libraries()           # Ray's notice that token auth is on, unless hydra.verbose
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cluster_cfg.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(cluster_cfg)       # one line, not minutes of "Failed to connect to GCS"
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost", "::1", "[::1]"):
            loopback_only()      # a cluster on loopback is one machine: keep Ray from leaving it
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    # Workers must import what the driver imports (a user's task module included).
    path = [os.getcwd()] + [p for p in sys.path if p and os.path.isdir(p) and "site-packages" not in p]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    kwargs: dict[str, Any] = {}
    if cluster_cfg.get("num_cpus") is not None:
        kwargs["num_cpus"] = int(cluster_cfg.num_cpus)
    if cluster_cfg.get("num_gpus") is not None:
        kwargs["num_gpus"] = int(cluster_cfg.num_gpus)
    loopback_only()
    log.info("starting a local Ray instance (listening on 127.0.0.1 only)")
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
                                       "RAY_USAGE_STATS_ENABLED": "0"}},
             **kwargs)


def in_worker() -> bool:
    """True in a Ray worker process (a task or an actor), False on the driver or outside Ray."""
    try:
        import ray
        return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except (ImportError, AttributeError):
        return False


def worker_logging() -> None:
    """In a Ray worker: our log lines in the driver's format (workers.logs.worker_format)."""
    if in_worker():
        from workers.logs import worker_format
        worker_format()


def worker_setup(threads: float | int | None, store_handle=None):
    """What every Ray task and actor of ours does first: our log format, torch's threads (the
    CPUs it was given), and the store (reached directly, or through the driver's node where it
    is a local directory there: scheduling.serve). Returns the store, or None without a handle."""
    worker_logging()
    try:
        import torch
        torch.set_num_threads(max(1, int(threads or 1)))
    except ImportError:
        pass
    return store_handle.open() if store_handle is not None else None
