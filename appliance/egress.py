"""The I/O half of ``host_fetch``: resolve once, check, connect to that IP.

Threats: T-SSRF-1 (internal/metadata egress) and T-SSRF-2 (DNS rebinding and
redirects). The rules live in :mod:`appliance.policy.egress`; this module
makes sure the address that was checked is the address that is connected to:

* the host is resolved exactly once per hop, every answer is checked, and the
  socket is connected to one of those validated IPs by this module — no HTTP
  library gets a host name it could resolve again (T-SSRF-2);
* redirects are followed by hand, at most :data:`MAX_REDIRECTS`, and every
  ``Location`` goes through the full parse/resolve/check again (T-SSRF-2);
* the whole exchange runs against one monotonic ``deadline``; the answer is
  read by :mod:`appliance.httpclient` (the reader ``host_mcp_call`` uses too):
  head capped at 64 KiB and 100 fields, ambiguous framing refused, body capped
  at ``max_bytes`` (<= 10,000,000). A body larger than the cap FAILS with
  ``too_large`` (never truncated: a guest must not mistake a partial document
  for the whole one).

Non-2xx final statuses are returned, not raised: the guest sees the status.
The default resolver (``getaddrinfo``) cannot be interrupted, so the deadline
is only checked around it; the worker's wall-clock kill is the backstop.

``own_addresses`` (default: :func:`appliance.ownaddrs.own_networks`, read per
hop) is injectable so tests can prove the fail-closed path (T-SSRF-1).
``address_check`` is a TEST-ONLY hook that lets a test admit its loopback
server; the appliance never passes it and the default is the deny table.
"""
from __future__ import annotations

import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from appliance import httpclient
from appliance.policy.egress import (
    EgressDenied,
    EgressPolicy,
    IPAddress,
    IPNetwork,
    Target,
    address_denied,
    check_resolved,
    parse_target,
)
from appliance.ownaddrs import OwnAddressesUnknown, own_networks

__all__ = ["EgressDenied", "EgressError", "FetchResult", "Resolver", "Connector", "fetch", "MAX_BYTES_CEILING"]

MAX_BYTES_CEILING = 10_000_000
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_WAIT = 3600.0
# host_fetch has always called a failed send or recv "connect"; the other
# reader reasons (timeout, tls, protocol, too_large) keep their names.
_REASONS = {"io": "connect"}

Resolver = Callable[[str, int], list[str]]
Connector = Callable[[str, int, float], socket.socket]


class EgressError(Exception):
    """The fetch failed after the policy allowed it.

    ``reason``: timeout, resolve, connect, tls, protocol, too_large.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class FetchResult:
    status: int
    body: bytes
    final_url: str


def default_resolver(host: str, port: int) -> list[str]:
    """All addresses of ``host``; numeric service so no services lookup."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError) as exc:
        raise EgressError("resolve", f"cannot resolve {host}: {exc}") from None
    return [str(info[4][0]) for info in infos]


