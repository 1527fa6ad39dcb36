"""The one bounded HTTP/1.1 reader (appliance/httpclient.py): T-DOS-1, T-PRO-2.

``RESPONSE_ATTACKS`` is the malformed-answer table shared by the reader and
both of its callers: this file runs it against the reader directly,
``test_egress_fetch.py`` through ``host_fetch``'s ``fetch`` and
``test_profuncs.py`` through the MCP client's HTTP transport. Every attack
carries a well-formed JSON-RPC answer (``BODY``) wherever a lenient reader
would find one, so a reader that guessed instead of refusing would hand it
on and the test would fail; ``ACCEPTED`` holds the framings that must still
work, through the same three paths.

Servers are one end of a ``socketpair`` (or, for MCP, a loopback HTTP
server) fed by :func:`serve`; nothing leaves the machine.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import pytest

from appliance import httpclient
from appliance.httpclient import HttpError

# A complete tools/call answer for request id 2 (the MCP client's first call after initialize).
BODY = b'{"jsonrpc":"2.0","id":2,"result":{"content":[],"isError":false}}'
N = len(BODY)
LIMIT = 70_000  # body cap on every path (MCP: max_bytes + OVERHEAD)
DRIP_S = 0.05
SLOW_DEADLINE_S, DEADLINE_S = 1.0, 10.0
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def _chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


CHUNKED_BODY = _chunk(BODY) + b"0\r\n\r\n"


@dataclass(frozen=True)
class Answer:
    """What a server sends: ``raw``; then ``drip`` once per DRIP_S forever, or ``hold`` the line open."""

    name: str
    threat: str
    raw: bytes
    reason: str = "protocol"
    says: str = ""  # a piece of the error message: the refusal is for the reason the row is about
    drip: bytes = b""
    hold: bool = False

    @property
    def id(self) -> str:
        return f"{self.threat}:{self.name}"

    @property
    def deadline_s(self) -> float:
        return SLOW_DEADLINE_S if self.drip or self.hold else DEADLINE_S


def _cl(raw_value: bytes, body: bytes = BODY, extra: bytes = b"") -> bytes:
    return OK + extra + b"Content-Length: " + raw_value + b"\r\n\r\n" + body


RESPONSE_ATTACKS = [
    # -- framing: exactly one reading or none (T-PRO-2: response smuggling) --------------
    Answer("cl-list-5-5", "T-PRO-2", _cl(b"%d, %d" % (N, N)), says="plain decimal"),
    Answer("cl-conflicting", "T-PRO-2", _cl(b"%d" % N, extra=b"Content-Length: %d\r\n" % (N + 1)),
           says="repeated Content-Length"),
    Answer("cl-repeated-equal", "T-PRO-2", _cl(b"%d" % N, extra=b"Content-Length: %d\r\n" % N),
           says="repeated Content-Length"),
    Answer("cl-then-te", "T-PRO-2", _cl(b"%d" % len(CHUNKED_BODY), CHUNKED_BODY, b"Transfer-Encoding: chunked\r\n"),
           says="together with Transfer-Encoding"),
    Answer("te-then-cl", "T-PRO-2",
           OK + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % N + CHUNKED_BODY,
           says="together with Transfer-Encoding"),
    Answer("te-gzip-chunked", "T-PRO-2", OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_BODY,
           says="other than one chunked"),
    Answer("te-chunked-twice", "T-PRO-2",
           OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
           says="other than one chunked"),
    Answer("te-chunked-list", "T-PRO-2", OK + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + CHUNKED_BODY,
           says="other than one chunked"),
    Answer("te-identity", "T-PRO-2", OK + b"Transfer-Encoding: identity\r\n\r\n" + BODY, says="other than one chunked"),
    Answer("te-in-http-1.0", "T-PRO-2",
           b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
           says="HTTP/1.0"),
    Answer("cl-negative", "T-PRO-2", _cl(b"-3"), says="plain decimal"),
    Answer("cl-plus-sign", "T-PRO-2", _cl(b"+%d" % N), says="plain decimal"),
    Answer("cl-hex", "T-PRO-2", _cl(b"0x%x" % N), says="plain decimal"),
    Answer("cl-empty", "T-PRO-2", _cl(b""), says="plain decimal"),
    Answer("cl-inner-space", "T-PRO-2", _cl(b"%d %d" % (N, N)), says="plain decimal"),
    Answer("cl-latin1-superscript-digit", "T-PRO-2", _cl(b"\xb2"), says="plain decimal"),  # "²".isdigit() is True
    Answer("cl-20-digits", "T-PRO-2", _cl(b"9" * 20), says="plain decimal"),
    Answer("cl-space-before-colon", "T-PRO-2", OK + b"Content-Length : %d\r\n\r\n" % N + BODY, says="malformed"),
    Answer("folded-header", "T-PRO-2", OK + b" folded: x\r\nContent-Length: %d\r\n\r\n" % N + BODY, says="folded"),
    Answer("folded-content-length", "T-PRO-2", OK + b"Content-Length:\r\n %d\r\n\r\n" % N + BODY, says="folded"),
    Answer("bare-lf-lines", "T-PRO-2",
           b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: %d\n\n" % N + BODY, says="bare LF"),
    Answer("bare-cr-in-value", "T-PRO-2", _cl(b"%d" % N, extra=b"X-A: a\rContent-Length: 99\r\n"),
           says="control character"),
    Answer("nul-in-value", "T-PRO-2", _cl(b"%d" % N, extra=b"X-A: a\x00b\r\n"), says="control character"),
    Answer("unasked-101", "T-PRO-2", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + _cl(b"%d" % N),
           says="101"),
    Answer("six-interim-answers", "T-DOS-1", b"HTTP/1.1 103 Early Hints\r\n\r\n" * 6 + _cl(b"%d" % N),
           says="interim"),
    Answer("status-http-2", "T-PRO-2", b"HTTP/2 200 OK\r\nContent-Length: %d\r\n\r\n" % N + BODY, says="status line"),
    Answer("status-lowercase", "T-PRO-2", b"http/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % N + BODY,
           says="status line"),
    Answer("status-below-100", "T-PRO-2", b"HTTP/1.1 099 Early\r\n\r\n" + _cl(b"%d" % N), says="status line"),
    Answer("status-no-code", "T-PRO-2", b"HTTP/1.1 OK\r\nContent-Length: %d\r\n\r\n" % N + BODY, says="status line"),
    Answer("ssh-banner", "T-PRO-2", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", says="status line"),
    # -- chunks ----------------------------------------------------------------------------
    Answer("chunk-size-not-hex", "T-PRO-2", OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + BODY,
           says="bad chunk size"),
    Answer("chunk-size-negative", "T-PRO-2", OK + b"Transfer-Encoding: chunked\r\n\r\n-%x\r\n" % N + BODY,
           says="bad chunk size"),
    Answer("chunk-size-0x", "T-PRO-2", OK + b"Transfer-Encoding: chunked\r\n\r\n0x%x\r\n" % N + BODY,
           says="bad chunk size"),
    Answer("chunk-size-leading-space", "T-PRO-2", OK + b"Transfer-Encoding: chunked\r\n\r\n %x\r\n" % N + BODY,
           says="bad chunk size"),
    Answer("chunk-size-17-digits", "T-PRO-2",
           OK + b"Transfer-Encoding: chunked\r\n\r\n%017x\r\n" % N + BODY + b"\r\n0\r\n\r\n", says="bad chunk size"),
    Answer("chunk-size-2-to-64", "T-DOS-1", OK + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n" + BODY,
           "too_large", "exceeds"),
    Answer("chunk-data-not-crlf", "T-PRO-2",
           OK + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % N + BODY + b"XX0\r\n\r\n", says="not followed by CRLF"),
    Answer("chunk-extension-line-flood", "T-DOS-1",
           OK + b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(BODY, b";x=" + b"a" * 2000) + b"0\r\n\r\n",
           says="over its cap"),
    Answer("chunk-extensions-over-budget", "T-DOS-1",
           OK + b"Transfer-Encoding: chunked\r\n\r\n"  # one byte per chunk, 1 KiB of extension each
           + b"".join(_chunk(bytes([c]), b";" + b"e" * 1010) for c in BODY + b" " * 100) + b"0\r\n\r\n",
           says="extensions over their cap"),
    Answer("trailer-flood", "T-DOS-1",
           OK + b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(BODY) + b"0\r\n" + b"X-T: 1\r\n" * 101 + b"\r\n",
           says="more than 100"),
    # -- size (T-DOS-1) --------------------------------------------------------------------
    Answer("header-flood-count", "T-DOS-1", _cl(b"%d" % N, extra=b"X-F: 1\r\n" * 101), says="more than 100"),
    Answer("header-flood-bytes", "T-DOS-1", _cl(b"%d" % N, extra=b"X-Pad: " + b"a" * 70_000 + b"\r\n"),
           says="over its cap"),
    Answer("cl-over-cap", "T-DOS-1", _cl(b"%d" % (LIMIT + 1)), "too_large", "exceeds"),
    Answer("cl-19-digits", "T-DOS-1", _cl(b"9" * 19), "too_large", "exceeds"),
    Answer("chunk-over-cap", "T-DOS-1", OK + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (LIMIT + 1) + BODY,
           "too_large", "exceeds"),
    Answer("chunks-add-up-over-cap", "T-DOS-1",
           OK + b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(b" " * 40_000) + _chunk(b" " * 40_000) + b"0\r\n\r\n",
           "too_large", "exceeds"),
    Answer("close-delimited-over-cap", "T-DOS-1", OK + b"\r\n" + BODY + b" " * (LIMIT + 1 - N), "too_large", "exceeds"),
    # -- early close -----------------------------------------------------------------------
    Answer("closed-before-anything", "T-PRO-2", b"", says="closed mid-line"),
    Answer("closed-mid-status-line", "T-PRO-2", b"HTTP/1.1 20", says="closed mid-line"),
    Answer("closed-mid-head", "T-PRO-2", OK + b"Content-Len", says="closed mid-line"),
    Answer("closed-mid-body", "T-PRO-2", _cl(b"%d" % (N + 10)), says="closed mid-body"),
    Answer("closed-mid-chunk", "T-PRO-2", OK + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (N + 10) + BODY,
           says="closed mid-chunk"),
    Answer("closed-before-last-chunk", "T-PRO-2", OK + b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(BODY),
           says="closed mid-line"),
    # -- time (T-DOS-1): the deadline holds however slowly bytes arrive -----------------------
    Answer("silent-server", "T-DOS-1", b"", "timeout", "deadline", hold=True),
    Answer("drip-head", "T-DOS-1", b"HTTP/1.1 200 OK\r\nX-Slow: ", "timeout", "deadline", drip=b"a"),
    Answer("drip-body", "T-DOS-1", _cl(b"%d" % (N + 1000)), "timeout", "deadline", drip=b" "),
    Answer("drip-chunks", "T-DOS-1", OK + b"Transfer-Encoding: chunked\r\n\r\n", "timeout", "deadline",
           drip=b"1\r\n \r\n"),
    Answer("stall-mid-body", "T-DOS-1", _cl(b"%d" % (N + 10)), "timeout", "deadline", hold=True),
]

ACCEPTED = [
    Answer("content-length", "-", _cl(b"%d" % N)),
    Answer("content-length-leading-zeros", "-", _cl(b"000%d" % N)),
    Answer("chunked-ext-trailer-mixed-case", "-",
           OK + b"Transfer-Encoding: Chunked\r\n\r\n" + _chunk(BODY[:10], b" ;a=1") + _chunk(BODY[10:])
           + b"0\r\nX-Trailer: t\r\n\r\n"),
    Answer("close-delimited", "-", OK + b"\r\n" + BODY),
    Answer("interim-103-then-200", "-", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + _cl(b"%d" % N)),
    Answer("http-1.0", "-", b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % N
           + BODY),
    Answer("no-reason-phrase", "-", b"HTTP/1.1 200\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % N
           + BODY),
    # Exactly at the cap, padded with JSON whitespace so MCP still parses it.
    Answer("content-length-at-cap", "-", _cl(b"%d" % LIMIT, BODY + b" " * (LIMIT - N))),
    Answer("close-delimited-at-cap", "-", OK + b"\r\n" + BODY + b" " * (LIMIT - N)),
]
ACCEPTED_BODY = {a.name: BODY + b" " * (LIMIT - N) if a.name.endswith("at-cap") else BODY for a in ACCEPTED}


def serve(sock: socket.socket, answer: Answer, stop: threading.Event) -> None:
    """Play ``answer`` on ``sock`` (a server's end); returns when done or when the client hangs up."""
    try:
        sock.sendall(answer.raw)
        if answer.drip:
            while not stop.wait(DRIP_S):
                sock.sendall(answer.drip)
        elif answer.hold:
            sock.settimeout(30)  # backstop only: the client's close (or stop) ends this
            while not stop.is_set() and sock.recv(65536):
                pass
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the client closed first: that is what most rows are about


class Wire:
    """Socketpairs whose server end plays an Answer in a thread; all closed and joined at teardown."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []

    def connect(self, answer: Answer) -> socket.socket:
        ours, peer = socket.socketpair()
        self.socks += [ours, peer]
        thread = threading.Thread(target=serve, args=(peer, answer, self.stop), daemon=True)
        thread.start()
        self.threads.append(thread)
        return ours

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.close()


def ids(table: list[Answer]) -> list[str]:
    return [a.id for a in table]


def check_refused(answer: Answer, attempt: Callable[[], object], error: type[Exception],
                  message_attr: str = "message") -> Exception:
    """The assertion all three paths share: refused, for the row's reason, by the row's deadline."""
    started = time.monotonic()
    with pytest.raises(error) as info:
        attempt()
    elapsed = time.monotonic() - started
    err = info.value
    assert getattr(err, "reason", None) == answer.reason, err
    assert answer.says.lower() in str(getattr(err, message_attr, "")).lower(), err
    assert elapsed < answer.deadline_s + 1.0  # slow rows end at their deadline; the rest at once
    return err


def read_direct(sock: socket.socket, deadline_s: float) -> bytes:
    reader = httpclient.Reader(sock, time.monotonic() + deadline_s)
    head = httpclient.read_head(reader)
    return httpclient.read_body(reader, head, LIMIT)


@pytest.mark.parametrize("answer", RESPONSE_ATTACKS, ids=ids(RESPONSE_ATTACKS))
def test_t_dos_1_t_pro_2_reader_refuses_malformed_answer(answer: Answer, wire: Wire) -> None:
    sock = wire.connect(answer)
    check_refused(answer, lambda: read_direct(sock, answer.deadline_s), HttpError)


@pytest.mark.parametrize("answer", ACCEPTED, ids=ids(ACCEPTED))
def test_reader_accepts_well_formed_answer(answer: Answer, wire: Wire) -> None:
    assert read_direct(wire.connect(answer), DEADLINE_S) == ACCEPTED_BODY[answer.name]


def test_attack_table_rows_are_distinct() -> None:
    raws = [(a.raw, a.drip, a.hold) for a in RESPONSE_ATTACKS]
    assert len(set(raws)) == len(raws)
    assert len({a.id for a in RESPONSE_ATTACKS}) == len(RESPONSE_ATTACKS)


# -- the pure parts, one decision each ---------------------------------------------------------

@pytest.mark.parametrize("fields,expected", [
    ({}, (None, False)),
    ({"content-length": ("0",)}, (0, False)),
    ({"content-length": ("0005",)}, (5, False)),
    ({"transfer-encoding": ("CHUNKED",)}, (None, True)),
])
def test_framing_accepts_one_reading(fields: dict[str, tuple[str, ...]], expected: tuple[int | None, bool]) -> None:
    assert httpclient.framing("HTTP/1.1", fields) == expected


@pytest.mark.parametrize("fields", [
    {"content-length": ("5", "5")},
    {"content-length": ("5,5",)},
    {"content-length": ("5", "6")},
    {"content-length": ("\u0665",)},  # ARABIC-INDIC DIGIT FIVE: str.isdigit() says yes
    {"content-length": ("5",), "transfer-encoding": ("chunked",)},
    {"transfer-encoding": ("chunked", "chunked")},
    {"transfer-encoding": ("chunked;q=1",)},
])
def test_t_pro_2_framing_refuses_ambiguity(fields: dict[str, tuple[str, ...]]) -> None:
    with pytest.raises(HttpError) as info:
        httpclient.framing("HTTP/1.1", fields)
    assert info.value.reason == "protocol"


def test_t_pro_2_repeated_single_field_refused() -> None:
    head = httpclient.Head("HTTP/1.1", 200, {"content-type": ("application/json", "text/html")}, None, False)
    assert head.all("Content-Type") == ("application/json", "text/html")
    with pytest.raises(HttpError):
        head.one("content-type")
    assert head.one("mcp-session-id") is None


def test_t_dos_1_deadline_already_passed_reads_nothing(wire: Wire) -> None:
    sock = wire.connect(ACCEPTED[0])
    reader = httpclient.Reader(sock, deadline=5.0, clock=lambda: 5.0)
    with pytest.raises(HttpError) as info:
        httpclient.read_head(reader)
    assert info.value.reason == "timeout" and reader.buf == bytearray()
