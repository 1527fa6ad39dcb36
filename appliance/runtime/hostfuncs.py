"""The ``cell`` host functions of the guest ABI (SECURITY.md §3).

Every function here is reachable by hostile code. Each one:
- never raises into wasmtime (T-MEM-1: a raised exception is
  kept in one process-wide slot and can surface in the wrong thread); it
  returns a negative code instead;
- converts every pointer and length to unsigned and bounds-checks it against
  the guest's memory before reading or writing (T-MEM-1);
- caps transfers at 10,000,000 bytes (T-DOS-1);
- resolves paths only through ``appliance.confine.Volume`` (T-PATH-1/2) and
  URLs only through ``appliance.egress``, in the supervisor (T-SSRF-1/2,
  the broker: T-ESCAPE-3).

Return codes: bytes transferred (>= 0), or
  -1 denied by policy (traversal, symlink, special file, SSRF, egress off, license)
  -2 not found
  -3 invalid argument (bad pointer or length, not UTF-8, no memory export),
     or not a directory ("notes.txt/x", "notes.txt/": T-PATH-1)
  -4 I/O or network error
  -5 too large (response or file over the cap)
  -6 is a directory
  -7 already exists
  -8 over the tenant's disk quota or file-count limit
"""
from __future__ import annotations

import time
from typing import Any

import wasmtime

from appliance.confine import ConfinementError
from appliance.policy.bounds import MAX_TRANSFER, span
from appliance.runtime import context

DENIED, NOT_FOUND, INVALID, IO_ERROR, TOO_LARGE, OVER_QUOTA = -1, -2, -3, -4, -5, -8
MAX_PATH_BYTES = 4096
MAX_URL_BYTES = 2048
FUNCTIONS = ("host_fs_read", "host_fs_write", "host_fetch")


def _memory(caller: wasmtime.Caller) -> Any:
    mem = caller.get("memory")
    return mem if isinstance(mem, wasmtime.Memory) else None


def _read_text(caller: wasmtime.Caller, mem: Any, ptr: int, length: int, limit: int) -> str | None:
    where = span(ptr, length, mem.data_len(caller))
    if where is None or where[1] > limit:
        return None
    try:
        return bytes(mem.read(caller, where[0], where[0] + where[1])).decode("utf-8")
    except UnicodeDecodeError:
        return None


def host_fs_read(caller: wasmtime.Caller, path_ptr: int, path_len: int, buf_ptr: int, max_len: int) -> int:
    try:
        ctx = context.current()
        mem = _memory(caller)
        if ctx is None or ctx.volume is None:
            return DENIED
        if mem is None:
            return INVALID
        path = _read_text(caller, mem, path_ptr, path_len, MAX_PATH_BYTES)
        buf = span(buf_ptr, max_len, mem.data_len(caller), cap=MAX_TRANSFER)  # T-MEM-1, T-DOS-1
        if path is None or buf is None:
            return INVALID
        try:
            data = ctx.volume.read_bytes(path, buf[1])
        except ConfinementError as e:
            if e.errno_code == DENIED:
                ctx.deny("T-PATH-1", "host_fs_read", e.code)
            return int(e.errno_code)
        mem.write(caller, data, buf[0])
        return len(data)
    except Exception:
        return IO_ERROR


def host_fs_write(caller: wasmtime.Caller, path_ptr: int, path_len: int, data_ptr: int, data_len: int) -> int:
    try:
        ctx = context.current()
        mem = _memory(caller)
        if ctx is None or ctx.volume is None:
            return DENIED
        if mem is None:
            return INVALID
        path = _read_text(caller, mem, path_ptr, path_len, MAX_PATH_BYTES)
        src = span(data_ptr, data_len, mem.data_len(caller))  # T-MEM-1: whole span must exist
        if path is None or src is None:
            return INVALID
        if src[1] > MAX_TRANSFER:  # T-DOS-1
            return TOO_LARGE
        if ctx.quota_left is not None and src[1] > ctx.quota_left:  # T-DISK-1: disk quota
            ctx.deny("T-DISK-1", "host_fs_write", "quota_exceeded")
            return OVER_QUOTA
        try:
            files_left = ctx.files_left
            creates = files_left is not None and not ctx.volume.exists(path)
            if files_left is not None and creates and files_left <= 0:  # T-DISK-1: per-tenant file-count limit
                ctx.deny("T-DISK-1", "host_fs_write", "file_limit_exceeded")
                return OVER_QUOTA
            data = bytes(mem.read(caller, src[0], src[0] + src[1]))
            written = int(ctx.volume.write_bytes(path, data))
            if ctx.quota_left is not None:
                ctx.quota_left -= written
            if files_left is not None and creates:
                ctx.files_left = files_left - 1
            return written
        except ConfinementError as e:
            if e.errno_code == DENIED:
                ctx.deny("T-PATH-1", "host_fs_write", e.code)
            return int(e.errno_code)
    except Exception:
        return IO_ERROR


def host_fetch(caller: wasmtime.Caller, url_ptr: int, url_len: int, buf_ptr: int, max_len: int) -> int:
    try:
        ctx = context.current()
        mem = _memory(caller)
        if ctx is None:
            return DENIED
        if ctx.egress is None or not getattr(ctx.egress, "enabled", False):
            ctx.deny("T-SSRF-1", "host_fetch", "egress_off")  # air-gap default
            return DENIED
        if mem is None:
            return INVALID
        url = _read_text(caller, mem, url_ptr, url_len, MAX_URL_BYTES)
        buf = span(buf_ptr, max_len, mem.data_len(caller), cap=MAX_TRANSFER)
        if url is None or buf is None:
            return INVALID
        deadline_s = max(0.0, min(ctx.governor.remaining(), 60.0))
        if ctx.broker is not None:
            # A pooled worker has no network: the supervisor fetches under the
            # run's policy (broker.py, T-ESCAPE-3) and answers at most buf[1] bytes.
            result = ctx.broker.fetch(url, buf[1], deadline_s)
        else:
            from appliance.runtime.broker import fetch_here  # an in-process runner (no worker)

            result = fetch_here(url, ctx.egress, ctx.resolver, buf[1], time.monotonic() + deadline_s)
        if result.code < 0:
            if result.code == DENIED:
                ctx.deny("T-SSRF-1", "host_fetch", result.denial or "denied")
            return int(result.code)
        body = bytes(result.body[: buf[1]])
        mem.write(caller, body, buf[0])
        return len(body)
    except Exception:
        return IO_ERROR


def define(linker: wasmtime.Linker) -> None:
    i32 = wasmtime.ValType.i32()
    sig = wasmtime.FuncType([i32] * 4, [i32])
    linker.define_func("cell", "host_fs_read", sig, host_fs_read, access_caller=True)
    linker.define_func("cell", "host_fs_write", sig, host_fs_write, access_caller=True)
    linker.define_func("cell", "host_fetch", sig, host_fetch, access_caller=True)
