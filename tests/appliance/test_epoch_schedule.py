"""The epoch ticker ticks when a deadline is due, not all the time
(governor._Schedule, T-DOS-1): a spinning guest is still stopped at its
deadline, at once by a stop from another thread (a cancel, the output cap,
the disk watch) however far its deadline is, and an idle worker's ticker
does not wake 200 times a second."""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import wasmtime

from appliance.runtime import governor as gov_mod
from appliance.runtime.governor import STOP_CANCEL, STOP_OUTPUT, STOP_TIMEOUT, EpochTicker, Governor

SPIN = (Path(__file__).resolve().parent.parent / "wasm" / "spin.wat").read_text()


class CountingEngine:
    """An engine whose epoch increments are counted (the ticker only calls increment_epoch)."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.engine = engine
        self.ticks = 0

    def increment_epoch(self) -> None:
        self.ticks += 1
        self.engine.increment_epoch()


def _spinner() -> tuple[wasmtime.Store, wasmtime.Func, Governor, CountingEngine, EpochTicker]:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    engine = wasmtime.Engine(cfg)
    store = wasmtime.Store(engine)
    governor = Governor(store)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, SPIN), [])
    run = instance.exports(store)["run"]
    assert isinstance(run, wasmtime.Func)
    counting = CountingEngine(engine)
    ticker = EpochTicker(counting)  # type: ignore[arg-type]
    return store, run, governor, counting, ticker


def _spin(store: wasmtime.Store, run: wasmtime.Func, governor: Governor, limit: float) -> tuple[str | None, float]:
    governor.arm(limit)
    started = time.monotonic()
    try:
        with pytest.raises((wasmtime.Trap, wasmtime.WasmtimeError)):  # the governor's stop comes as an error
            run(store)
        return governor.stop_reason, time.monotonic() - started
    finally:
        governor.disarm()


# (case, run limit in s, what stops it from another thread, the reason it must end with)
STOPS: list[tuple[str, float, Callable[[Governor], None], str]] = [
    ("deadline_passes", 0.3, lambda g: None, STOP_TIMEOUT),
    ("cell_deleted_far_from_its_deadline", 60.0, lambda g: threading.Timer(0.2, lambda: g.stop(STOP_CANCEL)).start(),
     STOP_CANCEL),
    ("output_cap_far_from_its_deadline", 60.0, lambda g: threading.Timer(0.2, lambda: g.stop(STOP_OUTPUT)).start(),
     STOP_OUTPUT),
]


@pytest.mark.parametrize("case, limit, stopper, reason", STOPS, ids=[s[0] for s in STOPS])
def test_t_dos_1_a_spinning_guest_is_stopped_with_the_ticker_asleep_until_due(
        case: str, limit: float, stopper: Callable[[Governor], None], reason: str) -> None:
    store, run, governor, _, ticker = _spinner()
    try:
        stopper(governor)
        stopped, took = _spin(store, run, governor, limit)
        assert stopped == reason
        assert took < min(limit, 0.2) + 1.0
    finally:
        ticker.close()


def test_t_dos_1_back_to_back_runs_each_stopped() -> None:
    """A run armed while the ticker sleeps for an earlier run's later deadline is still stopped at its own."""
    store, run, governor, _, ticker = _spinner()
    other = Governor(wasmtime.Store(wasmtime.Engine()))  # the schedule is one for the process
    try:
        other.arm(60.0)  # the ticker now sleeps towards this one
        stopped, took = _spin(store, run, governor, 0.3)
        assert stopped == STOP_TIMEOUT and took < 1.3
        stopped, took = _spin(store, run, governor, 0.3)
        assert stopped == STOP_TIMEOUT and took < 1.3
    finally:
        other.disarm()
        ticker.close()


def test_no_ticks_while_nothing_is_due() -> None:
    _, _, governor, counting, ticker = _spinner()
    try:
        time.sleep(0.2)  # idle: would have been ~40 ticks
        governor.arm(60.0)  # armed, far from its deadline
        time.sleep(0.2)
        governor.disarm()
        assert counting.ticks == 0
    finally:
        ticker.close()


def test_a_dropped_governor_leaves_the_schedule() -> None:
    store = wasmtime.Store(wasmtime.Engine())
    governor = Governor(store)
    governor.arm(0.0)  # due at once, and never disarmed
    with gov_mod._SCHEDULE.cond:
        assert gov_mod._SCHEDULE.earliest() <= time.monotonic()
    del governor, store
    gc.collect()
    with gov_mod._SCHEDULE.cond:
        assert gov_mod._SCHEDULE.earliest() == float("inf")
