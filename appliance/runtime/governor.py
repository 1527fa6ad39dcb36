"""Wall-clock governor for one wasmtime Store (threat T-DOS-1).

This is the only module that touches wasmtime's private ``_ffi`` bindings
(pinned wasmtime==49.0.0; ``tests/appliance/test_governor.py`` breaks loudly
if the binding moves).

Why a callback and not a plain epoch deadline: a persistent session's Store is
idle between runs, and a fixed deadline set at the start of one run would fire
at the first instruction of the next. wasmtime calls the epoch-deadline
callback on the Store's own thread each time the deadline tick passes; the
callback reads this governor's ``deadline`` (a float that any thread may set)
and either lets the guest continue for one more tick or traps it. No other
thread ever touches the Store.

The callback never raises: an exception inside a ctypes callback would be
printed and swallowed, and wasmtime-py keeps callback exceptions in one
process-wide slot. It returns a wasmtime error pointer to trap instead.
"""
from __future__ import annotations

import ctypes
import threading
import time
import weakref
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
# A host function's exception, kept by wasmtime-py while the guest traps with
# it; raised in its place after a call, as Func.__call__ does (I32Call).
from wasmtime._func import maybe_raise_last_exn

TICK_SECONDS = 0.005

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NO_FINALIZER = _FINALIZER(lambda _p: None)

# Why a run was stopped; the runner turns these into a run status.
STOP_TIMEOUT = "timeout"
STOP_OUTPUT = "output_limit"
STOP_CANCEL = "killed"


class Governor:
    """Holds the deadline of whatever run its Store is executing now."""

    def __init__(self, store: wasmtime.Store) -> None:
        self.deadline: float | None = None  # time.monotonic(); None = no run active
        self.stop_reason: str | None = None
        self._callback = _CALLBACK(self._on_tick)  # kept alive as long as the Store
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), self._callback, None, _NO_FINALIZER)
        store.set_epoch_deadline(1)

    def arm(self, seconds: float) -> None:
        self.stop_reason = None
        deadline = time.monotonic() + seconds
        self.deadline = deadline
        _SCHEDULE.armed(self, deadline)

    def disarm(self) -> None:
        self.deadline = None
        _SCHEDULE.disarmed(self)

    def stop(self, reason: str) -> None:
        """Ask the running guest to stop at its next tick (any thread may call)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.deadline = 0.0
        _SCHEDULE.armed(self, 0.0)  # the ticker ticks now, not at the run's own deadline

    def stop_now(self, caller: wasmtime.Caller, reason: str) -> None:
        """Stop from inside a host call on the Store's own thread: the guest
        traps at its very next epoch check, not at the next tick (T-DOS-1)."""
        self.stop(reason)
        ffi.wasmtime_context_set_epoch_deadline(caller._context(), 0)

    def remaining(self) -> float:
        deadline = self.deadline
        if deadline is None:
            return float("inf")
        return deadline - time.monotonic()

    def _on_tick(self, _ctx: Any, _env: Any, delta: Any, kind: Any) -> int:
        try:
            deadline = self.deadline
            if deadline is not None and time.monotonic() >= deadline:
                if self.stop_reason is None:
                    self.stop_reason = STOP_TIMEOUT
                err = ffi.wasmtime_error_new(b"cell: run stopped by the governor")
                return int(ctypes.cast(err, ctypes.c_void_p).value or 0)
            delta[0] = 1
            kind[0] = 0  # continue
            return 0
        except BaseException:  # never let anything escape into wasmtime
            delta[0] = 1
            kind[0] = 0
            return 0


class _Schedule:
    """The governors with a deadline, for the epoch tickers (T-DOS-1).

    An epoch tick is what lets a governor's callback run in a guest that never
    calls the host; between ticks nothing can stop it. A tick is only needed
    once some deadline has passed: until then every callback would let the
    guest go on. So a ticker sleeps until the earliest deadline of an armed
    governor (or until an arm or a stop brings that deadline nearer), then
    ticks every TICK_SECONDS while any deadline is due, i.e. until the guest
    traps and its run disarms. Ticking all the time cost each worker ~200
    thread wake-ups a second, busy or idle (~15 ms of CPU a second at load,
    0.1 ms per run at 130 runs/s, measured). A governor that is never
    disarmed only keeps the ticker ticking (fails closed); one that is
    garbage-collected leaves the schedule with it."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self._armed: weakref.WeakSet[Governor] = weakref.WeakSet()
        # Sleeping tickers -> when each looks again by itself (monotonic).
        self.sleeping: dict[EpochTicker, float] = {}

    def armed(self, governor: Governor, deadline: float) -> None:
        with self.cond:
            self._armed.add(governor)
            if any(deadline < until for until in self.sleeping.values()):
                self.cond.notify_all()

    def disarmed(self, governor: Governor) -> None:
        with self.cond:
            self._armed.discard(governor)

    def earliest(self) -> float:
        """The earliest deadline of an armed governor (under ``cond``); inf when none."""
        earliest = float("inf")
        for governor in self._armed:
            deadline = governor.deadline
            if deadline is not None and deadline < earliest:
                earliest = deadline
        return earliest


