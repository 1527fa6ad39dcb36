"""Pure egress policy: T-SSRF-1 (internal egress) and T-SSRF-2 (rebinding).

Addresses below are only *values* handed to pure functions; nothing here
opens a socket or resolves a name. ``ATTACKS`` is also replayed through the
I/O adapter in ``test_egress_fetch.py`` to prove each is refused before any
connection.
"""
from __future__ import annotations

import ipaddress
import subprocess
import sys
from typing import NamedTuple

import pytest

from appliance.policy.egress import (
    REASONS,
    EgressDenied,
    EgressPolicy,
    IPNetwork,
    address_denied,
    check_resolved,
    parse_networks,
    parse_target,
    site_denied,
)

ON = EgressPolicy(enabled=True)
OFF = EgressPolicy(enabled=False)
PUBLIC = ["8.8.8.8"]  # a real public address, used as a value only
NO_OWN: tuple[IPNetwork, ...] = ()  # tests of the deny table alone: no own addresses


class Attack(NamedTuple):
    url: str
    reason: str
    answers: list[str] | None = None  # what an (injected) resolver would say
    policy: EgressPolicy = ON


def _a(url: str, reason: str, answers: list[str] | None = None, policy: EgressPolicy = ON) -> Attack:
    return Attack(url, reason, answers, policy)


DA, NH, BH, BU = "denied_address", "numeric_host", "bad_host", "bad_url"

