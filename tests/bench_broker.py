"""Latency of one ``host_fetch`` to a loopback HTTP server, through a real pool.

Measurement only (not a test): a WorkerPool in this process (the supervisor,
no web server), one spawned and confined worker, a WAT guest that makes one
``host_fetch`` per run. It prints the median run latency of N runs whose guest
fetches from a loopback server, and of N runs whose fetch is denied at once
(egress off for the run: no I/O anywhere); the difference is what one fetch
costs. Runs on either tree: the test-only hooks admitting the loopback server
are installed in this process and in the worker (before the worker's
sandbox), so the fetch succeeds wherever it is made.

    SYNAPSE_MODULE_CACHE=... python -m tests.bench_broker [N]   (from the tree to measure)
"""
from __future__ import annotations

import functools
import http.server
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOOPBACK = ipaddress.ip_address("127.0.0.1")
LAST: list[Any] = []


def install_test_hooks() -> None:
    """TEST-ONLY: let appliance.egress.fetch reach 127.0.0.1 (the appliance never does this)."""
    from appliance import egress
    from appliance.ownaddrs import own_networks
    from appliance.policy.egress import address_denied

    def admit(ip: Any) -> str | None:
        return None if ip == LOOPBACK else address_denied(ip)

    # Read now: a confined worker (the old tree fetched there) cannot read /proc/net.
    nets = tuple(n for n in own_networks() if LOOPBACK not in n)

    def own() -> tuple[Any, ...]:
        return nets

    defaults = dict(egress.fetch.__kwdefaults__ or {})
    defaults.update(address_check=admit, own_addresses=own)
    egress.fetch.__kwdefaults__ = defaults


def hooked_worker(conn: Any, config: dict[str, Any]) -> None:
    install_test_hooks()
    from appliance.runtime.worker import worker_main

    worker_main(conn, config)


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello from loopback\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def main(n: int) -> None:
    install_test_hooks()
    from appliance.config import load_settings
    from appliance.runtime import protocol
    from appliance.runtime.pool import WorkerPool
    from tests import guests

    # The server runs in a process of its own: in this one it would share the
    # supervisor's GIL with the fetch it answers.
    server = subprocess.Popen([sys.executable, "-m", __spec__.name if __spec__ else "tests.bench_broker", "--serve"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    root = Path(tempfile.mkdtemp(prefix="cell-bench-broker-"))
    settings = load_settings({"SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                              "SYNAPSE_MODULE_CACHE": os.environ["SYNAPSE_MODULE_CACHE"], "SYNAPSE_WORKERS": "1",
                              "SYNAPSE_WARM_PYTHON": "0", "SYNAPSE_WARM_JAVASCRIPT": "0", "SYNAPSE_EGRESS": "on"})
    for p in (settings.volumes_dir, settings.db_path.parent, settings.keys_dir):
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
    pool = WorkerPool(settings, target=functools.partial(hooked_worker))
    pool.start()
    code = guests.fetch_probe(f"http://bench.example:{port}/x").encode()
    spec = protocol.EgressSpec(enabled=True, allow_hosts=[], deny=[], hosts={"bench.example": ["127.0.0.1"]})
    try:
        def one(egress: protocol.EgressSpec | None) -> tuple[float, int]:
            msg = protocol.ExecRequest(0, template="wasm", code=code, is_text=True, timeout_ms=5000, memory_mb=64,
                                       tenant_id="t", egress=egress)
            t = time.perf_counter()
            reply = pool.call(pool.worker(0), msg, deadline_s=5.0, tenant="t")
            elapsed = time.perf_counter() - t
            LAST[:] = [reply]
            return elapsed, reply.outcome.exit_code  # type: ignore[union-attr]

        for _ in range(5):  # warm the compile cache and the paths
            one(spec)
            one(None)
        fetched, denied = [], []
        for _ in range(n):
            t, rc = one(spec)
            assert rc == len(b"hello from loopback\n"), (rc, LAST)
            fetched.append(t)
            t, rc = one(None)
            assert rc == -1, rc
            denied.append(t)
        mf, md = statistics.median(fetched) * 1000, statistics.median(denied) * 1000
        print(f"runs={n} median run with one loopback fetch {mf:.2f} ms; with a denied fetch {md:.2f} ms; "
              f"fetch cost ~{mf - md:.2f} ms (p90 fetch run {sorted(fetched)[int(n * 0.9)] * 1000:.2f} ms)")
    finally:
        pool.close()
        server.kill()
        server.wait()


def serve() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
