#!/usr/bin/env python3
"""Pass rate and latency of a directory of example scripts run as one-shot jobs.

Usage: python tests/examples_bench.py DIR

DIR holds one sub-directory per kind (e.g. ``matplotlib/``, ``pandas/``,
``sklearn/``), each with ``*.py`` files; ``*.py`` files directly in DIR count
as kind ``.``. Every file is sent unmodified as one ``POST /v1/execute``
(template python3, timeout_ms 60000) to a real server started on loopback.
For each file the script prints status, exit code, latency, the first error
line of stderr for a failed run (the first warning line for a passed one),
and whether the answer's ``results`` carry an image/png; then a table per kind
with pass counts and median/max latency (wall clock of the HTTP request).

The machine may be shared: if the server is stopped from outside mid-run
(503 ``draining`` or a refused connection), the guest never ran, so a fresh
server is started and the same file is sent again (at most MAX_RESTARTS times);
the number of restarts is printed.

A measurement, not a gate: it exits 0 whatever the runs do (non-zero only if
the server cannot start or DIR holds no scripts).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.liveserver import start_server  # noqa: E402

RUN_TIMEOUT_MS = 60_000
HTTP_TIMEOUT_S = 180.0  # generous: first imports of sklearn/statsmodels take seconds on a busy machine
MAX_RESTARTS = 5


@dataclass
class Outcome:
    kind: str
    name: str
    http_status: int
    status: str
    exit_code: Any
    latency_s: float
    server_ms: Any
    error_line: str
    png: str  # "yes", "no" (results without a PNG) or "-" (the answer has no results field)
    warning: str = ""  # first warning line of stderr of a passed run

    @property
    def passed(self) -> bool:
        return self.http_status == 200 and self.status == "ok"


def collect(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for path in sorted(root.rglob("*.py")):
        kind = path.parent.relative_to(root).as_posix()
        found.append((kind, path))
    return found


def first_error_line(stderr: str) -> str:
    """The line naming the exception (last 'Xxx: ...' line of a traceback), else the last non-empty line."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return ""
    for ln in reversed(lines):
        if ln.startswith("Cell:"):
            continue
        if not ln.startswith((" ", "\t")) and ("Error" in ln or "Exception" in ln or ln.startswith("Warning")):
            return ln[:200]
    return lines[-1][:200]


def png_result(answer: Any) -> str:
    if not isinstance(answer, dict) or "results" not in answer:
        return "-"
    results = answer.get("results")
    for item in results if isinstance(results, list) else []:
        if isinstance(item, dict) and (item.get("png") or "image/png" in item
                                       or item.get("type") == "image/png" or item.get("mime") == "image/png"):
            return "yes"
    return "no"


def first_warning_line(stderr: str) -> str:
    for ln in stderr.splitlines():
        if "Warning" in ln:
            return ln.strip()[:200]
    return ""


def run_one(srv: Any, kind: str, path: Path) -> Outcome:
    code = path.read_text(encoding="utf-8")
    body = {"template": "python3", "code": code, "timeout_ms": RUN_TIMEOUT_MS}
    t0 = time.monotonic()
    try:
        http_status, answer, _ = srv.request("POST", "/v1/execute", body, timeout=HTTP_TIMEOUT_S)
    except OSError as exc:  # the HTTP request itself failed (refused connection, client timeout)
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        status = "http-refused" if isinstance(reason, ConnectionError) else "http-failure"
        return Outcome(kind, path.stem, 0, status, None, time.monotonic() - t0, None, repr(exc)[:200], "-")
    latency = time.monotonic() - t0
    if http_status != 200 or not isinstance(answer, dict):
        err = answer.get("code", "") if isinstance(answer, dict) else str(answer)[:200]
        return Outcome(kind, path.stem, http_status, f"http-{http_status}", None, latency, None, str(err), "-")
    status = str(answer.get("status", "?"))
    stderr = str(answer.get("stderr") or "")
    err_line = "" if status == "ok" else (first_error_line(stderr) or status)
    warning = first_warning_line(stderr) if status == "ok" else ""
    return Outcome(kind, path.stem, http_status, status, answer.get("exit_code"), latency,
                   answer.get("latency_ms"), err_line, png_result(answer), warning)


def report(outcomes: list[Outcome]) -> None:
    print(f"\n{'kind':<12} {'name':<30} {'status':<12} {'exit':>4} {'secs':>6} {'srv s':>6} {'png':>3}  "
          "first error line (failed) / first warning line (passed)")
    for o in outcomes:
        srv_s = f"{o.server_ms / 1000:6.2f}" if isinstance(o.server_ms, (int, float)) else f"{'-':>6}"
        print(f"{o.kind:<12} {o.name:<30} {o.status:<12} {str(o.exit_code):>4} {o.latency_s:6.2f} {srv_s} "
              f"{o.png:>3}  {o.error_line or o.warning}")
    print("secs: wall clock of the HTTP request; srv s: the answer's latency_ms")
    print("png: yes / no = the answer's results do / do not hold an image/png; - = the answer has no results field")
    print(f"\n{'kind':<12} {'N':>3} {'passed':>6} {'median s':>9} {'max s':>7}")
    kinds = sorted({o.kind for o in outcomes})
    for kind in [*kinds, "ALL"]:
        group = [o for o in outcomes if kind in ("ALL", o.kind)]
        lat = [o.latency_s for o in group]
        print(f"{kind:<12} {len(group):>3} {sum(o.passed for o in group):>6} "
              f"{statistics.median(lat):9.2f} {max(lat):7.2f}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    scripts = collect(Path(argv[1]))
    if not scripts:
        print(f"no *.py files under {argv[1]}", file=sys.stderr)
        return 2
    os.environ.setdefault("SYNAPSE_MODULE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "modules"))
    srv = start_server(env={"SYNAPSE_LOG_LEVEL": "warning"})
    outcomes: list[Outcome] = []
    restarts = 0
    try:
        for kind, path in scripts:
            outcome = run_one(srv, kind, path)
            # The machine is shared: if our server was stopped from outside
            # (503 "draining", refused connection), the guest never ran. Start a
            # fresh server and run the same file again, a bounded number of times.
            while _server_gone(outcome) and restarts < MAX_RESTARTS:
                restarts += 1
                print(f"server unavailable ({outcome.error_line}); starting a new one "
                      f"(restart {restarts}/{MAX_RESTARTS})", flush=True)
                tail = [ln for ln in srv.log[-8:] if "API key" not in ln and "Bearer" not in ln]
                print("\n".join("  | " + ln for ln in tail[-4:]), flush=True)
                srv.stop()
                srv = start_server(env={"SYNAPSE_LOG_LEVEL": "warning"})
                outcome = run_one(srv, kind, path)
            outcomes.append(outcome)
            print(f"[{len(outcomes)}/{len(scripts)}] {kind}/{path.name}: {outcome.status} {outcome.latency_s:.2f}s",
                  flush=True)
    finally:
        srv.stop()
    report(outcomes)
    print(f"\nserver restarts (server stopped from outside during the run): {restarts}")
    return 0


def _server_gone(outcome: Outcome) -> bool:
    return outcome.status == "http-refused" or (outcome.http_status == 503 and outcome.error_line == "draining")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
