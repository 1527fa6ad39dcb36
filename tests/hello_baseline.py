#!/usr/bin/env python3
"""The design card's own stack with nothing in it: a hello-world Flask app on
waitress that parses a JSON body and answers JSON. The benchmarks measure it
in the same run as Cell and print Cell's figures as ratios to it, because
the machine they run on is shared and noisy.

``python tests/hello_baseline.py`` serves it on an ephemeral loopback port
and prints ``serving on http://...``; ``start_hello()`` does that in a child
process; ``drive()`` is the keep-alive client loop both benchmarks use.
"""
from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Hello:
    url: str
    proc: subprocess.Popen[str]

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.split("//")[1].rsplit(":", 1)
        return host, int(port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_hello(threads: int = 36, wait_ms: float = 0.0) -> Hello:
    """``threads``: as many request threads as Cell's server gets by default;
    ``wait_ms``: each request also sleeps that long, as a run waits for its worker."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(threads), str(wait_ms)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            return Hello(m.group(1), proc)
    proc.wait(timeout=10)
    raise RuntimeError("the hello-world baseline did not start")


@dataclass
class Drive:
    requests: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    @property
    def p99_ms(self) -> float:
        if not self.latencies:
            return float("nan")
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(0.99 * len(s)))] * 1000


def drive(host: str, port: int, paths: list[str], body: bytes, headers: dict[str, str] | list[dict[str, str]],
          seconds: float, check: Callable[[Any], bool]) -> Drive:
    """One keep-alive client per path, each posting ``body`` in a loop for
    ``seconds``; ``headers`` for all, or one set per path."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(path: str, headers: dict[str, str]) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        mine: list[float] = []
        bad = 0
        try:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                conn.request("POST", path, body, headers)
                answer = json.loads(conn.getresponse().read())
                mine.append(time.perf_counter() - t0)
                if not check(answer):
                    bad += 1
        finally:
            conn.close()
        with lock:
            latencies.extend(mine)
            failures[0] += bad

    t0 = time.perf_counter()
    per_path = headers if isinstance(headers, list) else [headers] * len(paths)
    threads = [threading.Thread(target=client, args=(p, h)) for p, h in zip(paths, per_path)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Drive(len(latencies), time.perf_counter() - t0, latencies, failures[0])


def drive_hello(hello: Hello, clients: int, seconds: float) -> Drive:
    host, port = hello.host_port
    return drive(host, port, ["/run"] * clients, json.dumps({"code": "print(1+1)"}).encode(),
                 {"Content-Type": "application/json"}, seconds, lambda a: a.get("stdout") == "2\n")


def hello_app(wait_s: float = 0.0) -> Any:
    """The baseline's Flask app: POST /run parses a JSON body and answers JSON
    (after sleeping ``wait_s``, when given)."""
    from flask import Flask, jsonify, request

    app = Flask("hello")

    @app.post("/run")
    def run() -> Any:
        body = request.get_json()
        if wait_s:
            time.sleep(wait_s)
        return jsonify({"status": "ok", "stdout": "2\n", "stderr": "", "code_bytes": len(body.get("code", ""))})

    return app


def _serve(threads: int, wait_ms: float) -> None:
    from waitress import create_server  # type: ignore[import-untyped]

    server = create_server(hello_app(wait_ms / 1000), host="127.0.0.1", port=0, threads=threads)
    print(f"hello: serving on http://127.0.0.1:{server.effective_port}", flush=True)
    server.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 36, float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
