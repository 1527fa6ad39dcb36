"""The HTTP server: waitress, with every request body gated before it is read.

Threat T-DOS-2. waitress 3.0.2 reads a request's whole body (into memory,
then a temp file past ``inbuf_overflow``) before it calls the WSGI app, so
Flask's 413 and the API-key check come too late: an unauthenticated client
could make the server spool ``max_request_body_size`` per connection. Here
the decision is taken when the headers are complete, in waitress's own
parser:

* a body is read only for ``/v1`` and ``/mcp`` requests that carry a valid API key and a
  ``Content-Length`` within the limit (chunked bodies need the key too);
* otherwise the request is handed to the app at once with no body, marked
  ``cell.body_refused`` in the WSGI environ and ``Connection: close``; the
  app answers 413 or 401 with its usual JSON ``code``, and whatever the
  client sends after the headers is dropped unparsed (never stored, never
  read as a pipelined request);
* many clients (urllib, requests) send the whole body before they read the
  answer, and a close with unread data makes the kernel reset the
  connection, losing the answer. So after answering, the connection stays
  open to drop up to the announced length (at most :data:`DRAIN_MAX_BYTES`,
  for at most :data:`DRAIN_SECONDS`); a body announced larger than that is
  not waited for at all. Dropped bytes cost bandwidth, never memory or disk;
* what waitress itself may hold is bounded by its own settings:
  ``max_request_header_size`` (64 KiB) for every client, and for an
  authenticated chunked body ``max_request_body_size`` (the body limit plus
  :data:`CHUNK_FRAMING_SLACK`), which waitress enforces as it reads.

waitress's own error answers (400, 413, 431, 501) are rendered as the app's
``{"error", "code"}`` JSON too.

This subclasses waitress internals (parser, channel, tasks); the pin on
waitress 3.0.2 and the live tests in ``tests/appliance/test_api_limits.py``
keep them honest.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from waitress.channel import HTTPChannel  # type: ignore[import-untyped]
from waitress.parser import HTTPRequestParser  # type: ignore[import-untyped]
from waitress.server import BaseWSGIServer, create_server  # type: ignore[import-untyped]
from waitress.task import ErrorTask, WSGITask  # type: ignore[import-untyped]
from waitress.trigger import trigger as Trigger  # type: ignore[import-untyped]
from waitress.wasyncore import dispatcher  # type: ignore[import-untyped]

from appliance.web.guard import AUTHENTICATED, BODY_REFUSED

log = logging.getLogger("cell.web")

MAX_HEADER_BYTES = 64 * 1024
DRAIN_MAX_BYTES = 2 * 10 * 1024 * 1024  # refused bodies up to twice the body limit are drained, not reset
DRAIN_SECONDS = 10.0
CHUNK_FRAMING_SLACK = 64 * 1024  # chunk-size lines and CRLFs count against waitress's limit

# (path, upper-cased waitress header dict, declared length or None when chunked) -> refusal or None
BodyGate = Callable[[str, dict[str, str], "int | None"], "str | None"]

_WAITRESS_CODES = {400: "bad_request", 413: "payload_too_large", 431: "headers_too_large", 501: "not_implemented"}


def body_gate(services: Any) -> BodyGate:
    """May this request's body be read? The same rules as the app's guard."""
    limit = int(services.settings.max_body_bytes)

    def gate(path: str, headers: dict[str, str], length: int | None) -> str | None:
        if not path.startswith(AUTHENTICATED):
            return "no_body_here"  # no route outside /v1 and /mcp takes a body
        if length is not None and length > limit:
            return "too_large"  # T-DOS-2: refused by Content-Length, before reading
        auth = headers.get("AUTHORIZATION", "")
        if not auth.startswith("Bearer ") or len(auth) > 512:
            return "unauthorized"  # T-DOS-2: authenticate before buffering
        if services.store.tenant_for_key(auth[7:].strip()) is None:
            return "unauthorized"
        return None

    return gate


class _GatedParser(HTTPRequestParser):  # type: ignore[misc]
    body_refused: str | None = None
    _announced: int | None = None  # Content-Length of a refused body; None when chunked
    body_rcv: Any = None  # waitress's own defaults, typed for mypy
    content_length: int = 0

    def __init__(self, adj: Any, gate: BodyGate, stop_reading: Callable[[int], None]) -> None:
        super().__init__(adj)
        self._gate, self._stop_reading = gate, stop_reading

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.body_rcv is None:
            return  # no body announced
        try:
            reason = self._gate(self.path, self.headers, None if self.chunked else self.content_length)
        except Exception:  # a gate that cannot decide refuses (fail closed)
            log.exception("request body gate failed")
            reason = "gate_error"
        if reason is None:
            return
        # T-DOS-2: complete the request without its body. waitress then checks
        # no size (content_length 0) and reads nothing; the app answers.
        self.body_refused = reason
        self._announced = None if self.chunked else self.content_length
        self.body_rcv = None
        self.content_length = 0
        self.expect_continue = False  # never invite the body with 100 Continue
        self.headers["CONNECTION"] = "close"

    def received(self, data: bytes) -> int:
        if self.completed:
            return 0  # as waitress: a complete request takes nothing more
        consumed = int(super().received(data))
        if self.body_refused is not None and self.completed:
            # T-DOS-2: the bytes after the headers are an unread body, not a
            # pipelined request: swallow this chunk and drop the rest.
            seen = len(data) - consumed
            if self._announced is None:
                drain = DRAIN_MAX_BYTES  # chunked: no length to go by
            elif self._announced > DRAIN_MAX_BYTES:
                drain = 0  # not worth waiting for: close after the answer
            else:
                drain = self._announced - seen
            self._stop_reading(max(0, drain))
            return len(data)
        return consumed


class _GatedTask(WSGITask):  # type: ignore[misc]
    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        reason = getattr(self.request, "body_refused", None)
        if reason is not None:
            environ[BODY_REFUSED] = reason
        return environ


class _JsonErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's own refusals (bad framing, over its limits) in the app's JSON shape."""

    def execute(self) -> None:
        err = self.request.error
        status = int(getattr(err, "code", 500))
        body = json.dumps({"error": f"{err.reason}: {err.body}", "code": _WAITRESS_CODES.get(status, "internal")}).encode()
        self.status = f"{status} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


