#!/usr/bin/env python3
"""Restart with many idle persistent cells (T-IMAGE-2): a benchmark, not a test.

Starts a real ``cell serve`` (tests/liveserver.py), creates N idle persistent
Python cells (default 500) and sets a variable in each, measures the memory of
the service (RSS and PSS of the server and its workers, /proc/<pid>/smaps_rollup),
sends SIGTERM (drain, capture of every idle cell, stop), starts the service
again on the same data and checks that every cell answers its next run with its
own variable. Prints the stop time, the restart time (to listening and to
ready) and the time for all N first runs. Exits non-zero if a cell lost its
variable.

    SYNAPSE_MODULE_CACHE=... python tests/bench_restart_cells.py [N] [--clients C]

The node's cell limit is max_cells_per_worker x workers; the environment below
makes room for N cells (and no other limit stands in the way of a benchmark).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.liveserver import ServerProcess, start_server  # noqa: E402


def bench_env(cells: int, workers: int) -> dict[str, str]:
    per_worker = max(1, math.ceil(cells / workers))
    return {
        "SYNAPSE_WORKERS": str(workers),
        "SYNAPSE_MAX_CELLS_PER_WORKER": str(per_worker),
        "SYNAPSE_TENANT_MAX_CELLS": str(per_worker * workers),
        "SYNAPSE_TENANT_MAX_QUEUED": "0",
        "SYNAPSE_CELL_PAUSE_IDLE_S": "0",  # all N stay live until the SIGTERM captures them
        "SYNAPSE_CELL_CAPTURE_IDLE_S": "2",  # the service's default (tests/liveserver.py turns it off)
    }


def memory(pid: int) -> tuple[int, int, int]:
    """(processes, RSS, PSS) in bytes of ``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    rss = pss = 0
    for p in seen:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Pss"):
                        kib = int(rest.split()[0]) * 1024
                        if key == "Rss":
                            rss += kib
                        else:
                            pss += kib
        except OSError:
            continue
    return len(seen), rss, pss


def call(srv: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    for _ in range(50):
        status, answer, headers = srv.request(method, path, body, timeout=300)
        if status not in (429, 503):
            return status, answer
        time.sleep(float(headers.get("Retry-After", "0.2")))
    return status, answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="?", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--workers", type=int, default=4, help="SYNAPSE_WORKERS")
    parser.add_argument("--keep", action="store_true", help="keep the data directory (snapshots are ~1.3 MiB a cell)")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="seconds the cells stay idle before SIGTERM (the service captures idle cells in the "
                             "background; 0: stop at once, every capture is taken by the stop)")
    args = parser.parse_args()
    n = args.cells
    root = Path(tempfile.mkdtemp(prefix="cell-bench-restart-"))
    env = bench_env(n, args.workers)
    print(f"{n} idle persistent Python cells; data under {root}; env {env}", flush=True)
    pool = ThreadPoolExecutor(args.clients)

    srv = start_server(root, env=env)
    try:
        def make(i: int) -> str:
            status, body = call(srv, "POST", "/v1/cells", {"template": "python3", "timeout_ms": 3_600_000})
            if status != 201:
                raise RuntimeError(f"cell {i}: {status} {body}")
            cell = str(body["cell_id"])
            status, body = call(srv, "POST", f"/v1/cells/{cell}/exec", {"code": f"v = 'cell-{i}'"})
            if status != 200 or body.get("status") != "ok":
                raise RuntimeError(f"cell {i}: {status} {body}")
            return cell

        t = time.monotonic()
        cells = list(pool.map(make, range(n)))
        print(f"created {n} cells and set a variable in each: {time.monotonic() - t:.1f}s", flush=True)
        procs, rss, pss = memory(srv.proc.pid)
        print(f"memory with {n} idle cells: {procs} processes, RSS {rss / 2**20:.0f} MiB, PSS {pss / 2**20:.0f} MiB "
              f"({pss / n / 2**20:.2f} MiB PSS per cell, service included)", flush=True)
        if args.idle > 0:
            print(f"idle for {args.idle:.0f}s before SIGTERM", flush=True)
            time.sleep(args.idle)
        t = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=600)
        stop_s = time.monotonic() - t
    finally:
        srv.stop()
    captured = next((m.group(1) for line in srv.log if (m := re.search(r"captured (\d+) cell", line))), "0")
    print(f"stop (SIGTERM to exit, {captured} captured): {stop_s:.2f}s", flush=True)
    snaps = sum(f.stat().st_size for f in (root / "snapshots").rglob("*") if f.is_file())
    print(f"snapshot files: {snaps / 2**20:.0f} MiB ({snaps / max(1, n) / 2**10:.0f} KiB per cell)", flush=True)

    t = time.monotonic()
    again = start_server(root, env=env, wait_ready=False)
    listening_s = time.monotonic() - t
    try:
        while not any(line.startswith("cell: ready:") for line in again.log) and again.proc.poll() is None:
            time.sleep(0.01)
        ready_s = time.monotonic() - t
        print(f"restart: listening after {listening_s:.2f}s, ready after {ready_s:.2f}s", flush=True)

        def first_run(item: tuple[int, str]) -> str | None:
            i, cell = item
            status, body = call(again, "POST", f"/v1/cells/{cell}/exec", {"code": "print(v)"})
            if status != 200 or body.get("stdout") != f"cell-{i}\n":
                return f"cell {i} ({cell}): {status} {body}"
            return None

        t = time.monotonic()
        failures = [f for f in pool.map(first_run, enumerate(cells)) if f]
        runs_s = time.monotonic() - t
        print(f"first runs of all {n} cells after the restart: {runs_s:.1f}s ({runs_s / n * 1000:.0f} ms each, "
              f"{args.clients} clients); {n - len(failures)}/{n} answered with their variable", flush=True)
        for f in failures[:10]:
            print("  lost:", f, flush=True)
            cell_id = f.split("(", 1)[1].split(")", 1)[0]
            for name, server in (("before the stop", srv), ("after the restart", again)):
                for line in server.log:
                    if cell_id in line:
                        print(f"    log {name}: {line[:400]}", flush=True)
        procs, rss, pss = memory(again.proc.pid)
        print(f"memory after the first runs: {procs} processes, RSS {rss / 2**20:.0f} MiB, PSS {pss / 2**20:.0f} MiB",
              flush=True)
    finally:
        t = time.monotonic()
        again.stop()
        print(f"second stop: {time.monotonic() - t:.2f}s", flush=True)
        pool.shutdown()
    print(f"load: {os.getloadavg()}", flush=True)
    if not args.keep:
        subprocess.run(["rm", "-rf", "--", str(root)], check=False)  # guest trees may be deeper than rmtree likes
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
