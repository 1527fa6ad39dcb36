"""JavaScript as its users write it, on a live server: promises resolve,
``await`` works at the top level of a cell, ``setTimeout``/``setInterval``
callbacks run, all within the run's deadline (issue 16, item 5).

The run ends when the job queue and the timers are empty; an uncaught error
anywhere (the cell, a callback, a callback's promise) ends it with status
``error`` and cancels the remaining timers. What must never run after an
answer is covered in test_js_end_of_run.py (T-DOS-1).
"""
from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from tests.liveserver import ServerProcess

pytestmark = pytest.mark.slow

LIMIT_MS = 3000


def new_cell(live: ServerProcess) -> str:
    status, body, _ = live.request("POST", "/v1/cells", {"template": "javascript"})
    assert status == 201, body
    return str(body["cell_id"])


def run(live: ServerProcess, cid: str, code: str, limit_ms: int = LIMIT_MS) -> tuple[dict[str, Any], float]:
    t = time.monotonic()
    status, body, _ = live.request("POST", f"/v1/cells/{cid}/exec", {"code": code, "timeout_ms": limit_ms})
    elapsed = time.monotonic() - t
    assert status == 200, body
    assert body["receipt"]["receipt_hash"]
    return body, elapsed


def test_js_awaited_timer_then_log_in_the_same_run(live: ServerProcess) -> None:
    cid = new_cell(live)
    code = ("const t0 = Date.now();\n"
            "await new Promise(r => setTimeout(r, 50));\n"
            "console.log('after', Date.now() - t0 >= 50)")
    body, elapsed = run(live, cid, code)
    assert (body["status"], body["exit_code"], body["stdout"], body["stderr"]) == ("ok", 0, "after true\n", "")
    assert elapsed >= 0.05


def test_js_top_level_await_keeps_declarations_for_the_next_run(live: ServerProcess) -> None:
    """A cell with top-level await is still a script: its let/const/var and
    functions are globals seen by later runs (not locals of a wrapper)."""
    cid = new_cell(live)
    body, _ = run(live, cid, "let a = await Promise.resolve(1);\nconst b = await new Promise(r => setTimeout(() => r(2), 10));\n"
                             "var c = 3;\nfunction f() { return a + b + c; }\nclass K { v() { return 4; } }")
    assert (body["status"], body["stdout"]) == ("ok", ""), body
    body, _ = run(live, cid, "f() + new K().v()")
    assert (body["status"], body["stdout"]) == ("ok", "10\n"), body
    body, _ = run(live, cid, "a = await Promise.resolve(a + 40); a")
    assert (body["status"], body["stdout"]) == ("ok", "41\n"), body


@pytest.mark.parametrize("code,printed", [
    pytest.param("Promise.resolve(41).then(v => v + 1)", "42\n", id="resolved-promise"),
    pytest.param("(async () => { await new Promise(r => setTimeout(r, 20)); return 'late value'; })()", "late value\n",
                 id="async-function-with-timer"),
    pytest.param("new Promise(r => setTimeout(r, 10))", "", id="undefined-after-await"),
    pytest.param("[1, 2, 3].map(v => v * 2)", "2,4,6\n", id="plain-value-as-before"),
])
def test_js_last_value_is_awaited_when_a_promise(live: ServerProcess, code: str, printed: str) -> None:
    body, _ = run(live, new_cell(live), code)
    assert (body["status"], body["stdout"], body["stderr"]) == ("ok", printed, ""), body


def test_js_microtasks_drain_before_each_timer_and_value_prints_last(live: ServerProcess) -> None:
    code = ("setTimeout(() => console.log('timer 2'), 5);\n"
            "setTimeout(() => { console.log('timer 1'); Promise.resolve().then(() => console.log('micro of 1')); }, 0);\n"
            "Promise.resolve().then(() => console.log('micro a')).then(() => console.log('micro b'));\n"
            "'value'")
    body, _ = run(live, new_cell(live), code)
    assert body["status"] == "ok", body
    assert body["stdout"] == "micro a\nmicro b\ntimer 1\nmicro of 1\ntimer 2\nvalue\n"


def test_js_set_interval_with_clear_interval(live: ServerProcess) -> None:
    cid = new_cell(live)
    code = ("let n = 0;\n"
            "const h = setInterval((step) => { n += step; console.log('tick', n); if (n === 3) clearInterval(h); }, 10, 1);\n"
            "'started'")
    body, elapsed = run(live, cid, code)
    assert (body["status"], body["stdout"]) == ("ok", "tick 1\ntick 2\ntick 3\nstarted\n"), body
    assert elapsed < LIMIT_MS / 1000  # cleared: the run ended once nothing was left
    body, _ = run(live, cid, "const t = setTimeout(() => console.log('never'), 10); clearTimeout(t); n")
    assert (body["status"], body["stdout"]) == ("ok", "3\n"), body


def test_js_os_timers_and_sleep_async_are_the_cells_timers(live: ServerProcess) -> None:
    code = ("await os.sleepAsync(10);\n"
            "await new Promise(r => os.setTimeout(r, 10));\n"
            "const h = os.setInterval(() => { os.clearInterval(h); console.log('once'); }, 5);\n"
            "'done'")
    body, _ = run(live, new_cell(live), code)
    assert (body["status"], body["stdout"]) == ("ok", "once\ndone\n"), body


