"""One Ray work pool for every stage: bounded work in flight on workers that may die.

A stage gives the pool its items and a way to make workers (persistent actors, or
stateless tasks). The pool claims items in the store (so concurrent drivers split the
work), keeps a bounded number in flight per worker, and calls the stage back with each
result. When a worker dies its items go back to the queue, never to the dead worker, and
it is replaced after a backoff, up to a budget of deaths; the pool grows when nodes join
and shrinks when they leave. An item fails the run only after failing, for a reason of
its own, on several different workers; then the error is one line naming it.
"""
from __future__ import annotations

import collections
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """Work that cannot be finished: one line naming the item or the budget."""


@dataclass
class Item:
    key: str                 # unique within the stage; also the claim's name
    payload: Any             # what the worker is called with
    size: int = 1            # progress units (models, targets, methods)
    failures: dict = field(default_factory=dict)   # worker id -> last error line
    tries: int = 0           # times it failed for a reason of its own
    deaths: int = 0          # workers that died while running it


def _system_errors():
    import ray.exceptions as E
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
             "NodeDiedError", "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError",
             "RaySystemError", "ObjectFetchTimedOutError", "ReferenceCountingAssertionError",
             "ActorPlacementGroupRemoved", "TaskPlacementGroupRemoved", "OutOfMemoryError",
             "NodeDiedError", "TaskCancelledError")
    return tuple(getattr(E, n) for n in names if hasattr(E, n))


def error_line(err: BaseException) -> str:
    """The last meaningful line of an error (the user's exception, not Ray's wrapping)."""
    cause = getattr(err, "cause", None)
    if cause is not None and cause is not err:
        err = cause
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


class Progress:
    """A progress bar on a terminal; on a log file, a line every `step` of the total."""

    def __init__(self, total: int, desc: str, unit: str, step: float = 0.05):
        self.total, self.desc, self.unit, self.step = max(int(total), 0), desc, unit, step
        self.done, self._next = 0, step
        self.t0 = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, unit=unit, desc=desc, dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done / self.total >= self._next - 1e-9:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            log.info("%s: %d/%d %ss (%.0f%%, %.1f/s)", self.desc, self.done, self.total, self.unit,
                     100 * self.done / self.total, rate)
            while self.done / self.total >= self._next - 1e-9:
                self._next += self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Worker:
    wid: int
    handle: Any
    ready: bool = False
    running: list = field(default_factory=list)   # object refs, oldest first
    failed_items: int = 0                          # consecutive items that failed on it


