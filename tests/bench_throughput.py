#!/usr/bin/env python3
"""Persistent-cell throughput over HTTP with keep-alive clients, next to the
engine floor and a hello-world Flask-on-waitress baseline measured in the same run.

Starts a real server twice on one data root (the start-up rows: the first
start and a restart, each to the first answered run), gives each client its
own Python cell, and counts `print(1+1)` runs answered in a fixed time with
1, 2, 4 and 8 clients, each right after the same number of clients against
the hello-world app (tests/hello_baseline.py); prints CPU milliseconds per
run of the web process, the workers and the client; then create + run +
delete with 2 clients, and the rows of issue 18's table with their ratios.
The machine is shared: the ratios to the same-run baseline are the figures
to compare. A benchmark: exits non-zero only if a run fails.

``--only create-run-delete`` measures just that row (one server, no
baseline), with the CPU milliseconds per cycle of the web process and of
the workers and the p50 of each step, ``--rounds`` times in a row.

``--only start`` measures just the start row: one first start on a fresh
data root, then ``--rounds`` restarts on it (each to its first answered
run), and prints each restart and their median. The start rows are measured
with the tree's bytecode compiled, as an installed appliance has it.

``--tenants N`` spreads the clients over N tenants (client i is tenant
i mod N): with tenant-bound workers (T-TENANT-1) each tenant's cells live in
workers of their own.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.hello_baseline import Drive, drive, drive_hello, start_hello  # noqa: E402
from tests.liveserver import REPO, ServerProcess, shared_cache, start_server  # noqa: E402


def add_tenants(srv: ServerProcess, n: int) -> list[str]:
    """API keys of ``n`` new tenants (the operator's `cell tenant add`)."""
    env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
    keys = []
    for i in range(n):
        out = subprocess.run([sys.executable, "-m", "appliance.cli", "tenant", "add", f"bench{i}"], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        keys.append(out.strip().rsplit(" ", 1)[-1])
    return keys


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_floor(reps: int) -> tuple[float, float]:
    """p50 ms and CPU ms of `print(1+1)` in an in-process session (no HTTP, no worker hop)."""
    from appliance.runtime.loader import Runtimes
    from appliance.runtime.sessions import PythonSession

    rt = Runtimes(shared_cache())
    vol = tempfile.mkdtemp(prefix="cell-bench-vol-")
    sess = PythonSession(rt.get("python3"), vol, 256 << 20)
    try:
        for _ in range(20):
            sess.run(b"print(1+1)", 10.0, 1 << 20, None, None)
        times = []
        cpu0 = time.process_time()
        for _ in range(reps):
            t0 = time.perf_counter()
            out = sess.run(b"print(1+1)", 10.0, 1 << 20, None, None)
            times.append(time.perf_counter() - t0)
            if out.stdout != "2\n":
                raise SystemExit(f"engine floor: wrong answer {out.stdout!r}")
        cpu = (time.process_time() - cpu0) * 1000 / reps
    finally:
        sess.close()
        rt.close()
        shutil.rmtree(vol, ignore_errors=True)
    return statistics.median(times) * 1000, cpu


def timed_start(root: Path, log_level: str = "warning") -> tuple[ServerProcess, float]:
    """A server on ``root`` and the seconds from launch to its first answered run."""
    t0 = time.perf_counter()
    srv = start_server(root=root, env={"SYNAPSE_LOG_LEVEL": log_level}, wait_ready=False)  # the first run waits
    deadline = time.monotonic() + 120
    while True:
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1+1)"})
        if status == 200 and isinstance(body, dict) and body.get("stdout") == "2\n":
            return srv, time.perf_counter() - t0
        if time.monotonic() > deadline:
            srv.stop()
            raise SystemExit(f"no answered run within 120 s: {status} {body}")
        time.sleep(0.01)


def create_run_delete(srv: ServerProcess, clients: int, seconds: float,
                      phases: list[tuple[float, float, float]] | None = None) -> tuple[float, int]:
    """Cells per second and failed runs; ``phases`` gets each cycle's seconds in create, run and delete."""
    import http.client

    host, port = srv.url.split("//")[1].rsplit(":", 1)
    headers = {"Authorization": f"Bearer {srv.api_key}", "Content-Type": "application/json"}
    done = [0]
    bad = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        n = fails = 0
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/cells", json.dumps({"template": "python3"}), headers)
            cell = json.loads(conn.getresponse().read()).get("cell_id")
            t1 = time.perf_counter()
            conn.request("POST", f"/v1/cells/{cell}/exec", json.dumps({"code": "print(1)"}), headers)
            ok = json.loads(conn.getresponse().read()).get("stdout") == "1\n"
            t2 = time.perf_counter()
            conn.request("DELETE", f"/v1/cells/{cell}", None, headers)
            conn.getresponse().read()
            mine.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            n += 1
            fails += not ok
        conn.close()
        with lock:
            done[0] += n
            bad[0] += fails
            if phases is not None:
                phases.extend(mine)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=loop) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0] / (time.perf_counter() - t0), bad[0]


