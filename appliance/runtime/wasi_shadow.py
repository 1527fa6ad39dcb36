"""Our own ``poll_oneoff`` and ``clock_time_get`` in place of wasmtime's.

Why (threat T-DOS-1): a guest blocked in WASI's ``poll_oneoff`` (every
``sleep``) is inside a host call, where epoch interruption cannot reach it; a
3 s sleep was measured overrunning a 300 ms deadline by 2.7 s. Our version
sleeps at most until the run's deadline (or until its cell is deleted), then
sets the guest's epoch deadline to now, so it traps at its very next epoch
check right after the call returns.

``clock_time_get`` is ours too so that absolute-time subscriptions are
measured on the same clock as the one the guest reads.

Both are host callbacks: they never raise; bad guest pointers get EINVAL or
EFAULT as WASI errno values (T-MEM-1).
"""
from __future__ import annotations

import struct
import time
from typing import Any

import wasmtime

from appliance.policy.bounds import span
from appliance.runtime import context
from appliance.runtime.governor import STOP_TIMEOUT

WASI = "wasi_snapshot_preview1"
ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_INVAL = 28
ERRNO_IO = 29
ERRNO_NOTSUP = 58

SUB_SIZE = 48
EVENT_SIZE = 32
MAX_SUBSCRIPTIONS = 4096
TAG_CLOCK = 0
NO_CONTEXT_MAX_SLEEP = 1.0  # a guest outside any run should never be sleeping
SLEEP_SLICE_S = 0.02  # how soon a sleeping guest notices that its run was stopped


def _now_ns(clock_id: int) -> int | None:
    if clock_id == 0:
        return time.time_ns()
    if clock_id == 1:
        return time.monotonic_ns()
    if clock_id == 2:
        return time.process_time_ns()
    if clock_id == 3:
        return time.thread_time_ns()
    return None


def _memory(caller: wasmtime.Caller) -> Any:
    mem = caller.get("memory")
    return mem if isinstance(mem, wasmtime.Memory) else None


def clock_time_get(caller: wasmtime.Caller, clock_id: int, _precision: int, out_ptr: int) -> int:
    try:
        mem = _memory(caller)
        if mem is None:
            return ERRNO_FAULT
        now = _now_ns(clock_id & 0xFFFFFFFF)
        if now is None:
            return ERRNO_INVAL
        where = span(out_ptr, 8, mem.data_len(caller))
        if where is None:
            return ERRNO_FAULT
        mem.write(caller, struct.pack("<Q", now & 0xFFFFFFFFFFFFFFFF), where[0])
        return ERRNO_SUCCESS
    except Exception:
        return ERRNO_IO


def _sleep(ctx: context.RunContext | None, seconds: float) -> None:
    """Sleep in short slices, waking as soon as the run is stopped (its cell
    was deleted: worker.py, CancelRequest), not only at its deadline."""
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0 or (ctx is not None and ctx.governor is not None and ctx.governor.remaining() <= 0):
            return
        time.sleep(min(SLEEP_SLICE_S, left))


def poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
    try:
        mem = _memory(caller)
        if mem is None:
            return ERRNO_FAULT
        count = nsubs & 0xFFFFFFFF
        if count == 0 or count > MAX_SUBSCRIPTIONS:
            return ERRNO_INVAL
        size = mem.data_len(caller)
        src = span(in_ptr, count * SUB_SIZE, size)
        dst = span(out_ptr, count * EVENT_SIZE, size)
        nev = span(nevents_ptr, 4, size)
        if src is None or dst is None or nev is None:
            return ERRNO_FAULT
        raw = bytes(mem.read(caller, src[0], src[0] + src[1]))
        subs = []
        for i in range(count):
            base = i * SUB_SIZE
            userdata, tag = struct.unpack_from("<QB", raw, base)
            subs.append((userdata, tag, base))
        fd_subs = [(u, t) for u, t, _ in subs if t != TAG_CLOCK]
        fired: list[tuple[int, int]] = []
        if fd_subs:
            # Files and stdio are always ready in WASI; report them at once.
            fired = [(u, t) for u, t in fd_subs if t in (1, 2)]
            if not fired:
                return ERRNO_INVAL
        else:
            waits = []
            for userdata, _tag, base in subs:
                clock_id, timeout, _prec, flags = struct.unpack_from("<IxxxxQQH", raw, base + 16)
                if flags & 1:  # absolute time on that clock
                    now = _now_ns(clock_id)
                    if now is None:
                        return ERRNO_INVAL
                    rel = max(0, timeout - now)
                else:
                    if _now_ns(clock_id) is None:
                        return ERRNO_INVAL
                    rel = timeout
                waits.append((rel, userdata))
            shortest = min(w for w, _ in waits)
            ctx = context.current()
            budget = ctx.governor.remaining() if ctx is not None else NO_CONTEXT_MAX_SLEEP
            seconds = shortest / 1e9
            if seconds > budget:
                # T-DOS-1: never sleep past the deadline; stop the guest instead.
                _sleep(ctx, max(0.0, budget))
            elif seconds > 0:
                _sleep(ctx, seconds)
            if ctx is not None and ctx.governor is not None and ctx.governor.remaining() <= 0:
                # The run's deadline passed or its cell was deleted while the guest
                # slept: it traps at its very next epoch check, not at the next
                # tick of the epoch thread. Between the two, a guest whose sleep was
                # its last statement could finish its turn as if nothing happened
                # (a cancelled run answered "ok"; a late one not "timeout").
                ctx.governor.stop_now(caller, STOP_TIMEOUT)  # keeps a reason already given (cancel)
            fired = [(u, TAG_CLOCK) for w, u in waits if w == shortest]
        out = bytearray()
        for userdata, tag in fired:
            out += struct.pack("<QHBxxxxxQHxxxxxx", userdata, 0, tag, 0, 0)
        mem.write(caller, bytes(out), dst[0])
        mem.write(caller, struct.pack("<I", len(fired)), nev[0])
        return ERRNO_SUCCESS
    except Exception:
        return ERRNO_IO


def define_shadows(linker: wasmtime.Linker) -> None:
    """Replace wasmtime's versions on a linker that already has WASI defined."""
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    linker.allow_shadowing = True
    linker.define_func(WASI, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]), poll_oneoff, access_caller=True)
    linker.define_func(WASI, "clock_time_get", wasmtime.FuncType([i32, i64, i32], [i32]), clock_time_get, access_caller=True)
    linker.allow_shadowing = False
