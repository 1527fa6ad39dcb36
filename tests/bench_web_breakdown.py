#!/usr/bin/env python3
"""Where a persistent run's web-process CPU goes (issue 18), next to the
hello-world baseline measured the same way in the same run.

Rows, each per request, 1 client:
  - the hello-world app (tests/hello_baseline.py) on waitress in its own
    process, and the same app called in-process through WSGI with no server:
    the difference is waitress's own share; and the hello-world app on
    waitress sleeping as long as an in-process run's request thread waits
    (for its worker and the receipt's fsync): what waiting alone costs;
  - Cell's app on waitress (a real server, `print(1+1)` in a persistent
    Python cell) and the same app built in-process exactly as `cell serve`
    builds it (real pool, workers, stores, signatures), called through WSGI
    with no server: CPU of the whole web process, of the request's own
    thread, and the Python function calls the request thread makes;
  - the request thread's CPU split into the parts of a run (cProfile with a
    per-thread CPU clock, so waiting for the worker or for fsync counts
    nothing; profiling inflates each part about evenly, so read the shares);
  - a pipe round trip to a child process, read by the waiting thread itself
    and through a reader thread (what the pool does): the cost of that hop.

A benchmark: exits non-zero only if a run's answer is wrong.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing
import os
import pstats
import queue
import shutil
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bench_throughput import _cpu_seconds  # noqa: E402
from tests.hello_baseline import drive, drive_hello, hello_app, start_hello  # noqa: E402
from tests.liveserver import shared_cache, start_server  # noqa: E402

CODE = json.dumps({"code": "print(1+1)"}).encode()

# The parts of a run on the request thread: (label, file suffix, function name).
PARTS = [
    ("Flask: request context, dispatch, response object", "flask/app.py", "wsgi_app"),
    ("  before-request hooks (ids, rate limit, API key)", "flask/app.py", "preprocess_request"),
    ("  after-request hooks (metrics, access log)", "flask/app.py", "process_response"),
    ("  the route: exec_cell", "appliance/web/routes_cells.py", "exec_cell"),
    ("    body parse and validation", "appliance/web/validate.py", "exec_body"),
    ("    CellService.exec_in_cell", "appliance/cells.py", "exec_in_cell"),
    ("      WorkerPool.call (send, wait, lanes, locks)", "appliance/runtime/pool.py", "call"),
    ("      ReceiptStore.append (hash, sign, insert, commit)", "appliance/receipts/store.py", "append"),
    ("      run observers (metrics, run log line)", "appliance/ops/web.py", "observe"),
    ("    jsonify (the answer)", "flask/json/__init__.py", "jsonify"),
]


def wsgi_caller(app: Any, path: str, headers: dict[str, str]) -> Callable[[], bytes]:
    """One POST of ``CODE`` to ``path`` through ``app`` with no server in between."""
    base = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.version": (1, 0),
            "REMOTE_ADDR": "127.0.0.1", "CONTENT_LENGTH": str(len(CODE)), "CONTENT_TYPE": "application/json",
            "HTTP_HOST": "127.0.0.1", **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}}

    def call() -> bytes:
        environ = dict(base, **{"wsgi.input": io.BytesIO(CODE)})
        return b"".join(app(environ, lambda status, headers, exc=None: None))

    return call


def cpu_per_call(call: Callable[[], bytes], n: int, check: Callable[[bytes], bool]) -> tuple[float, float, int]:
    """Process and calling-thread CPU ms per call, and how many answers failed ``check``."""
    bad = 0
    p0, t0 = time.process_time(), time.thread_time()
    for _ in range(n):
        bad += not check(call())
    return (time.process_time() - p0) * 1000 / n, (time.thread_time() - t0) * 1000 / n, bad


def python_calls(call: Callable[[], bytes], n: int) -> float:
    """Python function calls per request on the calling thread."""
    count = [0]

    def tracer(_frame: Any, event: str, _arg: Any) -> None:
        if event == "call":
            count[0] += 1

    sys.setprofile(tracer)
    try:
        for _ in range(n):
            call()
    finally:
        sys.setprofile(None)
    return count[0] / n


def parts(call: Callable[[], bytes], n: int) -> tuple[float, dict[str, float]]:
    """The request thread's profiled CPU per request and each part's share of it."""
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in stats.values())
    shares = {}
    for label, suffix, name in PARTS:
        shares[label] = sum(v[3] for (f, _line, fn), v in stats.items() if fn == name and f.endswith(suffix)) / total
    return total * 1000 / n, shares


def _echo(conn: Connection) -> None:
    while True:
        frame = conn.recv_bytes()
        if not frame:
            return
        conn.send_bytes(frame)


def pipe_hop(n: int) -> tuple[float, float]:
    """CPU µs per round trip in the parent: read by the waiting thread, and via a reader thread."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(child,), daemon=True)
    proc.start()
    frame = b"x" * 300  # about a run's answer frame
    try:
        t0 = time.process_time()
        for _ in range(n):
            parent.send_bytes(frame)
            parent.recv_bytes()
        direct = (time.process_time() - t0) * 1e6 / n
        answers: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        reader = threading.Thread(target=lambda: [answers.put(parent.recv_bytes()) for _ in range(n)])
        reader.start()
        t0 = time.process_time()
        for _ in range(n):
            parent.send_bytes(frame)
            answers.get()
        hopped = (time.process_time() - t0) * 1e6 / n
        reader.join()
    finally:
        parent.send_bytes(b"")
        proc.join(10)
    return direct, hopped


