"""SIGTERM drains: running runs finish and are answered with their receipt,
new runs are refused with 503 draining, then the process exits 0."""
from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.liveserver import start_server

pytestmark = pytest.mark.slow


def test_sigterm_drains_running_runs_then_exits(module_cache: None, tmp_path: Path) -> None:
    srv = start_server(tmp_path / "drain")
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
    result: dict[str, Any] = {}

    def slow() -> None:
        result["answer"] = srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": "import time; time.sleep(1.5); print('done')"})

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.4)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"}, timeout=5)
        assert (status, body["code"]) == (503, "draining")
    except OSError:
        pass  # already closed: also a refusal
    t.join(timeout=30)
    status, body, _ = result["answer"]
    assert status == 200 and body["stdout"] == "done\n" and body["receipt"]["receipt_hash"]
    assert srv.proc.wait(timeout=30) == 0
    srv.stop()


def test_sigterm_closes_idle_keep_alive_connections_and_still_captures(module_cache: None, tmp_path: Path) -> None:
    """An idle keep-alive connection does not keep the service running: SIGTERM
    closes it, a keep-alive connection whose run is in flight gets its answer,
    the idle cell is captured (T-IMAGE-2), and the log has no traceback."""
    from appliance.runtime import snapshot_file

    srv = start_server(tmp_path / "keepalive")
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3", "timeout_ms": 600000})
    idle_cell = cell["cell_id"]
    assert srv.request("POST", f"/v1/cells/{idle_cell}/exec", {"code": "k = 7"})[0] == 200
    _, busy, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
    host, port = srv.url.rsplit("/", 1)[-1].split(":")
    headers = {"Authorization": f"Bearer {srv.api_key}", "Content-Type": "application/json"}
    idle = http.client.HTTPConnection(host, int(port), timeout=60)
    running = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        idle.request("GET", "/healthz")
        first = idle.getresponse()
        first.read()
        assert first.status == 200 and not first.will_close  # HTTP/1.1: kept open for the next request
        running.request("POST", f"/v1/cells/{busy['cell_id']}/exec", headers=headers,
                        body=json.dumps({"code": "import time; time.sleep(1.5); print('done')"}))
        time.sleep(0.4)  # the run has started
        srv.proc.send_signal(signal.SIGTERM)
        answer = running.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["stdout"] == "done\n"
        assert srv.proc.wait(timeout=30) == 0  # before: waited for the idle connection forever
        assert idle.sock is not None and idle.sock.recv(1) == b""  # closed by the server, not by us
    finally:
        idle.close()
        running.close()
        srv.stop()
    assert snapshot_file.path_for(str(srv.root / "snapshots"), "default", idle_cell).is_file()
    assert not [line for line in srv.log if "Traceback" in line or "Bad file descriptor" in line], srv.log[-20:]
