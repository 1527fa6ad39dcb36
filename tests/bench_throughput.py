#!/usr/bin/env python3
"""Persistent-cell throughput over HTTP with keep-alive clients.

Starts a real server, gives each client its own Python cell, and counts
`print(1+1)` runs answered in a fixed time with 1, 2, 4 and 8 clients; also
prints CPU milliseconds per run of the web process, each worker and the
client. A benchmark: exits non-zero only if a run fails.

``--tenants N`` spreads the clients over N tenants (client i is tenant
i mod N): with tenant-bound workers (T-TENANT-1) each tenant's cells live in
workers of their own. ``--seconds S`` sets the time per row.
"""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.liveserver import REPO, ServerProcess, start_server  # noqa: E402


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


def main(seconds: float = 5.0, tenants: int = 1) -> int:
    srv = start_server(env={"SYNAPSE_LOG_LEVEL": "warning"})
    failed = 0
    try:
        host, port = srv.url.split("//")[1].rsplit(":", 1)
        keys = add_tenants(srv, tenants) if tenants > 1 else [srv.api_key]
        print(f"{tenants} tenant(s)")
        print(f"{'clients':>8} {'runs/s':>8} {'web ms/run':>11} {'workers ms/run':>15} {'client ms/run':>14} {'workers':>8}")
        for clients in (1, 2, 4, 8):
            cells = [(srv.request("POST", "/v1/cells", {"template": "python3"}, key=keys[i % len(keys)])[1]["cell_id"],
                      keys[i % len(keys)]) for i in range(clients)]
            # Workers start on demand (one per tenant): read the pids once the cells exist.
            pids = [srv.proc.pid, *srv.request("GET", "/v1/status")[1]["workers"]["pids"]]
            before = {p: _cpu_seconds(p) for p in pids}
            mine = time.process_time()
            counts: list[int] = []
            stop = time.monotonic() + seconds
            lock = threading.Lock()

            def client(cell: str, key: str) -> None:
                nonlocal failed
                headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                body = json.dumps({"code": "print(1+1)"})
                n = 0
                while time.monotonic() < stop:
                    conn.request("POST", f"/v1/cells/{cell}/exec", body, headers)
                    answer = json.loads(conn.getresponse().read())
                    if answer.get("stdout") != "2\n":
                        with lock:
                            failed += 1
                    n += 1
                conn.close()
                with lock:
                    counts.append(n)

            threads = [threading.Thread(target=client, args=c) for c in cells]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runs = sum(counts)
            cpu = {p: (_cpu_seconds(p) - before[p]) * 1000 / max(1, runs) for p in pids if os.path.exists(f"/proc/{p}")}
            workers = sum(v for p, v in cpu.items() if p != srv.proc.pid)
            print(f"{clients:>8} {runs / seconds:>8.0f} {cpu[srv.proc.pid]:>11.2f} {workers:>15.2f} "
                  f"{(time.process_time() - mine) * 1000 / max(1, runs):>14.2f} {len(pids) - 1:>8}")
    finally:
        srv.stop()
    if failed:
        print(f"FAIL: {failed} runs did not answer 2")
        return 1
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]

    def _opt(name: str, default: str) -> str:
        return args[args.index(name) + 1] if name in args else default

    sys.exit(main(seconds=float(_opt("--seconds", "5")), tenants=int(_opt("--tenants", "1"))))
