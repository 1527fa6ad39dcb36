"""A flooding tenant and a probing tenant against a live server (T-FAIR-1).

Tenant A keeps more `while True: pass` runs in flight than the node has
workers (persistent cells and one-shot runs, each ending at its own timeout)
and tenant B times its `print(1)` runs meanwhile. Used by the live regression
test (tests/appliance/test_fairness.py) and by tests/bench_fairness.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.liveserver import REPO, ServerProcess

SPIN = "while True: pass"


def add_tenant(srv: ServerProcess, name: str) -> str:
    env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "tenant", "add", name], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return out.strip().rsplit(" ", 1)[-1]


@dataclass
class Flood:
    """Tenant A: `cells` persistent cells and `one_shots` one-shot clients, each
    re-sending a spinning run as soon as the previous one is answered."""

    srv: ServerProcess
    key: str
    cells: int = 2
    one_shots: int = 3
    timeout_ms: int = 8000
    statuses: list[Any] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        targets: list[str | None] = []
        for _ in range(self.cells):
            status, body, _ = self.srv.request("POST", "/v1/cells", {"template": "python3"}, key=self.key)
            assert status == 201, body
            targets.append(str(body["cell_id"]))
        targets += [None] * self.one_shots
        for target in targets:
            t = threading.Thread(target=self._client, args=(target,), daemon=True)
            t.start()
            self._threads.append(t)

    def _client(self, cell: str | None) -> None:
        while not self._stop.is_set():
            if cell is None:
                path, body = "/v1/execute", {"template": "python3", "code": SPIN, "timeout_ms": self.timeout_ms}
            else:
                path, body = f"/v1/cells/{cell}/exec", {"code": SPIN, "timeout_ms": self.timeout_ms}
            status, answer, headers = self.srv.request("POST", path, body, key=self.key)
            self.statuses.append((status, answer.get("status") if status == 200 else answer.get("code")))
            if status != 200:  # refused: back off as told (Retry-After), never spin on refusals
                self._stop.wait(min(2.0, float(headers.get("Retry-After", "1"))))

    def wait_saturated(self, workers: int, timeout: float = 60.0) -> None:
        """Until every worker is running one of A's runs (a condition, not a sleep)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            _, status, _ = self.srv.request("GET", "/v1/status", key=self.key)
            stats = status["workers"]
            if stats["busy"] >= workers:
                return
            time.sleep(0.05)
        raise AssertionError(f"tenant A never saturated the node: {stats}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_ms / 1000 * 4 + 60)


def probe(srv: ServerProcess, key: str, cell: str, rounds: int, refused: list[Any] | None = None) -> dict[str, list[float]]:
    """Tenant B: `rounds` times a `print(1)` in its cell and as a one-shot run;
    the wall time of each answer, in seconds. Every answer must be right,
    unless ``refused`` is given: then refusals are collected there."""
    times: dict[str, list[float]] = {"cell": [], "one-shot": []}
    for _ in range(rounds):
        for kind in ("cell", "one-shot"):
            t = time.monotonic()
            if kind == "cell":
                status, body, _ = srv.request("POST", f"/v1/cells/{cell}/exec", {"code": "print(1)"}, key=key)
            else:
                status, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"}, key=key)
            times[kind].append(time.monotonic() - t)
            if refused is not None and status != 200:
                refused.append((kind, status, body.get("code"), round(times[kind][-1], 1)))
                continue
            assert status == 200 and body["stdout"] == "1\n", (kind, status, body)
    return times


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[-1]
