"""A hung worker: a training actor stopped (SIGSTOP) mid-unit and left stopped, as one stuck on
a GPU, an NFS mount or a frozen container is. Its unit must be declared lost after the
deadline (`train.unit_timeout_seconds`), the actor killed and replaced, and the run finish
with every model in the ledger once. Also the deadline's arithmetic, without Ray."""
from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time

import psutil
import pytest

from orchestrator import pipeline
from orchestrator.scheduling.actors import PROBE_GROUP, Probed, probe
from orchestrator.scheduling.workpool import Item, unit_deadline
from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Store
from tests.conftest import compose
from tests.test_faults import EXPECTED, report, train_workers
from tests.test_pipeline import planted_overrides, trained_seeds

PER_UNIT = 20
DEADLINE = 12         # seconds without progress before a unit is declared lost (the setting)
WATCHDOG = 150        # seconds after the stop: wake the stopped actor, so a missed hang fails, never hangs


def test_unit_deadline_arithmetic():
    it = Item("u", None, size=10)
    # a set value is the deadline, whatever the median and the unit's size
    assert unit_deadline(it, 30.0, None) == 30.0
    assert unit_deadline(it, 30.0, 2.0) == 30.0
    # 0: no deadline at all
    assert unit_deadline(it, 0, 2.0) is None
    # auto: nothing finished yet, no median, no deadline
    assert unit_deadline(it, None, None) is None
    # auto: 5 x the median seconds per model x the unit's models, at least a minute
    assert unit_deadline(it, None, 0.5) == 60.0
    assert unit_deadline(it, None, 2.0) == 100.0
    assert unit_deadline(Item("v", None, size=20), None, 2.0) == 200.0
    # a unit declared lost before gets twice the time on its next worker (auto only)
    it.timeouts = 2
    assert unit_deadline(it, None, 2.0) == 400.0
    assert unit_deadline(it, None, 0.5) == 240.0
    assert unit_deadline(it, 30.0, 2.0) == 30.0