_SCHEDULE = _Schedule()
# With nothing armed a ticker still looks this often by itself (a safety net;
# every arm and stop wakes it when it must tick sooner).
IDLE_LOOK_S = 1.0


class EpochTicker:
    """One thread per worker process advancing the engine's epoch when a
    deadline is due (see _Schedule)."""

    def __init__(self, engine: wasmtime.Engine, tick: float = TICK_SECONDS) -> None:
        self._engine = engine
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epoch-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        schedule = _SCHEDULE
        while True:
            with schedule.cond:
                while True:
                    if self._stop.is_set():
                        schedule.sleeping.pop(self, None)
                        return
                    now = time.monotonic()
                    due = schedule.earliest()
                    if due <= now:
                        schedule.sleeping.pop(self, None)
                        break
                    wait = min(due - now, IDLE_LOOK_S)
                    schedule.sleeping[self] = now + wait
                    schedule.cond.wait(wait)
            self._engine.increment_epoch()
            if self._stop.wait(self._tick):  # due: tick at the usual rate until the run ends
                return

    def close(self) -> None:
        self._stop.set()
        with _SCHEDULE.cond:
            _SCHEDULE.cond.notify_all()
        self._thread.join(timeout=1)


_I32_KIND: Any = ffi.WASMTIME_I32.value  # a wasmtime_val_t's kind byte for i32


class I32Call:
    """A guest export of i32 parameters and one i32 result, called straight
    through wasmtime's C API. ``wasmtime.Func.__call__`` reads the function's
    type back and builds a wrapper object per parameter on every call (~45 us
    of a run's two calls, measured); here the type is checked once and the
    argument arrays are reused. Errors and traps raise as ``Func.__call__``
    raises them (``ExitTrap``, ``Trap``, or a host function's own exception),
    and wasmtime itself still checks each call against the function's type.

    Holds no Store (a closed session's Store must be freed, not kept alive
    here); the caller passes it on each call, on the Store's own thread."""

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, params: int) -> None:
        ty = func.type(store)
        i32 = wasmtime.ValType.i32()
        if len(ty.params) != params or any(p != i32 for p in ty.params) or len(ty.results) != 1 or ty.results[0] != i32:
            raise RuntimeError(f"runtime export has type {ty.params} -> {ty.results}, not {params} x i32 -> i32")
        self._func = func._func  # the (store id, index) pair naming the function: no reference to the Store
        self._nparams = params
        self._params = (ffi.wasmtime_val_t * max(1, params))()
        self._results = (ffi.wasmtime_val_t * 1)()

    def __call__(self, store: wasmtime.Store, *args: int) -> int:
        if len(args) != self._nparams:
            raise TypeError(f"expected {self._nparams} arguments, got {len(args)}")
        params = self._params
        for i, value in enumerate(args):
            params[i].kind = _I32_KIND
            params[i].of.i32 = value  # two's complement, as Val.i32 stores it
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_func_call(store._context(), ctypes.byref(self._func), params, self._nparams,
                                       self._results, 1, ctypes.byref(trap))
        if error:
            err = wasmtime.WasmtimeError._from_ptr(error)
            maybe_raise_last_exn()
            raise err
        if trap:
            caught = wasmtime.Trap._from_ptr(trap)
            maybe_raise_last_exn()
            raise caught
        result = self._results[0]
        if result.kind != _I32_KIND:
            raise wasmtime.WasmtimeError("runtime export returned a value that is not an i32")
        return int(result.of.i32)


def set_async_stack_size(cfg: wasmtime.Config, size: int) -> None:
    """wasmtime's async stack size (no public setter in wasmtime-py 49); it
    must be at least ``max_wasm_stack`` or creating the Engine aborts."""
    setter = getattr(ffi, "wasmtime_config_async_stack_size_set", None)
    if setter is None:
        raise RuntimeError("this wasmtime-py cannot set async_stack_size, which the guest stack needs")
    setter(cfg.ptr(), size)


def set_stdin_bytes(wasi: wasmtime.WasiConfig, data: bytes) -> None:
    """Give a guest fixed stdin bytes (no public setter in wasmtime-py 49)."""
    vec = ffi.wasm_byte_vec_t()
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8)))
    ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))
