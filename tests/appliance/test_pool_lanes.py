"""Lane hand-off in the worker pool (T-FAIR-1): a freed lane wakes only the
run it was granted to, each waiting run on a condition of its own, and a run
whose wait times out leaves nothing behind. No worker is started: the lanes
are the pool's own bookkeeping."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from appliance.config import load_settings
from appliance.errors import Busy
from appliance.policy.fairness import Ticket
from appliance.runtime.pool import WorkerPool


@pytest.fixture
def pool(tmp_path: Path) -> WorkerPool:
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_WORKERS": "1", "SYNAPSE_LANES_PER_WORKER": "1"})
    return WorkerPool(settings)


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def _waiters(pool: WorkerPool) -> int:
    with pool._fair_cv:
        return len(pool._lane_waits)


def test_t_fair_1_a_freed_lane_wakes_the_granted_run_only(pool: WorkerPool) -> None:
    first = pool._take_lane(0, "a", 5.0)
    assert first.granted and _waiters(pool) == 0  # granted at once: no condition made
    got: list[tuple[str, Ticket]] = []
    lock = threading.Lock()

    def wait(tenant: str) -> None:
        ticket = pool._take_lane(0, tenant, 30.0)
        with lock:
            got.append((tenant, ticket))

    threads = [threading.Thread(target=wait, args=(t,)) for t in ("b", "c", "d")]
    for t in threads:
        t.start()
    _until(lambda: _waiters(pool) == 3)
    held = first
    for n in range(1, 4):
        pool._free_lane(held)
        _until(lambda: len(got) == n)
        assert _waiters(pool) == 3 - n  # one lane, one run let through; the others still wait
        held = got[-1][1]
        assert held.granted
    pool._free_lane(held)
    for t in threads:
        t.join(10)
    assert sorted(t for t, _ in got) == ["b", "c", "d"]
    assert pool.fair.stats()["running"] == 0 and _waiters(pool) == 0


def test_t_fair_1_a_lane_wait_that_times_out_leaves_no_ticket(pool: WorkerPool) -> None:
    first = pool._take_lane(0, "a", 5.0)
    with pytest.raises(Busy):
        pool._take_lane(0, "b", 0.05)
    assert _waiters(pool) == 0 and pool.fair.stats()["tenants_waiting"] == 0
    pool._free_lane(first)
    again: Any = pool._take_lane(0, "b", 5.0)  # the lane is free for the next run
    assert again.granted
    pool._free_lane(again)
    assert pool.fair.stats()["running"] == 0
