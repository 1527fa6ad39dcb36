"""Structured logs: one JSON object per line, for journald (stderr) and an
optional size-rotated file.

Every event is built from an allowlist of fields by the caller; nothing here
ever formats a header, a body, an API key or a signature. ``scrub`` is a
second line of defence for free-text messages (T-LOG-1: secrets in logs).
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
EXCERPT_CHARS = 64

# Secrets that could reach a free-text message by accident: bearer credentials,
# base64 Ed25519 signatures (88 chars) and hex seeds/keys of 64+ chars.
_SECRET_PATTERNS = (
    re.compile(r"(?i)bearer\s+\S+"),
    re.compile(r"(?i)authorization\S*\s*[:=]\s*\S+"),
    re.compile(r"[A-Za-z0-9+/]{86}==?"),
)


def scrub(text: str) -> str:
    # Fast path, same result: in ASCII text the patterns need "bearer" or
    # "authorization" (any case) or a run of 86 base64 characters. Other text
    # always goes through the patterns (re's IGNORECASE also matches a few
    # non-ASCII letters, e.g. a dotless i).
    if len(text) < 86 and text.isascii():
        low = text.lower()
        if "bearer" not in low and "authorization" not in low:
            return text
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("[redacted]", text)
    return text


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A short, escaped excerpt of guest-influenced text: never raw guest data.

    ``ascii()`` escapes control characters and newlines, so a guest cannot
    forge a log line or a terminal escape sequence (T-LOG-2: log injection).
    """
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit]
    escaped = ascii(cut)[1:-1]
    return escaped + ("..." if len(text) > limit else "")


# One encoder for every line: json.dumps with these arguments builds a new
# JSONEncoder per call, a noticeable part of a line's cost on the run path.
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str)


def _c_encoder() -> Callable[[object], str]:
    """``_ENCODER.encode``'s output, from one C encoder made once: encode()
    makes a new one per call (and a dict of markers), about half the cost of
    a line's fields. Without the circular-reference markers, so it keeps no
    state between calls (threads share it); the fields are flat values the
    callers build, and a cycle would still fail (RecursionError), not loop."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator
        return _ENCODER.encode
    chunks = make(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)

    def encode(value: object) -> str:
        return "".join(chunks(value, 0))

    return encode


_ENCODE = _c_encoder()


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "event", ...fields}`` on one line."""

    _second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text

    def format(self, record: logging.LogRecord) -> str:
        # Formatted once per record: every handler (stderr, the file, and the
        # file's rollover check, which formats to measure) gets the same line.
        done = record.__dict__.get("_cell_json")
        if isinstance(done, str):
            return done
        line = self._format(record)
        record.__dict__["_cell_json"] = line
        return line

    def _format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        known = self._second
        if known[0] != second:  # lines of the same second share its text (strftime once a second)
            known = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        out: dict[str, Any] = {
            "time": f"{known[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": scrub(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, scrub(value) if isinstance(value, str) else value)
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: a traceback can quote request data.
            out["exception"] = record.exc_info[0].__name__
        return _ENCODER.encode(out)


class _LineFormat:
    """The lines :class:`JsonFormatter` writes, byte for byte, built without a
    ``LogRecord``: the run path writes two lines per run, and the record, the
    logger's handler walk and the handler locks cost more than the line.

    ``{"time":…,"level":…,"logger":…,"event":…`` is one cached head per
    (level, event); the fields are scrubbed and encoded as the formatter does
    and spliced after it (T-LOG-1, T-LOG-2: the same encoder escapes them)."""

    _second: tuple[int, str] = (-1, "")
    _MAX_HEADS = 64  # event names are the code's own constants; a bound all the same

    def __init__(self, logger: str) -> None:
        self._logger = logger
        self._heads: dict[tuple[int, str], str] = {}

    def line(self, level: int, name: str, fields: dict[str, Any], created: float) -> str:
        head = self._heads.get((level, name))
        if head is None:
            head = _ENCODER.encode({"level": logging.getLevelName(level).lower(), "logger": self._logger,
                                    "event": scrub(name)})[1:-1]
            if len(self._heads) < self._MAX_HEADS:
                self._heads[(level, name)] = head
        second = int(created)
        known = self._second
        if known[0] != second:
            known = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        # LogRecord's msecs, as the formatter prints it.
        start = f'{{"time":"{known[1]}.{int((created - second) * 1000):03d}Z",{head}'
        out = fields
        if not (_HEAD_KEYS.isdisjoint(fields) and _scrub_keeps([v for v in fields.values() if isinstance(v, str)])):
            # As the formatter's setdefault: a field never replaces time, level, logger or event.
            out = {key: scrub(value) if isinstance(value, str) else value
                   for key, value in fields.items() if key not in _HEAD_KEYS}
        if not out:
            return start + "}"
        return start + "," + _ENCODE(out)[1:]


_HEAD_KEYS = frozenset(("time", "level", "logger", "event"))


def _scrub_keeps(texts: list[str]) -> bool:
    """True only if :func:`scrub` returns each of ``texts`` as it is by its
    fast path (ASCII, under 86 characters, no "bearer" or "authorization" in
    any case): one check of them all, instead of a call per field (T-LOG-1)."""
    if not texts:
        return True
    joined = "\n".join(texts)  # a newline is in neither word: no match across two fields
    if not joined.isascii() or max(map(len, texts)) >= 86:
        return False
    low = joined.lower()
    return "bearer" not in low and "authorization" not in low


class _StderrSink:
    """Writes to ``sys.stderr`` resolved at each write, so a replaced stream
    (pytest capture, a daemon redirect) never receives writes after it was
    closed. One write and flush per call, under a lock: lines never interleave."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            try:
                stream = sys.stderr
                stream.write(text)
                stream.flush()
            except Exception:  # as logging's handlers: a log write never fails the request it describes
                pass

    def close(self) -> None:
        pass


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Rotating file created 0600: logs name tenants and cells. Written
    through :meth:`write_text` (whole lines), rotated by the base class."""

    _regular = True

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)  # never roll over anything else (as the base class)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    def write_text(self, text: str) -> None:
        """Append whole lines, rolling over first when they would reach
        ``maxBytes`` (the base class's rule; the size from one fstat of the
        open descriptor, not two stat() calls and a seek)."""
        with self.lock:  # type: ignore[union-attr]  # createLock() made it in __init__
            try:
                if self.stream is None:  # delay=True: opened at the first line
                    self.stream = self._open()
                if (self.maxBytes > 0 and self._regular
                        and os.fstat(self.stream.fileno()).st_size + len(text) >= self.maxBytes):
                    self.doRollover()
                    if self.stream is None:
                        self.stream = self._open()
                self.stream.write(text)
                self.stream.flush()
            except Exception as exc:  # a full disk must not fail a request; say so where journald sees it
                try:
                    sys.stderr.write(f"cell: could not write the log file: {type(exc).__name__}\n")
                except Exception:
                    pass

    def write(self, text: str) -> None:
        self.write_text(text)


