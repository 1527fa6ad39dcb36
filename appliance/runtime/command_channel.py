"""The command channel of a JavaScript session: its fd 0, served by the host.

Threat T-DOS-1 (forged end of run). QuickJS has no eval export, so a boot
loop inside the guest reads each cell from stdin and evaluates it. The host
must learn when a cell has finished, and nothing the guest can write may tell
it: the guest's output, memory, argv, env and files are all the guest's to
forge (a marker on stderr was forged, the deadline disarmed, and the guest
kept running after its ``ok``).

So the end of a run is a *state of the guest thread*, observed by the host:
WASI ``fd_read`` on fd 0 is our host function, not wasmtime's. When the guest
asks fd 0 for bytes and the host has none left for it, the guest is idle: its
thread is parked inside this host call and cannot execute one instruction
until the host hands it the next cell, which the host does only after
arming that run's deadline. Whoever reads fd 0 - the boot loop or guest code
- parks the same way; a guest that "ends early" this way has really stopped.

The boot loop's idle read is a single iovec of ``HEADER`` bytes after a cell
that completed, ``HEADER + 1`` after one that threw, ``HEADER + 2`` after one
whose pending timers the boot cancelled at its deadline: that is how the
status (ok / error / timeout) travels. Guest code can imitate that shape, which only
parks itself with a status of its choosing - the same power ``try``/``catch``
gives it. A read of any other shape is guest code reading the command
channel: the host stops the interpreter there (it would otherwise swallow the
next cell) and the run is an error.

Reads on any other fd go to wasmtime's own ``fd_read``, through a tiny
per-Store wasm trampoline (WASI functions need a calling instance that
exports the guest's memory; a host function cannot call them directly).

``fd_write`` is shadowed too, for one fd, ``RESULT_FD``, which no file the
guest opens can have: the boot writes the JSON bundle of a cell's last value
there (a plain object or array, as application/json). What arrives on it is
the guest's content, kept up to the run's result cap (T-DOS-1: more is
dropped and the run's results marked truncated) and read by the host only
once the guest is parked; it never decides anything. Writes to fd 1 and 2 go
straight to the session's capture (the JavaScript runtime imports no
``fd_renumber``, so those stay its stdout and stderr), to every other fd
through wasmtime's ``fd_write``.
"""
from __future__ import annotations

import collections
import ctypes
import struct
import threading
from typing import Callable

import wasmtime

from appliance.policy.bounds import span
from appliance.runtime.governor import STOP_CANCEL, Governor

WASI = "wasi_snapshot_preview1"
ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_INVAL = 28
ERRNO_IO = 29

HEADER = 8  # the body length, 8 hex digits
RC_TIMERS_CANCELLED = 2  # idle read of HEADER + 2: timers were left at the deadline
IDLE_READS = (HEADER, HEADER + 1, HEADER + RC_TIMERS_CANCELLED)
MAX_IOVS = 1024
MAX_BODY = 0xFFFFFFFF
RESULT_FD = 0x7FFF0001  # the cell's main result (js_boot.py); far past any fd the guest's table can reach

_local = threading.local()


class ChannelClosed(Exception):
    pass


