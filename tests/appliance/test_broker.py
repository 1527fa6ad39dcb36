"""The host-call broker (T-ESCAPE-3): the supervisor makes host_fetch and MCP
calls for its workers, bound to the run in flight, under that run's policy.

Unit rows drive :class:`appliance.runtime.broker.Broker` directly with the
frames a worker could send; a recording connector proves every refusal comes
before any connection. The last row runs a real confined worker whose fetch
the supervisor makes; the hostile-worker rows (a compromised worker's call
frames against a real pool) are in test_protocol.py.
"""
from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from appliance.runtime import broker_client, protocol
from appliance.runtime.broker import DENIED, IO_ERROR, Broker
from appliance.runtime.broker_client import BrokerClient
from tests import broker_loop
from tests.appliance.test_egress_fetch import admit_test_server, own_but_test_server

W1, W2 = 11, 12  # two workers' generations


class RecordingConnector:
    """Records every connect the broker asks for; never connects anywhere."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, ip: str, port: int, timeout: float) -> socket.socket:
        self.calls.append((ip, port))
        raise ConnectionRefusedError(f"test: no connection to {ip}")


def egress_on(hosts: dict[str, list[str]] | None = None, deny: list[str] | None = None) -> protocol.EgressSpec:
    return protocol.EgressSpec(enabled=True, allow_hosts=[], deny=deny or [], hosts=hosts)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(SimpleNamespace(lanes_per_worker=2, mcp_servers=None))
    b.fetch_hooks = {"connector": RecordingConnector()}
    yield b
    b.shutdown()


def connects(broker: Broker) -> list[tuple[str, int]]:
    return list(broker.fetch_hooks["connector"].calls)


def fetch(req_id: int, url: str = "http://8.8.8.8/", call_id: int = 1, max_len: int = 4096) -> protocol.FetchCall:
    return protocol.FetchCall(req_id, call_id, url, max_len)


# -- T-ESCAPE-3: a call is bound to the run in flight on that worker ---------------
def test_t_escape_3_call_for_a_run_not_in_flight_is_refused(broker: Broker) -> None:
    assert broker.admit(W1, fetch(99)) is not None
    assert connects(broker) == []


def test_t_escape_3_call_for_another_workers_run_is_refused(broker: Broker) -> None:
    broker.open(W2, 5, broker_loop.run_message(egress_on()), 10.0)
    assert broker.admit(W1, fetch(5)) is not None  # worker 1 names worker 2's run
    assert broker.admit(W2, fetch(5)) is None


def test_t_escape_3_call_for_a_control_request_is_refused(broker: Broker) -> None:
    broker.open(W1, 6, protocol.BindRequest(6, "c", "python3", "/v", 64), None)  # bind: no grant
    broker.open(W1, 7, protocol.ExecRequest(7, "python3", b"", True, 100, 64, "t"), None)  # no deadline: no grant
    assert broker.admit(W1, fetch(6)) is not None
    assert broker.admit(W1, fetch(7)) is not None


def test_t_escape_3_call_after_the_run_ended_is_refused(broker: Broker) -> None:
    broker.open(W1, 8, broker_loop.run_message(egress_on()), 10.0)
    broker.close(8)
    assert broker.admit(W1, fetch(8)) is not None


def test_t_escape_3_second_call_while_one_is_open_is_a_flood(broker: Broker) -> None:
    broker.open(W1, 9, broker_loop.run_message(egress_on()), 10.0)
    assert broker.admit(W1, fetch(9, call_id=1)) is None
    assert broker.admit(W1, fetch(9, call_id=2)) is not None
    broker.serve(W1, fetch(9, call_id=1))  # answered: the next call may come
    assert broker.admit(W1, fetch(9, call_id=3)) is None


def test_t_escape_3_calls_per_worker_are_capped_at_its_lanes(broker: Broker) -> None:
    for req_id in (20, 21, 22):
        broker.open(W1, req_id, broker_loop.run_message(egress_on()), 10.0)
    assert broker.admit(W1, fetch(20)) is None
    assert broker.admit(W1, fetch(21)) is None
    assert broker.admit(W1, fetch(22)) is not None  # a third at once: more than the worker's two lanes


# -- T-ESCAPE-3 / T-SSRF-1: the run's policy, never the frame's, and before any connection
DENIED_ROWS = [
    # (run's egress, url, reason)
    (None, "http://8.8.8.8/", "egress_off"),
    (protocol.EgressSpec(enabled=False, allow_hosts=[], deny=[]), "http://8.8.8.8/", "egress_off"),
    (egress_on(), "http://169.254.169.254/latest/meta-data/", "denied_address"),
    (egress_on(), "http://127.0.0.1:22/", "denied_address"),
    (egress_on(), "http://[::1]/", "denied_address"),
    (egress_on(), "file:///etc/passwd", "scheme"),
    (egress_on({"meta.attacker.example": ["169.254.169.254"]}), "http://meta.attacker.example/", "denied_address"),
    (egress_on({"lan.attacker.example": ["34.100.1.1"]}, ["34.64.0.0/10"]), "http://lan.attacker.example/",
     "denied_address"),
    (protocol.EgressSpec(enabled=True, allow_hosts=["example.org"], deny=[]), "http://8.8.8.8/", "not_allowlisted"),
]


@pytest.mark.parametrize("spec,url,reason", DENIED_ROWS, ids=[f"{r[2]}-{r[1]}" for r in DENIED_ROWS])
def test_t_escape_3_t_ssrf_1_refused_by_the_runs_policy_before_connect(broker: Broker, spec: protocol.EgressSpec | None,
                                                                         url: str, reason: str) -> None:
    broker.open(W1, 30, broker_loop.run_message(spec), 10.0)
    call = fetch(30, url)
    assert broker.admit(W1, call) is None
    answer = broker.serve(W1, call)
    assert (answer.code, answer.denial) == (DENIED, reason), answer
    assert connects(broker) == []


def test_t_escape_3_an_allowed_fetch_reaches_the_connector(broker: Broker) -> None:
    # The control row: the same recorder sees the connection a permitted fetch makes.
    broker.open(W1, 31, broker_loop.run_message(egress_on({"public.example": ["8.8.8.8"]})), 10.0)
    call = fetch(31, "http://public.example/")
    assert broker.admit(W1, call) is None
    assert broker.serve(W1, call).code == IO_ERROR  # the recorder refused the connection
    assert connects(broker) == [("8.8.8.8", 80)]


def test_t_escape_3_mcp_needs_the_runs_license_feature(broker: Broker) -> None:
    broker.set_mcp_client(SimpleNamespace(close=lambda: None, refused=lambda *a: None, call=lambda *a, **k: pytest.fail("called")))
    broker.open(W1, 32, broker_loop.run_message(features=[]), 10.0)  # the license grants no host_mcp_call
    call = protocol.McpCall(32, 1, b'{"server": "fake", "tool": "echo", "arguments": {}}', 4096)
    assert broker.admit(W1, call) is None
    answer = broker.serve(W1, call)
    assert (answer.code, answer.denial) == (DENIED, "mcp_off")


def test_t_escape_3_deadline_is_the_supervisors(broker: Broker) -> None:
    seen: list[float] = []

    def record(request: Any, *, deadline: float, max_bytes: int, tenant_id: str, cell_id: str) -> bytes:
        seen.append(deadline - time.monotonic())
        assert (tenant_id, cell_id) == ("acme", "c42")  # the run's, from the supervisor's own message
        return b"{}"

    broker.set_mcp_client(SimpleNamespace(close=lambda: None, refused=lambda *a: None, call=record))
    broker.open(W1, 33, broker_loop.run_message(features=["host_mcp_call"], tenant="acme", cell="c42"), 2.0)
    call = protocol.McpCall(33, 1, b'{"server": "fake", "tool": "echo", "arguments": {}}', 4096)
    assert broker.admit(W1, call) is None
    assert broker.serve(W1, call).code == 2
    assert 0 < seen[0] <= 2.0  # the run's own limit, not the 60 s ceiling


# -- the frames (T-PROTO-1 / T-ESCAPE-3) --------------------------------------------
BAD_CALL_FRAMES = [
    ("url_too_long", {"type": "fetch_call", "req_id": 1, "call_id": 1, "url": "http://a/" + "x" * 2048, "max_len": 10}),
    ("url_newline", {"type": "fetch_call", "req_id": 1, "call_id": 1, "url": "http://a/\r\nHost: b", "max_len": 10}),
    ("url_nul", {"type": "fetch_call", "req_id": 1, "call_id": 1, "url": "http://a/\u0000", "max_len": 10}),
    ("url_not_text", {"type": "fetch_call", "req_id": 1, "call_id": 1, "url": ["http://a/"], "max_len": 10}),
    ("max_len_negative", {"type": "fetch_call", "req_id": 1, "call_id": 1, "url": "http://a/", "max_len": -1}),
    ("max_len_over_cap", {"type": "fetch_call", "req_id": 1, "call_id": 1, "url": "http://a/", "max_len": 10_000_001}),
    ("call_id_zero", {"type": "fetch_call", "req_id": 1, "call_id": 0, "url": "http://a/", "max_len": 10}),
    ("extra_field", {"type": "fetch_call", "req_id": 1, "call_id": 1, "url": "http://a/", "max_len": 10,
                     "policy": {"enabled": True}}),
    ("mcp_request_not_base64", {"type": "mcp_call", "req_id": 1, "call_id": 1, "request": "{}", "max_len": 10}),
    ("mcp_server_field", {"type": "mcp_call", "req_id": 1, "call_id": 1, "request": "", "max_len": 10,
                          "command": ["/bin/sh"]}),
    ("answer_from_worker", {"type": "call_answer", "req_id": 1, "call_id": 1, "code": 0}),
]


@pytest.mark.parametrize("name,raw", BAD_CALL_FRAMES, ids=[n for n, _ in BAD_CALL_FRAMES])
def test_t_escape_3_t_proto_1_hostile_call_frames_are_refused(name: str, raw: dict[str, Any]) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(json.dumps(raw).encode(), protocol.FROM_WORKER, protocol.MAX_CALL_FRAME)


def test_t_escape_3_oversized_call_frame_is_refused() -> None:
    frame = protocol.encode(protocol.McpCall(1, 1, b"x" * protocol.MAX_CALL_BYTES, 10))
    assert len(frame) <= protocol.MAX_CALL_FRAME  # the largest honest call fits
    with pytest.raises(protocol.ProtocolError):
        protocol.McpCall(1, 1, b"x" * (protocol.MAX_CALL_BYTES + 1), 10)
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode(frame + b" " * 64 * 1024, protocol.FROM_WORKER, protocol.MAX_CALL_FRAME)


@pytest.mark.parametrize("code,body", [(5, b"abc"), (-1, b"x"), (-9, b""), (3, b"x" * 4)])
def test_t_escape_3_answer_must_match_its_body(code: int, body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.CallAnswer(1, 1, code, body)


@pytest.mark.parametrize("url", ["http://a/\tb", "http://a/ b", "http://a/\x85", "http://a/" + "é" * 1100])
def test_t_escape_3_worker_never_sends_a_url_the_frame_refuses(url: str) -> None:
    sent: list[object] = []
    calls = BrokerClient(sent.append).for_run(1)
    result = calls.fetch(url, 100, 1.0)
    assert (result.code, result.denial) == (DENIED, "bad_url") and sent == []


def test_t_escape_3_worker_drops_an_answer_for_another_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_client, "WAIT_MARGIN_S", 0.0)
    client = BrokerClient(lambda call: client.deliver(protocol.CallAnswer(2, 1, 0)), grace_s=0.0)
    # The answer names run 2; the call was for run 1: dropped, and the wait ends at its bound with -4.
    started = time.monotonic()
    assert client.for_run(1).fetch("http://a/", 10, 0.2).code == IO_ERROR
    assert time.monotonic() - started < 0.2 + 1


def test_t_escape_3_worker_never_takes_more_than_max_len() -> None:
    client = BrokerClient(lambda call: client.deliver(protocol.CallAnswer(1, 1, 20, b"x" * 20)))
    assert client.for_run(1).fetch("http://a/", 10, 1.0).code == IO_ERROR


# -- the positive path through the frames: a loopback server, admitted by the test hook
class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hello_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_t_escape_3_fetch_through_the_frames_returns_the_body(hello_server: int) -> None:
    broker = Broker(SimpleNamespace(lanes_per_worker=1, mcp_servers=None))
    broker.fetch_hooks = {"address_check": admit_test_server, "own_addresses": own_but_test_server}  # test-only
    loop = broker_loop.LoopbackCalls(broker, broker_loop.run_message(egress_on({"cell-test.example.com": ["127.0.0.1"]})))
    result = loop.fetch(f"http://cell-test.example.com:{hello_server}/x?y=1", 100, 5.0)
    assert (result.code, result.body) == (len(b"hello /x?y=1"), b"hello /x?y=1")
    assert loop.fetch(f"http://cell-test.example.com:{hello_server}/x?y=1", 3, 5.0).code == -5  # never truncated


# -- a real pool: a confined worker's host_fetch, made by the supervisor -------------
def test_t_escape_3_pooled_worker_fetches_through_the_supervisor(module_cache: None, tmp_path: Any,
                                                                 hello_server: int) -> None:
    from appliance.config import load_settings
    from appliance.runtime import sandbox
    from appliance.runtime.pool import WorkerPool
    from tests import guests
    from tests.liveserver import shared_cache

    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_WORKERS": "1",
                              "SYNAPSE_WARM_PYTHON": "0", "SYNAPSE_WARM_JAVASCRIPT": "0", "SYNAPSE_EGRESS": "on"})
    for path in (settings.volumes_dir, settings.db_path.parent, settings.keys_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    pool = WorkerPool(settings)
    recorder: list[tuple[str, int]] = []

    def connect(ip: str, port: int, timeout: float) -> socket.socket:
        recorder.append((ip, port))
        return socket.create_connection((ip, port), timeout=timeout)

    # test-only: the supervisor may reach the loopback test server, and records every connect
    pool.broker.fetch_hooks = {"address_check": admit_test_server, "own_addresses": own_but_test_server,
                               "connector": connect}
    pool.start()
    try:
        handle = pool.pick_for_run("t")  # a worker bound to tenant t (T-TENANT-1)
        pid = handle.process.pid
        assert sandbox.process_status(pid) == {"seccomp": 2, "no_new_privs": 1}  # no socket, no process: still fetches

        def run(url: str) -> Any:
            spec = egress_on({"cell-test.example.com": ["127.0.0.1"], "meta.attacker.example": ["169.254.169.254"]})
            msg = protocol.ExecRequest(0, template="wasm", code=guests.fetch_probe(url).encode(), is_text=True,
                                       timeout_ms=5000, memory_mb=64, tenant_id="t", egress=spec)
            return pool.call(handle, msg, deadline_s=5.0, tenant="t")

        ok = run(f"http://cell-test.example.com:{hello_server}/pooled")
        assert ok.outcome.exit_code == len(b"hello /pooled") and recorder == [("127.0.0.1", hello_server)]
        denied = run("http://meta.attacker.example/latest/meta-data/")
        assert denied.outcome.exit_code == -1
        assert denied.outcome.denials == [{"threat": "T-SSRF-1", "function": "host_fetch", "reason": "denied_address"}]
        assert len(recorder) == 1  # the denial came before any connection
        assert pool.kills == 0 and pid in pool.stats()["pids"]
    finally:
        pool.close()
