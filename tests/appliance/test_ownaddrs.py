"""Enumerating the host's own addresses from /proc (T-SSRF-1), failing closed."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from appliance.ownaddrs import OwnAddressesUnknown, own_networks, parse_fib_trie, parse_if_inet6

# A host with a public primary, a secondary address on the same interface and
# an AnyIP local route (`ip route add local 45.60.0.0/24 dev lo`).
FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 93.184.215.0/24 2 0 2
        |-- 93.184.215.0
           /24 link UNICAST
        +-- 93.184.215.14/31 1 0 0
           |-- 93.184.215.14
              /32 host LOCAL
           |-- 93.184.215.15
              /32 host LOCAL
        |-- 93.184.215.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 45.60.0.0/24 1 0 0
        |-- 45.60.0.0
           /24 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 93.184.215.14
        /32 host LOCAL
"""

IF_INET6 = """\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
2606280002200001000000000000000c 04 40 00 00     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_t_ssrf_1_fib_trie_local_entries_only() -> None:
    assert [str(n) for n in parse_fib_trie(FIB_TRIE)] == [
        "93.184.215.14/32", "93.184.215.15/32", "45.60.0.0/24", "127.0.0.0/8", "127.0.0.1/32"]


def test_t_ssrf_1_if_inet6_every_address() -> None:
    assert [str(n) for n in parse_if_inet6(IF_INET6)] == ["fe80::fc:ff:fe00:1/128", "2606:2800:220:1::c/128", "::1/128"]


@pytest.mark.parametrize("text", [
    "",                                                # nothing understood: not "no addresses"
    "Main:\n  +-- 0.0.0.0/0 3 0 5\n",                  # no LOCAL entry at all
    "Local:\n        /32 host LOCAL\n",                # LOCAL entry without its address
    "Local:\n     |-- 300.1.2.3\n        /32 host LOCAL\n",
    "Local:\n     |-- 10.0.0.1\n        /x host LOCAL\n",
])
def test_t_ssrf_1_fib_trie_not_understood_fails_closed(text: str) -> None:
    with pytest.raises(OwnAddressesUnknown):
        parse_fib_trie(text)


@pytest.mark.parametrize("text", ["xyz 04 40 20 80 eth0\n", "fe80" * 7 + "zzzz 04 40 20 80 eth0\n", "0" * 33 + " 01 80 10 80 lo\n"])
def test_t_ssrf_1_if_inet6_malformed_fails_closed(text: str) -> None:
    with pytest.raises(OwnAddressesUnknown):
        parse_if_inet6(text)


def test_t_ssrf_1_unreadable_proc_fails_closed(tmp_path: Path) -> None:
    v6 = tmp_path / "if_inet6"
    v6.write_text(IF_INET6)
    with pytest.raises(OwnAddressesUnknown):
        own_networks(tmp_path / "missing_fib_trie", v6)
    fib = tmp_path / "fib_trie"
    fib.write_text(FIB_TRIE)
    (tmp_path / "dir").mkdir()
    with pytest.raises(OwnAddressesUnknown):
        own_networks(fib, tmp_path / "dir")  # exists but cannot be read as a file


def test_t_ssrf_1_missing_if_inet6_fails_closed_while_ipv6_works(tmp_path: Path) -> None:
    import socket

    fib = tmp_path / "fib_trie"
    fib.write_text(FIB_TRIE)
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        pytest.skip("this kernel has no IPv6: a missing if_inet6 then means no IPv6 addresses")
    with pytest.raises(OwnAddressesUnknown):
        own_networks(fib, tmp_path / "missing_if_inet6")


def test_t_ssrf_1_files_given_are_read(tmp_path: Path) -> None:
    fib, v6 = tmp_path / "fib_trie", tmp_path / "if_inet6"
    fib.write_text(FIB_TRIE)
    v6.write_text(IF_INET6)
    nets = own_networks(fib, v6)
    assert ipaddress.ip_network("93.184.215.14/32") in nets and ipaddress.ip_network("::1/128") in nets


def test_t_ssrf_1_this_host_has_loopback_among_its_own_addresses() -> None:
    assert any(ipaddress.ip_address("127.0.0.1") in n for n in own_networks())
