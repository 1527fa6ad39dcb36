"""SIGTERM drains: running runs finish and are answered with their receipt,
new runs are refused with 503 draining, then the process exits 0."""
from __future__ import annotations

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