class CommandChannel:
    """Host side of one session's fd 0; its ``read`` runs on the Store's thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._chunks: collections.deque[memoryview] = collections.deque()
        self.governor: Governor | None = None
        self.fd_read: wasmtime.Func | None = None  # wasmtime's fd_read, via attach()
        self._idle = False
        self._dead = False
        self._closed = False
        self.idle_rc: int | None = None
        self.foreign_read = False
        self.fd_write: wasmtime.Func | None = None  # wasmtime's fd_write, via attach()
        self.memory: wasmtime.Memory | None = None  # the guest's memory, via attach()
        # fd 1 and 2 straight to the session's capture (capture.py): a round trip
        # through wasmtime's fd_write from here costs ~5x a write's own time.
        self.writers: dict[int, Callable[[bytes], int]] = {}
        self.result = bytearray()  # what the guest wrote to RESULT_FD during the run
        self.result_cap = 0  # bytes of it kept; set by the run before submit()
        self.result_over = False

    # -- the run's side (any thread) --------------------------------------
    def submit(self, body: bytes) -> None:
        """Hand the parked guest its next cell. Arm the deadline first."""
        if len(body) > MAX_BODY:
            raise ValueError("cell too large for the command channel")
        with self._cond:
            if self._dead or self._closed or not self._idle:
                raise ChannelClosed("the session is not waiting for a cell")
            self._chunks.append(memoryview(b"%08x" % len(body)))
            if body:
                self._chunks.append(memoryview(body))
            self._idle = False
            self.idle_rc = None
            self.foreign_read = False
            self.result = bytearray()
            self.result_over = False
            self._cond.notify_all()

    def wait_settled(self, timeout: float) -> bool:
        """True once the guest is parked in its read of fd 0 or its thread ended."""
        with self._cond:
            return self._cond.wait_for(lambda: self._idle or self._dead, timeout)

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._idle and not self._dead

    def mark_dead(self) -> None:
        with self._cond:
            self._dead = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the guest's side (the Store's thread, inside fd_read(0)) ----------
    def read(self, caller: wasmtime.Caller, capacity: int, single_iov: bool) -> bytes | None:
        """Bytes for the guest's read of fd 0, or None: stop the guest now."""
        with self._cond:
            if not self._chunks:
                if single_iov and capacity in IDLE_READS:
                    rc = capacity - HEADER
                else:
                    self.foreign_read = True
                    self._stop_now(caller)
                    return None
                # T-DOS-1: the guest is idle from here; the run waiting on us
                # may answer, because this thread cannot leave this call
                # before the next submit().
                self.idle_rc = rc
                self._idle = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: bool(self._chunks) or self._closed)
                if not self._chunks:
                    self._stop_now(caller)
                    return None
            first = self._chunks[0]  # a header or a source, never both in one read
            if len(first) <= capacity:
                self._chunks.popleft()
                return bytes(first)
            self._chunks[0] = first[capacity:]
            return bytes(first[:capacity])

    def write_result(self, data: bytes) -> None:
        """The guest's bytes on RESULT_FD (its thread), kept within the cap (T-DOS-1)."""
        if len(self.result) + len(data) > self.result_cap:
            self.result_over = True
        else:
            self.result += data

    def take_result(self) -> tuple[bytes, bool]:
        """What the run wrote on RESULT_FD, and whether some was dropped; call once the guest is parked."""
        with self._cond:
            data, over = bytes(self.result), self.result_over
            self.result = bytearray()
            self.result_over = False
            return data, over

    def _stop_now(self, caller: wasmtime.Caller) -> None:
        if self.governor is not None:
            self.governor.stop_now(caller, STOP_CANCEL)


# Imports the guest's memory and wasmtime's fd_read and fd_write, and
# re-exports them, so that wasmtime's functions see "memory" on their caller.
TRAMPOLINE_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "env" "memory" (memory 0))
  (export "memory" (memory 0))
  (func (export "fd_read") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_read)
  (func (export "fd_write") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_write))
"""


def compile_trampoline(engine: wasmtime.Engine) -> wasmtime.Module:
    return wasmtime.Module(engine, TRAMPOLINE_WAT)


def attach(channel: CommandChannel, store: wasmtime.Store, memory: wasmtime.Memory, trampoline: wasmtime.Module) -> None:
    """Give ``channel`` wasmtime's fd_read for ``store`` (after the guest is instantiated)."""
    linker = wasmtime.Linker(store.engine)
    linker.define_wasi()
    linker.define(store, "env", "memory", memory)
    exports = linker.instantiate(store, trampoline).exports(store)
    item, write = exports["fd_read"], exports["fd_write"]
    if not isinstance(item, wasmtime.Func) or not isinstance(write, wasmtime.Func):
        raise RuntimeError("the trampoline lacks fd_read or fd_write")
    channel.fd_read = item
    channel.fd_write = write
    channel.memory = memory


def bind(channel: CommandChannel | None) -> None:
    """Make ``channel`` the fd 0 of the Store driven by the calling thread."""
    _local.channel = channel


def _current() -> CommandChannel | None:
    return getattr(_local, "channel", None)