def _stop_one_actor_mid_unit(count_dir, timeout=240.0) -> psutil.Process:
    """SIGSTOP a training actor once both actors have trained something (so it is mid-unit)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        victims = train_workers()
        done = os.listdir(count_dir) if os.path.isdir(count_dir) else []
        pids = {int(f.split("-", 1)[0]) for f in done}
        busy = [v for v in victims if v.pid in pids]
        if len(victims) == 2 and len(busy) == 2 and len(done) >= 4:
            v = busy[0]
            time.sleep(0.3)          # into its next unit's training (each unit sleeps ~1 s)
            v.send_signal(signal.SIGSTOP)
            return v
        time.sleep(0.1)
    raise AssertionError("the training actors never started")


@pytest.mark.slow
def test_stopped_training_actor_is_declared_lost_and_replaced(tmp_path, ray_local, caplog):
    """SIGSTOP one of the two training actors mid-run and leave it stopped: its unit is lost
    after the deadline, one warning names it, the actor is killed and replaced, and the run
    finishes with every model in the ledger exactly once."""
    over = planted_overrides(tmp_path, extra=["stage=train", f"train.models_per_unit={PER_UNIT}",
                                              "+task.delay=0.05", f"train.unit_timeout_seconds={DEADLINE}"])
    caplog.set_level(logging.WARNING, logger="orchestrator.scheduling.workpool")
    state: dict = {}
    finished = threading.Event()

    def saboteur():
        try:
            state["victim"] = v = _stop_one_actor_mid_unit(tmp_path / "count")
        except Exception as err:  # noqa: BLE001 - reported by the test below
            state["error"] = err
            return
        state["stopped_at"] = time.monotonic()
        if not finished.wait(WATCHDOG):
            state["watchdog"] = True            # the pool never gave up on it: wake it up
            try:
                v.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass

    t = threading.Thread(target=saboteur, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        s = pipeline.run(compose(over, tmp_path))
    finally:
        finished.set()
        t.join()
        victim = state.get("victim")
        if victim is not None:
            try:
                alive = victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            state["victim_alive"] = alive
            if alive:                            # the pool did not kill it: do not leave it stopped
                victim.send_signal(signal.SIGCONT)
                victim.kill()
    wall = time.perf_counter() - t0
    assert "error" not in state, state.get("error")
    index = Ledger(Store(s["experiment_dir"])).index()
    seeds = trained_seeds(tmp_path / "count")
    twice = sum(1 for c in collections.Counter(seeds).values() if c > 1)
    hung = [r.getMessage() for r in caplog.records
            if r.name == "orchestrator.scheduling.workpool" and "no progress" in r.getMessage()]
    pool = s["train"]["pool"]
    report("training actor SIGSTOPped and left stopped", deadline_s=DEADLINE, warnings=len(hung),
           timeouts=pool.get("timeouts"), worker_deaths=pool["worker_deaths"],
           models_lost=EXPECTED - index.count("train") - index.count("eval"), duplicate_rows=index.duplicates,
           models_trained_twice=twice, trainings=len(seeds), wall_s=round(wall, 1))
    print("\n".join(hung), flush=True)
    assert not state.get("watchdog"), f"the run waited {WATCHDOG} s on the stopped actor"
    assert len(hung) == 1, hung
    assert "worker" in hung[0] and f"deadline {DEADLINE} s" in hung[0], hung[0]
    assert not state["victim_alive"], "the stopped actor was not killed"
    assert pool["timeouts"] == 1 and pool["worker_deaths"] == 1
    assert index.count("train") == 400 and index.count("eval") == 80
    assert s["models"] == {"train": 400, "eval": 80}
    assert twice <= PER_UNIT                     # at most the lost unit trained twice


def _chunk(key: str, marker_dir: str) -> str:
    """A stateless task: the first attempt at item `b` hangs (as a task stuck on NFS would)."""
    path = os.path.join(marker_dir, key)
    if key == "b" and not os.path.exists(path):
        open(path, "w").close()
        time.sleep(60)               # hung, for far longer than the deadline (and not forever)
    time.sleep(0.2)
    return key


@pytest.mark.slow
def test_hung_task_is_cancelled_and_resubmitted_on_the_automatic_deadline(tmp_path, ray_local, caplog):
    """Stateless tasks (the fit stage's kind): the automatic deadline (a few times the median
    of the items finished so far; its 60 s floor lowered so that the test is quick) cancels
    the hung task, the item runs again, and a late result would be ignored."""
    from orchestrator.scheduling.workpool import Pool
    ray = ray_local
    remote = ray.remote(_chunk).options(num_cpus=0.5, max_retries=0)
    results: list[str] = []
    pool = Pool("hang-test", submit=lambda _, key: remote.remote(key, str(tmp_path)), capacity=lambda: 2,
                per_worker=1, on_result=lambda item, out: results.append(out), poll_seconds=0.2)
    pool.floor = 5.0
    caplog.set_level(logging.WARNING, logger="orchestrator.scheduling.workpool")
    keys = ["b", "a", "c", "d", "e", "f"]
    stats = pool.run([Item(k, k) for k in keys])
    hung = [r.getMessage() for r in caplog.records if "no progress" in r.getMessage()]
    print("\n".join(hung), flush=True)
    assert sorted(results) == sorted(keys)
    assert stats["timeouts"] == 1 and stats["worker_deaths"] == 1 and stats["done_here"] == len(keys)
    assert len(hung) == 1 and "hang-test: b made no progress" in hung[0] and "task cancelled" in hung[0]


def _always_hangs(key: str) -> str:
    if key == "z":
        time.sleep(60)               # hangs on every worker (and not forever)
    return key


@pytest.mark.slow
def test_an_item_that_hangs_on_every_worker_fails_the_run_in_one_line(ray_local):
    """An item that makes no progress on `item_workers` workers in turn is the item's own
    fault: the run stops with one line naming it and the setting, not a retry forever."""
    from orchestrator.scheduling.workpool import Pool, PoolError
    remote = ray_local.remote(_always_hangs).options(num_cpus=0.5, max_retries=0)
    pool = Pool("hang-test", submit=lambda _, key: remote.remote(key), capacity=lambda: 2, per_worker=1,
                item_workers=2, poll_seconds=0.2, timeout=3, timeout_setting="train.unit_timeout_seconds")
    with pytest.raises(PoolError) as err:
        pool.run([Item(k, k) for k in ["a", "z", "b"]])
    msg = str(err.value)
    assert "\n" not in msg and "z made no progress on 2 workers" in msg and "train.unit_timeout_seconds" in msg, msg
    # (a task's first start on a busy machine may also pass so short a deadline: then it too is retried)
    assert pool.stats["timeouts"] >= 2


class _Worker(Probed):
    """A training actor's stand-in: items that compute (burn CPU) or block (sleep) for a while."""

    def ready(self) -> str:
        return "ready"

    def run(self, key: str, seconds: float, busy: bool, once: str | None = None) -> str:
        """`once`: a file; the item blocks only on its first run (the file does not exist yet)."""
        if once is not None:
            if os.path.exists(once):
                return key
            open(once, "w").close()
        t0 = time.monotonic()
        if busy:
            while time.monotonic() - t0 < seconds:
                sum(i * i for i in range(1000))
        else:
            time.sleep(seconds)
        return key


