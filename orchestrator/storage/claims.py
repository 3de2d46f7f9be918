"""Claims: one owner per work item at a time, across drivers, through the store alone.

A driver claims an item by writing `claims/<stage>/<item>~<owner>` and then listing the
item's claims: among the claims of live owners the oldest (by the store's own timestamp,
then by owner name) wins and the others withdraw. An owner is live while its heartbeat
object `claims/owners/<owner>` is fresher than the lease (`store.lease_seconds`), and is
known dead at once when it ran on this host and its process is gone; a dead owner's claims
are taken over. Works on a local directory and on object stores (no locks, no conditional
writes); where two claims carry the same timestamp both owners may train the item, and
the ledger keeps one copy.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from orchestrator.storage.store import Layout

log = logging.getLogger(__name__)

SEP = "~"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    def __init__(self, store, lease_seconds: float = 60.0, owner: str | None = None):
        self.store = store
        self.lease = float(lease_seconds)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = owner or f"{self.host}.{self.pid}.{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owners_dir = f"{Layout.CLAIMS}/owners"
        self.others_seen = False     # has another live driver been seen on this store?

    # ------------------------------------------------------------------ heartbeat
    def start(self) -> Claims:
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        body = json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "time": time.time()})
        self.store.write_bytes(f"{self._owners_dir}/{self.owner}", body.encode())

    def _loop(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self._beat()
            except Exception as err:  # noqa: BLE001 - a missed beat only shortens the lease
                log.warning("claims: heartbeat failed (%s)", str(err).splitlines()[0][:200])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.store.delete(f"{self._owners_dir}/{self.owner}")
        except Exception:  # noqa: BLE001 - best effort; the lease expires anyway
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ owners
    def _live_owners(self) -> set[str]:
        entries = self.store.list(self._owners_dir)
        mine = [e for e in entries if e.name == self.owner]
        now = mine[0].mtime if mine else time.time()   # the store's clock, where it has one
        live = set()
        for e in entries:
            if e.name == self.owner:
                live.add(e.name)
                continue
            if now - e.mtime > self.lease:
                continue
            host, pid = self._host_pid(e.name)
            if host == self.host and pid is not None and not pid_alive(pid):
                continue
            live.add(e.name)
            self.others_seen = True
        live.add(self.owner)
        return live

    @staticmethod
    def _host_pid(owner: str):
        parts = owner.rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            return parts[0], int(parts[1])
        return None, None

    def _entries(self, stage: str) -> dict[str, list]:
        out: dict[str, list] = {}
        for e in self.store.list(f"{Layout.CLAIMS}/{stage}"):
            item, _, owner = e.name.rpartition(SEP)
            if item:
                out.setdefault(item, []).append((e.mtime, owner, e.rel))
        return out

    # ------------------------------------------------------------------ claiming
    def claim(self, stage: str, items: list[str]) -> list[str]:
        """The items of `items` that this owner now holds (already held ones included)."""
        if not items:
            return []
        held = self._entries(stage)
        live = self._live_owners()
        for item in items:
            if not any(owner == self.owner for _, owner, _ in held.get(item, [])):
                if any(owner in live for _, owner, _ in held.get(item, [])):
                    continue       # someone else holds it: do not even try
                self.store.write_bytes(f"{Layout.CLAIMS}/{stage}/{item}{SEP}{self.owner}", b"")
        entries = self._entries(stage)
        won = []
        for item in items:
            contenders = sorted((mt, owner, rel) for mt, owner, rel in entries.get(item, []) if owner in live)
            mine = [rel for _, owner, rel in entries.get(item, []) if owner == self.owner]
            if contenders and contenders[0][1] == self.owner:
                won.append(item)
            else:
                for rel in mine:
                    self.store.delete(rel)
            for _, owner, rel in entries.get(item, []):
                if owner not in live:
                    self.store.delete(rel)     # a dead owner's claim: taken over
        log.debug("claims: %s asked %d, won %d", stage, len(items), len(won))
        return won

    def held_by_others(self, stage: str, items) -> set[str]:
        """The items among `items` that a live other owner holds."""
        entries = self._entries(stage)
        live = self._live_owners()
        return {item for item in items
                if any(owner in live and owner != self.owner for _, owner, _ in entries.get(item, []))}

    def release(self, stage: str, item: str) -> None:
        self.store.delete(f"{Layout.CLAIMS}/{stage}/{item}{SEP}{self.owner}")
