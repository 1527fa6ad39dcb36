"""Back-pressure on a live server: rate limits (429 + Retry-After) and a
full queue (503 + Retry-After), never a 500 or a hang (T-DOS-2)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
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


def test_t_mcp_1_rate_limit_covers_the_mcp_endpoint(limited: ServerProcess) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    answers = [limited.request("POST", "/mcp", init) for _ in range(8)]
    limited_answer = next((x for x in answers if x[0] == 429), None)
    assert limited_answer is not None, [a[0] for a in answers]
    _, body, headers = limited_answer
    assert body["error"]["data"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1


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


# --- T-DOS-2: bodies are refused at the headers, before waitress reads them ---
# Every refusal below is answered while the client has sent no body byte at
# all: a server that read (or spooled) the body first would still be waiting.

LIMIT = 10 * 1024 * 1024  # Settings.max_body_bytes


@pytest.fixture(scope="module")
def spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def gated(module_cache: None, tmp_path_factory: pytest.TempPathFactory, spool_dir: Path) -> Iterator[ServerProcess]:
    # TMPDIR is where waitress spools bodies past inbuf_overflow: private, so we can count it.
    srv = start_server(tmp_path_factory.mktemp("gated"), env={
        "TMPDIR": str(spool_dir), "SYNAPSE_WORKERS": "1", "SYNAPSE_WARM_PYTHON": "0", "SYNAPSE_WARM_JAVASCRIPT": "0",
    })
    yield srv
    srv.stop()


def _connect(srv: ServerProcess) -> socket.socket:
    host, port = srv.url.split("//", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=15)


def _head(path: str = "/v1/execute", auth: str | None = None, length: int | None = None, chunked: bool = False,
          extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: cell", "Content-Type: application/json"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        rest += chunk
    return int(lines[0].split()[1]), headers, json.loads(rest[:length])


def _spooled(pid: int, spool: Path) -> int:
    """Bytes in temp files the server process holds open under its TMPDIR."""
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith(str(spool)):
                total += os.stat(fd).st_size
        except OSError:
            continue  # closed meanwhile
    return total


def _gate_cases(key: str) -> list[tuple[str, dict[str, Any], int, str]]:
    good = f"Bearer {key}"
    return [
        ("no key, 10 GiB", {"length": 10 * 1024 ** 3}, 413, "payload_too_large"),
        ("no key, limit + 1", {"length": LIMIT + 1}, 413, "payload_too_large"),
        ("no key, 5 MB", {"length": 5_000_000}, 401, "unauthorized"),
        ("no key, 5 MB, Expect 100-continue", {"length": 5_000_000, "extra": ("Expect: 100-continue",)}, 401, "unauthorized"),
        ("wrong key, 5 MB", {"length": 5_000_000, "auth": "Bearer not-a-key"}, 401, "bad_key"),
        ("basic auth, 5 MB", {"length": 5_000_000, "auth": "Basic Zm9vOmJhcg=="}, 401, "unauthorized"),
        ("oversized bearer, 5 MB", {"length": 5_000_000, "auth": "Bearer " + "k" * 600}, 401, "unauthorized"),
        ("no key, chunked", {"chunked": True}, 401, "unauthorized"),
        ("wrong key, chunked", {"chunked": True, "auth": "Bearer not-a-key"}, 401, "bad_key"),
        ("no key, chunked with a length too", {"chunked": True, "length": 5}, 401, "unauthorized"),
        ("valid key, limit + 1", {"length": LIMIT + 1, "auth": good}, 413, "payload_too_large"),
        ("valid key, 10 GiB", {"length": 10 * 1024 ** 3, "auth": good}, 413, "payload_too_large"),
        ("valid key, 10 GiB, files route", {"length": 10 * 1024 ** 3, "auth": good, "path": "/v1/cells/x/files"}, 413, "payload_too_large"),
    ]


GATE_IDS = [c[0] for c in _gate_cases("k")]


@pytest.mark.parametrize("case", range(len(GATE_IDS)), ids=GATE_IDS)
def test_t_dos_2_body_refused_at_the_headers(gated: ServerProcess, spool_dir: Path, case: int) -> None:
    _, kw, status, code = _gate_cases(gated.api_key)[case]
    with _connect(gated) as sock:
        sock.sendall(_head(**kw))  # headers only: not one body byte follows
        got, headers, body = _response(sock)
        assert (got, body["code"]) == (status, code), body
        assert headers.get("connection") == "close" and headers.get("x-request-id")
    assert _spooled(gated.proc.pid, spool_dir) == 0


def test_t_dos_2_body_announced_past_the_drain_budget_is_not_waited_for(gated: ServerProcess) -> None:
    with _connect(gated) as sock:
        sock.sendall(_head(length=10 * 1024 ** 3))
        assert _response(sock)[0] == 413
        assert sock.recv(1) == b""  # the server hangs up at once rather than wait for 10 GiB


def test_t_dos_2_client_that_sends_the_refused_body_anyway_gets_the_answer(gated: ServerProcess, spool_dir: Path) -> None:
    # Like urllib: the whole body goes out before the answer is read. The
    # server answers at the headers, drops the 2 MB it is sent (stores none
    # of it), then closes cleanly, so the client sees the 401, not a reset.
    with _connect(gated) as sock:
        sock.sendall(_head(length=2_000_000) + b"z" * 2_000_000)
        status, headers, body = _response(sock)
        assert (status, body["code"]) == (401, "unauthorized")
        assert sock.recv(1) == b""
    assert _spooled(gated.proc.pid, spool_dir) == 0


def test_t_dos_2_refused_body_is_dropped_not_spooled(gated: ServerProcess, spool_dir: Path) -> None:
    # Control: an authenticated body in flight IS spooled, and we can see it.
    with _connect(gated) as sock:
        sock.sendall(_head(auth=f"Bearer {gated.api_key}", length=4_000_000) + b"x" * 2_000_000)
        deadline = time.monotonic() + 20
        while _spooled(gated.proc.pid, spool_dir) < 1_000_000:
            assert time.monotonic() < deadline, "the control body never showed up in the spool"
            time.sleep(0.05)
    deadline = time.monotonic() + 20
    while _spooled(gated.proc.pid, spool_dir) != 0:  # released once the client hung up
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Unauthenticated, 9 MB announced, then a client that keeps sending 3 MB anyway.
    for head, part in ((_head(length=9_000_000), b"y" * 65536), (_head(chunked=True), b"10000\r\n" + b"y" * 65536 + b"\r\n")):
        with _connect(gated) as sock:
            sock.sendall(head)
            status, _, body = _response(sock)
            assert status == 401 and body["code"] == "unauthorized"
            sent = 0
            try:
                for _ in range(48):  # 3 MB
                    sock.sendall(part)
                    sent += len(part)
            except OSError:
                pass  # the server closed the connection: nothing of it was read
        assert _spooled(gated.proc.pid, spool_dir) == 0, f"spooled after {sent} bytes sent"


def test_t_dos_2_refused_body_is_not_parsed_as_a_pipelined_request(gated: ServerProcess) -> None:
    inner = f"DELETE /v1/cells/c1 HTTP/1.1\r\nHost: cell\r\nAuthorization: Bearer {gated.api_key}\r\n\r\n".encode()
    with _connect(gated) as sock:
        sock.sendall(_head(length=len(inner)) + inner)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 401"), data


def test_t_dos_2_authenticated_chunked_body_within_limit_is_read(gated: ServerProcess) -> None:
    payload = json.dumps({"template": "wasm"}).encode()
    chunks = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (payload[:5], payload[5:])) + b"0\r\n\r\n"
    with _connect(gated) as sock:
        sock.sendall(_head("/v1/cells", auth=f"Bearer {gated.api_key}", chunked=True) + chunks)
        status, _, body = _response(sock)
    assert status == 201 and body["cell_id"]


@pytest.mark.parametrize("raw,status,code", [
    (_head("/v1/cells", auth="Bearer {key}", chunked=True) + b"zz\r\n", 400, "bad_request"),  # waitress: bad chunk size
    (_head(extra=("X-Pad: " + "p" * 70_000,)), 431, "headers_too_large"),  # over the 64 KiB header bound
    (_head(auth="Bearer {key}", extra=("Transfer-Encoding: gzip",)), 501, "not_implemented"),
], ids=["bad-chunk-size", "headers-over-64k", "unknown-transfer-encoding"])
def test_t_dos_2_waitress_refusals_answer_json_with_a_code(gated: ServerProcess, raw: bytes, status: int, code: str) -> None:
    with _connect(gated) as sock:
        sock.sendall(raw.replace(b"{key}", gated.api_key.encode()))
        got, _, body = _response(sock)
    assert (got, body["code"]) == (status, code) and set(body) == {"error", "code"}
