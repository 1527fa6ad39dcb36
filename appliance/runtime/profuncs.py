"""The Pro ``cell`` host functions: ``load_weights`` and ``host_mcp_call`` (SECURITY.md §3).

Reachable by hostile code exactly like :mod:`appliance.runtime.hostfuncs`, and
built to the same rules:
- never raise into wasmtime (an exception there lands in one process-wide slot
  and was seen surfacing in the wrong thread): every path returns a code;
- every pointer and length is made unsigned and bounds-checked before use
  (T-MEM-1); transfers are capped at 10,000,000 bytes (T-DOS-1);
- denials are recorded with ``ctx.deny`` under their threat id.

``load_weights(name_ptr i32, name_len i32, offset i64, buf_ptr i32, max_len i32) -> i32``
  Copies up to ``min(max_len, 10,000,000)`` bytes of the weights file ``name``
  (relative to ``SYNAPSE_ROOT/weights``) starting at byte ``offset``; returns
  the count, 0 at or past end of file. T-PRO-1: the file is opened through
  ``appliance.confine.Volume`` (openat2 beneath the weights dir, no symlinks,
  regular single-link file, O_RDONLY|O_NONBLOCK) and read with ``pread`` on
  that one fd: nothing is ever opened for writing, and no path string is
  re-resolved after the checks.

``host_mcp_call(req_ptr i32, req_len i32, buf_ptr i32, max_len i32) -> i32``
  Request: UTF-8 JSON ``{"server": name, "tool": name, "arguments": {...}}``.
  Writes the JSON of the ``tools/call`` result and returns its length.
  T-PRO-2: the server is looked up by name in the operator's table; a request
  carrying any other field (``url``, ``command`` ...) is denied; the call runs
  within the run's deadline and the answer is capped at ``max_len``.

Return codes: >= 0 bytes; -1 denied; -2 not found; -3 invalid argument
(pointer, length, negative offset, bad JSON); -4 I/O, server error or
timeout; -5 too large; -6 is a directory.
"""
from __future__ import annotations

import time
from typing import Any

import wasmtime

from appliance import confine
from appliance.policy.bounds import MAX_TRANSFER, span
from appliance.runtime import context

DENIED, NOT_FOUND, INVALID, IO_ERROR, TOO_LARGE, IS_DIR = -1, -2, -3, -4, -5, -6
MAX_NAME_BYTES = 4096
HARD_DEADLINE_S = 60.0  # SECURITY.md §4 run ceiling; the run's own deadline is normally shorter
FUNCTIONS = ("load_weights", "host_mcp_call")


def _memory(caller: wasmtime.Caller) -> Any:
    mem = caller.get("memory")
    return mem if isinstance(mem, wasmtime.Memory) else None


def _read_span(caller: wasmtime.Caller, mem: Any, ptr: int, length: int, limit: int) -> bytes | None:
    where = span(ptr, length, mem.data_len(caller))  # T-MEM-1: the whole span must exist
    if where is None or where[1] > limit:
        return None
    return bytes(mem.read(caller, where[0], where[0] + where[1]))


# -- load_weights --------------------------------------------------------------------

def read_at(volume: Any, name: str, offset: int, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the regular file ``name`` from ``offset`` (b"" past EOF).

    T-PRO-1: the Volume's own confined positional read (the same openat2/
    no-follow walk and regular-file/one-link check as ``read_bytes``),
    read-only; raises ``ConfinementError``.
    """
    if name.startswith("/"):
        # Volume accepts "/data/x" as the cell's own view; a weights name is
        # relative, so an absolute name is refused outright rather than mapped.
        raise confine.ConfinementError("denied", "absolute path", reason="absolute")
    data: bytes = volume.read_at(name, offset, max_bytes)
    return data


def load_weights(caller: wasmtime.Caller, name_ptr: int, name_len: int, offset: int, buf_ptr: int, max_len: int) -> int:
    try:
        ctx = context.current()
        if ctx is None:
            return DENIED
        weights = getattr(ctx, "weights", None)
        if weights is None:
            ctx.deny("T-PRO-1", "load_weights", "weights_off")  # no weights dir configured
            return DENIED
        mem = _memory(caller)
        if mem is None:
            return INVALID
        raw = _read_span(caller, mem, name_ptr, name_len, MAX_NAME_BYTES)
        buf = span(buf_ptr, max_len, mem.data_len(caller), cap=MAX_TRANSFER)  # T-MEM-1, T-DOS-1
        if raw is None or buf is None:
            return INVALID
        if offset < 0:  # i64 arrives signed: a negative offset is a bad argument, never "from the end"
            return INVALID
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return INVALID
        try:
            data = read_at(weights, name, offset, buf[1])
        except confine.ConfinementError as e:
            if e.errno_code == DENIED:
                ctx.deny("T-PRO-1", "load_weights", e.reason)
            return int(e.errno_code)
        mem.write(caller, data, buf[0])
        return len(data)
    except Exception:
        return IO_ERROR


# -- host_mcp_call -------------------------------------------------------------------

def host_mcp_call(caller: wasmtime.Caller, req_ptr: int, req_len: int, buf_ptr: int, max_len: int) -> int:
    try:
        ctx = context.current()
        if ctx is None:
            return DENIED
        client = getattr(ctx, "mcp", None)
        if client is None:
            ctx.deny("T-PRO-2", "host_mcp_call", "mcp_off")  # no servers configured
            return DENIED
        mem = _memory(caller)
        if mem is None:
            return INVALID
        raw = _read_span(caller, mem, req_ptr, req_len, MAX_TRANSFER)  # T-MEM-1, T-DOS-1
        buf = span(buf_ptr, max_len, mem.data_len(caller), cap=MAX_TRANSFER)
        if raw is None or buf is None:
            return INVALID
        # T-DOS-1: all MCP I/O ends by the run's deadline (the guest cannot
        # outlive it inside a host call; the worker would be SIGKILLed).
        remaining = ctx.governor.remaining() if ctx.governor is not None else HARD_DEADLINE_S
        deadline_s = max(0.0, min(remaining, HARD_DEADLINE_S))
        if ctx.broker is not None:
            # A pooled worker starts no server and opens no socket: the supervisor
            # parses the request and calls its own client (broker.py, T-ESCAPE-3).
            result = ctx.broker.mcp(raw, buf[1], deadline_s)
        else:
            from appliance.runtime.broker import mcp_here  # an in-process runner (no worker)

            result = mcp_here(client, raw, buf[1], time.monotonic() + deadline_s, ctx.tenant_id, ctx.cell_id)
        if result.code < 0:
            if result.code == DENIED:
                ctx.deny("T-PRO-2", "host_mcp_call", result.denial or "denied")
            return int(result.code)
        out = bytes(result.body)
        if len(out) > buf[1]:  # the client already refuses this; never write past the guest's buffer
            return TOO_LARGE
        mem.write(caller, out, buf[0])
        return len(out)
    except Exception:
        return IO_ERROR


def define(linker: wasmtime.Linker) -> None:
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    linker.define_func("cell", "load_weights", wasmtime.FuncType([i32, i32, i64, i32, i32], [i32]),
                       load_weights, access_caller=True)
    linker.define_func("cell", "host_mcp_call", wasmtime.FuncType([i32] * 4, [i32]), host_mcp_call, access_caller=True)
