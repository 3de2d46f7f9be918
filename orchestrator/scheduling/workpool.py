"""One Ray work pool for every stage: bounded work in flight on workers that may die.

A stage gives the pool its items and a way to make workers (persistent actors, or
stateless tasks). The pool claims items in the store (so concurrent drivers split the
work), keeps a bounded number in flight per worker, and calls the stage back with each
result. When a worker dies its items go back to the queue, never to the dead worker, and
it is replaced after a backoff; the run gives up only when more workers have died than
the budget allows. The pool grows when nodes join and shrinks when they leave. An item
fails the run only after failing, for a reason of its own, on several different workers,
and then the error is one line naming it; a fault of the environment that the store has
already retried (a full disk, refused credentials) stops the run at once.

A worker that hangs (stuck on a GPU, an NFS mount, a frozen container) raises no error: an
item that has not finished by its deadline (`unit_deadline`: a fixed number of seconds, or
a few times the median time per size unit so far) is declared lost with one warning line;
its actor is killed (or its task cancelled) and replaced, counted as a worker death, and its
items go back to the front of the queue. A late result from the killed worker is ignored.
Past its deadline, an actor that can be probed (`probe`: its process's CPU seconds, answered
while it trains) is asked first: one that is still computing (slowed by other jobs on its
cores, not stuck) is left to finish and asked again every `probe_window` seconds; one that does
not answer (stopped) or has used almost no CPU since the last answer (blocked) is hung.
"""
from __future__ import annotations

import bisect
import collections
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import UserError
from orchestrator.storage.store import StoreError

log = logging.getLogger(__name__)


class PoolError(UserError):
    """Work that cannot be finished: one line naming the item or the budget."""


@dataclass
class Item:
    key: str                 # unique within the stage; also the claim's name
    payload: Any             # what the worker is called with
    size: int = 1            # progress units (models, targets, methods)
    failures: dict = field(default_factory=dict)   # worker id -> last error line
    tries: int = 0           # times it failed for a reason of its own
    deaths: int = 0          # workers that died while running it
    timeouts: int = 0        # workers it hung on (declared lost at its deadline)


AUTO_FLOOR_SECONDS = 60.0    # the automatic deadline is never shorter than this
AUTO_FACTOR = 5.0            # ... and is this many times the median time of an item of its size
PROBE_WINDOW = 30.0          # seconds between two probes of an actor past its deadline
PROBE_ANSWER = 10.0          # seconds a probe may take to answer (a stopped process never does)
BUSY_FRACTION = 0.05         # CPU seconds per second since the last probe that count as still working


def unit_deadline(item: Item, timeout: float | None, per_size: float | None,
                  floor: float = AUTO_FLOOR_SECONDS, factor: float = AUTO_FACTOR) -> float | None:
    """Seconds `item` may run without finishing before it is declared lost, or None (no deadline).

    timeout: a number of seconds (a setting), fixed; 0: never; None: automatic, from
    per_size, the median seconds per size unit of the items finished so far: max(floor,
    factor * per_size * item.size), doubled for each time the item was declared lost before
    (a unit slower than the rest is then not killed forever). Before anything has finished
    (per_size None) the automatic deadline is None: only a set value applies then."""
    if timeout is not None:
        return float(timeout) if timeout > 0 else None
    if per_size is None:
        return None
    return max(floor, factor * per_size * max(int(item.size), 1)) * 2 ** item.timeouts


def _system_errors() -> tuple:
    """Ray's errors for work lost with its worker, node or owner (not the work's own)."""
    import ray.exceptions as E
    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
             "LocalRayletDiedError", "RaySystemError", "ObjectFetchTimedOutError", "OutOfMemoryError",
             "TaskCancelledError", "ActorPlacementGroupRemoved", "TaskPlacementGroupRemoved")
    return tuple(getattr(E, n) for n in names if hasattr(E, n))