def create_run_delete_only(seconds: float, rounds: int, log_level: str = "warning") -> int:
    """The create + run + delete row alone, with CPU ms per cycle (web process, workers)."""
    root = Path(tempfile.mkdtemp(prefix="cell-bench-root-"))
    srv = start_server(root=root, env={"SYNAPSE_LOG_LEVEL": log_level})
    failed = 0
    try:
        create_run_delete(srv, 1, 1.0)  # the tenant's worker bound and its warm pool filled
        for _ in range(rounds):
            load = os.getloadavg()[0]
            pids = [srv.proc.pid, *srv.request("GET", "/v1/status")[1]["workers"]["pids"]]
            before = {p: _cpu_seconds(p) for p in pids}
            phases: list[tuple[float, float, float]] = []
            rate, bad = create_run_delete(srv, 2, seconds, phases)
            cycles = max(1, len(phases))
            p50 = [statistics.median(p[i] for p in phases) * 1000 if phases else 0.0 for i in range(3)]
            cpu = {p: (_cpu_seconds(p) - before[p]) * 1000 / cycles for p in pids if os.path.exists(f"/proc/{p}")}
            workers = sum(v for p, v in cpu.items() if p != srv.proc.pid)
            failed += bad
            print(f"create + run + delete, cells/s, 2 clients: {rate:.0f}   CPU ms/cycle: web {cpu[srv.proc.pid]:.2f}, "
                  f"workers {workers:.2f}   p50 ms: create {p50[0]:.1f}, run {p50[1]:.1f}, delete {p50[2]:.1f}   (load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)", flush=True)
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"FAIL: {failed} runs did not answer as expected")
        return 1
    return 0


def compile_bytecode() -> None:
    """Compile the tree's modules as an installed appliance has them (pip
    compiles them at install): a checkout run with PYTHONDONTWRITEBYTECODE=1
    would otherwise compile every module at every start, in every process."""
    import compileall

    for package in ("appliance", "mirror", "tui", "sdk"):
        compileall.compile_dir(REPO / package, quiet=1)
    print("bytecode: compiled, as an installed appliance has it", flush=True)