def cell_in_process(root: Path) -> tuple[Any, Any, str]:
    """Cell's app, services and a tenant key, built as `cell serve --dev` builds them."""
    os.environ.update({"SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                       "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_LOG_LEVEL": "warning",
                       "SYNAPSE_RATE_LIMIT_RPS": "100000", "SYNAPSE_RATE_LIMIT_BURST": "100000"})
    from appliance.cli import build_parser, settings_from_args
    from appliance.datadir import prepare_root
    from appliance.runtime.pool import WorkerPool
    from appliance.services import build_services, ensure_default_tenant
    from appliance.web.app import create_app

    settings = settings_from_args(build_parser().parse_args(["serve", "--dev"]))
    prepare_root(settings)
    pool = WorkerPool(settings)
    pool.start()
    services = build_services(settings, pool=pool)
    key = ensure_default_tenant(services)
    assert key is not None, "a fresh data root gets a default tenant"
    services.start_background()
    return create_app(services), services, key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000, help="requests per measurement (default 2000)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per over-HTTP measurement (default 4)")
    n = ap.parse_args(argv).runs
    seconds = ap.parse_args(argv).seconds
    load0 = os.getloadavg()[0]
    ok_cell: Callable[[bytes], bool] = lambda raw: json.loads(raw).get("stdout") == "2\n"  # noqa: E731
    failed = 0

    root = Path(tempfile.mkdtemp(prefix="cell-breakdown-"))
    srv = start_server(root / "http", env={"SYNAPSE_LOG_LEVEL": "warning"})
    try:
        host, port = srv.url.split("//")[1].rsplit(":", 1)
        cell = srv.request("POST", "/v1/cells", {"template": "python3"})[1]["cell_id"]
        headers = {"Authorization": f"Bearer {srv.api_key}", "Content-Type": "application/json"}
        drive(host, int(port), [f"/v1/cells/{cell}/exec"], CODE, headers, 1.0, lambda a: True)
        c_cpu0 = _cpu_seconds(srv.proc.pid)
        c = drive(host, int(port), [f"/v1/cells/{cell}/exec"], CODE, headers, seconds,
                  lambda a: a.get("stdout") == "2\n")
        c_http = (_cpu_seconds(srv.proc.pid) - c_cpu0) * 1000 / max(1, c.requests)
        failed += c.failures
    finally:
        srv.stop()

    app, services, key = cell_in_process(root / "inproc")
    try:
        created = app.test_client().post("/v1/cells", json={"template": "python3"},
                                         headers={"Authorization": f"Bearer {key}"})
        assert created.status_code == 201, created.get_data()
        cell = created.get_json()["cell_id"]
        call = wsgi_caller(app, f"/v1/cells/{cell}/exec", {"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json"})
        for _ in range(200):
            call()
        wall0 = time.perf_counter()
        c_proc, c_thread, bad = cpu_per_call(call, n, ok_cell)
        # What the request thread spends not running: waiting for the worker and the receipt's fsync.
        c_wait = (time.perf_counter() - wall0) * 1000 / n - c_thread
        failed += bad
        c_calls = python_calls(call, 200)
        profiled, shares = parts(call, n)
    finally:
        services.close()
        shutil.rmtree(root, ignore_errors=True)

    hello_http: list[float] = []
    for wait_ms in (0.0, c_wait):
        hello = start_hello(wait_ms=wait_ms)
        try:
            h_cpu0 = _cpu_seconds(hello.proc.pid)
            h = drive_hello(hello, 1, seconds)
            hello_http.append((_cpu_seconds(hello.proc.pid) - h_cpu0) * 1000 / max(1, h.requests))
            failed += h.failures
        finally:
            hello.stop()
    h_http, h_wait = hello_http
    hello_call = wsgi_caller(hello_app(), "/run", {"Content-Type": "application/json"})
    for _ in range(200):
        hello_call()
    h_proc, h_thread, bad = cpu_per_call(hello_call, n, ok_cell)
    failed += bad
    h_calls = python_calls(hello_call, 200)
    direct, hopped = pipe_hop(n)

    print(f"web-process CPU per request, 1 client (load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end)")
    print(f"{'':44} {'hello-world':>12} {'Cell run':>10}")
    print(f"{'on waitress, over HTTP (server process)':44} {h_http:>9.3f} ms {c_http:>7.3f} ms")
    print(f"{f'  the same, each request sleeping {c_wait:.2f} ms':44} {h_wait:>9.3f} ms   (as long as a run waits: worker, fsync)")
    print(f"{'in-process WSGI call, no server: process':44} {h_proc:>9.3f} ms {c_proc:>7.3f} ms")
    print(f"{'  of which the request thread':44} {h_thread:>9.3f} ms {c_thread:>7.3f} ms")
    print(f"{'  other threads (pipe reader, stores)':44} {h_proc - h_thread:>9.3f} ms {c_proc - c_thread:>7.3f} ms")
    print(f"{'waitress share (over HTTP - in-process)':44} {h_http - h_proc:>9.3f} ms {c_http - c_proc:>7.3f} ms")
    print(f"{'Python calls on the request thread':44} {h_calls:>12.0f} {c_calls:>10.0f}")
    print(f"\nthe request thread's CPU by part (profiled: {profiled:.3f} ms per run; shares of it):")
    for label, share in shares.items():
        print(f"  {label:56} {100 * share:5.1f}%  ~{share * c_thread * 1000:5.0f} us")
    print(f"\npipe round trip to a child, parent CPU: read by the waiting thread {direct:.1f} us, "
          f"through a reader thread {hopped:.1f} us (the hop: {hopped - direct:.1f} us)")
    if failed:
        print(f"FAIL: {failed} answers were wrong")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
