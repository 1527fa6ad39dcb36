"""One bounded HTTP/1.1 response reader for the host's outbound requests.

``host_fetch`` (:mod:`appliance.egress`) and the HTTP transport of
``host_mcp_call`` (:mod:`appliance.mcp`) each send one request on a fresh
connection (``Connection: close``) and read one answer from a server that may
be hostile: any allowed host for ``host_fetch``, an operator's MCP server that
may be broken or taken over for ``host_mcp_call``. Both read that answer here
and nowhere else, so they cannot disagree about what it says.

What this module promises (SECURITY.md: T-DOS-1, T-PRO-2, T-SSRF-2):

* **Deadline.** Every send, handshake and recv runs with a socket timeout
  re-armed from one monotonic ``deadline``: a server dripping one byte at a
  time still ends the call at the deadline (``timeout``).
* **Head caps.** Status lines, header fields and interim (1xx) answers share
  :data:`HEAD_CAP` bytes; at most :data:`MAX_FIELDS` fields per head and
  :data:`MAX_INTERIM` interim answers. Trailers get the same caps.
* **Body cap.** At most ``cap`` body bytes are accepted. A declared length
  over the cap fails before a body byte is read, a chunk that would pass it
  fails before it is read, a read-to-close body fails one byte past it
  (``too_large``; a body is never truncated).
* **One framing, or none.** Anything two HTTP implementations could frame
  differently is refused (``protocol``): a line not ended by CRLF, a bare CR
  or other control character, a folded line, whitespace before a colon; a
  repeated, list-valued, signed or non-decimal Content-Length;
  Transfer-Encoding other than exactly one ``chunked``, next to a
  Content-Length, or in an HTTP/1.0 answer; a chunk size that is not 1-16 hex
  digits; chunk data not followed by CRLF; a 101 nobody asked for.

Errors are :class:`HttpError` with a ``reason`` (timeout, io, tls, protocol,
too_large); each caller maps it onto its own error type.
"""
from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "HttpError", "Head", "Reader", "read_head", "body", "read_body", "send_all", "start_tls", "remaining",
    "parse_status_line", "parse_field_line", "framing", "HEAD_CAP", "MAX_FIELDS", "MAX_INTERIM",
]

Clock = Callable[[], float]

