"""The JavaScript session's fd_write shadow (command_channel.py), driven by a
small wasm guest that calls WASI ``fd_write`` with the arguments a hostile
guest may pass: pointers outside its memory (T-MEM-1), too many iovecs, and
floods of the result fd past its cap (T-DOS-1). fd 1 and 2 go to the
capture, the result fd keeps at most its cap, everything else is refused
with a WASI errno and never raises into the host."""
from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
import wasmtime

from appliance.runtime import command_channel
from appliance.runtime.command_channel import RESULT_FD, CommandChannel

WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "write") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_write))
"""
PAGE = 65536
IOVS, NWRITTEN, DATA = 0, 1024, 2048


class Guest:
    def __init__(self) -> None:
        engine = wasmtime.Engine()
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        command_channel.define_command_channel(linker)
        self.store = wasmtime.Store(engine)
        self.store.set_wasi(wasmtime.WasiConfig())
        self.out: list[tuple[int, bytes]] = []
        self.channel = CommandChannel()
        self.channel.writers = {fd: self._writer(fd) for fd in (1, 2)}
        self.channel.result_cap = 100
        instance = linker.instantiate(self.store, wasmtime.Module(engine, WAT))
        exports = instance.exports(self.store)
        self.memory = exports["memory"]
        self.write_fn = exports["write"]
        assert isinstance(self.memory, wasmtime.Memory) and isinstance(self.write_fn, wasmtime.Func)
        command_channel.attach(self.channel, self.store, self.memory, command_channel.compile_trampoline(engine))

    def _writer(self, fd: int) -> Any:
        def write(data: bytes) -> int:
            self.out.append((fd, data))
            return len(data)
        return write

    def iovecs(self, *parts: tuple[int, int]) -> None:
        self.memory.write(self.store, b"".join(struct.pack("<II", p, n) for p, n in parts), IOVS)

    def call(self, fd: int, iovs: int, count: int, nwritten: int = NWRITTEN) -> tuple[int, int]:
        errno = self.write_fn(self.store, fd, iovs, count, nwritten)
        written = struct.unpack("<I", bytes(self.memory.read(self.store, NWRITTEN, NWRITTEN + 4)))[0]
        return int(errno), written


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    command_channel.bind(g.channel)
    try:
        yield g
    finally:
        command_channel.bind(None)


def test_stdout_and_stderr_go_to_the_capture_in_order(guest: Guest) -> None:
    guest.memory.write(guest.store, b"hello world", DATA)
    guest.iovecs((DATA, 5), (DATA + 5, 0), (DATA + 5, 6))
    assert guest.call(1, IOVS, 3) == (0, 11)
    assert guest.call(2, IOVS, 1) == (0, 5)
    assert guest.out == [(1, b"hello"), (1, b" world"), (2, b"hello")]


def test_T_DOS_1_result_fd_keeps_at_most_its_cap(guest: Guest) -> None:
    guest.memory.write(guest.store, b"x" * 200, DATA)
    guest.iovecs((DATA, 60))
    assert guest.call(RESULT_FD, IOVS, 1) == (0, 60)
    assert guest.call(RESULT_FD, IOVS, 1) == (0, 60)  # told it was written, so no retry loop; dropped
    data, over = guest.channel.take_result()
    assert data == b"x" * 60 and over is True and guest.out == []


HOSTILE = [
    pytest.param(1, PAGE - 4, 1, NWRITTEN, id="iovec-table-past-memory"),
    pytest.param(1, IOVS, 1, PAGE - 2, id="nwritten-past-memory"),
    pytest.param(1, IOVS, 0x10000, NWRITTEN, id="too-many-iovecs"),
    pytest.param(1, 0xFFFFFFF8, 1, NWRITTEN, id="iovec-table-wraps"),
    pytest.param(RESULT_FD, PAGE - 4, 1, NWRITTEN, id="result-fd-table-past-memory"),
]


@pytest.mark.parametrize("fd,iovs,count,nwritten", HOSTILE)
def test_T_MEM_1_bad_pointers_get_an_errno_and_nothing_is_written(guest: Guest, fd: int, iovs: int, count: int,
                                                                  nwritten: int) -> None:
    guest.iovecs((DATA, 4))
    errno, _ = guest.call(fd, iovs, count, nwritten)
    assert errno in (command_channel.ERRNO_FAULT, command_channel.ERRNO_INVAL)
    assert guest.out == [] and guest.channel.take_result() == (b"", False)


@pytest.mark.parametrize("fd", [1, RESULT_FD])
def test_T_MEM_1_an_iovec_pointing_past_memory_is_refused(guest: Guest, fd: int) -> None:
    guest.iovecs((PAGE - 2, 8))
    assert guest.call(fd, IOVS, 1)[0] == command_channel.ERRNO_FAULT
    assert guest.out == [] and guest.channel.take_result() == (b"", False)
