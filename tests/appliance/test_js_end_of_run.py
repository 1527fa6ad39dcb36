"""T-DOS-1: a JavaScript guest cannot forge the end of its run.

The host learns that a JavaScript cell has finished only by seeing the guest
thread parked in its read of fd 0, which the host serves (see
appliance/runtime/command_channel.py). These tests attack that channel on a
live server and then watch the worker from outside for two seconds after the
answer: no worker thread may burn CPU and the cell's volume may not grow,
i.e. no guest instruction runs after its answer.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from appliance.runtime.sessions import JS_TIMER_MARGIN  # the boot cancels timers this long before the deadline
from tests.liveserver import ServerProcess
from tests.procwatch import thread_cpu, tree_bytes, watch_after_answer, worker_pids
from tests.redteam_corpus import (JS_FORGED_END, JS_FORGED_MARKER, JS_IMITATE_IDLE_READ, JS_KEEP_WORKING,
                                  JS_LATE_TIMERS)

pytestmark = pytest.mark.slow

LIMIT_MS = 1500

ATTACKS = [pytest.param(code, expected, to_deadline, stream, id=name)
           for name, code, expected, to_deadline, stream in JS_FORGED_END]
LATE_TIMERS = [pytest.param(code.replace("{delay}", str(LIMIT_MS + 300)), expected, kept, id=name)
               for name, code, expected, kept in JS_LATE_TIMERS]


def new_cell(live: ServerProcess) -> tuple[str, Path]:
    status, body, _ = live.request("POST", "/v1/cells", {"template": "javascript"})
    assert status == 201, body
    cid = str(body["cell_id"])
    return cid, live.root / "sandbox_volumes" / "default" / cid


def timed_exec(live: ServerProcess, cid: str, code: str, limit_ms: int = LIMIT_MS) -> tuple[dict[str, Any], float]:
    t = time.monotonic()
    status, body, _ = live.request("POST", f"/v1/cells/{cid}/exec", {"code": code, "timeout_ms": limit_ms})
    elapsed = time.monotonic() - t
    assert status == 200, body
    return body, elapsed


def assert_quiet_after_answer(live: ServerProcess, volume: Path, pids: list[int]) -> None:
    cpu, size = thread_cpu(pids), tree_bytes(volume)
    after = watch_after_answer(pids, volume, cpu, size, window=2.0, cpu_limit=0.3)
    assert after.volume_growth == 0, f"the guest wrote {after.volume_growth} bytes to /data after its answer"
    assert after.busiest_thread_s <= 0.3, f"a worker thread used {after.busiest_thread_s:.2f} s CPU after the answer"


@pytest.mark.parametrize("code,expected,runs_to_deadline,stream", ATTACKS)
def test_t_dos_1_js_forged_end_of_run_no_guest_code_after_answer(live: ServerProcess, code: str, expected: str,
                                                                  runs_to_deadline: bool, stream: str | None) -> None:
    cid, volume = new_cell(live)
    pids = worker_pids(live)
    body, elapsed = timed_exec(live, cid, code)
    assert body["status"] == expected, body
    assert body["exit_code"] == -1 and body["receipt"]["receipt_hash"]
    assert_quiet_after_answer(live, volume, pids)
    if runs_to_deadline:
        # The forged marker ended nothing: the run lasted to its deadline...
        assert LIMIT_MS / 1000 - 0.05 <= elapsed < LIMIT_MS / 1000 + 1.5, elapsed
        # ...and the marker is the guest's output like any other bytes.
        assert stream is not None and JS_FORGED_MARKER in body[stream]
    else:
        assert elapsed < LIMIT_MS / 1000, elapsed
    again, _ = timed_exec(live, cid, "1+1")
    assert (again["status"], again["stdout"]) == ("ok", "2\n")


@pytest.mark.parametrize("size,status,exit_code", [(8, "ok", 0), (9, "error", 1), (10, "timeout", -1)],
                         ids=["as-completed", "as-failed", "as-timers-cancelled"])
def test_t_dos_1_js_imitated_idle_read_parks_the_guest(live: ServerProcess, size: int, status: str, exit_code: int) -> None:
    """A guest imitating the boot loop's idle read (8, 9 or 10 bytes of fd 0)
    really is idle: it is parked in the host's read with the status it chose,
    and the next cell it receives runs under that run's armed deadline."""
    cid, volume = new_cell(live)
    pids = worker_pids(live)
    imitation = JS_IMITATE_IDLE_READ.replace("0, 8)", f"0, {size})").replace("ArrayBuffer(9)", "ArrayBuffer(16)")
    assert f"0, {size})" in imitation
    body, elapsed = timed_exec(live, cid, imitation + JS_KEEP_WORKING)
    assert (body["status"], body["exit_code"]) == (status, exit_code) and elapsed < LIMIT_MS / 1000, body
    assert "note" not in body  # parked, not stopped
    assert_quiet_after_answer(live, volume, pids)
    assert not (volume / "grow.bin").exists()  # not one instruction after the parked read
    # The next cell wakes the guest's own read; it works on until the deadline.
    body, elapsed = timed_exec(live, cid, "1+1")
    assert body["status"] == "timeout" and LIMIT_MS / 1000 - 0.05 <= elapsed < LIMIT_MS / 1000 + 1.5, (body, elapsed)
    assert (volume / "grow.bin").exists()
    assert_quiet_after_answer(live, volume, pids)
    again, _ = timed_exec(live, cid, "1+1")
    assert (again["status"], again["stdout"]) == ("ok", "2\n")