def default_connector(ip: str, port: int, timeout: float) -> socket.socket:
    """Connect to an IP literal; no name ever reaches the socket layer."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _remaining(deadline: float, clock: Callable[[], float], what: str) -> float:
    remaining = deadline - clock()
    if remaining <= 0:
        raise EgressError("timeout", f"deadline passed before {what}")
    return min(remaining, _MAX_WAIT)  # settimeout overflows on absurd deadlines


def _connect(
    target: Target, addresses: list[IPAddress], connector: Connector, deadline: float, clock: Callable[[], float]
) -> socket.socket:
    last: Exception | None = None
    for ip in addresses:  # every one was validated; try them in order
        timeout = _remaining(deadline, clock, "connect")
        try:
            # T-SSRF-2: connect to the checked IP, never to the name.
            return connector(ip.compressed, target.port, timeout)
        except OSError as exc:  # includes TimeoutError
            last = exc
    _remaining(deadline, clock, "connect")
    raise EgressError("connect", f"could not connect to {target.host}: {last}")


def _exchange(
    sock: socket.socket, target: Target, max_bytes: int, deadline: float, clock: Callable[[], float]
) -> tuple[httpclient.Head, bytes]:
    try:
        return _exchange_on(sock, target, max_bytes, deadline, clock)
    except httpclient.HttpError as exc:
        raise EgressError(_REASONS.get(exc.reason, exc.reason), exc.message) from None
    finally:
        sock.close()  # the raw socket; after a TLS wrap it is detached and this is a no-op


def _exchange_on(
    sock: socket.socket, target: Target, max_bytes: int, deadline: float, clock: Callable[[], float]
) -> tuple[httpclient.Head, bytes]:
    if target.scheme == "https":
        # Certificate and host name are verified against the URL host.
        sock = httpclient.start_tls(sock, target.host, deadline, clock)
    # Path and host were validated free of CR/LF/space: no header injection.
    request = (
        f"GET {target.path_and_query} HTTP/1.1\r\n"
        f"Host: {target.host_header}\r\n"
        "User-Agent: cell-host-fetch/1\r\n"
        "Accept-Encoding: identity\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    try:
        httpclient.send_all(sock, request, deadline, clock)
        # The answer is read by the one bounded HTTP/1.1 reader (caps, strict
        # framing, the deadline on every recv: T-DOS-1).
        reader = httpclient.Reader(sock, deadline, clock)
        head = httpclient.read_head(reader)
        if head.status in REDIRECT_STATUSES:
            return head, b""  # redirect bodies are never read
        return head, httpclient.read_body(reader, head, max_bytes)
    finally:
        sock.close()


def _plain_location(location: str) -> bool:
    return all(0x20 < ord(ch) < 0x7F and ch != "\\" for ch in location)


def fetch(
    url: str,
    *,
    policy: EgressPolicy,
    max_bytes: int,
    deadline: float,
    resolver: Resolver | None = None,
    connector: Connector | None = None,
    clock: Callable[[], float] = time.monotonic,
    address_check: Callable[[IPAddress], str | None] = address_denied,
    own_addresses: Callable[[], tuple[IPNetwork, ...]] = own_networks,
) -> FetchResult:
    """GET ``url`` under ``policy``; raise EgressDenied or EgressError."""
    resolve = resolver or default_resolver
    connect = connector or default_connector
    cap = max(0, min(int(max_bytes), MAX_BYTES_CEILING))  # T-DOS: hard ceiling
    current = url
    for hop in range(MAX_REDIRECTS + 1):
        target = parse_target(current, policy)  # T-SSRF-1, again on every hop (T-SSRF-2)
        _remaining(deadline, clock, "resolving")
        if target.is_ip_literal:
            answers = [target.host]  # already checked; re-checked below anyway
        else:
            try:
                answers = list(resolve(target.host, target.port))  # T-SSRF-2: once per hop
            except EgressError:
                raise
            except (OSError, UnicodeError, ValueError, TypeError) as exc:
                raise EgressError("resolve", f"cannot resolve {target.host}: {exc}") from None
        try:
            own = own_addresses()  # per hop: addresses change (DHCP, IPv6 privacy addresses)
        except OwnAddressesUnknown as exc:
            raise EgressDenied("denied_address", f"this host's own addresses are unknown: {exc}") from None  # T-SSRF-1: fail closed
        # T-SSRF-1: every answer must pass before any connection is made.
        addresses = check_resolved(target.host, answers, policy, own_networks=own, address_check=address_check)
        sock = _connect(target, addresses, connect, deadline, clock)
        head, body = _exchange(sock, target, cap, deadline, clock)
        if head.status not in REDIRECT_STATUSES:
            return FetchResult(head.status, body, target.url)
        locations = head.all("location")
        if len(locations) != 1 or not locations[0]:
            raise EgressError("protocol", f"redirect {head.status} without a single Location")
        if hop == MAX_REDIRECTS:
            break
        if not _plain_location(locations[0]):
            # T-SSRF-2: urljoin silently drops tabs/newlines and leading
            # spaces; refuse instead of fetching a URL nobody wrote.
            raise EgressDenied("bad_url", "redirect Location has control, space, backslash or non-ASCII")
        # T-SSRF-2: a relative Location is resolved against this hop's URL and
        # then goes through parse/resolve/check like the first URL did.
        current = urllib.parse.urljoin(target.url, locations[0])
    raise EgressDenied("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