ATTACKS: list[Attack] = [
    # --- literal IPv4 in each denied range (T-SSRF-1)
    _a("http://169.254.169.254/latest/meta-data/iam/", DA),
    _a("http://169.254.169.254:80/", DA),
    _a("https://169.254.169.254/", DA),
    _a("http://169.254.170.2/v2/credentials", DA),
    _a("http://168.63.129.16/machine", DA),
    _a("http://100.100.100.200/latest/meta-data/", DA),
    _a("http://127.0.0.1/", DA),
    _a("http://127.255.255.254:6379/", DA),
    _a("http://0.0.0.0/", DA),
    _a("http://0.1.2.3/", DA),
    _a("http://10.0.0.1/", DA),
    _a("http://10.255.255.255/", DA),
    _a("http://100.64.0.1/", DA),
    _a("http://100.127.255.255/", DA),
    _a("http://172.16.0.1/", DA),
    _a("http://172.31.255.255/", DA),
    _a("http://192.168.0.1/", DA),
    _a("http://192.168.255.255/", DA),
    _a("http://192.0.0.8/", DA),
    _a("http://192.0.2.1/", DA),
    _a("http://192.88.99.1/", DA),
    _a("http://198.18.0.1/", DA),
    _a("http://198.19.255.255/", DA),
    _a("http://198.51.100.7/", DA),
    _a("http://203.0.113.9/", DA),
    _a("http://224.0.0.1/", DA),
    _a("http://239.255.255.250:1900/", DA),
    _a("http://240.0.0.1/", DA),
    _a("http://255.255.255.255/", DA),
    _a("HTTP://127.0.0.1/", DA),
    # --- numeric forms glibc would read as an address (T-SSRF-1)
    _a("http://2130706433/", NH),
    _a("http://2852039166/", NH),
    _a("http://0177.0.0.1/", NH),
    _a("http://0x7f.0.0.1/", NH),
    _a("http://0X7F.0.0.1/", NH),
    _a("http://0x7f.1/", NH),
    _a("http://0x7f000001/", NH),
    _a("http://0xA9FEA9FE/", NH),
    _a("http://0251.0376.0251.0376/", NH),
    _a("http://0xa9.0xfe.0xa9.0xfe/", NH),
    _a("http://017700000001/", NH),
    _a("http://127.1/", NH),
    _a("http://127.0.1/", NH),
    _a("http://10.1/", NH),
    _a("http://169.254.43518/", NH),
    _a("http://169.16689662/", NH),
    _a("http://127.000.000.001/", NH),
    _a("http://08.0.0.1/", NH),
    _a("http://0/", NH),
    _a("http://0x/", NH),
    _a("http://1.2.3.4.5/", NH),
    _a("http://256.1.1.1/", NH),
    _a("http://127.0.0.1./", NH),
    _a("http://169.254.169.254./", NH),
    _a("http://8.8.8.8./", NH),
    _a("http://example.0x1/", NH),
    _a("http://foo.123/", NH),
    # --- IPv6 literals (T-SSRF-1)
    _a("http://[::1]/", DA),
    _a("http://[::1]:8080/", DA),
    _a("http://[0:0:0:0:0:0:0:1]/", DA),
    _a("http://[::]/", DA),
    _a("http://[::ffff:127.0.0.1]/", DA),
    _a("http://[::ffff:7f00:1]/", DA),
    _a("http://[::ffff:169.254.169.254]/", DA),
    _a("http://[::ffff:8.8.8.8]/", DA),
    _a("http://[::127.0.0.1]/", DA),
    _a("http://[::a9fe:a9fe]/", DA),
    _a("http://[64:ff9b::169.254.169.254]/", DA),
    _a("http://[64:ff9b::7f00:1]/", DA),
    _a("http://[64:ff9b:1::808:808]/", DA),
    _a("http://[100::1]/", DA),
    _a("http://[2001::1]/", DA),
    _a("http://[2001:2::1]/", DA),
    _a("http://[2001:db8::1]/", DA),
    _a("http://[2002:a9fe:a9fe::1]/", DA),
    _a("http://[2002:c0a8:101::]/", DA),
    _a("http://[fc00::1]/", DA),
    _a("http://[fd00:ec2::254]/latest/meta-data/", DA),
    _a("http://[fe80::1]/", DA),
    _a("http://[FE80::a9fe:a9fe]/", DA),
    _a("http://[fec0::1]/", DA),
    _a("http://[ff02::1]/", DA),
    _a("http://[2001:10::1]/", DA),
    _a("http://[2001:20::1]/", DA),
    _a("http://[5f00::1]/", DA),
    _a("http://[3fff::1]/", DA),
    _a("http://[1::1]/", DA),
    _a("http://[fe80::1%25eth0]/", BH),
    _a("http://[127.0.0.1]/", BH),
    _a("http://[::1/", BH),
    _a("http://[::1]x/", BH),
    _a("http://::1/", BH),
    # --- encoded, non-ASCII and malformed hosts (T-SSRF-1)
    _a("http://%31%32%37.0.0.1/", BH),
    _a("http://169.254.169.254%2f.example.com/", BH),
    _a("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", BH),
    _a("http://127\u30020\u30020\u30021/", BH),
    _a("http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3/", BH),
    _a("http://ex\u0430mple.com/", BH),
    _a("http:///etc/passwd", BH),
    _a("http://:80/", BH),
    _a("http://exa_mple.com/", BH),
    _a("http://-evil.com/", BH),
    _a("http://evil-.com/", BH),
    _a("http://a..b.com/", BH),
    _a("http://.example.com/", BH),
    _a("http://example.com../", BH),
    _a("http://" + "a" * 64 + ".com/", BH),
    _a("http://" + "a." * 127 + "com/", BH),
    _a("http://example.com:8080:80/", BH),
    # --- userinfo tricks (T-SSRF-1)
    _a("http://good.com@169.254.169.254/", "userinfo"),
    _a("http://169.254.169.254@good.com/", "userinfo"),
    _a("http://user:pass@example.com/", "userinfo"),
    _a("http://good.com:80@127.0.0.1/", "userinfo"),
    _a("http://@127.0.0.1/", "userinfo"),
    _a("http://a%40b@example.com/", "userinfo"),
    _a("http://[::1]@example.com/", "userinfo"),
    # --- parser differentials: backslash, control chars, whitespace
    _a("http://good.com\\@169.254.169.254/", BU),
    _a("http:\\\\169.254.169.254\\", BU),
    _a("http://169.254.169.254\t/", BU),
    _a(" http://127.0.0.1/", BU),
    _a("http://127.0.0.1/\n", BU),
    _a("http://exa\nmple.com/", BU),
    _a("http://example.com/\r\nHost: 169.254.169.254", BU),
    _a("http://example.com/\x00", BU),
    _a("http://example.com/\x7f", BU),
    _a("http://example.com/a b", BU),
    _a("http://example.com/\u3000", BU),
    _a("http://example.com/caf\u00e9", BU),
    _a("http://example.com/" + "a" * 2100, BU),
    _a("//169.254.169.254/", BU),
    _a("http:/169.254.169.254/", BU),
    _a("http:169.254.169.254", BU),
    # --- schemes other than http(s)
    _a("file:///etc/passwd", "scheme"),
    _a("gopher://127.0.0.1:6379/_FLUSHALL", "scheme"),
    _a("dict://127.0.0.1:11211/stats", "scheme"),
    _a("ftp://example.com/", "scheme"),
    _a("ldap://127.0.0.1/", "scheme"),
    _a("jar:http://example.com/a.jar!/", "scheme"),
    _a("javascript:alert(1)", "scheme"),
    _a("data:text/plain,hi", "scheme"),
    _a("ws://example.com/", "scheme"),
    # --- ports
    _a("http://example.com:0/", "port"),
    _a("http://example.com:65536/", "port"),
    _a("http://example.com:123456/", "port"),
    _a("http://example.com:-1/", "port"),
    _a("http://example.com:+80/", "port"),
    _a("http://example.com:80a/", "port"),
    _a("http://example.com:/", "port"),
    _a("http://[2606:4700::1111]:0/", "port"),
    # --- internal names (T-SSRF-1)
    _a("http://localhost/", "denied_name"),
    _a("http://LOCALHOST:8080/", "denied_name"),
    _a("http://localhost./", "denied_name"),
    _a("http://foo.localhost/", "denied_name"),
    _a("http://localhost.localdomain/", "denied_name"),
    _a("http://printer.local/", "denied_name"),
    _a("http://metadata.google.internal/computeMetadata/v1/", "denied_name"),
    _a("http://instance-data.ec2.internal/", "denied_name"),
    _a("http://metadata/", "denied_name"),
    _a("http://intranet/", "denied_name"),
    _a("http://router.home.arpa/", "denied_name"),
    _a("http://1.0.0.127.in-addr.arpa/", "denied_name"),
    _a("http://1.0.0.0.ip6.arpa/", "denied_name"),
    _a("http://nas.lan/", "denied_name"),
    # --- allowlist narrows, never widens
    _a("http://evil.com/", "not_allowlisted", policy=EgressPolicy(True, ("example.com",))),
    _a("http://example.com.evil.com/", "not_allowlisted", policy=EgressPolicy(True, ("example.com",))),
    _a("http://example.com/", "not_allowlisted", policy=EgressPolicy(True, (".example.com",))),
    _a("http://notexample.com/", "not_allowlisted", policy=EgressPolicy(True, (".example.com",))),
    _a("http://8.8.4.4/", "not_allowlisted", policy=EgressPolicy(True, ("8.8.8.8",))),
    _a("http://[2606:4700::1111]/", "not_allowlisted", policy=EgressPolicy(True, ("example.com",))),
    _a("http://localhost/", "denied_name", policy=EgressPolicy(True, ("localhost",))),
    _a("http://127.0.0.1/", DA, policy=EgressPolicy(True, ("127.0.0.1",))),
    _a("http://intra.example.com/", DA, ["10.0.0.7"], EgressPolicy(True, (".example.com",))),
    # --- egress off: the air gap denies everything
    _a("http://example.com/", "egress_off", policy=OFF),
    _a("https://8.8.8.8/", "egress_off", policy=OFF),
    _a("file:///etc/passwd", "egress_off", policy=OFF),
    # --- names whose DNS answers are internal (T-SSRF-1 / T-SSRF-2)
    _a("http://169.254.169.254.nip.io/", DA, ["169.254.169.254"]),
    _a("http://127.0.0.1.nip.io/", DA, ["127.0.0.1"]),
    _a("http://10-0-0-1.sslip.io/", DA, ["10.0.0.1"]),
    _a("http://rebind.example.com/", DA, ["8.8.8.8", "10.0.0.5"]),
    _a("http://rebind.example.com/", DA, ["10.0.0.5", "8.8.8.8"]),
    _a("http://v6.example.com/", DA, ["2606:4700::1111", "fd00::1"]),
    _a("http://loop6.example.com/", DA, ["::1"]),
    _a("http://mapped.example.com/", DA, ["::ffff:169.254.169.254"]),
    _a("http://scoped.example.com/", DA, ["fe80::1%eth0"]),
    _a("http://nat64.example.com/", DA, ["64:ff9b::a9fe:a9fe"]),
    _a("http://sixtofour.example.com/", DA, ["2002:7f00:1::1"]),
    _a("http://zero.example.com/", DA, ["0.0.0.0"]),
    _a("http://cgnat.example.com/", DA, ["100.100.100.200"]),
    _a("http://empty.example.com/", DA, []),
    _a("http://junk.example.com/", DA, ["not-an-ip"]),
    _a("http://decimal.example.com/", DA, ["2130706433"]),
    _a("http://short.example.com/", DA, ["127.1"]),
]