class Pool:
    """Run items on Ray workers until every one is done (by this driver or another).

    spawn(): a new worker handle (an actor), or None for stateless tasks.
    submit(handle, payload): an ObjectRef for the item's result.
    capacity(): how many workers the cluster can hold now (its resources, the user's cap).
    done(items): the keys among `items` whose outputs are already in the store.
    on_result(item, result): called on the driver for every finished item.
    """

    def __init__(self, name: str, *, submit: Callable, spawn: Callable | None = None,
                 capacity: Callable[[], int], per_worker: int = 2, claims=None,
                 done: Callable | None = None, on_result: Callable | None = None,
                 max_deaths: int = 100, item_workers: int = 3, item_deaths: int = 5, unit: str = "item",
                 poll_seconds: float = 1.0):
        self.name, self.submit_fn, self.spawn_fn = name, submit, spawn
        self.capacity, self.per_worker, self.claims = capacity, max(1, int(per_worker)), claims
        self.done_fn, self.on_result = done, on_result
        self.max_deaths, self.item_workers, self.item_deaths = int(max_deaths), int(item_workers), int(item_deaths)
        self.unit, self.poll = unit, float(poll_seconds)
        self.stats = {"items": 0, "done_here": 0, "done_elsewhere": 0, "worker_deaths": 0,
                      "item_failures": 0, "resubmitted": 0, "workers_started": 0}

    # ------------------------------------------------------------------ workers
    def _spawn(self, workers: dict, refs: dict) -> None:
        wid = self._next_wid
        self._next_wid += 1
        if self.spawn_fn is None:
            workers[wid] = _Worker(wid, None, ready=True)
        else:
            handle = self.spawn_fn()
            workers[wid] = _Worker(wid, handle)
            refs[handle.ready.remote()] = ("ready", wid, None)
        self.stats["workers_started"] += 1

    def _retire(self, workers: dict, wid: int) -> None:
        import ray
        w = workers.pop(wid, None)
        if w is not None and w.handle is not None:
            try:
                ray.kill(w.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # ------------------------------------------------------------------ main loop
    def run(self, items: list[Item]) -> dict:
        import ray
        system_errors = _system_errors()
        self._next_wid, self._start_failures = 0, 0
        self.stats["items"] = len(items)
        queue = collections.deque(items)          # claimed by us or not yet claimed
        mine: set[str] = set()                    # keys we hold claims on
        waiting: dict[str, Item] = {}             # held by other live drivers
        workers: dict[int, _Worker] = {}
        refs: dict = {}                           # ref -> ("ready"|"item", wid, item)
        deaths_in_a_row, next_spawn = 0, 0.0
        last_check = 0.0
        total = sum(it.size for it in items)
        bar = Progress(total, self.name, self.unit)
        try:
            while queue or waiting or any(kind == "item" for kind, _, _ in refs.values()):
                now = time.monotonic()
                in_flight = sum(1 for kind, _, _ in refs.values() if kind == "item")
                # -- size the pool to the cluster and the work left
                # at least one, so that a pending worker is the demand an autoscaler answers
                want = max(1, min(self.capacity(), -(-(len(queue) + in_flight) // self.per_worker)))
                if len(workers) < want and now >= next_spawn:
                    for _ in range(want - len(workers)):
                        self._spawn(workers, refs)
                elif len(workers) > want:
                    for wid in [w.wid for w in workers.values() if not w.running][: len(workers) - want]:
                        if not workers[wid].ready or self.spawn_fn is None:
                            self._retire(workers, wid)
                # -- claim and dispatch
                free = [w for w in workers.values() if w.ready and len(w.running) < self.per_worker]
                slots = sum(self.per_worker - len(w.running) for w in free)
                if slots and queue:
                    batch = []
                    while queue and len(batch) < slots:
                        batch.append(queue.popleft())
                    batch = self._claim(batch, mine, waiting)
                    for item in batch:
                        w = min((w for w in workers.values() if w.ready and len(w.running) < self.per_worker
                                 and w.wid not in item.failures),
                                key=lambda w: len(w.running), default=None)
                        if w is None:
                            w = min((w for w in workers.values() if w.ready and len(w.running) < self.per_worker),
                                    key=lambda w: len(w.running))
                        ref = self.submit_fn(w.handle, item.payload)
                        w.running.append(ref)
                        refs[ref] = ("item", w.wid, item)
                # -- wait for something to happen
                if not refs:
                    if waiting and now - last_check >= self.poll:
                        last_check = now
                        self._check_waiting(waiting, queue, mine, bar)
                    time.sleep(self.poll if waiting else 0.05)
                    continue
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll)
                for ref in ready:
                    kind, wid, item = refs.pop(ref)
                    w = workers.get(wid)
                    if w is not None and ref in w.running:
                        w.running.remove(ref)
                    try:
                        out = ray.get(ref)
                    except system_errors as err:
                        deaths_in_a_row += 1
                        next_spawn = time.monotonic() + min(30.0, 0.5 * 2 ** min(deaths_in_a_row, 6))
                        self._worker_died(workers, refs, wid, item, err, queue)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        if kind == "ready":       # the worker's constructor raised: a death
                            deaths_in_a_row += 1
                            next_spawn = time.monotonic() + min(30.0, 0.5 * 2 ** min(deaths_in_a_row, 6))
                            self._worker_died(workers, refs, wid, None, err, queue)
                            continue
                        self._item_failed(workers, wid, item, err, queue)
                        continue
                    if kind == "ready":
                        if w is not None:
                            w.ready = True
                        self._start_failures = 0
                        continue
                    deaths_in_a_row = 0
                    if w is not None:
                        w.failed_items = 0
                    self.stats["done_here"] += 1
                    bar.update(item.size)
                    if self.on_result is not None:
                        self.on_result(item, out)
                    if self.claims is not None and item.key in mine:
                        self.claims.release(self.name, item.key)
                        mine.discard(item.key)
                if waiting and time.monotonic() - last_check >= max(self.poll, 2.0):
                    last_check = time.monotonic()
                    self._check_waiting(waiting, queue, mine, bar)
        finally:
            bar.close()
            for wid in list(workers):
                self._retire(workers, wid)
            if self.claims is not None:
                for key in mine:
                    try:
                        self.claims.release(self.name, key)
                    except Exception:  # noqa: BLE001 - the lease expires anyway
                        pass
        return self.stats

    # ------------------------------------------------------------------ claims
    def _claim(self, batch: list[Item], mine: set, waiting: dict) -> list[Item]:
        """The items of `batch` this driver may run now; the others wait in `waiting`."""
        if self.claims is None:
            return batch
        todo = [it for it in batch if it.key not in mine]
        won = set(self.claims.claim(self.name, [it.key for it in todo])) if todo else set()
        out = []
        for it in batch:
            if it.key in mine or it.key in won:
                mine.add(it.key)
                out.append(it)
            else:
                waiting[it.key] = it
        return out

    def _check_waiting(self, waiting: dict, queue, mine: set, bar: Progress) -> None:
        """Items held by other drivers: drop those now done, take back those whose owner died."""
        items = list(waiting.values())
        done = set(self.done_fn(items)) if self.done_fn is not None else set()
        others = self.claims.held_by_others(self.name, [it.key for it in items]) if self.claims else set()
        for it in items:
            if it.key in done:
                del waiting[it.key]
                self.stats["done_elsewhere"] += 1
                bar.update(it.size)
            elif it.key not in others:
                del waiting[it.key]
                queue.append(it)      # its owner is gone: claim it again

    # ------------------------------------------------------------------ failures
    def _worker_died(self, workers, refs, wid, item, err, queue) -> None:
        self.stats["worker_deaths"] += 1
        w = workers.get(wid)
        if w is not None and not w.ready:
            # a worker that never started: its constructor (or its node) fails it
            self._start_failures = getattr(self, "_start_failures", 0) + 1
            if self._start_failures >= 3:
                raise PoolError(f"{self.name}: workers fail to start ({error_line(err)[:400]})")
        lost = []
        if item is not None:
            lost.append(item)
        if w is not None:
            for ref in list(w.running):       # its other items go back too (never to it)
                kind, _, other = refs.pop(ref, (None, None, None))
                if kind == "item":
                    lost.append(other)
            w.running.clear()
        self._retire(workers, wid)
        running = lost[0] if lost else None
        if running is not None:
            running.deaths += 1
        log.warning("%s: worker %d died (%s); %d item(s) back to the queue", self.name, wid,
                    error_line(err)[:200], len(lost))
        if self.stats["worker_deaths"] > self.max_deaths:
            raise PoolError(f"{self.name}: {self.stats['worker_deaths']} workers died (budget {self.max_deaths}; "
                            f"last: {error_line(err)[:300]}); finished work is in the store, re-run to resume")
        if running is not None and running.deaths >= self.item_deaths:
            raise PoolError(f"{self.name}: {running.key} was running on {running.deaths} workers that died "
                            f"(last: {error_line(err)[:300]}); it may be killing them (out of memory?)")
        self.stats["resubmitted"] += len(lost)
        for it in reversed(lost):
            queue.appendleft(it)

    def _item_failed(self, workers, wid, item, err, queue) -> None:
        self.stats["item_failures"] += 1
        line = error_line(err)
        item.failures[wid] = line
        w = workers.get(wid)
        if w is not None:
            w.failed_items += 1
            if w.failed_items >= self.item_workers and self.spawn_fn is not None:
                log.warning("%s: worker %d failed %d items in a row; replacing it", self.name, wid, w.failed_items)
                self._retire(workers, wid)
        item.tries += 1
        distinct = len(item.failures)
        if distinct >= self.item_workers or item.tries >= 2 * self.item_workers:
            raise PoolError(f"{self.name}: {item.key} failed on {distinct} worker(s): {line[:400]}")
        log.warning("%s: %s failed on worker %d (%s); retrying on another", self.name, item.key, wid, line[:200])
        self.stats["resubmitted"] += 1
        queue.appendleft(item)


def shuffled(items: list[Item], seed: str) -> list[Item]:
    """Items in an order of this driver's own, so that concurrent drivers rarely collide."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