def error_line(err: BaseException) -> str:
    """The last meaningful line of an error (the user's exception, not Ray's wrapping)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        err = cause
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text if type(err).__name__ in text else f"{type(err).__name__}: {text}"


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
    born: float
    ready: bool = False
    running: list = field(default_factory=list)   # object refs, oldest first
    failed_items: int = 0                          # items in a row that failed on it


class Pool:
    """Run items on Ray workers until every one is done (by this driver or another).

    spawn(): a new worker (an actor with a `ready()` method), or None for stateless tasks.
    submit(worker, payload): an ObjectRef for the item's result.
    capacity(): how many workers the cluster can hold now (its resources, the user's cap).
    done(items): the keys among `items` whose outputs are already in the store.
    on_result(item, result): called on the driver for every finished item.
    timeout: seconds an item may run before it is declared lost (see `unit_deadline`: None is
    automatic, 0 never); timeout_setting: the setting that holds it, named in the messages.
    probe(worker): an ObjectRef of the actor's process CPU seconds (scheduling.actors.Probed),
    asked before an item past its deadline is declared lost; None: the deadline alone decides.
    """

    def __init__(self, name: str, *, submit: Callable, spawn: Callable | None = None,
                 capacity: Callable[[], int], per_worker: int = 2, claims=None,
                 done: Callable | None = None, on_result: Callable | None = None,
                 max_deaths: int = 100, item_workers: int = 3, unit: str = "item",
                 poll_seconds: float = 1.0, fatal: tuple | None = None,
                 timeout: float | None = None, timeout_setting: str | None = None,
                 probe: Callable | None = None):
        self.name, self.submit_fn, self.spawn_fn = name, submit, spawn
        self.capacity_fn, self.per_worker, self.claims = capacity, max(1, int(per_worker)), claims
        self.done_fn, self.on_result = done, on_result
        self.max_deaths, self.item_workers = int(max_deaths), max(1, int(item_workers))
        self.unit, self.poll = unit, float(poll_seconds)
        self.fatal = fatal if fatal is not None else (StoreError,)
        self.timeout = None if timeout is None else float(timeout)
        self.timeout_setting = timeout_setting
        self.floor, self.factor = AUTO_FLOOR_SECONDS, AUTO_FACTOR   # of the automatic deadline
        self.probe_fn = probe
        self.probe_window, self.probe_answer, self.busy_fraction = PROBE_WINDOW, PROBE_ANSWER, BUSY_FRACTION
        self.stats = {"items": 0, "done_here": 0, "done_elsewhere": 0, "worker_deaths": 0,
                      "item_failures": 0, "resubmitted": 0, "workers_started": 0, "timeouts": 0,
                      "slow_not_hung": 0}

    # ------------------------------------------------------------------ state
    def _reset(self, items: list[Item]) -> None:
        self.queue = collections.deque(items)   # ours to run (claimed, or not claimed yet)
        self.mine: set[str] = set()              # keys this driver holds claims on
        self.waiting: dict[str, Item] = {}       # held by other live drivers
        self.workers: dict[int, _Worker] = {}
        self.refs: dict = {}                     # ref -> ("ready" | "item", wid, item)
        self.started: dict = {}                  # item ref -> when it started running (monotonic)
        self.probed: dict = {}                   # item ref past its deadline -> (when, CPU seconds) last probed
        self.slow_items: set[str] = set()        # items found computing past their deadline (said once)
        self.per_size: list[float] = []          # seconds per size unit of finished items, sorted
        self.next_wid = 0
        self.deaths_in_a_row = 0
        self.start_failures = 0
        self.next_spawn = 0.0
        self._capacity = (0.0, 1)
        self.stats["items"] = len(items)

    def _in_flight(self) -> int:
        return sum(1 for kind, _, _ in self.refs.values() if kind == "item")

    def _median(self) -> float | None:
        """The median seconds per size unit of the items finished here so far (None: none yet)."""
        n = len(self.per_size)
        if not n:
            return None
        return self.per_size[n // 2] if n % 2 else 0.5 * (self.per_size[n // 2 - 1] + self.per_size[n // 2])

    def _finished(self, w: _Worker | None, ref, item: Item | None, ok: bool) -> None:
        """`ref` is done on `w`: an actor starts its next queued item now; a success's time
        counts toward the median."""
        t0 = self.started.pop(ref, None)
        self.probed.pop(ref, None)
        now = time.monotonic()
        if ok and t0 is not None and item is not None:
            bisect.insort(self.per_size, (now - t0) / max(int(item.size), 1))
        if w is None or ref not in w.running:
            return
        w.running.remove(ref)
        if w.handle is not None and w.running and w.running[0] not in self.started:
            self.started[w.running[0]] = now    # an actor runs its items one after another

    def _capacity_now(self) -> int:
        """capacity(), asked at most every 2 s."""
        at, value = self._capacity
        if time.monotonic() - at > 2.0:
            value = int(self.capacity_fn())
            self._capacity = (time.monotonic(), value)
        return value

    # ------------------------------------------------------------------ workers
    def _spawn(self) -> None:
        wid = self.next_wid
        self.next_wid += 1
        if self.spawn_fn is None:
            self.workers[wid] = _Worker(wid, None, time.monotonic(), ready=True)
        else:
            handle = self.spawn_fn()
            self.workers[wid] = _Worker(wid, handle, time.monotonic())
            self.refs[handle.ready.remote()] = ("ready", wid, None)
        self.stats["workers_started"] += 1

    def _retire(self, wid: int) -> list[Item]:
        """Stop a worker and forget its refs; returns the items it held, oldest first."""
        import ray
        w = self.workers.pop(wid, None)
        held = []
        for ref, (kind, owner, item) in list(self.refs.items()):
            if owner == wid:
                del self.refs[ref]
                self.started.pop(ref, None)
                if kind == "item":
                    held.append((w.running.index(ref) if w and ref in w.running else 0, item))
        if w is not None and w.handle is not None:
            try:
                ray.kill(w.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        return [item for _, item in sorted(held, key=lambda x: x[0])]

    def _size_pool(self) -> None:
        """As many workers as the cluster holds and the work left needs (at least one, so
        that a pending worker is the demand an autoscaler answers)."""
        left = len(self.queue) + self._in_flight()
        want = max(1, min(self._capacity_now(), -(-left // self.per_worker)))
        now = time.monotonic()
        if len(self.workers) < want and now >= self.next_spawn:
            for _ in range(want - len(self.workers)):
                self._spawn()
        elif len(self.workers) > want:
            # workers the cluster cannot place (a node left): stop those long pending
            stale = [w.wid for w in self.workers.values() if not w.ready and now - w.born > 30]
            for wid in stale[: len(self.workers) - want]:
                self.queue.extendleft(reversed(self._retire(wid)))

    def _dispatch(self, bar: Progress) -> None:
        free = [w for w in self.workers.values() if w.ready and len(w.running) < self.per_worker]
        slots = sum(self.per_worker - len(w.running) for w in free)
        if not slots or not self.queue:
            return
        batch = [self.queue.popleft() for _ in range(min(slots, len(self.queue)))]
        for item in self._claim(batch, bar):
            open_ = [w for w in self.workers.values() if w.ready and len(w.running) < self.per_worker]
            fresh = [w for w in open_ if w.wid not in item.failures] or open_
            w = min(fresh, key=lambda w: len(w.running))
            ref = self.submit_fn(w.handle, item.payload)
            if w.handle is None or not w.running:   # a task starts now; an actor's next, when idle
                self.started[ref] = time.monotonic()
            w.running.append(ref)
            self.refs[ref] = ("item", w.wid, item)

    # ------------------------------------------------------------------ main loop
    def run(self, items: list[Item]) -> dict:
        import ray
        system_errors = _system_errors()
        self._reset(items)
        bar = Progress(sum(it.size for it in items), self.name, self.unit)
        last_check = 0.0
        try:
            while self.queue or self.waiting or self._in_flight():
                self._size_pool()
                self._dispatch(bar)
                if self.waiting and time.monotonic() - last_check >= max(self.poll, 2.0):
                    last_check = time.monotonic()
                    self._check_waiting(bar)
                if not self.refs:
                    time.sleep(self.poll if self.waiting else 0.05)
                    continue
                ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=self.poll)
                for ref in ready:
                    if ref not in self.refs:       # dropped with a retired worker
                        continue
                    kind, wid, item = self.refs.pop(ref)
                    w = self.workers.get(wid)
                    try:
                        out = ray.get(ref)
                    except system_errors as err:
                        self._finished(w, ref, item, ok=False)
                        self._worker_died(wid, item, err, kind)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        self._finished(w, ref, item, ok=False)
                        if kind == "ready":
                            self._worker_died(wid, None, err, kind)
                        else:
                            self._item_failed(wid, item, err)
                        continue
                    self._finished(w, ref, item, ok=kind == "item")
                    if kind == "ready":
                        if w is not None:
                            w.ready = True
                        self.start_failures = 0
                        continue
                    self.deaths_in_a_row = 0
                    if w is not None:
                        w.failed_items = 0
                    self.stats["done_here"] += 1
                    bar.update(item.size)
                    if self.on_result is not None:
                        self.on_result(item, out)
                    if self.claims is not None and item.key in self.mine:
                        self.claims.release(self.name, item.key)
                        self.mine.discard(item.key)
                self._check_hung()
        finally:
            bar.close()
            for wid in list(self.workers):
                self._retire(wid)
            if self.claims is not None:
                for key in self.mine:
                    try:
                        self.claims.release(self.name, key)
                    except Exception:  # noqa: BLE001 - the lease expires anyway
                        pass
        return self.stats

    # ------------------------------------------------------------------ claims
    def _claim(self, batch: list[Item], bar: Progress) -> list[Item]:
        """The items of `batch` this driver may run now; the others wait. Once another driver
        has been seen on the store, an item won is checked against the store once more (that
        driver may have finished it since this one planned its work): with the claim held,
        nobody else can be producing it. A driver alone skips that check."""
        if self.claims is None:
            return batch
        todo = [it.key for it in batch if it.key not in self.mine]
        won = set(self.claims.claim(self.name, todo)) if todo else set()
        fresh = [it for it in batch if it.key in won]
        check = fresh and self.done_fn is not None and self.claims.others_seen
        finished = set(self.done_fn(fresh)) if check else set()  # type: ignore[misc]  # check: done_fn set
        out = []
        for it in batch:
            if it.key in finished:
                self.claims.release(self.name, it.key)
                self.stats["done_elsewhere"] += 1
                bar.update(it.size)
            elif it.key in self.mine or it.key in won:
                self.mine.add(it.key)
                out.append(it)
            else:
                self.waiting[it.key] = it
        return out

    def _check_waiting(self, bar: Progress) -> None:
        """Items held by other drivers: drop those now done, take back those whose owner died."""
        items = list(self.waiting.values())
        done = set(self.done_fn(items)) if self.done_fn is not None else set()
        others = self.claims.held_by_others(self.name, [it.key for it in items]) if self.claims else set()
        for it in items:
            if it.key in done:
                del self.waiting[it.key]
                self.stats["done_elsewhere"] += 1
                bar.update(it.size)
            elif it.key not in others:
                del self.waiting[it.key]
                self.queue.append(it)      # its owner is gone: ours to claim again

    # ------------------------------------------------------------------ failures
    def _worker_died(self, wid: int, item: Item | None, err: BaseException, kind: str) -> None:
        if wid not in self.workers:
            if item is not None:
                self.queue.appendleft(item)
            return
        w = self.workers[wid]
        if getattr(err, "actor_init_failed", False) or (kind == "ready" and not w.ready
                                                        and not isinstance(err, _system_errors())):
            # its constructor raised: a broken setup, not a lost machine
            self.start_failures += 1
            if self.start_failures >= 3:
                raise PoolError(f"{self.name}: workers fail to start ({error_line(err)[:400]})")
        self.stats["worker_deaths"] += 1
        self.deaths_in_a_row += 1
        self.next_spawn = time.monotonic() + min(30.0, 0.25 * 2 ** min(self.deaths_in_a_row, 7))
        lost = ([item] if item is not None else []) + self._retire(wid)
        if lost:
            lost[0].deaths += 1
        log.warning("%s: worker %d died (%s); %d item(s) back to the queue", self.name, wid,
                    error_line(err)[:160], len(lost))
        if self.stats["worker_deaths"] > self.max_deaths:
            worst = max(lost, key=lambda it: it.deaths, default=None)
            hint = f"; {worst.key} was running on {worst.deaths} of them" if worst and worst.deaths > 1 else ""
            raise PoolError(f"{self.name}: {self.stats['worker_deaths']} workers died, over the budget of "
                            f"{self.max_deaths} (last: {error_line(err)[:200]}){hint}; finished work is in the "
                            f"store: fix the cause and re-run to resume")
        self.stats["resubmitted"] += len(lost)
        self.queue.extendleft(reversed(lost))

    def _check_hung(self) -> None:
        """Declare lost every running item past its deadline (one that has finished meanwhile,
        its result not read yet, is not)."""
        if self.timeout == 0 or not self.started:
            return
        import ray
        now, median = time.monotonic(), self._median()
        for ref, t0 in list(self.started.items()):
            entry = self.refs.get(ref)
            if entry is None:                   # retired with its worker meanwhile
                self.started.pop(ref, None)
                continue
            _, wid, item = entry
            limit = unit_deadline(item, self.timeout, median, self.floor, self.factor)
            if limit is None or now - t0 <= limit:
                continue
            if ray.wait([ref], timeout=0)[0]:   # done; read on a later turn of the loop
                continue
            if self._still_working(wid, ref, item, now, now - t0):
                continue
            self.probed.pop(ref, None)
            self._hung(wid, ref, item, now - t0, limit)

    def _still_working(self, wid: int, ref, item: Item, now: float, waited: float) -> bool:
        """Whether the actor running `item` past its deadline is still computing: its CPU
        seconds (`probe`) grew by at least `busy_fraction` of the wall seconds since the last
        probe. The first probe past the deadline takes the reading and waits `probe_window`;
        an actor that does not answer within `probe_answer` seconds is not working."""
        import ray
        w = self.workers.get(wid)
        if self.probe_fn is None or w is None or w.handle is None:
            return False
        last = self.probed.get(ref)
        if last is not None and now - last[0] < self.probe_window:
            return True                     # asked recently: wait for the next probe
        try:
            cpu = float(ray.get(self.probe_fn(w.handle), timeout=self.probe_answer))
        except Exception:  # noqa: BLE001 - no answer in time, or the actor is gone: not working
            return False
        when = time.monotonic()
        self.probed[ref] = (when, cpu)
        if last is None:
            return True
        used, wall = cpu - last[1], max(when - last[0], 1e-9)
        if used < self.busy_fraction * wall:
            return False
        if item.key not in self.slow_items:
            self.slow_items.add(item.key)
            self.stats["slow_not_hung"] += 1
            log.info("%s: %s is past its deadline (%.0f s) but its worker %d is computing (%.0f%% of a core); "
                     "left to finish", self.name, item.key, waited, wid, 100 * used / wall)
        return True

    def _hung(self, wid: int, ref, item: Item, waited: float, limit: float) -> None:
        """`item` made no progress on worker `wid` for `waited` s (over `limit`): kill that
        worker (cancel a task), put its items back at the front of the queue; a replacement is
        started by `_size_pool`. Counted as a worker death (the budget applies)."""
        import ray
        w = self.workers.get(wid)
        actor = w is not None and w.handle is not None
        if not actor:
            try:
                ray.cancel(ref, force=True)     # kills the process running the task
            except Exception:  # noqa: BLE001 - finished or gone meanwhile
                pass
        lost = self._retire(wid)                # ray.kill: a stopped process dies too
        if not any(it is item for it in lost):
            lost.insert(0, item)
        item.timeouts += 1
        self.stats["timeouts"] += 1
        self.stats["worker_deaths"] += 1
        how = "worker killed and replaced" if actor else "task cancelled"
        why = f"{self.factor:g}x the median so far" if self.timeout is None else "fixed"
        if self.timeout_setting:
            why += f", {self.timeout_setting}"
        log.warning("%s: %s made no progress for %.0f s on worker %d (deadline %.0f s: %s); %s, %d item(s) back "
                    "to the queue", self.name, item.key, waited, wid, limit, why, how, len(lost))
        if item.timeouts >= self.item_workers:
            hint = f"; raise {self.timeout_setting} if it needs longer" if self.timeout_setting else ""
            raise PoolError(f"{self.name}: {item.key} made no progress on {item.timeouts} workers (deadline "
                            f"{limit:.0f} s){hint}; finished work is in the store")
        if self.stats["worker_deaths"] > self.max_deaths:
            raise PoolError(f"{self.name}: {self.stats['worker_deaths']} workers died or hung, over the budget of "
                            f"{self.max_deaths} (last: {item.key} made no progress for {waited:.0f} s); finished "
                            f"work is in the store: fix the cause and re-run to resume")
        self.stats["resubmitted"] += len(lost)
        self.queue.extendleft(reversed(lost))

    def _item_failed(self, wid: int, item: Item, err: BaseException) -> None:
        self.stats["item_failures"] += 1
        cause = getattr(err, "cause", None)
        if isinstance(cause, self.fatal):
            raise PoolError(f"{self.name}: {item.key}: {' '.join(str(cause).split())[:600]}")
        line = error_line(err)
        item.failures[wid] = line
        item.tries += 1
        w = self.workers.get(wid)
        if w is not None:
            w.failed_items += 1
            if w.failed_items >= self.item_workers and self.spawn_fn is not None:
                log.warning("%s: worker %d failed %d items in a row; replacing it", self.name, wid, w.failed_items)
                self.queue.extendleft(reversed(self._retire(wid)))
        if len(item.failures) >= self.item_workers or item.tries >= 2 * self.item_workers:
            raise PoolError(f"{self.name}: {item.key} failed on {len(item.failures)} worker(s): {line[:400]}")
        log.warning("%s: %s failed on worker %d (%s); retrying on another", self.name, item.key, wid, line[:200])
        self.stats["resubmitted"] += 1
        self.queue.appendleft(item)


def shuffled(items: list[Item], seed: str) -> list[Item]:
    """Items in an order of this driver's own, so that concurrent drivers rarely collide."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
