"""python-tuf fetchers: one confined to a bundle on removable media, one to a LAN peer.

Every byte python-tuf verifies comes through one of these. They only decide
*where* bytes may come from; *whether* the bytes are trusted is python-tuf's
job (signatures, versions, expiry, lengths, hashes).
"""
from __future__ import annotations

import errno
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import unquote, urlsplit

from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from mirror.checks import UnsafePath, check_peer_url, split_relative_path

BUNDLE_SCHEME = "bundle:/"
CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchLimits:
    """Ceilings applied before python-tuf knows a file's signed length."""

    max_file_bytes: int = 512 * 1024 * 1024
    http_timeout_s: float = 30.0


def _not_found(url: str) -> NoReturn:
    # python-tuf stops probing for newer roots on a 404, so a missing file
    # must look like one rather than like a broken medium.
    raise exceptions.DownloadHTTPError(f"{url}: not found", 404)


def open_confined(root: Path, parts: tuple[str, ...]) -> int:
    """An fd for the regular file root/parts..., never following a symlink.

    T-SUPPLY-1: each component is opened relative to its parent's fd with
    O_NOFOLLOW, so a symlink anywhere under ``root`` (to /etc, or to another
    bundle) fails with ELOOP/ENOTDIR instead of being read. ``root`` itself is
    what the operator named and may be a mount point reached through links.
    Raises FileNotFoundError for a missing file, UnsafePath for anything else odd.
    """
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(root, dir_flags)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, dir_flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise FileNotFoundError(part) from None
                raise UnsafePath(f"{'/'.join(parts)}: {part} is not a plain directory") from None
            os.close(fd)
            fd = nxt
        try:
            # O_NONBLOCK: opening a FIFO planted in the bundle must not hang.
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise FileNotFoundError(parts[-1]) from None
            raise UnsafePath(f"{'/'.join(parts)} is not a plain file") from None
    finally:
        os.close(fd)
    st = os.fstat(ffd)
    if not stat.S_ISREG(st.st_mode):
        os.close(ffd)
        raise UnsafePath(f"{'/'.join(parts)} is not a regular file")
    return ffd


def _read_capped(f: IO[bytes], cap: int, url: str) -> Iterator[bytes]:
    total = 0
    try:
        while chunk := f.read(CHUNK):
            total += len(chunk)
            if total > cap:
                raise exceptions.DownloadLengthMismatchError(f"{url}: larger than {cap} bytes")
            yield chunk
    finally:
        f.close()


class BundleFetcher(FetcherInterface):
    """Reads ``bundle:/metadata/...`` and ``bundle:/targets/...`` inside one directory only."""

    metadata_url = BUNDLE_SCHEME + "metadata/"
    targets_url = BUNDLE_SCHEME + "targets/"

    def __init__(self, root: Path, limits: FetchLimits | None = None) -> None:
        self._root = root
        self._limits = limits or FetchLimits()

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(BUNDLE_SCHEME):
            raise exceptions.DownloadError(f"{url}: outside the bundle")
        try:
            parts = split_relative_path(unquote(url[len(BUNDLE_SCHEME):]))
        except UnsafePath as exc:
            raise exceptions.DownloadError(str(exc)) from None
        if parts[0] not in ("metadata", "targets"):
            raise exceptions.DownloadError(f"{url}: outside metadata/ and targets/")
        try:
            fd = open_confined(self._root, parts)
        except FileNotFoundError:
            _not_found(url)
        except UnsafePath as exc:
            raise exceptions.DownloadError(str(exc)) from None
        return _read_capped(os.fdopen(fd, "rb"), self._limits.max_file_bytes, url)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A peer that redirects could point the appliance anywhere; the operator
    # named one address, so nothing else is ever contacted (T-SUPPLY-1).
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, "redirects are not followed", headers, fp)


class PeerFetcher(FetcherInterface):
    """urllib against one operator-named LAN base URL (``.../mirror/``) and nothing else."""

    def __init__(self, base_url: str, limits: FetchLimits | None = None) -> None:
        base = check_peer_url(base_url)
        # An operator may type just the appliance's address: its mirror lives under /mirror/.
        self.base_url = base + "mirror/" if urlsplit(base).path == "/" else base
        self.metadata_url = self.base_url + "metadata/"
        self.targets_url = self.base_url + "targets/"
        self._limits = limits or FetchLimits()
        # No proxies from the environment: the bytes come from the peer itself.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(self.base_url):
            raise exceptions.DownloadError(f"{url}: not under the peer {self.base_url}")
        try:
            split_relative_path(unquote(url[len(self.base_url):]))
        except UnsafePath as exc:
            raise exceptions.DownloadError(str(exc)) from None
        try:
            resp = self._opener.open(url, timeout=self._limits.http_timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from None
        except TimeoutError as exc:
            raise exceptions.SlowRetrievalError(f"{url}: timed out") from exc
        return _read_capped(resp, self._limits.max_file_bytes, url)
