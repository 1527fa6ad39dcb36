"""What one guest run produced, and how a trap becomes a run status."""
from __future__ import annotations

from dataclasses import dataclass, field

import wasmtime

from appliance.runtime.governor import STOP_OUTPUT, STOP_TIMEOUT
from appliance.runtime.protocol import ResultBundle

# exit_code when the guest did not exit by itself (trap, limit, kill).
NO_EXIT = -1


# What a crashed Python run's stderr says about the cell's variables; a roll-back
# (worker.py, T-IMAGE-2) puts the second sentence in place of the first.
CRASH_LOST = "Its variables are lost; in a cell, the next run starts a fresh interpreter (files are kept)."
CRASH_ROLLED_BACK = ("The cell was rolled back to its capture from before this run: its variables from before the "
                     "run are kept (files are as the run left them).")


@dataclass
class Outcome:
    exit_code: int
    status: str
    stdout: str
    stderr: str
    truncated: bool
    session_alive: bool = True
    restarted: bool = False
    note: str | None = None
    denials: list[dict[str, str]] = field(default_factory=list)
    results: list[ResultBundle] = field(default_factory=list)  # rich results (rich.py): Python runs only
    results_truncated: bool = False
    cancelled: bool = False  # stopped because its cell was deleted (worker.py, CancelRequest)
    restored: bool = False  # the interpreter was restored from the cell's snapshot first (T-IMAGE-2)
    rolled_back: bool = False  # the run killed the interpreter; restored from the capture taken before it (T-IMAGE-2)

    def to_wire(self) -> dict[str, object]:
        return {
            "exit_code": self.exit_code,
            "status": self.status,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "truncated": self.truncated,
            "session_alive": self.session_alive,
            "restarted": self.restarted,
            "note": self.note,
            "denials": self.denials,
            "results": self.results,
            "results_truncated": self.results_truncated,
            "cancelled": self.cancelled,
            "restored": self.restored,
            "rolled_back": self.rolled_back,
        }


def trap_status(exc: BaseException, stop_reason: str | None) -> str:
    """Map a trap (or a governor stop) to a run status."""
    if stop_reason == STOP_OUTPUT:
        return "output_limit"
    if stop_reason == STOP_TIMEOUT:
        return "timeout"
    if stop_reason is not None:
        return "killed"
    if isinstance(exc, wasmtime.Trap) and exc.trap_code is not None:
        return "error"  # a wasm trap (unreachable, out-of-bounds access, ...) is never a memory limit
    text = trap_cause(str(exc)).lower()
    if "out of memory" in text or "memory limit" in text or "resource limit" in text:
        return "memory_limit"
    return "error"


def trap_cause(text: str) -> str:
    """wasmtime's own reason for a trap: what follows the last "Caused by:".
    The backtrace before it lists function names from the guest's name
    section, which the guest chooses (T-DOS-1: no status from guest bytes)."""
    return text.rsplit("Caused by:", 1)[-1]


_NATIVE_CRASH = "native (C) code in the sandbox crashed"
_TRAP_WORDS = {
    wasmtime.TrapCode.STACK_OVERFLOW: "stack overflow: the code nested too deeply for the sandbox's stack (very deep "
                                      "recursion, often in C code, e.g. freeing or walking a structure nested about "
                                      "100,000 levels deep, or a raised sys.setrecursionlimit)",
    wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS: f"out-of-bounds memory access: {_NATIVE_CRASH} reading or writing outside its memory",
    wasmtime.TrapCode.HEAP_MISALIGNED: f"misaligned memory access: {_NATIVE_CRASH}",
    wasmtime.TrapCode.TABLE_OUT_OF_BOUNDS: f"bad function pointer: {_NATIVE_CRASH}",
    wasmtime.TrapCode.INDIRECT_CALL_TO_NULL: f"call through a null function pointer: {_NATIVE_CRASH}",
    wasmtime.TrapCode.BAD_SIGNATURE: f"call through a function pointer of the wrong type: {_NATIVE_CRASH}",
    wasmtime.TrapCode.NULL_REFERENCE: f"null reference: {_NATIVE_CRASH}",
    wasmtime.TrapCode.ARRAY_OUT_OF_BOUNDS: f"out-of-bounds array access: {_NATIVE_CRASH}",
    wasmtime.TrapCode.INTEGER_OVERFLOW: f"integer overflow: {_NATIVE_CRASH}",
    wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO: f"integer division by zero: {_NATIVE_CRASH}",
    wasmtime.TrapCode.BAD_CONVERSION_TO_INTEGER: f"invalid float-to-integer conversion: {_NATIVE_CRASH}",
    wasmtime.TrapCode.UNREACHABLE: "unreachable code reached: native (C) code in the sandbox aborted (a failed "
                                   "assertion, abort() or an unhandled internal error)",
    wasmtime.TrapCode.ALLOCATION_TOO_LARGE: "allocation too large: the guest asked for more memory than the sandbox allows",
}


def trap_words(exc: BaseException) -> str:
    """What stopped the guest, in words a user understands (never the host's
    backtrace): the trap kind, then what usually causes it."""
    if isinstance(exc, wasmtime.Trap) and exc.trap_code is not None:
        words = _TRAP_WORDS.get(exc.trap_code)
        if words is not None:
            return words
        return f"the guest trapped ({exc.trap_code.name.lower().replace('_', ' ')}): {_NATIVE_CRASH}"
    text = str(exc)
    if "Caused by:" in text:  # wasmtime puts the reason after the backtrace
        text = text.split("Caused by:", 1)[1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if "wasm backtrace" in first:
        first = ""
    return f"the sandbox stopped the guest: {first[:200] or type(exc).__name__}"


def exited_status(exit_code: int, stderr: str) -> str:
    if exit_code == 0:
        return "ok"
    tail = stderr[-2000:].rstrip().splitlines()[-6:] if stderr else []
    # CPython and QuickJS both survive a refused allocation and report it as
    # an exception (sometimes while failing to print it); the run still hit
    # the memory limit.
    if any(line.startswith("MemoryError") or "type name: MemoryError" in line or "out of memory" in line for line in tail):
        return "memory_limit"
    return "error"