def _evaluate(attack: Attack) -> None:
    """What the adapter does before connecting: parse, then check answers."""
    target = parse_target(attack.url, attack.policy)
    answers = [target.host] if target.is_ip_literal else (attack.answers if attack.answers is not None else PUBLIC)
    check_resolved(target.host, answers, attack.policy, own_networks=NO_OWN)


def test_attack_table_is_large_and_uses_known_reasons() -> None:
    assert len(ATTACKS) >= 100
    assert {a.reason for a in ATTACKS} <= set(REASONS)


@pytest.mark.parametrize("attack", ATTACKS, ids=[f"{i}:{a.url[:60]!r}" for i, a in enumerate(ATTACKS)])
def test_t_ssrf_1_attack_denied(attack: Attack) -> None:
    with pytest.raises(EgressDenied) as info:
        _evaluate(attack)
    assert info.value.reason == attack.reason, str(info.value)


ALLOWED: list[tuple[str, list[str], EgressPolicy, tuple[str, str, int, str]]] = [
    ("http://example.com/", ["93.184.215.14"], ON, ("http", "example.com", 80, "/")),
    ("https://Example.COM./a/b?x=1#frag", ["93.184.215.14"], ON, ("https", "example.com", 443, "/a/b?x=1")),
    ("http://example.com?q", PUBLIC, ON, ("http", "example.com", 80, "/?q")),
    ("https://api.github.com:8443/", ["140.82.112.6"], ON, ("https", "api.github.com", 8443, "/")),
    ("http://xn--bcher-kva.example/", PUBLIC, ON, ("http", "xn--bcher-kva.example", 80, "/")),
    ("http://10.example.com/", PUBLIC, ON, ("http", "10.example.com", 80, "/")),
    ("http://deadbeef.com/", PUBLIC, ON, ("http", "deadbeef.com", 80, "/")),
    ("http://8.8.8.8/", [], ON, ("http", "8.8.8.8", 80, "/")),
    ("http://1.1.1.1:65535/", [], ON, ("http", "1.1.1.1", 65535, "/")),
    ("http://172.32.0.1/", [], ON, ("http", "172.32.0.1", 80, "/")),
    ("http://100.128.0.1/", [], ON, ("http", "100.128.0.1", 80, "/")),
    ("http://[2606:4700:4700::1111]/", [], ON, ("http", "2606:4700:4700::1111", 80, "/")),
    ("http://[2001:4860:4860::8888]:8080/", [], ON, ("http", "2001:4860:4860::8888", 8080, "/")),
    ("http://[64:ff9b::8.8.8.8]/", [], ON, ("http", "64:ff9b::808:808", 80, "/")),
    ("http://[2002:808:808::1]/", [], ON, ("http", "2002:808:808::1", 80, "/")),
    ("http://dual.example.com/", ["9.9.9.9", "2620:fe::fe"], ON, ("http", "dual.example.com", 80, "/")),
    ("http://api.example.com/", PUBLIC, EgressPolicy(True, (".example.com",)), ("http", "api.example.com", 80, "/")),
    ("http://example.com/", PUBLIC, EgressPolicy(True, ("example.com", "other.org")), ("http", "example.com", 80, "/")),
    ("http://8.8.8.8/", [], EgressPolicy(True, ("8.8.8.8",)), ("http", "8.8.8.8", 80, "/")),
]


