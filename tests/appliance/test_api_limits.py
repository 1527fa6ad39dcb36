"""Back-pressure on a live server: rate limits (429 + Retry-After) and a
full queue (503 + Retry-After), never a 500 or a hang (T-DOS-2)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.liveserver import ServerProcess, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def limited(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("limited"), env={
        "SYNAPSE_RATE_LIMIT_RPS": "2", "SYNAPSE_RATE_LIMIT_BURST": "3", "SYNAPSE_WORKERS": "1",
        "SYNAPSE_WARM_PYTHON": "0", "SYNAPSE_WARM_JAVASCRIPT": "0",
    })
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def narrow(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("narrow"), env={"SYNAPSE_WORKERS": "1", "SYNAPSE_QUEUE_MAX": "0"})
    yield srv
    srv.stop()


def test_t_dos_2_rate_limit_answers_429_with_retry_after(limited: ServerProcess) -> None:
    statuses: list[tuple[int, Any, dict[str, str]]] = [limited.request("GET", "/v1/cells") for _ in range(8)]
    codes = [s for s, _, _ in statuses]
    assert codes[:3] == [200, 200, 200] and 429 in codes
    status, body, headers = next(x for x in statuses if x[0] == 429)
    assert body["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    time.sleep(1.6)
    assert limited.request("GET", "/v1/cells")[0] == 200


def test_t_dos_2_spoofed_forwarded_for_from_untrusted_peer_is_ignored(limited: ServerProcess) -> None:
    time.sleep(2)
    codes = [limited.request("GET", "/v1/cells", headers={"X-Forwarded-For": f"203.0.113.{i}"})[0] for i in range(8)]
    assert 429 in codes  # a new XFF per request does not buy a new bucket


def test_t_dos_2_full_queue_answers_503_not_500(narrow: ServerProcess) -> None:
    _, cell, _ = narrow.request("POST", "/v1/cells", {"template": "python3"})
    results: list[int] = []

    def slow() -> None:
        results.append(narrow.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": "import time; time.sleep(1.5)", "timeout_ms": 5000})[0])

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    status, body, headers = narrow.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"})
    for t in threads:
        t.join(timeout=30)
    assert (status, body["code"]) == (503, "busy") and int(headers["Retry-After"]) >= 1
    assert sorted(results) == [200, 200]


@pytest.fixture(scope="module")
def quota(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("quota"), env={"SYNAPSE_TENANT_QUOTA_MB": "1"})
    yield srv
    srv.stop()


def test_t_disk_1_files_api_write_over_quota_refused(quota: ServerProcess) -> None:
    _, cell, _ = quota.request("POST", "/v1/cells", {"template": "wasm"})
    cid = cell["cell_id"]
    assert quota.request("POST", f"/v1/cells/{cid}/files", {"path": "a.bin", "content": "x" * 600_000})[0] == 200
    status, body, _ = quota.request("POST", f"/v1/cells/{cid}/files", {"path": "b.bin", "content": "x" * 600_000})
    assert (status, body["code"]) == (413, "quota_exceeded")
    _, info, _ = quota.request("GET", f"/v1/cells/{cid}")
    assert info["disk_bytes"] == 600_000
    _, status_body, _ = quota.request("GET", "/v1/status")
    assert status_body["quota"] == {"used_bytes": 600_000, "limit_bytes": 1024 * 1024, "used_files": 1, "limit_files": 100_000}
    assert quota.request("DELETE", f"/v1/cells/{cid}/files?path=a.bin")[0] == 200


def test_t_disk_1_guest_writes_over_quota_block_further_runs(quota: ServerProcess) -> None:
    _, cell, _ = quota.request("POST", "/v1/cells", {"template": "python3"})
    cid = cell["cell_id"]
    status, body, _ = quota.request("POST", f"/v1/cells/{cid}/exec", {"code": "open('big.bin', 'wb').write(b'x' * 2_000_000)"})
    assert status == 200 and body["status"] in ("ok", "killed")  # killed: the mid-run watch saw it first (T-DISK-1)
    status, body, _ = quota.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(1)"})
    assert (status, body["code"]) == (413, "quota_exceeded")
    assert quota.request("DELETE", f"/v1/cells/{cid}/files?path=big.bin")[0] == 200
    status, body, _ = quota.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(1)"})
    assert status == 200 and body["stdout"] == "1\n"
