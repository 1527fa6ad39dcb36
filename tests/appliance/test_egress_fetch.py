"""The ``host_fetch`` adapter: T-SSRF-1, T-SSRF-2 and its byte/time caps.

Nothing here reaches a non-loopback address. Fakes stand in for DNS and for
connect(): the fake connector records every (ip, port) it is asked for and
hands back one end of a ``socketpair`` pre-loaded with a canned response, so
"connected to 8.8.8.8" only ever means "was asked to". The positive path runs
a real HTTP server on 127.0.0.1 and admits it through the test-only
``address_check`` hook.
"""
from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
from typing import Iterator

import pytest

from appliance.egress import MAX_BYTES_CEILING, EgressError, FetchResult, Resolver, fetch
from appliance.config import load_settings
from appliance.ownaddrs import OwnAddressesUnknown, own_networks
from appliance.policy.egress import EgressDenied, EgressPolicy, IPAddress, IPNetwork, address_denied, parse_networks
from appliance.runtime.worker import static_resolver
from tests.appliance.test_egress_policy import ATTACKS, Attack
from tests.appliance.test_httpclient import (  # noqa: F401 - wire is a fixture
    ACCEPTED,
    ACCEPTED_BODY,
    DEADLINE_S,
    LIMIT,
    RESPONSE_ATTACKS,
    Answer,
    Wire,
    check_refused,
    ids,
    wire,
)

ON = EgressPolicy(enabled=True)
LONG = 1e12  # a deadline that never arrives under the fixed fake clock


