"""HTTP/JSON transport of the SDK: standard library only (``http.client``).

Retry rule, so no code ever runs twice because of the SDK:

* 429, and 503 with ``Retry-After``: the server refused the request before
  doing anything (rate limiter, full queue, cell capacity), so any request is
  sent again after the advertised wait, within ``retries`` and ``max_retry_wait``.
* A refused TCP connection: nothing was sent, so any request is retried.
* Any other failure (reset, timeout, 5xx, a dropped stream): only idempotent
  requests (GET, PUT, DELETE) are retried. A POST that may have reached the
  server — above all a code run — is never sent again; the caller gets the error.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

from cell_sdk.exceptions import (
    SandboxException,
    TimeoutException,
    from_response,
)

DEFAULT_API_URL = "http://127.0.0.1:8080"
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# A kept-alive connection idle longer than this is not reused for a POST: if
# the server had closed it, a failed POST would be ambiguous (sent or not?).
POST_REUSE_IDLE_S = 5.0
BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class ConnectionConfig:
    """Where the appliance is and how patient to be. ``api_url``/``api_key``
    default to ``CELL_API_URL``/``CELL_API_KEY``."""

    api_url: str
    api_key: str
    request_timeout: float = 60.0
    retries: int = 3
    max_retry_wait: float = 30.0

    @classmethod
    def resolve(cls, api_url: str | None = None, api_key: str | None = None, request_timeout: float | None = None,
                retries: int | None = None, max_retry_wait: float | None = None) -> ConnectionConfig:
        url = api_url or os.environ.get("CELL_API_URL") or DEFAULT_API_URL
        key = api_key if api_key is not None else os.environ.get("CELL_API_KEY", "")
        return cls(
            api_url=url.rstrip("/"),
            api_key=key,
            request_timeout=60.0 if request_timeout is None else float(request_timeout),
            retries=3 if retries is None else int(retries),
            max_retry_wait=30.0 if max_retry_wait is None else float(max_retry_wait),
        )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Pool:
    """Kept-alive connections to one host, shared by threads."""

    def __init__(self, scheme: str, host: str, port: int | None) -> None:
        self._scheme, self._host, self._port = scheme, host, port
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._lock = threading.Lock()

    def get(self, max_idle: float | None) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn, since = self._idle.pop()
                if max_idle is None or now - since <= max_idle:
                    return conn, True
                conn.close()
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port), False

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < 16:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


class Transport:
    def __init__(self, config: ConnectionConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._sleep = sleep
        parts = urllib.parse.urlsplit(config.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SandboxException(f"api_url must be an http(s) URL, not {config.api_url!r}", code="bad_api_url")
        self._prefix = parts.path.rstrip("/")
        self._pool = _Pool(parts.scheme, parts.hostname, parts.port)

    def close(self) -> None:
        self._pool.close()

    def __del__(self) -> None:  # idle kept-alive sockets go with the object
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close()

    def _headers(self, has_body: bool, accept: str = "application/json") -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.config.api_key}", "Accept": accept, "User-Agent": "cell-sdk-python/1"}
        if has_body:
            headers["Content-Type"] = "application/json"
        return headers

    def url(self, path: str, query: dict[str, str] | None = None) -> str:
        return self._prefix + path + ("?" + urllib.parse.urlencode(query) if query else "")

    # -- one exchange ----------------------------------------------------
    def _open(self, method: str, target: str, payload: bytes | None, timeout: float,
              accept: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn, _reused = self._pool.get(None if method in IDEMPOTENT else POST_REUSE_IDLE_S)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request(method, target, body=payload, headers=self._headers(payload is not None, accept))
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _wait_for_retry(self, status: int, retry_after: float | None, attempt: int, idempotent: bool) -> bool:
        """Whether to send again after a 429/503 (sleeping first)."""
        if attempt >= self.config.retries:
            return False
        if retry_after is None:
            if not (status == 503 and idempotent):
                return False
            retry_after = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        if retry_after > self.config.max_retry_wait:
            return False
        self._sleep(retry_after)
        return True

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                timeout: float | None = None) -> Any:
        """One JSON request with the retry rule of this module; the parsed answer."""
        target = self.url(path, query)
        payload = None if body is None else json.dumps(body).encode("utf-8")
        idempotent = method in IDEMPOTENT
        limit = self.config.request_timeout if timeout is None else timeout
        attempt = 0
        while True:
            try:
                conn, resp = self._open(method, target, payload, limit, "application/json")
                try:
                    raw = resp.read()
                except BaseException:
                    conn.close()
                    raise
                if resp.will_close:
                    conn.close()
                else:
                    self._pool.put(conn)
            except ConnectionRefusedError as exc:  # nothing was sent
                if attempt < self.config.retries:
                    self._sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                    attempt += 1
                    continue
                raise TimeoutException(f"cannot connect to {self.config.api_url}: {exc}", code="connection_refused") from None
            except (socket.timeout, TimeoutError):
                if idempotent and attempt < self.config.retries:
                    attempt += 1
                    continue
                raise TimeoutException(f"{method} {path}: no answer within {limit:g} s"
                                       + ("" if idempotent else "; it may have run, and was not sent again"),
                                       code="request_timeout") from None
            except (OSError, http.client.HTTPException) as exc:
                if idempotent and attempt < self.config.retries:
                    self._sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                    attempt += 1
                    continue
                raise SandboxException(f"{method} {path}: connection failed ({exc.__class__.__name__}: {exc})"
                                       + ("" if idempotent else "; it may have run, and was not sent again"),
                                       code="connection_error") from None
            data = _decode(raw)
            if resp.status < 400:
                return data
            retry_after = parse_retry_after(resp.getheader("Retry-After"))
            if resp.status in (429, 503) and self._wait_for_retry(resp.status, retry_after, attempt, idempotent):
                attempt += 1
                continue
            raise from_response(resp.status, data, retry_after)

    def stream(self, path: str, body: Any, timeout: float, on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """POST a run to an SSE route; call ``on_event`` for each output event and
        return the final ``result`` event. Never re-sent once output has arrived
        or the connection broke."""
        target = self.url(path)
        payload = json.dumps(body).encode("utf-8")
        attempt = 0
        while True:
            try:
                conn, resp = self._open("POST", target, payload, timeout, "text/event-stream")
            except ConnectionRefusedError as exc:
                if attempt < self.config.retries:
                    self._sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                    attempt += 1
                    continue
                raise TimeoutException(f"cannot connect to {self.config.api_url}: {exc}", code="connection_refused") from None
            except (socket.timeout, TimeoutError):
                raise TimeoutException(f"POST {path}: no answer within {timeout:g} s; it may have run, and was not sent again",
                                       code="request_timeout") from None
            except (OSError, http.client.HTTPException) as exc:
                raise SandboxException(f"POST {path}: connection failed ({exc}); it may have run, and was not sent again",
                                       code="connection_error") from None
            if resp.status >= 400:
                data = _decode(resp.read())
                conn.close()
                retry_after = parse_retry_after(resp.getheader("Retry-After"))
                if resp.status in (429, 503) and self._wait_for_retry(resp.status, retry_after, attempt, False):
                    attempt += 1
                    continue
                raise from_response(resp.status, data, retry_after)
            try:
                final, saw_output = self._read_events(resp, on_event)
            except (socket.timeout, TimeoutError):
                raise TimeoutException(f"POST {path}: the stream stalled for {timeout:g} s", code="request_timeout") from None
            except (OSError, http.client.HTTPException) as exc:
                raise SandboxException(f"POST {path}: the stream broke ({exc}); the run was not sent again",
                                       code="connection_error") from None
            finally:
                conn.close()  # an SSE answer has no length: never reuse its connection
            if final is None:
                raise SandboxException(f"POST {path}: the stream ended without a result", code="stream_incomplete")
            if final.get("type") == "error":
                status = int(final.get("status") or 500)
                # Refused before it started (queue full), and nothing ran: safe to send again.
                if status in (429, 503) and not saw_output and self._wait_for_retry(status, 1.0, attempt, False):
                    attempt += 1
                    continue
                raise from_response(status, final, None)
            return final

    @staticmethod
    def _read_events(resp: http.client.HTTPResponse,
                     on_event: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any] | None, bool]:
        data_lines: list[str] = []
        saw_output = False
        while True:
            raw = resp.readline()
            if not raw:
                return None, saw_output
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                data_lines.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
                continue
            if line or not data_lines:
                continue  # comments, other fields, keep-alive blank lines
            text, data_lines = "\n".join(data_lines), []
            try:
                event = json.loads(text)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("type") in ("result", "error"):
                return event, saw_output
            saw_output = True
            on_event(event)


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")

