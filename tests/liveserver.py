"""Start a real Cell server on an ephemeral loopback port, for tests and the
release-gate scripts (run_test.py, tests/red_team.py, tests/stress_test.py,
tests/benchmark_e2b.py).

The server is a real ``cell serve`` process (waitress + worker processes),
with its data in a fresh directory and the compiled-module cache shared
(the machine-wide ``~/.cache/cell/modules``, also used by `make run`,
unless SYNAPSE_MODULE_CACHE says otherwise), so the runtimes are compiled at most once per machine.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import dev_module_cache

REPO = Path(__file__).resolve().parent.parent


def shared_cache() -> Path:
    path = Path(os.environ.get("SYNAPSE_MODULE_CACHE") or dev_module_cache(os.environ))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def warm_cache() -> None:
    """Compile the runtimes into the shared cache in a child process (once per machine)."""
    env = dict(os.environ, SYNAPSE_MODULE_CACHE=str(shared_cache()), SYNAPSE_ROOT=tempfile.mkdtemp(prefix="cell-warm-"))
    subprocess.run([sys.executable, "-m", "appliance.cli", "warm"], env=env, check=True, cwd=REPO)


@dataclass
class ServerProcess:
    url: str
    api_key: str
    root: Path
    proc: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def request(self, method: str, path: str, body: Any = None, key: str | None = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {key if key is not None else self.api_key}")
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read().decode()
                return resp.status, _json(text), dict(resp.headers)
        except urllib.error.HTTPError as e:
            with e:  # an error response still holds its socket: close it (no ResourceWarning)
                text = e.read().decode()
                return e.code, _json(text), dict(e.headers)

    def verify_receipts(self, key: str | None = None, timeout: float = 120) -> tuple[int, Any]:
        """GET /v1/receipts/verify until the answer is no longer "pending" (the node's
        auditor checks new rows on its own thread), honouring 429 Retry-After."""
        deadline = time.monotonic() + timeout
        while True:
            status, body, headers = self.request("GET", "/v1/receipts/verify", key=key)
            done = status != 429 and not (status == 200 and isinstance(body, dict) and body.get("status") == "pending")
            if done or time.monotonic() > deadline:
                return status, body
            time.sleep(float(headers.get("Retry-After", "1")) if status == 429 else 0.5)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.pump is not None:
            self.pump.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode or 0)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def start_server(root: Path | None = None, env: dict[str, str] | None = None, timeout: float = 900,
                 wait_ready: bool = True) -> ServerProcess:
    """``cell serve --dev`` on ``root``; returns once it listens and, with
    ``wait_ready``, once its first workers are up ("cell: ready:"): the server
    listens before its workers are ready, and runs sent earlier wait for them."""
    root = Path(root or tempfile.mkdtemp(prefix="cell-live-"))
    full_env = dict(os.environ)
    full_env.update({
        "SYNAPSE_ROOT": str(root),
        "SYNAPSE_CONFIG_DIR": str(root / "etc"),
        "SYNAPSE_MODULE_CACHE": str(shared_cache()),
        "SYNAPSE_PORT": "0",
        "SYNAPSE_HOST": "127.0.0.1",
        "SYNAPSE_RATE_LIMIT_RPS": "100000",
        "SYNAPSE_RATE_LIMIT_BURST": "100000",
        "PYTHONUNBUFFERED": "1",
        # Idle captures off unless a test asks (test_cell_snapshots.py's own server):
        # with them on, whether a crash loses the interpreter or rolls back would
        # depend on how long the machine took between a test's runs.
        "SYNAPSE_CELL_CAPTURE_IDLE_S": "0",
    })
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--dev"], env=full_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = ServerProcess(url="", api_key="", root=root, proc=proc)
    listening = threading.Event()
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.log.append(line.rstrip("\n"))
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                server.url = m.group(1)
            m = re.search(r"API key of tenant 'default': (\S+)", line)
            if m:
                server.api_key = m.group(1)
                listening.set()
            if line.startswith("cell: ready:"):
                ready.set()
        listening.set()
        ready.set()

    server.pump = threading.Thread(target=pump, daemon=True)
    server.pump.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (ready if wait_ready else listening).wait(0.1):
        pass
    if not server.url or not server.api_key:
        server.stop()
        raise RuntimeError("server did not start:\n" + "\n".join(server.log[-40:]))
    return server
