"""A local store on a cluster, served to the other nodes: `StoreServer`, an actor pinned
to the driver's node, does the store calls of tasks that run elsewhere (`RemoteStore`);
`StoreHandle.open()` picks the store itself where it can be reached directly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from orchestrator.storage.store import CorruptFile, Store, StoreError
from orchestrator.uris import is_remote


# ----------------------------------------------------------------------------- serving
class StoreServer:
    """A Ray actor on the driver's node that performs store calls for tasks on other nodes
    when the store is a local directory there (threaded: calls run concurrently)."""

    def __init__(self, uri: str, retry_seconds: float = 60.0):
        self.store = Store(uri, retry_seconds)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.store, method)(*args, **kwargs)

    def ping(self) -> bool:
        return True


class RemoteStore:
    """The `Store` interface, served by a `StoreServer` actor."""

    def __init__(self, server, uri: str):
        self._server, self.uri, self.remote = server, uri, False

    def __getattr__(self, method: str):
        import ray
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs):
            try:
                return ray.get(self._server.call.remote(method, *args, **kwargs))
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if getattr(err, "cause", None) is not None else err
                if isinstance(cause, (StoreError, CorruptFile, FileNotFoundError)):
                    raise cause from None
                raise
        return call


@dataclass
class StoreHandle:
    """What a task or actor gets to reach the store: the URI, and for a local store the
    actor that serves it from the driver's node. `open()` returns a `Store` where the
    store is reachable directly (an object store, or the driver's own node), else a
    `RemoteStore`."""

    uri: str
    server: Any = None
    node_id: str | None = None
    retry_seconds: float = 60.0

    def open(self):
        if self.server is not None and not is_remote(self.uri):
            import ray
            if ray.is_initialized() and ray.get_runtime_context().get_node_id() != self.node_id:
                return RemoteStore(self.server, self.uri)
        return Store(self.uri, self.retry_seconds)

    def close(self, wait_seconds: float = 10.0) -> None:
        """Stop the serving actor (the driver does, when its run ends). The reference is
        kept until the actor is seen dead: dropped earlier, Ray 2.60 may also start a
        graceful exit of this threaded actor, whose teardown aborts with a C++ stack trace
        printed on the driver's console (seen in 10 of 117 runs)."""
        if self.server is None:
            return
        import ray
        server, self.server = self.server, None
        try:
            ray.kill(server, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            return
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            try:
                ray.get(server.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - ActorDiedError (what we wait for), or a timeout
                return
            time.sleep(0.05)


def serve(store: Store) -> StoreHandle:
    """The handle that tasks get: for a local store, start the serving actor on this
    (the driver's) node; an object store needs none."""
    import ray
    if store.remote:
        return StoreHandle(store.uri, retry_seconds=store.retry_seconds)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    node_id = ray.get_runtime_context().get_node_id()
    server = ray.remote(StoreServer).options(
        num_cpus=0, max_concurrency=16, max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(store.uri, store.retry_seconds)
    return StoreHandle(store.uri, server, node_id, store.retry_seconds)
