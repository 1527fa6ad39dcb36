"""The body gate inside waitress's parser (T-DOS-2), without a network.

The live tests in ``test_api_limits.py`` prove the gate on a real server;
these pin the parser's behaviour byte by byte, the gate's rules, and the
app's refusal when the gate and the guard disagree.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from waitress.adjustments import Adjustments

from appliance.web.app import BODY_REFUSED
from appliance.web.server import CHUNK_FRAMING_SLACK, DRAIN_MAX_BYTES, MAX_HEADER_BYTES, _GatedParser, body_gate

LIMIT = 1000


class Recorder:
    def __init__(self, answer: str | None = None, fail: bool = False) -> None:
        self.answer, self.fail = answer, fail
        self.calls: list[tuple[str, int | None]] = []
        self.stopped: list[int] = []

    def gate(self, path: str, headers: dict[str, str], length: int | None) -> str | None:
        self.calls.append((path, length))
        if self.fail:
            raise RuntimeError("store unavailable")
        return self.answer

    def stop(self, drain: int) -> None:
        self.stopped.append(drain)


def parser(rec: Recorder) -> _GatedParser:
    adj = Adjustments(listen="127.0.0.1:0", max_request_header_size=MAX_HEADER_BYTES, max_request_body_size=LIMIT + CHUNK_FRAMING_SLACK)
    return _GatedParser(adj, rec.gate, rec.stop)


HEAD = b"POST /v1/execute HTTP/1.1\r\nHost: cell\r\nContent-Length: 500000\r\nExpect: 100-continue\r\n\r\n"
CHUNKED = b"POST /v1/execute HTTP/1.1\r\nHost: cell\r\nTransfer-Encoding: chunked\r\n\r\n"


TAIL = b"GET /v1/status HTTP/1.1\r\n\r\n" + b"x" * 4096  # body bytes that arrive with the headers


@pytest.mark.parametrize("head,length,drain", [
    (HEAD, 500000, 500000 - len(TAIL)),   # the rest of the announced body is dropped before the close
    (CHUNKED, None, DRAIN_MAX_BYTES),     # no length: drop up to the drain budget
    (HEAD.replace(b"500000", str(DRAIN_MAX_BYTES + 1).encode()), DRAIN_MAX_BYTES + 1, 0),  # too big to wait for
], ids=["content-length", "chunked", "over-drain-budget"])
@pytest.mark.parametrize("reason", ["unauthorized", "too_large"])
def test_t_dos_2_refused_body_is_not_buffered(head: bytes, length: int | None, drain: int, reason: str) -> None:
    rec = Recorder(reason)
    p = parser(rec)
    data = head + TAIL
    assert p.received(data) == len(data)  # all of it swallowed: nothing left to parse as a request
    assert p.completed and p.error is None and p.body_refused == reason
    assert p.body_rcv is None and p.get_body_stream().read() == b""
    assert p.expect_continue is False and p.headers["CONNECTION"] == "close"
    assert rec.calls == [("/v1/execute", length)] and rec.stopped == [drain]
    assert p.received(b"more body") == 0  # a completed parser takes nothing more


def test_t_dos_2_gate_failure_refuses_the_body() -> None:
    p = parser(Recorder(fail=True))
    p.received(HEAD)
    assert p.completed and p.body_refused == "gate_error" and p.body_rcv is None


def test_t_dos_2_allowed_body_is_read_as_usual() -> None:
    rec = Recorder(None)
    p = parser(rec)
    head = b"POST /v1/cells HTTP/1.1\r\nHost: cell\r\nContent-Length: 5\r\n\r\n"
    assert p.received(head + b"ab") == len(head)  # the headers; the channel hands the rest back
    assert p.received(b"ab") == 2 and not p.completed
    p.received(b"cde")
    assert p.completed and p.body_refused is None and p.get_body_stream().read() == b"abcde" and rec.stopped == []


def test_t_dos_2_bodiless_requests_never_reach_the_gate() -> None:
    rec = Recorder("unauthorized")
    p = parser(rec)
    p.received(b"GET /v1/cells HTTP/1.1\r\nHost: cell\r\n\r\n")
    assert p.completed and p.body_refused is None and rec.calls == []


def test_t_dos_2_authenticated_chunked_body_is_bounded_by_waitress() -> None:
    p = parser(Recorder(None))
    p.received(CHUNKED)
    chunk = f"{LIMIT:x}\r\n".encode() + b"z" * LIMIT + b"\r\n"
    for _ in range(CHUNK_FRAMING_SLACK // LIMIT + 2):
        if p.completed:
            break
        p.received(chunk)
    assert p.completed and p.error is not None and p.error.code == 413


class FakeStore:
    def tenant_for_key(self, key: str) -> Any:
        return SimpleNamespace(id="t1") if key == "good-key" else None


GATE = body_gate(SimpleNamespace(settings=SimpleNamespace(max_body_bytes=LIMIT), store=FakeStore()))
GATE_TABLE = [
    ("/v1/execute", {"AUTHORIZATION": "Bearer good-key"}, 10, None),
    ("/v1/execute", {"AUTHORIZATION": "Bearer good-key"}, LIMIT, None),
    ("/v1/execute", {"AUTHORIZATION": "Bearer good-key"}, None, None),  # chunked, bounded by waitress
    ("/v1/execute", {"AUTHORIZATION": "Bearer good-key"}, LIMIT + 1, "too_large"),
    ("/v1/execute", {}, LIMIT + 1, "too_large"),
    ("/v1/execute", {}, 10, "unauthorized"),
    ("/v1/execute", {}, None, "unauthorized"),
    ("/v1/execute", {"AUTHORIZATION": "Bearer bad-key"}, 10, "unauthorized"),
    ("/v1/execute", {"AUTHORIZATION": "Basic Z29vZC1rZXk="}, 10, "unauthorized"),
    ("/v1/execute", {"AUTHORIZATION": "bearer good-key"}, 10, "unauthorized"),
    ("/v1/execute", {"AUTHORIZATION": "Bearer good-key" + " " * 600}, 10, "unauthorized"),
    # T-MCP-1: the MCP endpoint takes bodies on the same terms as /v1.
    ("/mcp", {"AUTHORIZATION": "Bearer good-key"}, 10, None),
    ("/mcp", {"AUTHORIZATION": "Bearer good-key"}, LIMIT + 1, "too_large"),
    ("/mcp", {}, 10, "unauthorized"),
    ("/mcp", {}, None, "unauthorized"),
    ("/mcp", {"AUTHORIZATION": "Bearer bad-key"}, 10, "unauthorized"),
    ("/healthz", {"AUTHORIZATION": "Bearer good-key"}, 10, "no_body_here"),
    ("/mirror/targets.json", {"AUTHORIZATION": "Bearer good-key"}, 10, "no_body_here"),
    ("/metrics", {}, 10, "no_body_here"),
]


@pytest.mark.parametrize("path,headers,length,expected", GATE_TABLE)
def test_t_dos_2_gate_rules(path: str, headers: dict[str, str], length: int | None, expected: str | None) -> None:
    assert GATE(path, headers, length) == expected


@pytest.fixture(scope="module")
def app_client(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from tests.appliance.test_ops_web import build_ops_app

    root: Path = tmp_path_factory.mktemp("gate-app")
    app, services, state, key = build_ops_app(root, metrics_token="op-token-for-tests-0123456789")
    try:
        yield app.test_client(), key
    finally:
        state.close()
        services.close()


def test_t_dos_2_guard_never_treats_a_refused_body_as_empty(app_client: tuple[Any, str]) -> None:
    # The key became valid between the gate and the guard: the unread body must not pass for "{}".
    client, key = app_client
    r = client.post("/v1/cells", data=b"", headers={"Authorization": f"Bearer {key}"},
                    environ_base={BODY_REFUSED: "unauthorized"})
    assert r.status_code == 400 and r.get_json() == {"error": r.get_json()["error"], "code": "body_refused"}
    r = client.post("/v1/cells", json={"template": "wasm"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201
