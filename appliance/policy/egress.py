"""Egress (SSRF) policy for ``host_fetch``: pure functions over values.

Threats: T-SSRF-1 (egress to loopback, private, link-local, metadata and
other internal networks) and T-SSRF-2 (DNS rebinding, redirects). This module
does no I/O: it parses a URL strictly, checks host names against a name deny
table and addresses against an explicit address deny table. The I/O adapter
``appliance.egress`` resolves once, calls :func:`check_resolved`, and connects
to the validated address itself.

Why hand parsing instead of ``urlsplit`` alone: glibc ``getaddrinfo`` and the
various URL parsers disagree on hosts such as ``0x7f.1``, ``2130706433``,
``127.1``, full-width digits or ``good.com@evil``. Anything that two parsers
could read differently is refused rather than interpreted.

Why an explicit table instead of ``ipaddress.is_global``/``is_private``: those
properties are wrong for several IPv6 ranges and change between Python
versions. The table below is the contract; tests pin every row.

Name deny table (reason ``denied_name``), matched on the lowercased host with
one trailing dot removed: exactly or as a suffix ``.<name>`` for each of
``localhost``, ``localdomain``, ``local`` (mDNS), ``internal`` (cloud
metadata names such as ``metadata.google.internal``), ``intranet``, ``lan``,
``corp``, ``private``, ``home.arpa``, ``in-addr.arpa``, ``ip6.arpa``. Single
label names (``http://metadata/``) are denied too: the system resolver would
complete them with the local search domains, i.e. resolve an internal name.

Site rows (T-SSRF-1), checked on every resolved answer after the table:
the host's own interface addresses (``own_networks``, passed in by the
adapter, which enumerates them per fetch) are always denied, even when the
allowlist names them; the operator's deny-list (``EgressPolicy.deny_networks``,
``SYNAPSE_EGRESS_DENY``) covers site-internal ranges that are globally
routable, e.g. the LAN's own global IPv6 prefix. Both also match the IPv4
address embedded in NAT64 (64:ff9b::/96), 6to4 and IPv4-mapped answers.

Allowlist (``EgressPolicy.allow_hosts``): it can only NARROW. When non-empty,
a host must equal an entry exactly, or, for an entry written with a leading
dot (``.example.com``), be a strict subdomain of it (``a.example.com``, not
``example.com`` itself). Every other check still applies to allowed hosts,
and the resolved addresses are still checked against the deny table.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MAX_URL_LENGTH = 2048
MAX_HOST_LENGTH = 253
MAX_LABEL_LENGTH = 63
DEFAULT_PORTS = {"http": 80, "https": 443}

REASONS = (
    "egress_off",
    "scheme",
    "userinfo",
    "bad_host",
    "numeric_host",
    "denied_name",
    "denied_address",
    "not_allowlisted",
    "port",
    "too_many_redirects",
    "bad_url",
)


class EgressDenied(Exception):
    """The policy refused a request. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class EgressPolicy:
    """``enabled`` mirrors SYNAPSE_EGRESS; ``allow_hosts`` SYNAPSE_EGRESS_ALLOW;
    ``deny_networks`` SYNAPSE_EGRESS_DENY (see :func:`parse_networks`)."""

    enabled: bool
    allow_hosts: tuple[str, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()


def parse_networks(items: tuple[str, ...] | list[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or bare addresses) -> networks; ``ValueError`` names a bad one.

    Host bits are dropped (``10.1.2.3/24`` is ``10.1.2.0/24``): for a
    deny-list the wider reading is the safe one. Zone ids are refused.
    """
    nets: list[IPNetwork] = []
    for item in items:
        text = str(item).strip()
        if not text or "%" in text:
            raise ValueError(f"{item!r} is not a CIDR")
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR") from None
    return tuple(nets)


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lowercased ASCII; IPv6 literals without brackets, compressed
    port: int
    path_and_query: str  # never empty, fragment removed
    is_ip_literal: bool

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.path_and_query}"


# --- address deny table (T-SSRF-1) -------------------------------------------

_V4_TABLE: tuple[tuple[str, ipaddress.IPv4Network], ...] = tuple(
    (name, ipaddress.IPv4Network(net))
    for name, net in (
        ("this_network", "0.0.0.0/8"),
        ("private_10", "10.0.0.0/8"),
        ("shared_cgnat", "100.64.0.0/10"),
        ("loopback", "127.0.0.0/8"),
        ("link_local_metadata", "169.254.0.0/16"),
        ("private_172", "172.16.0.0/12"),
        ("ietf_protocol", "192.0.0.0/24"),
        ("documentation_1", "192.0.2.0/24"),
        ("relay_6to4_anycast", "192.88.99.0/24"),
        ("private_192", "192.168.0.0/16"),
        ("benchmarking", "198.18.0.0/15"),
        ("documentation_2", "198.51.100.0/24"),
        ("documentation_3", "203.0.113.0/24"),
        ("multicast", "224.0.0.0/4"),
        ("limited_broadcast", "255.255.255.255/32"),
        ("reserved_240", "240.0.0.0/4"),
        # Not special-use, but Azure's host wireserver/metadata endpoint:
        # a public address that only ever answers from inside a cloud VM.
        ("azure_wireserver", "168.63.129.16/32"),
    )
)

# Order matters: the first matching row names the denial, so narrow rows
# come before the wide ones that contain them.
_V6_TABLE: tuple[tuple[str, ipaddress.IPv6Network], ...] = tuple(
    (name, ipaddress.IPv6Network(net))
    for name, net in (
        ("unspecified", "::/128"),
        ("loopback", "::1/128"),
        # Kernels route ::ffff:a.b.c.d to the IPv4 address: deny outright.
        ("ipv4_mapped", "::ffff:0:0/96"),
        ("ipv4_compatible", "::/96"),
        # Local-use NAT64 prefix (RFC 8215) belongs to this site's own
        # translator and embeds IPv4 at variable offsets: deny outright.
        ("nat64_local", "64:ff9b:1::/48"),
        ("discard", "100::/64"),
        ("teredo", "2001::/32"),
        ("orchid", "2001:10::/28"),
        ("orchid_v2", "2001:20::/28"),
        ("documentation", "2001:db8::/32"),
        # Rest of the IETF protocol assignments (benchmarking, AMT, AS112,
        # DETs): nothing a guest should fetch over HTTP.
        ("ietf_protocol", "2001::/23"),
        ("documentation_3fff", "3fff::/20"),
        ("srv6_sids", "5f00::/16"),
        ("unique_local", "fc00::/7"),
        ("link_local", "fe80::/10"),
        ("site_local", "fec0::/10"),
        ("multicast", "ff00::/8"),
    )
)

_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
# Everything outside 2000::/3 is reserved or unassigned by IANA: fail closed.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def address_denied(ip: IPAddress) -> str | None:
    """Name of the deny-table row matching ``ip``, or None when allowed."""
    if isinstance(ip, ipaddress.IPv4Address):
        for name, net4 in _V4_TABLE:
            if ip in net4:
                return name  # T-SSRF-1
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped"  # T-SSRF-1: a zone id only makes sense on-link
        for name, net6 in _V6_TABLE:
            if ip in net6:
                return name  # T-SSRF-1
        if ip in _NAT64_WKP:
            # T-SSRF-1: the translator would connect to the embedded IPv4.
            inner = address_denied(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return None if inner is None else f"nat64:{inner}"
        if ip in _SIX_TO_FOUR:
            # T-SSRF-1: 6to4 relays tunnel to the IPv4 in bits 16..48.
            inner = address_denied(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
            return None if inner is None else f"6to4:{inner}"
        if ip not in _GLOBAL_UNICAST:
            return "not_global_unicast"  # T-SSRF-1: fail closed on reserved space
        return None
    return "not_an_address"  # T-SSRF-1: fail closed on anything unexpected


def _embedded_v4(ip: IPAddress) -> list[IPAddress]:
    """``ip`` itself plus any IPv4 address a translator or tunnel would reach."""
    out: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip in _NAT64_WKP:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _SIX_TO_FOUR:
            out.append(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    return out


def _in_any(ip: IPAddress, nets: tuple[IPNetwork, ...]) -> IPNetwork | None:
    for net in nets:
        if ip.version == net.version and ip in net:
            return net
    return None


def site_denied(ip: IPAddress, deny_networks: tuple[IPNetwork, ...], own_networks: tuple[IPNetwork, ...]) -> str | None:
    """Row name when ``ip`` is this host's own address or operator-denied."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])  # compare the address, not the zone
    for candidate in _embedded_v4(ip):
        # T-SSRF-1: the appliance's own non-loopback addresses (its own
        # services listen there), whatever the allowlist says.
        if _in_any(candidate, own_networks) is not None:
            return "own_address"
        net = _in_any(candidate, deny_networks)
        if net is not None:
            return f"operator_deny:{net}"  # T-SSRF-1: SYNAPSE_EGRESS_DENY
    return None


# --- URL parsing (T-SSRF-1) --------------------------------------------------

_DENIED_NAMES = (
    "localhost",
    "localdomain",
    "local",
    "internal",
    "intranet",
    "lan",
    "corp",
    "private",
    "home.arpa",
    "in-addr.arpa",
    "ip6.arpa",
)

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?")
# A label inet_aton/WHATWG would read as a number: decimal, octal or hex.
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*")
_CANONICAL_OCTET_RE = re.compile(r"0|[1-9][0-9]{0,2}")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _deny(reason: str, message: str) -> EgressDenied:
    return EgressDenied(reason, message)


def _check_chars(url: str) -> None:
    if len(url) > MAX_URL_LENGTH:
        raise _deny("bad_url", f"URL longer than {MAX_URL_LENGTH} characters")
    for ch in url:
        # T-SSRF-1: control chars and whitespace are stripped or split
        # differently by each parser, and CR/LF would inject request headers.
        if ord(ch) <= 0x20 or ord(ch) == 0x7F or ch.isspace():
            raise _deny("bad_url", "control character or whitespace in URL")
        if ch == "\\":
            # T-SSRF-1: browsers read "\" as "/", Python does not.
            raise _deny("bad_url", "backslash in URL")


def _split_authority(url: str) -> tuple[str, str, str]:
    match = _SCHEME_RE.match(url)
    if match is None:
        raise _deny("bad_url", "URL has no scheme")
    scheme = match.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        raise _deny("scheme", f"scheme {scheme!r} is not http or https")
    rest = url[match.end():]
    if not rest.startswith("//"):
        raise _deny("bad_url", "URL has no authority")
    rest = rest[2:]
    end = len(rest)
    for sep in "/?#":
        pos = rest.find(sep)
        if pos != -1:
            end = min(end, pos)
    authority, tail = rest[:end], rest[end:]
    tail = tail.split("#", 1)[0]  # fragments never leave the client
    if tail.startswith("?"):
        tail = "/" + tail
    if not tail.isascii():
        raise _deny("bad_url", "non-ASCII characters in path (percent-encode them)")
    return scheme, authority, tail or "/"


def _split_host_port(authority: str, scheme: str) -> tuple[str, int]:
    if "@" in authority:
        raise _deny("userinfo", "user info in URL authority")  # T-SSRF-1: good.com@evil
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise _deny("bad_host", "unterminated IPv6 literal")
        host, after = authority[: close + 1], authority[close + 1:]
        if after and not after.startswith(":"):
            raise _deny("bad_host", "garbage after IPv6 literal")
        port_text = after[1:] if after else None
    else:
        if authority.count(":") > 1:
            raise _deny("bad_host", "unbracketed IPv6 or extra ':' in host")
        host, sep, port_text_raw = authority.partition(":")
        port_text = port_text_raw if sep else None
    if port_text is None:
        return host, DEFAULT_PORTS[scheme]
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise _deny("port", f"port {port_text!r} is not 1..65535")
    return host, int(port_text)


def _parse_ipv6_literal(host: str) -> ipaddress.IPv6Address:
    inner = host[1:-1]
    if "%" in inner:
        raise _deny("bad_host", "zone id in IPv6 literal")  # T-SSRF-1: link-local scope
    try:
        return ipaddress.IPv6Address(inner)
    except ValueError:
        raise _deny("bad_host", f"invalid IPv6 literal {host!r}") from None


def _check_numeric(host: str, trailing_dot: bool) -> ipaddress.IPv4Address | None:
    """Canonical dotted quad -> address; other numeric-looking hosts denied."""
    labels = host.split(".")
    # T-SSRF-1: glibc reads 2130706433, 0177.0.0.1, 0x7f.1 and 127.1 as
    # 127.0.0.1; WHATWG parses any host whose last label is numeric as IPv4.
    if not _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        return None
    if trailing_dot:
        raise _deny("numeric_host", f"numeric host with trailing dot {host!r}.")
    if len(labels) == 4 and all(_CANONICAL_OCTET_RE.fullmatch(x) and int(x) <= 255 for x in labels):
        return ipaddress.IPv4Address(host)
    raise _deny("numeric_host", f"ambiguous numeric host {host!r}")


def _name_denied(host: str) -> bool:
    if "." not in host:
        return True  # T-SSRF-1: single labels resolve via internal search domains
    return any(host == name or host.endswith("." + name) for name in _DENIED_NAMES)


def _allowlisted(host: str, allow_hosts: tuple[str, ...]) -> bool:
    for raw in allow_hosts:
        entry = raw.lower()
        if entry.startswith("."):
            # ".example.com" admits strict subdomains only, never the apex.
            if host.endswith(entry) and len(host) > len(entry):
                return True
        elif host == entry.rstrip("."):
            return True
    return False


def parse_target(url: str, policy: EgressPolicy) -> Target:
    """Parse ``url`` strictly and apply the policy; raise :class:`EgressDenied`."""
    if not policy.enabled:
        raise _deny("egress_off", "egress is off on this node")  # air gap
    if not isinstance(url, str):
        raise _deny("bad_url", "URL is not a string")
    _check_chars(url)
    scheme, authority, path_and_query = _split_authority(url)
    raw_host, port = _split_host_port(authority, scheme)
    if not raw_host:
        raise _deny("bad_host", "empty host")
    if "%" in raw_host:
        raise _deny("bad_host", "percent-encoding in host")  # T-SSRF-1: %31%32%37...
    if not raw_host.isascii():
        raise _deny("bad_host", "non-ASCII host (use its xn-- form)")  # full-width digits, '。'
    if raw_host.startswith("["):
        ip6 = _parse_ipv6_literal(raw_host)
        row = address_denied(ip6)
        if row is not None:
            raise _deny("denied_address", f"{ip6} is in denied range {row}")  # T-SSRF-1
        if policy.allow_hosts and not _allowlisted(ip6.compressed, policy.allow_hosts):
            raise _deny("not_allowlisted", f"{ip6} is not in the egress allowlist")
        return Target(scheme, ip6.compressed, port, path_and_query, True)
    host = raw_host.lower()
    trailing_dot = host.endswith(".")
    if trailing_dot:
        host = host[:-1]  # one trailing dot = the same FQDN; "a.." fails below
    ip4 = _check_numeric(host, trailing_dot) if host else None
    if ip4 is not None:
        row = address_denied(ip4)
        if row is not None:
            raise _deny("denied_address", f"{ip4} is in denied range {row}")  # T-SSRF-1
        if policy.allow_hosts and not _allowlisted(host, policy.allow_hosts):
            raise _deny("not_allowlisted", f"{host} is not in the egress allowlist")
        return Target(scheme, str(ip4), port, path_and_query, True)
    if not host or len(host) > MAX_HOST_LENGTH:
        raise _deny("bad_host", "host is empty or longer than 253 characters")
    for label in host.split("."):
        if len(label) > MAX_LABEL_LENGTH or not _LABEL_RE.fullmatch(label):
            raise _deny("bad_host", f"host {host!r} is not letters, digits and hyphens")
    if _name_denied(host):
        raise _deny("denied_name", f"host {host!r} is an internal name")  # T-SSRF-1
    if policy.allow_hosts and not _allowlisted(host, policy.allow_hosts):
        raise _deny("not_allowlisted", f"{host} is not in the egress allowlist")
    return Target(scheme, host, port, path_and_query, False)


def check_resolved(
    host: str,
    addresses: list[str],
    policy: EgressPolicy,
    *,
    own_networks: tuple[IPNetwork, ...],
    address_check: Callable[[IPAddress], str | None] = address_denied,
) -> list[IPAddress]:
    """Validate every DNS answer for ``host``; return them parsed, de-duplicated.

    ``own_networks`` are this host's own addresses (the adapter enumerates
    them; there is no default, so no caller can forget them). They and the
    operator's ``deny_networks`` are checked even when ``address_check`` —
    which exists only so tests can admit a loopback test server; the
    appliance never passes it — lets an address through.
    """
    if not policy.enabled:
        raise _deny("egress_off", "egress is off on this node")
    if not addresses:
        raise _deny("denied_address", f"{host} has no addresses")  # fail closed
    parsed: list[IPAddress] = []
    for answer in addresses:
        try:
            ip = ipaddress.ip_address(answer)
        except (TypeError, ValueError):
            raise _deny("denied_address", f"{host} resolved to non-address {answer!r}") from None
        row = address_check(ip)
        if row is not None:
            # T-SSRF-1/T-SSRF-2: one bad answer poisons the set; the adapter
            # might otherwise fall back to it when the good one fails.
            raise _deny("denied_address", f"{host} resolved to {ip} in denied range {row}")
        row = site_denied(ip, policy.deny_networks, own_networks)
        if row is not None:
            raise _deny("denied_address", f"{host} resolved to {ip}: {row}")  # T-SSRF-1
        if ip not in parsed:
            parsed.append(ip)
    return parsed
