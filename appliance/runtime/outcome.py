"""What one guest run produced, and how a trap becomes a run status."""
from __future__ import annotations

from dataclasses import dataclass, field

import wasmtime

from appliance.runtime.governor import STOP_OUTPUT, STOP_TIMEOUT

# exit_code when the guest did not exit by itself (trap, limit, kill).
NO_EXIT = -1


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