def _channel_class(gate: BodyGate) -> type:
    class GatedChannel(HTTPChannel):  # type: ignore[misc]
        task_class = _GatedTask
        error_task_class = _JsonErrorTask
        discarding = False
        drain_left = 0
        drain_until = 0.0
        close_when_flushed: bool = False  # waitress's default, typed for mypy

        def parser_class(self, adj: Any) -> _GatedParser:  # waitress calls self.parser_class(self.adj)
            return _GatedParser(adj, gate, self._stop_reading)

        def _stop_reading(self, drain: int) -> None:
            self.discarding = True
            self.drain_left = drain
            self.drain_until = time.monotonic() + DRAIN_SECONDS

        def _draining(self) -> bool:
            return bool(self.discarding and self.connected and self.drain_left > 0 and time.monotonic() < self.drain_until)

        def received(self, data: bytes) -> bool:
            if self.discarding:
                self.drain_left -= len(data)  # T-DOS-2: a refused body is counted and dropped, never kept
                return False
            return bool(super().received(data))

        # All of the below run on waitress's I/O thread, like received().
        def handle_close(self) -> None:
            # A body half received when the client hung up: release its spool
            # file now (T-DOS-2), not whenever the request object is collected.
            request: Any = getattr(self, "request", None)
            self.request = None
            if request is not None:
                try:
                    request.close()
                except Exception:
                    log.exception("could not release a partly received body")
            super().handle_close()

        def readable(self) -> bool:
            if self.discarding:
                return not self.will_close and self._draining()
            return bool(super().readable())

        def writable(self) -> bool:
            if self._draining() and not self.total_outbufs_len:
                return False  # answer sent; wait for the rest of the body, do not close yet
            return bool(super().writable())

        def handle_write(self) -> None:
            if self._draining() and self.close_when_flushed:
                # Send the answer, but close only once the announced body is
                # dropped (or the drain budget or deadline runs out).
                self.close_when_flushed = False
                try:
                    super().handle_write()
                finally:
                    self.close_when_flushed = True
                return
            super().handle_write()

    return GatedChannel