def test_js_rejected_promise_at_top_level_is_an_error(live: ServerProcess) -> None:
    cid = new_cell(live)
    body, _ = run(live, cid, "await Promise.reject(new Error('nope'))")
    assert (body["status"], body["exit_code"], body["stdout"]) == ("error", 1, ""), body
    assert body["stderr"].startswith("Error: nope\n")
    body, _ = run(live, cid, "Promise.reject(new TypeError('as last value'))")
    assert (body["status"], body["exit_code"]) == ("error", 1) and "TypeError: as last value" in body["stderr"], body
    body, _ = run(live, cid, "1 + 1")
    assert (body["status"], body["stdout"]) == ("ok", "2\n"), body  # the same interpreter goes on


@pytest.mark.parametrize("callback,message", [
    pytest.param("async () => { await null; throw new Error('async boom'); }", "Error: async boom", id="rejects"),
    pytest.param("() => { throw new RangeError('sync boom'); }", "RangeError: sync boom", id="throws"),
])
def test_js_error_in_a_callback_ends_the_run_and_cancels_timers(live: ServerProcess, callback: str, message: str) -> None:
    cid = new_cell(live)
    code = (f"setTimeout({callback}, 10);\n"
            "setTimeout(() => console.log('never'), 200);\n"
            "'value'")
    body, elapsed = run(live, cid, code)
    assert (body["status"], body["exit_code"]) == ("error", 1), body
    assert body["stderr"].startswith(message + "\n"), body
    assert body["stdout"] == "value\n"
    # The second timer was cancelled with the run: it fires neither now nor in the next run.
    again, _ = run(live, cid, "await new Promise(r => setTimeout(r, 300)); 'next'")
    assert (again["status"], again["stdout"]) == ("ok", "next\n"), again


def test_js_await_that_can_never_settle_is_an_error(live: ServerProcess) -> None:
    cid = new_cell(live)
    body, elapsed = run(live, cid, "await new Promise(() => {}); console.log('unreachable')")
    assert (body["status"], body["exit_code"], body["stdout"]) == ("error", 1, ""), body
    assert "can never settle" in body["stderr"] and elapsed < LIMIT_MS / 1000
    assert run(live, cid, "'alive'")[0]["stdout"] == "alive\n"


def test_js_bad_timer_arguments(live: ServerProcess) -> None:
    cid = new_cell(live)
    body, _ = run(live, cid, "setTimeout('console.log(1)', 10)")
    assert (body["status"], body["exit_code"]) == ("error", 1) and "TypeError" in body["stderr"], body
    # NaN and negative delays mean 0; clearing an unknown id is a no-op, as in browsers.
    body, _ = run(live, cid, "clearTimeout(12345); clearInterval(undefined); await new Promise(r => setTimeout(r, NaN)); "
                             "await new Promise(r => setTimeout(r, -5)); 'ok'")
    assert (body["status"], body["stdout"]) == ("ok", "ok\n"), body


def test_js_timer_output_streams_before_the_run_ends(live: ServerProcess) -> None:
    """Output is flushed each time the loop goes to wait for a timer, so a
    stream sees it while the run still waits (same shape as the SSE test in
    test_api_e2e.py)."""
    cid = new_cell(live)
    code = "console.log('first'); await new Promise(r => setTimeout(r, 400)); console.log('second')"
    req = urllib.request.Request(f"{live.url}/v1/cells/{cid}/exec/stream", method="POST",
                                 data=json.dumps({"code": code, "timeout_ms": LIMIT_MS}).encode())
    req.add_header("Authorization", f"Bearer {live.api_key}")
    events: list[tuple[float, dict[str, Any]]] = []
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=30) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append((time.monotonic() - t0, json.loads(line[6:])))
    assert events[-1][1]["type"] == "result" and events[-1][1]["stdout"] == "first\nsecond\n"
    first_out = next(t for t, e in events if e["type"] == "stdout")
    assert first_out < events[-1][0] - 0.3  # "first" arrived while the timer was pending


def test_js_long_promise_chains_and_many_timers_fit_a_short_limit(live: ServerProcess) -> None:
    """Telling that the job queue is empty costs a host call, which must not
    be paid per job: 50,000 awaits and 300 zero-delay timers end well inside
    the limit (at one host call per job they would not)."""
    code = ("let k = 0;\n"
            "for (let i = 0; i < 50000; i++) await null;\n"
            "for (let i = 0; i < 300; i++) setTimeout(() => k++, 0);\n"
            "await new Promise(r => setTimeout(r, 0));\n"
            "k")
    body, elapsed = run(live, new_cell(live), code, limit_ms=5000)
    assert (body["status"], body["stdout"]) == ("ok", "300\n"), body


def test_js_unawaited_rejection_does_not_end_the_interpreter(live: ServerProcess) -> None:
    """QuickJS ends the whole interpreter when it finds an unhandled rejection
    with its job queue empty; the loop never lets the queue run empty during
    a run, so such a rejection is not reported (README: known limit) and
    the cell's state survives, through timer waits and long job chains."""
    cid = new_cell(live)
    assert run(live, cid, "let kept = 'state'")[0]["status"] == "ok"
    code = ("Promise.reject(new Error('unawaited'));\n"
            "await new Promise(r => setTimeout(r, 50));\n"
            "for (let i = 0; i < 3000; i++) { Promise.reject(i); await null; }\n"
            "kept")
    body, _ = run(live, cid, code)
    assert (body["status"], body["stdout"], body["stderr"]) == ("ok", "state\n", ""), body
    assert "note" not in body
    again, _ = run(live, cid, "kept")
    assert (again["status"], again["stdout"], again["restarted"]) == ("ok", "state\n", False), again