class FakeResolver:
    """Answers from a script; each host's list of answer-sets is consumed in turn."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answers = self.script[host]
        return answers.pop(0) if len(answers) > 1 else answers[0]


class FakeConnector:
    """Records connects; replies with the next canned response."""

    def __init__(self, *responses: bytes, fail: set[str] | None = None) -> None:
        self.responses = list(responses)
        self.fail = fail or set()
        self.calls: list[tuple[str, int, float]] = []
        self.peers: list[socket.socket] = []

    def __call__(self, ip: str, port: int, timeout: float) -> socket.socket:
        self.calls.append((ip, port, timeout))
        if ip in self.fail:
            raise ConnectionRefusedError(f"refused {ip}")
        if not self.responses:
            raise AssertionError(f"unexpected connect to {ip}:{port}")
        ours, peer = socket.socketpair()
        peer.sendall(self.responses.pop(0))
        peer.shutdown(socket.SHUT_WR)  # EOF after the response; peer still reads
        self.peers.append(peer)
        return ours

    def request(self, i: int = 0) -> bytes:
        self.peers[i].settimeout(1)
        return self.peers[i].recv(65536)

    def close(self) -> None:
        for p in self.peers:
            p.close()


@pytest.fixture
def conn_factory() -> Iterator[list[FakeConnector]]:
    made: list[FakeConnector] = []
    yield made
    for c in made:
        c.close()


def _connector(made: list[FakeConnector], *responses: bytes, fail: set[str] | None = None) -> FakeConnector:
    c = FakeConnector(*responses, fail=fail)
    made.append(c)
    return c


def ok(body: bytes = b"hello", status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def redirect(location: str, status: int = 302) -> bytes:
    return f"HTTP/1.1 {status} Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()


def run(url: str, resolver: Resolver, connector: FakeConnector, **kw: object) -> FetchResult:
    params: dict[str, object] = {"policy": ON, "max_bytes": 1_000_000, "deadline": LONG, "clock": lambda: 0.0}
    params.update(kw)
    return fetch(url, resolver=resolver, connector=connector, **params)  # type: ignore[arg-type]


# --- T-SSRF-1: every attack in the policy table is refused with zero connects


@pytest.mark.parametrize("attack", ATTACKS, ids=[f"{i}:{a.url[:60]!r}" for i, a in enumerate(ATTACKS)])
def test_t_ssrf_1_attack_refused_before_connect(attack: Attack, conn_factory: list[FakeConnector]) -> None:
    connector = _connector(conn_factory, ok())

    def resolver(host: str, port: int) -> list[str]:
        return attack.answers if attack.answers is not None else ["8.8.8.8"]

    with pytest.raises(EgressDenied) as info:
        fetch(attack.url, policy=attack.policy, max_bytes=100, deadline=LONG, resolver=resolver,
              connector=connector, clock=lambda: 0.0)
    assert info.value.reason == attack.reason
    assert connector.calls == []


def test_t_ssrf_1_egress_off_never_resolves(conn_factory: list[FakeConnector]) -> None:
    resolver, connector = FakeResolver({"example.com": [["8.8.8.8"]]}), _connector(conn_factory, ok())
    with pytest.raises(EgressDenied) as info:
        run("http://example.com/", resolver, connector, policy=EgressPolicy(enabled=False))
    assert info.value.reason == "egress_off"
    assert resolver.calls == [] and connector.calls == []


def test_t_ssrf_1_ip_literal_is_not_resolved(conn_factory: list[FakeConnector]) -> None:
    resolver, connector = FakeResolver({}), _connector(conn_factory, ok())
    result = run("http://8.8.8.8/x", resolver, connector)
    assert resolver.calls == [] and [c[:2] for c in connector.calls] == [("8.8.8.8", 80)]
    assert result.body == b"hello"


# --- T-SSRF-2: DNS rebinding and redirects


def test_t_ssrf_2_rebinding_cannot_switch_the_connected_address(conn_factory: list[FakeConnector]) -> None:
    resolver = FakeResolver({"rebind.example.com": [["8.8.8.8"], ["169.254.169.254"]]})
    connector = _connector(conn_factory, ok(b"public"))
    result = run("http://rebind.example.com/", resolver, connector)
    assert resolver.calls == [("rebind.example.com", 80)]  # resolved once
    assert [c[:2] for c in connector.calls] == [("8.8.8.8", 80)]  # connected to the checked IP
    assert result.body == b"public"
    assert connector.request().startswith(b"GET / HTTP/1.1\r\nHost: rebind.example.com\r\n")


def test_t_ssrf_2_rebinding_on_redirect_to_same_host_refused(conn_factory: list[FakeConnector]) -> None:
    resolver = FakeResolver({"rebind.example.com": [["8.8.8.8"], ["10.0.0.1"]]})
    connector = _connector(conn_factory, redirect("/again"), ok())
    with pytest.raises(EgressDenied) as info:
        run("http://rebind.example.com/", resolver, connector)
    assert info.value.reason == "denied_address"
    assert len(resolver.calls) == 2 and [c[0] for c in connector.calls] == ["8.8.8.8"]


@pytest.mark.parametrize(
    "location,reason",
    [
        ("http://169.254.169.254/latest/meta-data/", "denied_address"),
        ("//127.0.0.1:6379/", "denied_address"),
        ("http://[::1]/", "denied_address"),
        ("http://[::ffff:10.0.0.1]/", "denied_address"),
        ("http://2130706433/", "numeric_host"),
        ("http://localhost/", "denied_name"),
        ("http://metadata.google.internal/", "denied_name"),
        ("http://inside.example.net/", "denied_address"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://127.0.0.1:25/", "scheme"),
        ("http://good.com@10.0.0.1/", "userinfo"),
        ("http://10.0.0.1\t.example.net/", "bad_url"),
        ("\\\\169.254.169.254\\", "bad_url"),
        ("/caf\u00e9", "bad_url"),
    ],
)
def test_t_ssrf_2_redirect_to_internal_refused_before_connect(
    location: str, reason: str, conn_factory: list[FakeConnector]
) -> None:
    resolver = FakeResolver({"start.example.com": [["8.8.8.8"]], "inside.example.net": [["192.168.1.10"]]})
    connector = _connector(conn_factory, redirect(location), ok())
    with pytest.raises(EgressDenied) as info:
        run("http://start.example.com/", resolver, connector)
    assert info.value.reason == reason
    assert [c[0] for c in connector.calls] == ["8.8.8.8"]  # only the first hop connected


def test_t_ssrf_2_more_than_three_redirects_refused(conn_factory: list[FakeConnector]) -> None:
    resolver = FakeResolver({"a.example.com": [["8.8.8.8"]]})
    connector = _connector(conn_factory, *(redirect(f"/r{i}") for i in range(4)), ok())
    with pytest.raises(EgressDenied) as info:
        run("http://a.example.com/", resolver, connector)
    assert info.value.reason == "too_many_redirects"
    assert len(connector.calls) == 4  # the 4th Location is never fetched


def test_t_ssrf_2_three_redirects_followed_and_rechecked(conn_factory: list[FakeConnector]) -> None:
    resolver = FakeResolver({"a.example.com": [["8.8.8.8"]], "b.example.org": [["1.1.1.1"]]})
    connector = _connector(
        conn_factory, redirect("/one", 301), redirect("http://b.example.org:8080/two?x", 307),
        redirect("http://b.example.org/three", 308), ok(b"done"),
    )
    result = run("http://a.example.com/", resolver, connector)
    assert result.status == 200 and result.body == b"done"
    assert result.final_url == "http://b.example.org/three"
    assert [c[:2] for c in connector.calls] == [
        ("8.8.8.8", 80), ("8.8.8.8", 80), ("1.1.1.1", 8080), ("1.1.1.1", 80)
    ]
    assert resolver.calls == [("a.example.com", 80), ("a.example.com", 80), ("b.example.org", 8080), ("b.example.org", 80)]
    assert connector.request(1).startswith(b"GET /one HTTP/1.1\r\nHost: a.example.com\r\n")
    assert connector.request(2).startswith(b"GET /two?x HTTP/1.1\r\nHost: b.example.org:8080\r\n")


def test_t_ssrf_2_redirect_without_location_is_protocol_error(conn_factory: list[FakeConnector]) -> None:
    connector = _connector(conn_factory, b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(EgressError) as info:
        run("http://8.8.8.8/", FakeResolver({}), connector)
    assert info.value.reason == "protocol"


def test_t_ssrf_1_every_answer_validated_then_fallback(conn_factory: list[FakeConnector]) -> None:
    resolver = FakeResolver({"multi.example.com": [["8.8.8.8", "1.1.1.1"]]})
    connector = _connector(conn_factory, ok(), fail={"8.8.8.8"})
    result = run("http://multi.example.com/", resolver, connector)
    assert [c[0] for c in connector.calls] == ["8.8.8.8", "1.1.1.1"]
    assert result.status == 200


# --- the answer: the shared reader's attack table (tests/appliance/test_httpclient.py), through fetch


@pytest.mark.parametrize("answer", RESPONSE_ATTACKS, ids=ids(RESPONSE_ATTACKS))
def test_t_dos_1_host_fetch_refuses_malformed_answer(answer: Answer, wire: Wire) -> None:
    def attempt() -> FetchResult:
        return fetch("http://8.8.8.8/", policy=ON, max_bytes=LIMIT, deadline=time.monotonic() + answer.deadline_s,
                     resolver=FakeResolver({}), connector=lambda ip, port, t: wire.connect(answer))

    check_refused(answer, attempt, EgressError)


@pytest.mark.parametrize("answer", ACCEPTED, ids=ids(ACCEPTED))
def test_host_fetch_accepts_well_formed_answer(answer: Answer, wire: Wire) -> None:
    result = fetch("http://8.8.8.8/", policy=ON, max_bytes=LIMIT, deadline=time.monotonic() + DEADLINE_S,
                   resolver=FakeResolver({}), connector=lambda ip, port, t: wire.connect(answer))
    assert (result.status, result.body) == (200, ACCEPTED_BODY[answer.name])


# --- caps: body size (T-DOS-1) and deadline


def test_t_dos_1_body_exactly_at_cap_is_returned(conn_factory: list[FakeConnector]) -> None:
    connector = _connector(conn_factory, b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1000)
    result = run("http://8.8.8.8/", FakeResolver({}), connector, max_bytes=1000)
    assert result.body == b"x" * 1000


def test_t_dos_1_max_bytes_clamped_to_ceiling(conn_factory: list[FakeConnector]) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BYTES_CEILING + 1}\r\n\r\n".encode()
    connector = _connector(conn_factory, head)
    with pytest.raises(EgressError) as info:
        run("http://8.8.8.8/", FakeResolver({}), connector, max_bytes=2**40)
    assert info.value.reason == "too_large"


def test_chunked_body_decoded(conn_factory: list[FakeConnector]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    result = run("http://8.8.8.8/", FakeResolver({}), _connector(conn_factory, raw))
    assert result.body == b"hello world"


def test_non_2xx_status_is_returned(conn_factory: list[FakeConnector]) -> None:
    raw = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"missing", "404 Not Found")
    result = run("http://8.8.8.8/", FakeResolver({}), _connector(conn_factory, raw))
    assert (result.status, result.body) == (404, b"missing")


def test_status_over_599_is_returned_like_any_final_status(conn_factory: list[FakeConnector]) -> None:
    result = run("http://8.8.8.8/", FakeResolver({}), _connector(conn_factory, ok(b"no", "999 Request denied")))
    assert (result.status, result.body) == (999, b"no")


def test_t_dos_1_deadline_already_passed_nothing_happens(conn_factory: list[FakeConnector]) -> None:
    resolver, connector = FakeResolver({"a.example.com": [["8.8.8.8"]]}), _connector(conn_factory, ok())
    with pytest.raises(EgressError) as info:
        run("http://a.example.com/", resolver, connector, deadline=10.0, clock=lambda: 10.0)
    assert info.value.reason == "timeout"
    assert resolver.calls == [] and connector.calls == []


def test_t_dos_1_connect_timeout_is_remaining_time(conn_factory: list[FakeConnector]) -> None:
    connector = _connector(conn_factory, ok())
    run("http://8.8.8.8/", FakeResolver({}), connector, deadline=107.5, clock=lambda: 100.0)
    assert connector.calls[0][2] == pytest.approx(7.5)


def test_resolver_and_connect_failures_are_typed(conn_factory: list[FakeConnector]) -> None:
    def broken(host: str, port: int) -> list[str]:
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(EgressError) as info:
        run("http://a.example.com/", broken, _connector(conn_factory, ok()))
    assert info.value.reason == "resolve"
    with pytest.raises(EgressError) as info:
        run("http://8.8.8.8/", FakeResolver({}), _connector(conn_factory, fail={"8.8.8.8"}))
    assert info.value.reason == "connect"


def test_https_wraps_with_tls_and_fails_closed_on_plaintext(conn_factory: list[FakeConnector]) -> None:
    with pytest.raises(EgressError) as info:
        run("https://8.8.8.8/", FakeResolver({}), _connector(conn_factory, ok()))
    assert info.value.reason == "tls"


# --- positive path: a real server on loopback, admitted by the test-only hook


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", "/final?x=1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = f"path={self.path} host={self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


TEST_SERVER = ipaddress.ip_address("127.0.0.1")


def admit_test_server(ip: IPAddress) -> str | None:
    """Test-only: the loopback test server and nothing else; the app never does this."""
    return None if ip == TEST_SERVER else address_denied(ip)


def own_but_test_server() -> tuple[IPNetwork, ...]:
    """Test-only: the host's own addresses except the range holding the test server."""
    return tuple(n for n in own_networks() if TEST_SERVER not in n)