@pytest.mark.parametrize("url,answers,policy,expected", ALLOWED, ids=[a[0][:50] for a in ALLOWED])
def test_t_ssrf_1_public_targets_allowed(
    url: str, answers: list[str], policy: EgressPolicy, expected: tuple[str, str, int, str]
) -> None:
    target = parse_target(url, policy)
    assert (target.scheme, target.host, target.port, target.path_and_query) == expected
    checked = check_resolved(target.host, answers or [target.host], policy, own_networks=NO_OWN)
    assert [str(ip) for ip in checked] == (answers or [target.host])


def test_target_renders_host_header_and_url() -> None:
    t = parse_target("https://[2606:4700::1111]:8443/p?q", ON)
    assert t.host_header == "[2606:4700::1111]:8443"
    assert t.url == "https://[2606:4700::1111]:8443/p?q"
    assert parse_target("https://example.com:443/", ON).host_header == "example.com"


# Every row of the deny table: first and last address denied with its name.
V4_ROWS = [
    ("this_network", "0.0.0.0", "0.255.255.255"),
    ("private_10", "10.0.0.0", "10.255.255.255"),
    ("shared_cgnat", "100.64.0.0", "100.127.255.255"),
    ("loopback", "127.0.0.0", "127.255.255.255"),
    ("link_local_metadata", "169.254.0.0", "169.254.255.255"),
    ("private_172", "172.16.0.0", "172.31.255.255"),
    ("ietf_protocol", "192.0.0.0", "192.0.0.255"),
    ("documentation_1", "192.0.2.0", "192.0.2.255"),
    ("relay_6to4_anycast", "192.88.99.0", "192.88.99.255"),
    ("private_192", "192.168.0.0", "192.168.255.255"),
    ("benchmarking", "198.18.0.0", "198.19.255.255"),
    ("documentation_2", "198.51.100.0", "198.51.100.255"),
    ("documentation_3", "203.0.113.0", "203.0.113.255"),
    ("multicast", "224.0.0.0", "239.255.255.255"),
    ("reserved_240", "240.0.0.0", "255.255.255.254"),
    ("limited_broadcast", "255.255.255.255", "255.255.255.255"),
    ("azure_wireserver", "168.63.129.16", "168.63.129.16"),
]
V6_ROWS = [
    ("unspecified", "::", "::"),
    ("loopback", "::1", "::1"),
    ("ipv4_mapped", "::ffff:0.0.0.0", "::ffff:255.255.255.255"),
    ("ipv4_compatible", "::0.0.0.2", "::255.255.255.255"),
    ("nat64_local", "64:ff9b:1::", "64:ff9b:1:ffff:ffff:ffff:ffff:ffff"),
    ("discard", "100::", "100::ffff:ffff:ffff:ffff"),
    ("teredo", "2001::", "2001:0:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("orchid", "2001:10::", "2001:1f:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("orchid_v2", "2001:20::", "2001:2f:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("documentation", "2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("ietf_protocol", "2001:1::", "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("documentation_3fff", "3fff::", "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("srv6_sids", "5f00::", "5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("unique_local", "fc00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("link_local", "fe80::", "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("site_local", "fec0::", "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("multicast", "ff00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("nat64:link_local_metadata", "64:ff9b::169.254.169.254", "64:ff9b::169.254.0.0"),
    ("nat64:private_10", "64:ff9b::10.0.0.0", "64:ff9b::10.255.255.255"),
    ("6to4:loopback", "2002:7f00::", "2002:7fff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("6to4:private_192", "2002:c0a8::", "2002:c0a8:ffff::"),
    ("not_global_unicast", "1::", "1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("not_global_unicast", "4000::", "fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ("scoped", "2606:4700::1%eth0", "2606:4700::1%1"),
]


@pytest.mark.parametrize("row,first,last", V4_ROWS + V6_ROWS, ids=[f"{r[0]}:{r[1]}" for r in V4_ROWS + V6_ROWS])
def test_t_ssrf_1_deny_table_row(row: str, first: str, last: str) -> None:
    assert address_denied(ipaddress.ip_address(first)) == row
    assert address_denied(ipaddress.ip_address(last)) == row


@pytest.mark.parametrize(
    "addr",
    ["1.1.1.1", "8.8.8.8", "9.255.255.255", "11.0.0.0", "100.63.255.255", "100.128.0.0", "126.255.255.255",
     "128.0.0.0", "169.253.255.255", "169.255.0.0", "172.15.255.255", "172.32.0.0", "192.167.255.255",
     "192.169.0.0", "198.17.255.255", "198.20.0.0", "223.255.255.255", "168.63.129.17",
     "2606:4700:4700::1111", "2001:4860:4860::8888", "2620:fe::fe", "2001:200::1", "2a00:1450::1",
     "64:ff9b::8.8.8.8", "2002:808:808::", "3001::1", "3ffe::1"],
)
def test_t_ssrf_1_public_address_not_denied(addr: str) -> None:
    assert address_denied(ipaddress.ip_address(addr)) is None


def test_t_ssrf_1_deny_table_fails_closed_on_non_address() -> None:
    assert address_denied("127.0.0.1") == "not_an_address"  # type: ignore[arg-type]


def test_t_ssrf_1_deny_table_does_not_trust_is_global() -> None:
    # Rows where ipaddress's view has been wrong or version-dependent.
    for addr in ["64:ff9b:1::a00:1", "2001:2::1", "2001:20::1", "5f00::1", "3fff::1", "100.64.0.1", "192.0.0.9"]:
        assert address_denied(ipaddress.ip_address(addr)) is not None, addr


def test_t_ssrf_2_check_resolved_dedupes_and_keeps_order() -> None:
    got = check_resolved("h.example.com", ["8.8.8.8", "2606:4700::1111", "8.8.8.8"], ON, own_networks=NO_OWN)
    assert [str(i) for i in got] == ["8.8.8.8", "2606:4700::1111"]


def test_t_ssrf_1_check_resolved_respects_egress_off() -> None:
    with pytest.raises(EgressDenied) as info:
        check_resolved("h.example.com", PUBLIC, OFF, own_networks=NO_OWN)
    assert info.value.reason == "egress_off"


def test_egress_denied_carries_reason_and_message() -> None:
    err = EgressDenied("scheme", "nope")
    assert (err.reason, err.message, str(err)) == ("scheme", "nope", "scheme: nope")


def test_policy_module_is_pure() -> None:
    code = (
        "import sys, appliance.policy.egress, appliance.policy.ratelimit\n"
        "bad = {'socket', 'ssl', 'urllib.request', 'http.client', 'flask', 'wasmtime', 'sqlite3'} & set(sys.modules)\n"
        "print(sorted(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


# --- site rows: own addresses and the operator deny-list (T-SSRF-1) ----------
# Global addresses stand in for "this appliance's own public address" and
# "the site's own global prefix"; they are values only.

OWN: tuple[IPNetwork, ...] = parse_networks(["93.184.215.14", "2606:2800:220:1::7", "45.60.0.0/24"])  # last: an AnyIP local route
SITE = EgressPolicy(True, deny_networks=parse_networks(["2a00:1450:4001::/48", "34.64.0.0/10"]))


class SiteAttack(NamedTuple):
    url: str
    answers: list[str] | None
    policy: EgressPolicy
    row: str


SITE_ATTACKS: list[SiteAttack] = [
    # own addresses, by literal and by name, even when the allowlist names them
    SiteAttack("http://93.184.215.14/", None, ON, "own_address"),
    SiteAttack("http://93.184.215.14:8080/", None, EgressPolicy(True, ("93.184.215.14",)), "own_address"),
    SiteAttack("http://[2606:2800:220:1::7]/", None, ON, "own_address"),
    SiteAttack("http://[2606:2800:220:1::7]/", None, EgressPolicy(True, ("2606:2800:220:1::7",)), "own_address"),
    SiteAttack("http://me.example.com/", ["93.184.215.14"], EgressPolicy(True, ("me.example.com",)), "own_address"),
    SiteAttack("http://me.example.com/", ["8.8.8.8", "2606:2800:220:1::7"], ON, "own_address"),
    SiteAttack("http://anyip.example.com/", ["45.60.0.200"], ON, "own_address"),
    # own IPv4 reached through a translator or a tunnel
    SiteAttack("http://[64:ff9b::5db8:d70e]/", None, ON, "own_address"),
    SiteAttack("http://nat64.example.com/", ["64:ff9b::93.184.215.14"], ON, "own_address"),
    SiteAttack("http://[2002:5db8:d70e::1]/", None, ON, "own_address"),
    # operator deny-list: the site's global IPv6 prefix and a global IPv4 range
    SiteAttack("http://[2a00:1450:4001::1]/", None, SITE, "operator_deny:2a00:1450:4001::/48"),
    SiteAttack("http://[2a00:1450:4001:ffff::1]/", None, SITE, "operator_deny:2a00:1450:4001::/48"),
    SiteAttack("http://lanhost.example.com/", ["2a00:1450:4001:81c::200e"], SITE, "operator_deny:2a00:1450:4001::/48"),
    SiteAttack("http://lanhost.example.com/", ["8.8.8.8", "34.100.1.1"], SITE, "operator_deny:34.64.0.0/10"),
    SiteAttack("http://34.64.0.1/", None, SITE, "operator_deny:34.64.0.0/10"),
    SiteAttack("http://34.127.255.255/", None, EgressPolicy(True, ("34.127.255.255",), SITE.deny_networks), "operator_deny:34.64.0.0/10"),
    SiteAttack("http://[64:ff9b::34.65.0.1]/", None, SITE, "operator_deny:34.64.0.0/10"),
    SiteAttack("http://[2002:2241:1::1]/", None, SITE, "operator_deny:34.64.0.0/10"),
]


@pytest.mark.parametrize("attack", SITE_ATTACKS, ids=[f"{i}:{a.url[:50]}" for i, a in enumerate(SITE_ATTACKS)])
def test_t_ssrf_1_own_address_and_operator_deny_refused(attack: SiteAttack) -> None:
    target = parse_target(attack.url, attack.policy)
    answers = [target.host] if target.is_ip_literal else (attack.answers or [])
    with pytest.raises(EgressDenied) as info:
        check_resolved(target.host, answers, attack.policy, own_networks=OWN)
    assert info.value.reason == "denied_address"
    assert info.value.message.endswith(": " + attack.row), info.value.message


def test_t_ssrf_1_own_address_check_survives_the_test_hook() -> None:
    # address_check (the loopback test hook) admits everything; the site rows
    # still apply, and a zone id does not make an own address someone else's.
    own = parse_networks(["93.184.215.14", "127.0.0.0/8", "2606:2800:220:1::7"])
    for answer in ["93.184.215.14", "127.0.0.1", "2606:2800:220:1::7%eth0"]:
        with pytest.raises(EgressDenied) as info:
            check_resolved("h.example.com", [answer], ON, own_networks=own, address_check=lambda ip: None)
        assert info.value.message.endswith(": own_address")


@pytest.mark.parametrize("answer", ["93.184.215.15", "2606:2800:220:1::8", "45.60.1.1", "34.128.0.1", "2a00:1450:4002::1", "8.8.8.8"])
def test_t_ssrf_1_neighbours_of_site_rows_still_allowed(answer: str) -> None:
    assert [str(i) for i in check_resolved("h.example.com", [answer], SITE, own_networks=OWN)] == [answer]


def test_t_ssrf_1_site_denied_reports_the_matching_row() -> None:
    ip = ipaddress.ip_address
    assert site_denied(ip("93.184.215.14"), (), OWN) == "own_address"
    assert site_denied(ip("::ffff:93.184.215.14"), (), OWN) == "own_address"
    assert site_denied(ip("34.64.0.9"), SITE.deny_networks, ()) == "operator_deny:34.64.0.0/10"
    assert site_denied(ip("34.64.0.9"), (), ()) is None


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "::/129", "fe80::1%eth0/64", "fe80::1%eth0", "example.com", "10.0.0.0/8/8",
                                 "1.2.3", "", " ", "10.0.0.0/-1", "2001:db8::/+64"])
def test_t_ssrf_1_deny_list_entries_are_strict_cidrs(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_networks([bad])


def test_t_ssrf_1_deny_list_host_bits_widen_to_the_network() -> None:
    assert [str(n) for n in parse_networks(["10.1.2.3/24", "2001:db8::1/64", "8.8.8.8", "2001:db8::5"])] == [
        "10.1.2.0/24", "2001:db8::/64", "8.8.8.8/32", "2001:db8::5/128"]