def _probed_pool(ray, **kw):
    from orchestrator.scheduling.workpool import Pool
    Actor = ray.remote(concurrency_groups=PROBE_GROUP)(_Worker).options(num_cpus=0.5, max_restarts=0)
    pool = Pool("probe-test", submit=lambda actor, p: actor.run.remote(*p), spawn=lambda: Actor.remote(),
                capacity=lambda: 2, per_worker=1, poll_seconds=0.2, timeout=2, item_workers=2,
                timeout_setting="train.unit_timeout_seconds", probe=probe, **kw)
    pool.probe_window, pool.probe_answer = 1.5, 5.0
    return pool


@pytest.mark.slow
def test_an_actor_still_computing_past_its_deadline_is_left_to_finish(ray_local, caplog):
    """A unit slowed past its deadline by other jobs on its cores is not hung: its actor
    answers the probe with CPU seconds that grow, so it is left to finish (no worker killed,
    nothing trained twice), with one info line. Before the probe, each was killed at its
    deadline and retrained, and a loaded machine could lose every unit that way."""
    caplog.set_level(logging.INFO, logger="orchestrator.scheduling.workpool")
    pool = _probed_pool(ray_local)
    keys = ["a", "b", "c"]
    stats = pool.run([Item(k, (k, 6.0, True)) for k in keys])
    said = [r.getMessage() for r in caplog.records if "past its deadline" in r.getMessage()]
    report("slow_but_computing", units=len(keys), timeouts=stats["timeouts"], worker_deaths=stats["worker_deaths"],
           left_to_finish=stats["slow_not_hung"], resubmitted=stats["resubmitted"])
    assert stats["done_here"] == len(keys) and stats["timeouts"] == 0 and stats["worker_deaths"] == 0
    assert stats["resubmitted"] == 0 and stats["slow_not_hung"] == len(keys)
    assert len(said) == len(keys) and all("is computing" in s for s in said), said


@pytest.mark.slow
def test_an_actor_blocked_past_its_deadline_is_hung(tmp_path, ray_local, caplog):
    """A unit blocked (asleep: no CPU, as on a dead NFS mount) answers the probe, but its CPU
    seconds do not grow: it is declared lost one probe window after its deadline, its actor
    killed and replaced, and the unit runs again on another worker."""
    caplog.set_level(logging.WARNING, logger="orchestrator.scheduling.workpool")
    pool = _probed_pool(ray_local)
    t0 = time.monotonic()
    stats = pool.run([Item("z", ("z", 60.0, False, str(tmp_path / "z-ran")))] +
                     [Item(k, (k, 0.1, True)) for k in "ab"])
    seconds = time.monotonic() - t0
    hung = [r.getMessage() for r in caplog.records if "no progress" in r.getMessage()]
    report("blocked_past_deadline", units=3, timeouts=stats["timeouts"], worker_deaths=stats["worker_deaths"],
           seconds=round(seconds, 1))
    assert stats["done_here"] == 3 and stats["timeouts"] == 1 and stats["worker_deaths"] == 1, stats
    assert len(hung) == 1 and "probe-test: z made no progress" in hung[0] and "worker killed" in hung[0], hung
    assert seconds < 40, seconds          # the deadline and a probe window or two, not the 60 s block
