"""This host's own addresses, read from ``/proc`` without any network I/O.

Threat T-SSRF-1: with egress on, a guest must not reach the appliance's own
non-loopback addresses (its API, metrics, SSH listen there). The egress
policy denies every address returned here; this module only enumerates.

* IPv4: every ``host LOCAL`` route of ``/proc/net/fib_trie``. That is the
  kernel's own list of addresses it answers for, including secondary
  addresses and "AnyIP" local routes wider than /32 (``127.0.0.0/8`` is one).
* IPv6: every address of ``/proc/net/if_inet6``.

Both files are per network namespace, so a worker sees what it could reach.
Enumeration fails closed: an unreadable or unparsable file raises
:class:`OwnAddressesUnknown`, and the caller refuses the fetch. A missing
``if_inet6`` only counts as "no IPv6" when the kernel cannot make an IPv6
socket at all.
"""
from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from appliance.policy.egress import IPNetwork

FIB_TRIE = Path("/proc/net/fib_trie")
IF_INET6 = Path("/proc/net/if_inet6")
_MAX_PROC_BYTES = 16 * 1024 * 1024  # a router with a full table is ~100 MB: refuse, do not stall


class OwnAddressesUnknown(Exception):
    """The host's own addresses could not be listed; deny (T-SSRF-1)."""


def parse_fib_trie(text: str) -> tuple[IPNetwork, ...]:
    """Networks of the ``host LOCAL`` entries of a ``fib_trie`` dump."""
    found: list[IPNetwork] = []
    leaf: str | None = None
    for line in text.splitlines():
        item = line.strip()
        if item.startswith("|-- "):
            leaf = item[4:]
        elif item.startswith("+-- ") or item.endswith(":"):
            leaf = None  # a new subtree or table: the next entries need their own leaf
        elif item.startswith("/") and item.split()[1:3] == ["host", "LOCAL"]:
            if leaf is None:
                raise OwnAddressesUnknown("fib_trie: LOCAL entry without an address")
            prefix = item.split()[0][1:]
            try:
                net = ipaddress.IPv4Network(f"{leaf}/{prefix}", strict=False)
            except ValueError:
                raise OwnAddressesUnknown(f"fib_trie: bad entry {leaf}/{prefix}") from None
            if net not in found:
                found.append(net)
    if not found:
        # Every usable namespace has at least 127.0.0.1: an empty list means
        # the format was not understood, not that there are no addresses.
        raise OwnAddressesUnknown("fib_trie: no local addresses found")
    return tuple(found)


def parse_if_inet6(text: str) -> tuple[IPNetwork, ...]:
    """One /128 per line of ``/proc/net/if_inet6`` (32 hex digits first)."""
    found: list[IPNetwork] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        raw = fields[0]
        if len(raw) != 32 or any(c not in "0123456789abcdefABCDEF" for c in raw):
            raise OwnAddressesUnknown(f"if_inet6: bad address field {raw[:40]!r}")
        net = ipaddress.IPv6Network((int(raw, 16), 128))
        if net not in found:
            found.append(net)
    return tuple(found)


def _read(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(_MAX_PROC_BYTES + 1)
    if len(data) > _MAX_PROC_BYTES:
        raise OwnAddressesUnknown(f"{path} is larger than {_MAX_PROC_BYTES} bytes")
    return data.decode("ascii", "strict")


def _ipv6_usable() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def own_networks(fib_trie: Path = FIB_TRIE, if_inet6: Path = IF_INET6) -> tuple[IPNetwork, ...]:
    """Every address this host answers for; raises :class:`OwnAddressesUnknown`."""
    try:
        v4 = parse_fib_trie(_read(fib_trie))
    except (OSError, UnicodeDecodeError) as exc:
        raise OwnAddressesUnknown(f"cannot read {fib_trie}: {exc}") from None
    try:
        v6 = parse_if_inet6(_read(if_inet6))
    except FileNotFoundError:
        if _ipv6_usable():
            raise OwnAddressesUnknown(f"{if_inet6} is missing but IPv6 works") from None
        v6 = ()
    except (OSError, UnicodeDecodeError) as exc:
        raise OwnAddressesUnknown(f"cannot read {if_inet6}: {exc}") from None
    return v4 + v6
