"""The host's own ``poll_oneoff`` (runtime/wasi_shadow.py), threat T-DOS-1.

A guest asleep in ``poll_oneoff`` is inside a host call, out of reach of
epoch interruption. When its run is stopped meanwhile (its deadline passes,
or its cell is deleted), the sleep ends early, and the guest must trap at its
very next epoch check: not at the next tick of the epoch thread, a window in
which a guest whose sleep was its last statement finished its turn as if
nothing had happened (seen in CI: a run cancelled by ``kill()`` answered
"ok"). These tests run with no epoch thread at all, so only an immediate
trap can pass them."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import wasmtime

from appliance.runtime import context, wasi_shadow
from appliance.runtime.governor import STOP_CANCEL, STOP_TIMEOUT, Governor

# run() sleeps 10 s in one clock subscription (monotonic, relative), then
# returns 7 through a call (a function entry is an epoch check, as in any
# real guest after its sleep).
SLEEPER = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $seven (result i32) (i32.const 7))
  (func (export "run") (result i32)
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {sleep_ns}))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (call $seven)))
"""


def _instance(sleep_ns: int = 10_000_000_000) -> tuple[wasmtime.Store, wasmtime.Func, Governor]:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    engine = wasmtime.Engine(cfg)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    wasi_shadow.define_shadows(linker)
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    governor = Governor(store)  # no EpochTicker: the engine's epoch never moves
    instance = linker.instantiate(store, wasmtime.Module(engine, SLEEPER.replace("{sleep_ns}", str(sleep_ns))))
    run = instance.exports(store)["run"]
    assert isinstance(run, wasmtime.Func)
    return store, run, governor


def _cancel_after(gov: Governor, seconds: float) -> None:
    threading.Timer(seconds, lambda: gov.stop(STOP_CANCEL)).start()


# (case, run limit in s, what stops the sleep from another thread, stop reason the run must end with)
STOPS: list[tuple[str, float, Callable[[Governor], None], str]] = [
    ("cell_deleted_while_asleep", 30.0, lambda g: _cancel_after(g, 0.1), STOP_CANCEL),
    ("deadline_passes_while_asleep", 0.2, lambda g: None, STOP_TIMEOUT),
]


@pytest.mark.parametrize("case, limit, stopper, reason", STOPS, ids=[s[0] for s in STOPS])
def test_t_dos_1_a_guest_stopped_in_its_sleep_traps_at_once(case: str, limit: float,
                                                            stopper: Callable[[Governor], None], reason: str) -> None:
    store, run, gov = _instance()
    context.enter(context.RunContext(governor=gov))
    gov.arm(limit)
    stopper(gov)
    started = time.monotonic()
    try:
        with pytest.raises((wasmtime.Trap, wasmtime.WasmtimeError)):
            run(store)  # returning 7 would be a run that finished after it was stopped
    finally:
        gov.disarm()
        context.enter(None)
    assert gov.stop_reason == reason
    assert time.monotonic() - started < 5.0  # not the guest's 10 s


def test_t_dos_1_a_sleep_within_the_limit_is_undisturbed() -> None:
    store, run, gov = _instance(sleep_ns=50_000_000)  # 50 ms inside a 30 s limit
    context.enter(context.RunContext(governor=gov))
    gov.arm(30.0)
    started = time.monotonic()
    try:
        assert run(store) == 7
    finally:
        gov.disarm()
        context.enter(None)
    assert gov.stop_reason is None and time.monotonic() - started >= 0.05