def test_fetch_from_loopback_server_via_test_hook(loopback_server: int) -> None:
    resolver = FakeResolver({"cell-test.example.com": [["127.0.0.1"]]})
    result = fetch(f"http://cell-test.example.com:{loopback_server}/hop", policy=ON, max_bytes=10_000,
                   deadline=time.monotonic() + 10, resolver=resolver, address_check=admit_test_server,
                   own_addresses=own_but_test_server)
    assert result.status == 200
    assert result.body == f"path=/final?x=1 host=cell-test.example.com:{loopback_server}".encode()
    assert result.final_url == f"http://cell-test.example.com:{loopback_server}/final?x=1"
    assert len(resolver.calls) == 2  # re-resolved and re-checked on the redirect


def test_t_ssrf_1_same_loopback_server_denied_by_default(loopback_server: int) -> None:
    resolver = FakeResolver({"cell-test.example.com": [["127.0.0.1"]]})
    with pytest.raises(EgressDenied) as info:
        fetch(f"http://cell-test.example.com:{loopback_server}/", policy=ON, max_bytes=10_000,
              deadline=time.monotonic() + 10, resolver=resolver)
    assert info.value.reason == "denied_address"


# --- T-SSRF-1: the host's own addresses and the operator deny-list ----------
# Names resolve from a static map (what SYNAPSE_EGRESS_HOSTS gives a worker);
# the recording connector proves the refusal comes before any connect.