def make_server(app: Any, services: Any, host: str, port: int, **adjustments: Any) -> Any:
    """A waitress server whose connections use the body gate."""
    limit = int(services.settings.max_body_bytes)
    sockets: dict[int, Any] = {}
    server = create_server(app, map=sockets, host=host, port=port,
                           max_request_header_size=MAX_HEADER_BYTES,
                           max_request_body_size=limit + CHUNK_FRAMING_SLACK, **adjustments)
    channel = _channel_class(body_gate(services))
    listeners = [d for d in sockets.values() if isinstance(d, BaseWSGIServer)]
    if not listeners:
        raise RuntimeError("waitress created no listening socket")
    for listener in listeners:
        listener.channel_class = channel  # before the loop runs: no connection accepted yet
    return server


# -- stopping (SIGTERM) -------------------------------------------------------
# waitress's loop runs while its socket map holds a dispatcher, and only its own
# thread may touch that map: closing sockets from another thread makes its
# select() fail on a closed descriptor, and a keep-alive connection left in the
# map keeps the loop (and so the process) alive. The steps below therefore run
# on waitress's I/O thread, handed over through its trigger.

def _socket_map(server: Any) -> dict[int, Any]:
    found = getattr(server, "map", None)  # MultiSocketServer (several listen addresses)
    return found if isinstance(found, dict) else server._map


def _on_io_thread(server: Any, thunk: Callable[[], None]) -> None:
    wake = next((d for d in list(_socket_map(server).values()) if isinstance(d, Trigger)), None)
    if wake is None:
        return  # the loop has ended: nothing left to close
    try:
        wake.pull_trigger(thunk)
    except (OSError, ValueError):  # closed meanwhile
        pass


def _idle(channel: Any) -> bool:
    """A keep-alive connection between requests: nothing received, queued or unsent."""
    return (not channel.requests and channel.request is None and not channel.total_outbufs_len
            and not getattr(channel, "discarding", False))


def hang_up_idle(server: Any) -> None:
    """While draining: close the connections that wait for no answer (idle
    keep-alive ones). A connection whose request is running keeps it and gets
    its answer; called again, it is closed once it is idle."""
    def close_idle() -> None:
        for channel in list(_socket_map(server).values()):
            if isinstance(channel, HTTPChannel) and _idle(channel):
                channel.handle_close()
    _on_io_thread(server, close_idle)


def stop_listening(server: Any) -> None:
    """Accept no more connections (the listening sockets close; the trigger stays)."""
    def close_listeners() -> None:
        for listener in list(_socket_map(server).values()):
            if isinstance(listener, BaseWSGIServer):
                dispatcher.close(listener)  # not listener.close(): that closes the trigger too
    _on_io_thread(server, close_listeners)


def open_connections(server: Any) -> int:
    """How many client connections are open (read from any thread: a count only)."""
    return sum(1 for d in list(_socket_map(server).values()) if isinstance(d, HTTPChannel))


def stop_serving(server: Any) -> None:
    """Close whatever is left (connections, listeners, the trigger), on the I/O
    thread: ``server.run()`` then returns."""
    def close_all() -> None:
        sockets = _socket_map(server)
        for item in list(sockets.values()):
            try:
                # A connection's own close also tells a request thread still
                # writing to it that the client is gone.
                (item.handle_close if isinstance(item, HTTPChannel) else item.close)()
            except OSError:
                pass
        sockets.clear()
    _on_io_thread(server, close_all)