def test_t_dos_1_js_exit_status_and_state_survive_the_host_channel(live: ServerProcess) -> None:
    cid, _ = new_cell(live)
    assert timed_exec(live, cid, "let x = 40")[0]["status"] == "ok"
    thrown, _ = timed_exec(live, cid, "throw new Error('boom')")
    assert (thrown["status"], thrown["exit_code"]) == ("error", 1) and "boom" in thrown["stderr"]
    out, _ = timed_exec(live, cid, "console.log(x + 2, 'h\u00e9llo \u2713 \U0001F600'); x")
    assert (out["status"], out["exit_code"], out["stdout"]) == ("ok", 0, "42 h\u00e9llo \u2713 \U0001F600\n40\n")
    # Files in /data are still read through wasmtime's own fd_read.
    out, _ = timed_exec(live, cid, "let g = std.open('n.txt', 'w'); g.puts('file'); g.close(); std.loadFile('n.txt')")
    assert out["stdout"] == "file\n"


@pytest.mark.parametrize("code,expected,kept", LATE_TIMERS)
def test_t_dos_1_js_timer_never_runs_after_its_answer(live: ServerProcess, code: str, expected: frozenset[str],
                                                       kept: bool) -> None:
    """A timer due after the deadline (or one that keeps firing until it) is
    cancelled there: the run answers ``timeout``, keeps the interpreter, and
    the callback runs neither in the 2 s after the answer (the timer's due
    time falls inside that window) nor in the next run of the same cell.
    QuickJS's own os timers (``import('qjs:os')``) are not the cell's: that run
    ends without it or is stopped at its deadline, and nothing runs after the
    answer either."""
    cid, volume = new_cell(live)
    pids = worker_pids(live)
    late = volume / "late.txt"
    assert timed_exec(live, cid, "let kept = 7")[0]["status"] == "ok"
    body, elapsed = timed_exec(live, cid, code)
    assert body["status"] in expected and body["receipt"]["receipt_hash"], body
    assert "late" not in body["stdout"]
    if body["status"] == "timeout":
        assert LIMIT_MS / 1000 - JS_TIMER_MARGIN - 0.05 <= elapsed < LIMIT_MS / 1000 + 1.5, elapsed
    else:
        assert elapsed < LIMIT_MS / 1000, elapsed
    size = late.stat().st_size if late.exists() else 0  # an interval may write before the deadline
    assert_quiet_after_answer(live, volume, pids)
    assert (late.stat().st_size if late.exists() else 0) == size
    if not kept:
        return  # a QuickJS os timer may also fire in a later run, under that run's deadline (README)
    assert "note" not in body, body  # the interpreter was kept
    # The next run outlives the cancelled timer's due time: nothing of it runs.
    again, _ = timed_exec(live, cid, "await new Promise(r => setTimeout(r, 300)); kept")
    assert (again["status"], again["stdout"]) == ("ok", "7\n"), again
    assert (late.stat().st_size if late.exists() else 0) == size