HEAD_CAP = 64 * 1024  # status lines + fields of all interim answers and the final head
MAX_FIELDS = 100  # per head, and for the trailers
MAX_INTERIM = 5
CHUNK_LINE_CAP = 1024  # one chunk-size line, extensions included
EXT_BUDGET = 64 * 1024  # all chunk extensions of one body (they are ignored)
_MAX_LENGTH_DIGITS = 19  # any longer Content-Length is past every cap anyway
_RECV = 64 * 1024
_MAX_WAIT = 3600.0  # settimeout overflows on absurd deadlines
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class HttpError(Exception):
    """The exchange failed. ``reason``: timeout, io, tls, protocol, too_large."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _protocol(message: str) -> HttpError:
    return HttpError("protocol", message)


def remaining(deadline: float, clock: Clock, what: str) -> float:
    """Seconds left before ``deadline``, or ``timeout`` if none are."""
    left = deadline - clock()
    if left <= 0:
        raise HttpError("timeout", f"deadline passed {what}")
    return min(left, _MAX_WAIT)


# -- sending -----------------------------------------------------------------------------

def start_tls(sock: socket.socket, server_hostname: str, deadline: float, clock: Clock = time.monotonic) -> ssl.SSLSocket:
    """TLS over ``sock``; certificate and name checked against ``server_hostname``."""
    try:
        sock.settimeout(remaining(deadline, clock, "before the TLS handshake"))
        return ssl.create_default_context().wrap_socket(sock, server_hostname=server_hostname)
    except (socket.timeout, TimeoutError):
        sock.close()
        raise HttpError("timeout", "deadline passed during the TLS handshake") from None
    except OSError as exc:  # ssl.SSLError and CertificateError included
        sock.close()
        raise HttpError("tls", str(exc)) from None
    except HttpError:
        sock.close()
        raise


def send_all(sock: socket.socket, data: bytes, deadline: float, clock: Clock = time.monotonic) -> None:
    try:
        sock.settimeout(remaining(deadline, clock, "before sending"))
        sock.sendall(data)  # the timeout bounds the whole sendall, not each send
    except (socket.timeout, TimeoutError):
        raise HttpError("timeout", "deadline passed while sending") from None
    except OSError as exc:
        raise HttpError("io", f"send failed: {exc}") from None


# -- reading -----------------------------------------------------------------------------

class Reader:
    """Buffered reads against the deadline; never asks for more than the caller may keep."""

    def __init__(self, sock: socket.socket, deadline: float, clock: Clock = time.monotonic) -> None:
        self.sock, self.deadline, self.clock = sock, deadline, clock
        self.buf = bytearray()
        self.eof = False

    def _fill(self, want: int) -> None:
        # T-DOS-1: each recv waits at most until the deadline, so a slow drip ends there.
        timeout = remaining(self.deadline, self.clock, "while reading")
        try:
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(max(1, min(_RECV, want)))
        except (socket.timeout, TimeoutError):
            raise HttpError("timeout", "deadline passed while reading") from None
        except ssl.SSLError as exc:
            raise HttpError("tls", str(exc)) from None
        except OSError as exc:
            raise HttpError("io", f"read failed: {exc}") from None
        if not chunk:
            self.eof = True
        self.buf += chunk

    def line(self, cap: int) -> bytes:
        """One line of at most ``cap`` bytes including its CRLF, returned without it."""
        while True:
            pos = self.buf.find(b"\n", 0, max(0, cap))
            if pos != -1:
                raw = bytes(self.buf[: pos + 1])
                del self.buf[: pos + 1]
                if not raw.endswith(b"\r\n"):
                    raise _protocol("line ended by a bare LF")  # T-PRO-2: CRLF only
                return raw[:-2]
            if len(self.buf) >= cap:
                raise _protocol("line or head over its cap")  # T-DOS-1
            if self.eof:
                raise _protocol("connection closed mid-line")
            self._fill(cap - len(self.buf))

    def take(self, n: int) -> bytes:
        """Up to ``n`` buffered or newly received bytes; b"" only at end of stream."""
        if not self.buf and not self.eof:
            self._fill(n)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise _protocol("connection closed mid-body")
            self._fill(n - len(self.buf))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


# -- the head (pure parsing) -------------------------------------------------------------

def _has_ctl(data: bytes) -> bool:
    return any((c < 0x20 and c != 0x09) or c == 0x7F for c in data)


def parse_status_line(line: bytes) -> tuple[str, int]:
    """``HTTP/1.x SP 3DIGIT [SP reason]`` -> (version, status)."""
    version, sp, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.0", b"HTTP/1.1") or not sp:
        raise _protocol("malformed status line")
    # Below 100 some readers see an interim answer and others a final one:
    # refused. 600-999 are final answers (RFC 9110 says: handle like a 5xx).
    if len(code) != 3 or not code.isdigit() or code < b"100" or _has_ctl(reason):
        raise _protocol("malformed status line")
    return version.decode("ascii"), int(code)


def parse_field_line(line: bytes) -> tuple[str, str]:
    """``name: value`` -> (lower-case name, value without surrounding blanks)."""
    name, colon, value = line.partition(b":")
    # T-PRO-2: a folded line (leading blank), whitespace before the colon or a
    # non-token name is read differently by different parsers: refused.
    if not colon or not name or any(c not in _TOKEN for c in name):
        raise _protocol("malformed or folded header line")
    value = value.strip(b" \t")
    if _has_ctl(value):
        raise _protocol("control character in a header value")
    return name.decode("ascii").lower(), value.decode("latin-1")


def framing(version: str, fields: Mapping[str, tuple[str, ...]]) -> tuple[int | None, bool]:
    """(declared Content-Length or None, chunked) — or ``protocol`` if ambiguous.

    T-PRO-2: this is where response smuggling would start. Exactly one
    framing is accepted; everything RFC 9112 lets a recipient "choose" between
    is refused instead.
    """
    te, cl = fields.get("transfer-encoding"), fields.get("content-length")
    if te is not None:
        if cl is not None:
            raise _protocol("Content-Length together with Transfer-Encoding")
        if version == "HTTP/1.0":
            raise _protocol("Transfer-Encoding in an HTTP/1.0 answer")
        if len(te) != 1 or te[0].lower() != "chunked":
            raise _protocol("Transfer-Encoding other than one chunked")
        return None, True
    if cl is None:
        return None, False
    if len(cl) != 1:
        raise _protocol("repeated Content-Length")  # even with equal values
    text = cl[0]
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_LENGTH_DIGITS:
        raise _protocol("Content-Length is not one plain decimal number")  # "5, 5", "-3", "+5", "0x5"
    return int(text), False


@dataclass(frozen=True)
class Head:
    version: str
    status: int
    fields: Mapping[str, tuple[str, ...]]
    length: int | None  # the declared Content-Length
    chunked: bool

    def all(self, name: str) -> tuple[str, ...]:
        return self.fields.get(name.lower(), ())

    def one(self, name: str) -> str | None:
        """The field's single value; a repeated field is ``protocol`` (no guessing which one counts)."""
        values = self.all(name)
        if len(values) > 1:
            raise _protocol(f"repeated {name}")
        return values[0] if values else None


