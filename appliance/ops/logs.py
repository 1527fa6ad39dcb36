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
import time
from pathlib import Path
from typing import Any, TextIO

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


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Resolve sys.stderr at each write, so a replaced stream (pytest capture,
    a daemon redirect) never receives writes after it was closed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Rotating file created 0600: logs name tenants and cells."""

    _regular = True

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)  # never roll over anything else (as the base class)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        """The base class's rule without its two stat() calls and a seek per
        line: the file's size comes from one fstat of the open descriptor."""
        if self.stream is None:  # delay=True: opened at the first line
            self.stream = self._open()
        if self.maxBytes <= 0 or not self._regular:
            return False
        self.stream.flush()
        return bool(os.fstat(self.stream.fileno()).st_size + len(self.format(record)) + 1 >= self.maxBytes)


class OpsLog:
    """The per-app event logger.

    A ``logging.Logger`` built directly, not through ``logging.getLogger``:
    it is not registered process-wide, so several apps in one process (tests)
    keep their own handlers and nothing leaks between them.
    """

    def __init__(self, *, level: str = "info", log_file: Path | None = None,
                 max_bytes: int = 10 * 1024 * 1024, backups: int = 5, stderr: bool = True) -> None:
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
        self.logger = logging.Logger("cell.ops", LEVELS[level])
        self.logger.propagate = False
        formatter = JsonFormatter()
        self._handlers: list[logging.Handler] = []
        if stderr:
            self._handlers.append(_StderrHandler())
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._handlers.append(_PrivateRotatingFileHandler(str(log_file), maxBytes=max_bytes,
                                                              backupCount=backups, encoding="utf-8", delay=True))
        for handler in self._handlers:
            handler.setFormatter(formatter)
            self.logger.addHandler(handler)

    def event(self, level: int, name: str, **fields: Any) -> None:
        if self.logger.isEnabledFor(level):
            # The record is built directly: Logger.log would walk the stack
            # for a caller's file and line that these lines never print.
            record = self.logger.makeRecord(self.logger.name, level, "(ops)", 0, name, (), None,
                                            extra={"fields": fields})
            self.logger.handle(record)

    def logs_request(self, status: int) -> bool:
        """Would :meth:`request` write a line for this status? (Callers skip
        gathering its fields when not: the access log is on the hot path.)"""
        return self.logger.isEnabledFor(logging.ERROR if status >= 500 else logging.INFO)

    def request(self, *, status: int, **fields: Any) -> None:
        level = logging.ERROR if status >= 500 else logging.INFO
        self.event(level, "request", status=status, **fields)

    def run(self, summary: dict[str, Any], request_id: str | None) -> None:
        """One line per run, then one per policy denial (allowlisted fields only)."""
        if self.logger.isEnabledFor(logging.INFO):  # the fields are gathered only for a line that is written
            self.event(logging.INFO, "run", request_id=request_id,
                       execution_id=summary.get("execution_id"), receipt_seq=summary.get("receipt_seq"),
                       tenant_id=summary.get("tenant_id"), cell_id=summary.get("cell_id"),
                       template=summary.get("template"), status=summary.get("status"),
                       exit_code=summary.get("exit_code"), latency_ms=summary.get("latency_ms"),
                       guest_ms=summary.get("guest_ms"), code_bytes=summary.get("code_bytes"),
                       stdout_bytes=summary.get("stdout_bytes"), stderr_bytes=summary.get("stderr_bytes"),
                       truncated=summary.get("truncated"), denials=len(summary.get("denials") or []))
        for denial in summary.get("denials") or []:
            self.event(logging.WARNING, "policy_denial", request_id=request_id,
                       execution_id=summary.get("execution_id"), tenant_id=summary.get("tenant_id"),
                       cell_id=summary.get("cell_id"), threat=excerpt(denial.get("threat", ""), 16),
                       function=excerpt(denial.get("function", ""), 32),
                       reason=excerpt(denial.get("reason", "")))

    def close(self) -> None:
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self._handlers.clear()
