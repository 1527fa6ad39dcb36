"""Pure checks of the trust-registry mirror: names, paths, tar members, peer URLs.

Plain functions over values: no file system, socket or clock in here, so the
importer, the fetchers and the LAN routes all apply the same rules and the
rules are tested as tables (threat T-SUPPLY-1).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit


class UnsafePath(ValueError):
    """A path that could leave the bundle or the mirror (T-SUPPLY-1)."""


class BadPeerURL(ValueError):
    """A sync address that is not a LAN address the operator may name."""


# Target names are one flat file name: no directories, no dot files, so a
# signed name can never become a path outside targets/ (T-SUPPLY-1).
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
# One path component of a bundle or served path.
_COMPONENT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,199}")
MAX_PATH_DEPTH = 4


def check_target_name(name: str) -> str:
    """A TUF target path the registry accepts: a single safe file name."""
    if not _TARGET_NAME.fullmatch(name) or ".." in name:
        raise UnsafePath(f"target name {name!r} is not a plain file name")
    return name


def split_relative_path(path: str) -> tuple[str, ...]:
    """The components of a relative path, refusing anything that could escape.

    T-SUPPLY-1: no absolute paths, no '..' or '.', no empty components, no
    backslashes, NULs or dot files, and a bounded depth. Symlinks cannot be
    judged here; the I/O layer opens every component without following them.
    """
    if not path or len(path) > 1024:
        raise UnsafePath("empty or overlong path")
    if path.startswith("/") or "\\" in path or "\x00" in path:
        raise UnsafePath(f"path {path!r} is absolute or has forbidden characters")
    parts = tuple(path.split("/"))
    if len(parts) > MAX_PATH_DEPTH:
        raise UnsafePath(f"path {path!r} is too deep")
    for part in parts:
        if part in ("", ".", "..") or not _COMPONENT.fullmatch(part):
            raise UnsafePath(f"path {path!r} has a forbidden component {part!r}")
    return parts


@dataclass(frozen=True)
class TarMember:
    """What the importer needs to know about one tar member, as plain values."""

    name: str
    kind: str  # "file", "dir", or anything else (symlink, hardlink, device, fifo)
    size: int


def bundle_relative_name(name: str) -> str:
    """A tar member name as a path inside the bundle (a leading './' allowed)."""
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def check_tar_members(members: list[TarMember], *, max_members: int, max_total: int, max_file: int) -> None:
    """Refuse the whole tarball if any member is unsafe (T-SUPPLY-1).

    Links of any kind are refused, not just links that point out: a bundle is
    regular files in metadata/ and targets/, and a link inside is never needed.
    """
    if len(members) > max_members:
        raise UnsafePath(f"tarball has {len(members)} members, more than {max_members}")
    total = 0
    for m in members:
        rel = bundle_relative_name(m.name)
        if rel == "" and m.kind == "dir":
            continue
        if m.kind not in ("file", "dir"):
            raise UnsafePath(f"tarball member {m.name!r} is a {m.kind}, only files and directories are allowed")
        parts = split_relative_path(rel)
        if parts[0] not in ("metadata", "targets"):
            raise UnsafePath(f"tarball member {m.name!r} is outside metadata/ and targets/")
        if m.size < 0 or m.size > max_file:
            raise UnsafePath(f"tarball member {m.name!r} is larger than {max_file} bytes")
        total += m.size
        if total > max_total:
            raise UnsafePath(f"tarball unpacks to more than {max_total} bytes")


# LAN ranges a peer appliance may live in. An explicit table, because
# ipaddress.is_private/is_global differ between Python versions and cover
# ranges (documentation, benchmarking, shared address space) that are no LAN.
_LAN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "127.0.0.0/8",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)
# Cloud metadata endpoints sit inside link-local: never a peer appliance.
_DENIED = tuple(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254"))


def check_peer_url(url: str) -> str:
    """The normalised base URL of a peer appliance, or BadPeerURL.

    The operator types the address; it must be an IP literal in a LAN range
    (no host name: resolving one would let DNS pick the peer), http or https,
    with no credentials, query or fragment. Returns the base ending in '/'.
    """
    if not url.isascii() or any(c.isspace() for c in url):
        raise BadPeerURL("the peer URL must be plain ASCII without spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadPeerURL("the peer URL must start with http:// or https://")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise BadPeerURL("the peer URL must not carry credentials")
    if parts.query or parts.fragment:
        raise BadPeerURL("the peer URL must not have a query or fragment")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise BadPeerURL("the peer URL has an invalid port") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadPeerURL(f"the peer must be given as an IP address on the LAN, not {host!r}") from None
    # Strict form: '127.1', '0177.0.0.1' and friends never parse above, and
    # mapped IPv6 forms are refused rather than unwrapped.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise BadPeerURL("IPv4-mapped IPv6 addresses are not accepted; type the IPv4 address")
    if ip in _DENIED or not any(ip in net for net in _LAN_NETWORKS):
        raise BadPeerURL(f"{ip} is not a LAN address")
    path = parts.path or "/"
    if ".." in path.split("/"):
        raise BadPeerURL("the peer URL path must not contain '..'")
    if not path.endswith("/"):
        path += "/"
    netloc = f"[{ip}]" if ip.version == 6 else str(ip)
    if port is not None:
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}{path}"