def _read_fields(reader: Reader, budget: int) -> tuple[dict[str, tuple[str, ...]], int]:
    fields: dict[str, tuple[str, ...]] = {}
    count = 0
    while True:
        raw = reader.line(budget)
        budget -= len(raw) + 2
        if not raw:
            return fields, budget
        count += 1
        if count > MAX_FIELDS:
            raise _protocol(f"more than {MAX_FIELDS} header fields")  # T-DOS-1
        name, value = parse_field_line(raw)
        fields[name] = fields.get(name, ()) + (value,)


def read_head(reader: Reader) -> Head:
    """The final (>= 200) head, after at most :data:`MAX_INTERIM` interim answers."""
    budget = HEAD_CAP  # T-DOS-1: one budget for every head line of this answer
    for _ in range(MAX_INTERIM + 1):
        line = reader.line(budget)
        budget -= len(line) + 2
        version, status = parse_status_line(line)
        fields, budget = _read_fields(reader, budget)
        if status == 101:
            raise _protocol("101 Switching Protocols was never asked for")
        if status >= 200:
            length, chunked = framing(version, fields)
            return Head(version, status, fields, length, chunked)
    raise _protocol("too many interim responses")


# -- the body ----------------------------------------------------------------------------

def _counted(reader: Reader, left: int, early_close: str) -> Iterator[bytes]:
    """Exactly ``left`` bytes (already checked against the cap), in pieces as they arrive."""
    while left:
        piece = reader.take(left)
        if not piece:
            raise _protocol(early_close)
        left -= len(piece)
        yield piece


def _chunk_size(line: bytes, ext_budget: int) -> tuple[int, int]:
    size_text, semi, ext = line.partition(b";")
    if semi:
        size_text = size_text.rstrip(b" \t")  # BWS before the extension
        ext_budget -= len(ext) + 1
        if ext_budget < 0:
            raise _protocol("chunk extensions over their cap")  # T-DOS-1
        if _has_ctl(ext):
            raise _protocol("control character in a chunk extension")
    if not 1 <= len(size_text) <= 16 or any(c not in _HEX for c in size_text):
        raise _protocol("bad chunk size")  # no sign, no 0x, no blanks, no overflow
    return int(size_text, 16), ext_budget


def _chunked(reader: Reader, cap: int) -> Iterator[bytes]:
    total, ext_budget = 0, EXT_BUDGET
    while True:
        size, ext_budget = _chunk_size(reader.line(CHUNK_LINE_CAP), ext_budget)
        if size == 0:
            _read_fields(reader, HEAD_CAP)  # trailers: capped like a head, then ignored
            return
        if total + size > cap:
            raise HttpError("too_large", f"body exceeds {cap} bytes")  # T-DOS-1: before reading it
        total += size
        yield from _counted(reader, size, "connection closed mid-chunk")
        if reader.exactly(2) != b"\r\n":
            raise _protocol("chunk data not followed by CRLF")


def body(reader: Reader, head: Head, cap: int) -> Iterator[bytes]:
    """The body of ``head`` in pieces; never more than ``cap`` bytes in all."""
    if head.status in (204, 304):
        return
    if head.chunked:
        yield from _chunked(reader, cap)
        return
    if head.length is not None:
        if head.length > cap:
            raise HttpError("too_large", f"Content-Length {head.length} exceeds {cap} bytes")  # T-DOS-1: nothing read
        yield from _counted(reader, head.length, "connection closed mid-body")
        return
    total = 0
    while True:  # no framing: the body ends when the server closes
        piece = reader.take(cap + 1 - total)
        if not piece:
            return
        total += len(piece)
        if total > cap:
            raise HttpError("too_large", f"body exceeds {cap} bytes")  # T-DOS-1
        yield piece


def read_body(reader: Reader, head: Head, cap: int) -> bytes:
    return b"".join(body(reader, head, cap))