def define_command_channel(linker: wasmtime.Linker) -> None:
    """Shadow ``fd_read`` on ``linker``, which already has WASI defined."""
    i32 = wasmtime.ValType.i32()

    def fd_read(caller: wasmtime.Caller, fd: int, iovs_ptr: int, iovs_len: int, nread_ptr: int) -> int:
        try:
            channel = _current()
            if channel is None:
                return ERRNO_IO  # a Store without a channel is not a JavaScript session
            if fd != 0:
                if channel.fd_read is None:
                    return ERRNO_IO
                result = channel.fd_read(caller, fd, iovs_ptr, iovs_len, nread_ptr)
                return int(result) if isinstance(result, int) else ERRNO_IO
            mem = caller.get("memory")
            if not isinstance(mem, wasmtime.Memory):
                return ERRNO_FAULT
            size = mem.data_len(caller)
            count = iovs_len & 0xFFFFFFFF
            if count > MAX_IOVS:
                return ERRNO_INVAL
            table = span(iovs_ptr, 8 * count, size)
            nread = span(nread_ptr, 4, size)
            if table is None or nread is None:
                return ERRNO_FAULT
            raw = bytes(mem.read(caller, table[0], table[0] + table[1]))
            iovs: list[tuple[int, int]] = []
            for i in range(count):
                ptr, length = struct.unpack_from("<II", raw, 8 * i)
                where = span(ptr, length, size)
                if where is None:
                    return ERRNO_FAULT
                iovs.append(where)
            data = channel.read(caller, sum(n for _, n in iovs), count == 1)
            if data is None:
                mem.write(caller, b"\0\0\0\0", nread[0])
                return ERRNO_SUCCESS  # end of file; the guest traps at its next epoch check
            done = 0
            for ptr, length in iovs:
                part = data[done : done + length]
                if part:
                    mem.write(caller, part, ptr)
                done += len(part)
            mem.write(caller, struct.pack("<I", done), nread[0])
            return ERRNO_SUCCESS
        except Exception:
            return ERRNO_IO

    def fd_write(caller: wasmtime.Caller, fd: int, iovs_ptr: int, iovs_len: int, nwritten_ptr: int) -> int:
        try:
            channel = _current()
            if channel is None:
                return ERRNO_IO
            writer = channel.writers.get(fd)
            if fd != RESULT_FD and writer is None:
                if channel.fd_write is None:
                    return ERRNO_IO
                result = channel.fd_write(caller, fd, iovs_ptr, iovs_len, nwritten_ptr)
                return int(result) if isinstance(result, int) else ERRNO_IO
            # The hot path of every console.log: guest memory is read through one
            # base address, each range checked against its size first (T-MEM-1).
            mem = channel.memory
            if mem is None:
                return ERRNO_FAULT
            size = mem.data_len(caller)
            base = ctypes.addressof(mem.data_ptr(caller).contents)
            count = iovs_len & 0xFFFFFFFF
            if count > MAX_IOVS:
                return ERRNO_INVAL
            table = span(iovs_ptr, 8 * count, size)
            nwritten = span(nwritten_ptr, 4, size)
            if table is None or nwritten is None:
                return ERRNO_FAULT
            raw = ctypes.string_at(base + table[0], table[1])
            done = 0
            for i in range(count):
                ptr, length = struct.unpack_from("<II", raw, 8 * i)
                where = span(ptr, length, size)
                if where is None:
                    return ERRNO_FAULT
                if not length:
                    continue
                if writer is not None:  # the capture keeps its own cap (T-DOS-1)
                    writer(ctypes.string_at(base + where[0], where[1]))
                elif len(channel.result) + length <= channel.result_cap:  # T-DOS-1: read only what is kept
                    channel.write_result(ctypes.string_at(base + where[0], where[1]))
                else:
                    channel.result_over = True
                done += length
            ctypes.memmove(base + nwritten[0], struct.pack("<I", done & 0xFFFFFFFF), 4)
            return ERRNO_SUCCESS
        except Exception:
            return ERRNO_IO

    linker.allow_shadowing = True
    linker.define_func(WASI, "fd_read", wasmtime.FuncType([i32] * 4, [i32]), fd_read, access_caller=True)
    linker.define_func(WASI, "fd_write", wasmtime.FuncType([i32] * 4, [i32]), fd_write, access_caller=True)
    linker.allow_shadowing = False