def _admit_everything(ip: IPAddress) -> str | None:
    return None  # test-only: switch the deny table off so only the site rows stand


def _own_samples() -> list[str]:
    out = []
    for net in own_networks():
        out.append(str(net.network_address))
        if net.num_addresses > 1:
            out.append(str(net[net.num_addresses // 2]))
    return out


@pytest.mark.parametrize("address", _own_samples())
def test_t_ssrf_1_own_interface_address_refused_before_connect(address: str, conn_factory: list[FakeConnector]) -> None:
    resolver = static_resolver({"self.attacker.example": [address]})
    connector = _connector(conn_factory, ok())
    policy = EgressPolicy(True, ("self.attacker.example", address))  # the allowlist names it: still denied
    with pytest.raises(EgressDenied) as info:
        run("http://self.attacker.example/", resolver, connector, policy=policy, address_check=_admit_everything)
    assert info.value.message.endswith(": own_address"), info.value.message
    assert connector.calls == []


def test_t_ssrf_1_own_addresses_include_loopback_and_every_interface() -> None:
    nets = own_networks()
    assert any(ipaddress.ip_address("127.0.0.1") in n for n in nets)
    with open("/proc/net/if_inet6") as f:
        for line in f:
            assert ipaddress.IPv6Network((int(line.split()[0], 16), 128)) in nets


def test_t_ssrf_1_own_addresses_unknown_fails_closed(conn_factory: list[FakeConnector]) -> None:
    def broken() -> tuple[IPNetwork, ...]:
        raise OwnAddressesUnknown("no /proc")

    resolver = static_resolver({"public.attacker.example": ["8.8.8.8"]})
    connector = _connector(conn_factory, ok())
    with pytest.raises(EgressDenied) as info:
        run("http://public.attacker.example/", resolver, connector, own_addresses=broken)
    assert info.value.reason == "denied_address" and "unknown" in info.value.message
    assert connector.calls == []


DENY_ENV = "2a00:1450:4001::/48, 34.64.0.0/10 ,198.51.100.77"  # as an operator would write SYNAPSE_EGRESS_DENY
DENY_ATTACKS = [
    ("lan6.attacker.example", ["2a00:1450:4001:81c::200e"], "operator_deny:2a00:1450:4001::/48"),
    ("lan4.attacker.example", ["34.100.1.1"], "operator_deny:34.64.0.0/10"),
    ("mixed.attacker.example", ["8.8.8.8", "34.64.0.1"], "operator_deny:34.64.0.0/10"),
    ("nat64.attacker.example", ["64:ff9b::2240:1"], "operator_deny:34.64.0.0/10"),
    ("one.attacker.example", ["198.51.100.77"], "operator_deny:198.51.100.77/32"),
]


@pytest.mark.parametrize("host,answers,row", DENY_ATTACKS, ids=[a[0] for a in DENY_ATTACKS])
def test_t_ssrf_1_operator_deny_list_refused_before_connect(
    host: str, answers: list[str], row: str, conn_factory: list[FakeConnector]
) -> None:
    settings = load_settings({"SYNAPSE_EGRESS": "on", "SYNAPSE_EGRESS_DENY": DENY_ENV})
    policy = EgressPolicy(True, (host,), parse_networks(settings.egress_deny))
    connector = _connector(conn_factory, ok())
    with pytest.raises(EgressDenied) as info:
        run(f"http://{host}/", static_resolver({host: answers}), connector, policy=policy, address_check=_admit_everything)
    assert info.value.message.endswith(": " + row), info.value.message
    assert connector.calls == []


def test_t_ssrf_1_operator_deny_list_stops_a_reachable_server(loopback_server: int) -> None:
    """The same loopback server the test hook admits is refused once the deny-list names it."""
    url = f"http://cell-test.example.com:{loopback_server}/"
    hosts = static_resolver({"cell-test.example.com": ["127.0.0.1"]})
    common = {"max_bytes": 10_000, "resolver": hosts, "address_check": admit_test_server, "own_addresses": own_but_test_server}
    assert fetch(url, policy=ON, deadline=time.monotonic() + 10, **common).status == 200  # type: ignore[arg-type]
    denied = EgressPolicy(True, deny_networks=parse_networks(["127.0.0.0/8"]))
    with pytest.raises(EgressDenied) as info:
        fetch(url, policy=denied, deadline=time.monotonic() + 10, **common)  # type: ignore[arg-type]
    assert info.value.message.endswith(": operator_deny:127.0.0.0/8")