class OpsLog:
    """The per-app event logger: whole JSON lines written to stderr and,
    optionally, a rotating file.

    Not a ``logging.Logger``: nothing is registered process-wide, so several
    apps in one process (tests) keep their own sinks, and a line is built once
    and written with one call per sink (the lines of a run and its request
    together, see :meth:`run_lines`)."""

    NAME = "cell.ops"

    def __init__(self, *, level: str = "info", log_file: Path | None = None,
                 max_bytes: int = 10 * 1024 * 1024, backups: int = 5, stderr: bool = True) -> None:
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
        self.level = LEVELS[level]
        self._format = _LineFormat(self.NAME)
        self._sinks: list[_StderrSink | _PrivateRotatingFileHandler] = []
        if stderr:
            self._sinks.append(_StderrSink())
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._sinks.append(_PrivateRotatingFileHandler(str(log_file), maxBytes=max_bytes,
                                                           backupCount=backups, encoding="utf-8", delay=True))

    def enabled(self, level: int) -> bool:
        return level >= self.level

    def line(self, level: int, name: str, fields: dict[str, Any]) -> str:
        """The event's line with its newline, or "" at a level that is off."""
        if level < self.level:
            return ""
        try:
            return self._format.line(level, name, fields, time.time()) + "\n"
        except (ValueError, TypeError, RecursionError) as exc:  # as logging's handlers: never fail the caller
            try:
                sys.stderr.write(f"cell: could not format the {excerpt(name, 32)} log line: {type(exc).__name__}\n")
            except Exception:
                pass
            return ""

    def write(self, text: str) -> None:
        """Whole lines, one write per sink (nothing for "")."""
        if text:
            for sink in self._sinks:
                sink.write(text)

    def event(self, level: int, name: str, **fields: Any) -> None:
        self.write(self.line(level, name, fields))

    def logs_request(self, status: int) -> bool:
        """Would :meth:`request` write a line for this status? (Callers skip
        gathering its fields when not: the access log is on the hot path.)"""
        return self.enabled(logging.ERROR if status >= 500 else logging.INFO)

    def request_line(self, status: int, fields: dict[str, Any]) -> str:
        """The access-log line; ``fields`` are the other fields, in order after ``status``."""
        return self.line(logging.ERROR if status >= 500 else logging.INFO, "request", {"status": status, **fields})

    def request(self, *, status: int, **fields: Any) -> None:
        self.write(self.request_line(status, fields))

    def run_lines(self, summary: dict[str, Any], request_id: str | None) -> str:
        """One line per run, then one per policy denial (allowlisted fields only)."""
        text = ""
        if self.level <= logging.INFO:  # the fields are gathered only for a line that is written
            text = self.line(logging.INFO, "run", {
                "request_id": request_id, "execution_id": summary.get("execution_id"),
                "receipt_seq": summary.get("receipt_seq"), "tenant_id": summary.get("tenant_id"),
                "cell_id": summary.get("cell_id"), "template": summary.get("template"),
                "status": summary.get("status"), "exit_code": summary.get("exit_code"),
                "latency_ms": summary.get("latency_ms"), "guest_ms": summary.get("guest_ms"),
                "code_bytes": summary.get("code_bytes"), "stdout_bytes": summary.get("stdout_bytes"),
                "stderr_bytes": summary.get("stderr_bytes"), "truncated": summary.get("truncated"),
                "denials": len(summary.get("denials") or [])})
        for denial in summary.get("denials") or []:
            text += self.line(logging.WARNING, "policy_denial", {
                "request_id": request_id, "execution_id": summary.get("execution_id"),
                "tenant_id": summary.get("tenant_id"), "cell_id": summary.get("cell_id"),
                "threat": excerpt(denial.get("threat", ""), 16), "function": excerpt(denial.get("function", ""), 32),
                "reason": excerpt(denial.get("reason", ""))})
        return text

    def run(self, summary: dict[str, Any], request_id: str | None) -> None:
        self.write(self.run_lines(summary, request_id))

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks.clear()