def start_only(rounds: int, log_level: str = "warning") -> int:
    """The start row alone: a first start, then ``rounds`` restarts of the same data root; prints the median."""
    compile_bytecode()
    root = Path(tempfile.mkdtemp(prefix="cell-bench-root-"))
    load = os.getloadavg()[0]
    try:
        srv, first = timed_start(root, log_level)
        srv.stop()
        times = []
        for _ in range(max(1, rounds)):
            srv, t = timed_start(root, log_level)
            srv.stop()
            times.append(t)
            print(f"restart to first answered run: {t:.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"start to first answered run: first start {first:.2f} s, restart median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}, {len(times)} restarts; "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    ap.add_argument("--tenants", type=int, default=1, help="spread the clients over N tenants (default 1)")
    ap.add_argument("--only", choices=["create-run-delete", "start"], help="measure only this row")
    ap.add_argument("--rounds", type=int, default=1, help="with --only: measurements (restarts) in a row (default 1)")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                    help="the server's SYNAPSE_LOG_LEVEL (default warning; an appliance runs at info)")
    args = ap.parse_args(argv)
    seconds = args.seconds
    if args.only == "create-run-delete":
        return create_run_delete_only(seconds, args.rounds, args.log_level)
    if args.only == "start":
        return start_only(args.rounds, args.log_level)
    compile_bytecode()
    load0 = os.getloadavg()
    floor_p50, floor_cpu = engine_floor(200)
    root = Path(tempfile.mkdtemp(prefix="cell-bench-root-"))
    first, first_start = timed_start(root, args.log_level)
    first.stop()
    srv, restart = timed_start(root, args.log_level)  # the same data root: the restart an operator sees
    hello = start_hello()
    failed = 0
    rows: dict[int, tuple[Drive, Drive, float, float, float, float]] = {}
    try:
        host, port = srv.url.split("//")[1].rsplit(":", 1)
        headers = {"Authorization": f"Bearer {srv.api_key}", "Content-Type": "application/json"}
        keys = add_tenants(srv, args.tenants) if args.tenants > 1 else [srv.api_key]
        print(f"{args.tenants} tenant(s), server log level {args.log_level}")
        print(f"engine floor, print(1+1) in-process: p50 {floor_p50:.2f} ms, CPU {floor_cpu:.2f} ms/run")
        print(f"start to first answered run: first start {first_start:.2f} s, restart {restart:.2f} s")
        print(f"{'clients':>7} {'hello/s':>8} {'runs/s':>7} {'ratio':>6} {'hello p50':>9} {'run p50':>8} {'p99':>7} "
              f"{'ratio':>6} {'hello CPU':>9} {'web ms/run':>10} {'workers':>8} {'client':>7}")
        for clients in (1, 2, 4, 8):
            h_cpu0 = _cpu_seconds(hello.proc.pid)
            h = drive_hello(hello, clients, seconds)
            h_cpu = (_cpu_seconds(hello.proc.pid) - h_cpu0) * 1000 / max(1, h.requests)
            owners = [keys[i % len(keys)] for i in range(clients)]
            cells = [srv.request("POST", "/v1/cells", {"template": "python3"}, key=k)[1]["cell_id"] for k in owners]
            # Workers start on demand, one set per tenant (T-TENANT-1): read the pids once the cells exist.
            pids = [srv.proc.pid, *srv.request("GET", "/v1/status")[1]["workers"]["pids"]]
            before = {p: _cpu_seconds(p) for p in pids}
            mine = time.process_time()
            c = drive(host, int(port), [f"/v1/cells/{cell}/exec" for cell in cells],
                      json.dumps({"code": "print(1+1)"}).encode(), [dict(headers, Authorization=f"Bearer {k}") for k in owners],
                      seconds, lambda a: a.get("stdout") == "2\n")
            client_cpu = (time.process_time() - mine) * 1000 / max(1, c.requests)
            cpu = {p: (_cpu_seconds(p) - before[p]) * 1000 / max(1, c.requests) for p in pids if os.path.exists(f"/proc/{p}")}
            workers = sum(v for p, v in cpu.items() if p != srv.proc.pid)
            failed += c.failures + h.failures
            rows[clients] = (h, c, h_cpu, cpu[srv.proc.pid], workers, client_cpu)
            print(f"{clients:>7} {h.rate:>8.0f} {c.rate:>7.0f} {c.rate / h.rate:>6.2f} {h.p50_ms:>9.2f} {c.p50_ms:>8.2f} "
                  f"{c.p99_ms:>7.2f} {c.p50_ms / h.p50_ms:>6.2f} {h_cpu:>9.2f} {cpu[srv.proc.pid]:>10.2f} {workers:>8.2f} "
                  f"{client_cpu:>7.2f}")
        crd, bad = create_run_delete(srv, 2, seconds)
        failed += bad
    finally:
        hello.stop()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    h1, c1 = rows[1][0], rows[1][1]
    h4, c4 = rows[4][0], rows[4][1]
    print(f"\nIssue 18's rows (load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; 2 cores shared):")
    table = [
        ("persistent Python print(1+1), 1 client, p50", f"{c1.p50_ms:.2f} ms", "<= 1.5 ms"),
        ("runs/s, 4 clients, each its own cell", f"{c4.rate:.0f}", ">= 1,000"),
        ("web-process CPU per run (4 clients)", f"{rows[4][3]:.2f} ms", "<= 0.5 ms"),
        ("worker CPU per run above the engine floor (4 clients)", f"{rows[4][4] - floor_cpu:.2f} ms", "<= 0.2 ms"),
        ("create + run + delete, cells/s, 2 clients", f"{crd:.0f}", ">= 400"),
        ("cell serve start -> first answered run (restart, cache warm)", f"{restart:.2f} s", "<= 1.0 s"),
        ("persistent run p50 / hello-world p50 (same run)", f"{c1.p50_ms / h1.p50_ms:.2f}", "<= 2.0"),
        ("runs/s with 4 clients / hello-world req/s (same run)", f"{c4.rate / h4.rate:.2f}", ">= 0.5"),
    ]
    for name, value, goal in table:
        print(f"  {name:62} {value:>10}   goal {goal}")
    print(f"  (engine floor p50 {floor_p50:.2f} ms, CPU {floor_cpu:.2f} ms; hello-world p50 {h1.p50_ms:.2f} ms, "
          f"{h4.rate:.0f} req/s with 4 clients, CPU {rows[4][2]:.2f} ms/request)")
    if failed:
        print(f"FAIL: {failed} runs did not answer as expected")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
