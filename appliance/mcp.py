"""The MCP client behind ``host_mcp_call``: stdio and HTTP transports, caps, deadline.

Threats T-PRO-2 and T-DOS-1 (SECURITY.md). The rules (config, request and
answer shapes) are pure and live in :mod:`appliance.policy.mcp`; this module
does the I/O and keeps these promises:

* **Only the operator's addresses.** A stdio server is the operator's argv,
  started by this module without a shell, with a minimal environment (the
  appliance's own environment — license path, keys, egress settings — never
  reaches it) plus the operator's ``env``. An HTTP server is the operator's
  URL, exactly: redirects are not followed (a 3xx is an error), so no answer
  can steer the appliance to another address.
* **Deadline.** Every wait (lock, spawn, handshake, write, read, connect) is
  bounded by one monotonic ``deadline`` — the run's, or a shorter per-server
  ``timeout_ms`` — through ``poll`` on non-blocking pipes and per-operation
  socket timeouts re-armed from the remaining time. A stdio server that
  overruns is SIGKILLed (its whole process group) and restarted lazily on the
  next call: its late answer can never be read as the next call's.
* **Size.** At most ``max_bytes + OVERHEAD`` bytes of one answer are ever
  buffered. Past that the call fails with ``too_large`` (never truncated) and
  the stdio server is killed (the rest of its answer is still in the pipe);
  an HTTP connection is simply closed. HTTP answers are read by
  :mod:`appliance.httpclient`, the bounded reader ``host_fetch`` uses too
  (head caps, strict framing, the deadline on every recv).
* **Restarts are budgeted** (``RESTARTS`` per ``RESTART_WINDOW_S`` per server):
  a guest calling a tool that crashes its server cannot turn the supervisor
  into a fork loop.
* **One process per server per node**, started lazily by the supervisor (the
  broker, :mod:`appliance.runtime.broker`: workers start none); calls to one server
  are serialised by a lock acquired within the deadline.
* **Every call is logged** with tenant, cell, server, tool, outcome, size and
  time; never the arguments or the result (they may hold customer data).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Callable

from appliance import httpclient
from appliance.policy import mcp as policy
from appliance.policy.mcp import McpConfig, McpRequest, ServerConfig

__all__ = ["McpClient", "McpError", "load_config", "from_env", "OVERHEAD", "MAX_BYTES_CEILING"]

log = logging.getLogger("cell.mcp")

MAX_BYTES_CEILING = 10_000_000  # SECURITY.md §6: the per-call transfer ceiling
OVERHEAD = 64 * 1024  # JSON-RPC envelope allowance on top of the guest's max_len
INIT_CAP = 1 << 20  # initialize result and server notifications
RESTARTS, RESTART_WINDOW_S = 5, 10.0
_READ = 64 * 1024
_MAX_WAIT = 3600.0
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_PR_SET_PDEATHSIG = 1


def _bind_pdeathsig() -> Callable[[], None] | None:
    """A preexec hook making the server die with its parent (resolved in the parent).

    The parent is the supervisor (the broker); a killed service must not leave a
    hung server behind as an orphan, and a server holding stdin open past EOF
    would. (The signal follows the thread that started the server: a web thread
    that ends takes its servers along, and they are restarted lazily.) The
    hook is one pre-bound libc call (no imports, no allocation of note after fork).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return hook


_PDEATHSIG = _bind_pdeathsig()


class McpError(Exception):
    """A call failed. ``reason``: denied, timeout, too_large, io, protocol, server_error, busy.

    ``code`` is the guest ABI code: -1 denied, -4 I/O/server/timeout, -5 too large.
    """

    CODES = {"denied": -1, "too_large": -5}

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.detail = message
        self.code = self.CODES.get(reason, -4)


def load_config(path: str | os.PathLike[str]) -> McpConfig:
    """Read and parse the operator's server table (raises McpConfigError or OSError)."""
    with open(path, "rb") as fh:
        raw = fh.read((1 << 20) + 1)
    if len(raw) > 1 << 20:
        raise policy.McpConfigError("the MCP config is larger than 1 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise policy.McpConfigError("the MCP config is not UTF-8") from None
    return policy.parse_config_text(text)


def from_env(env: dict[str, str] | None = None) -> McpClient | None:
    """A client for ``$SYNAPSE_MCP_SERVERS`` (a JSON file), or None when unset."""
    path = (env if env is not None else os.environ).get("SYNAPSE_MCP_SERVERS", "")
    return McpClient(load_config(path)) if path else None


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise McpError("timeout", "deadline passed")
    return min(left, _MAX_WAIT)


# -- stdio ---------------------------------------------------------------------------

class _StdioServer:
    """One child process speaking newline-delimited JSON-RPC on stdin/stdout."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = bytearray()
        self.next_id = 1
        self.starts: deque[float] = deque()

    # lifecycle
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        self.buf = bytearray()
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group is the server's
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except OSError:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=1.0)  # SIGKILL is not ignorable; reap so no zombie remains
        except subprocess.TimeoutExpired:
            pass

    def _start(self, deadline: float) -> None:
        now = time.monotonic()
        while self.starts and now - self.starts[0] > RESTART_WINDOW_S:
            self.starts.popleft()
        if len(self.starts) >= RESTARTS:  # T-DOS-1: no fork loop from a crashing tool
            raise McpError("io", "restart budget exhausted")
        self.starts.append(now)
        env = dict(_BASE_ENV)
        env.update(self.cfg.env)  # T-ENV: only the operator's variables reach the server
        try:
            self.proc = subprocess.Popen(
                list(self.cfg.command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, cwd=self.cfg.cwd, close_fds=True, start_new_session=True, shell=False,
                preexec_fn=_PDEATHSIG,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.proc = None
            raise McpError("io", f"cannot start: {exc.__class__.__name__}") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = bytearray()
        try:
            result = self._roundtrip("initialize", policy.initialize_params(), deadline, INIT_CAP)
            policy.check_initialize(result)
            self._send(policy.rpc_notification("notifications/initialized"), deadline)
        except policy.ProtocolError as exc:
            raise McpError("protocol", f"initialize: {exc}") from None
        except policy.RpcError as exc:
            raise McpError("server_error", f"initialize: {exc}") from None

    # I/O
    def _send(self, line: bytes, deadline: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        view = memoryview(line + b"\n")
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while view:
            if not poller.poll(int(_remaining(deadline) * 1000) + 1):
                continue  # loop re-checks the deadline
            try:
                view = view[os.write(fd, view[:_READ]):]
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE: the server died
                raise McpError("io", f"write: {errno.errorcode.get(exc.errno or 0, 'error')}") from None

    def _line(self, deadline: float, cap: int) -> bytes:
        """One line of at most ``cap`` bytes; never buffers more than cap + one read."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            pos = self.buf.find(b"\n")
            if pos != -1:
                if pos > cap:
                    raise McpError("too_large", "answer over the cap")
                line = bytes(self.buf[:pos])
                del self.buf[: pos + 1]
                return line
            if len(self.buf) > cap:
                raise McpError("too_large", "answer over the cap")  # T-DOS-1: stop reading here
            if not poller.poll(int(_remaining(deadline) * 1000) + 1):
                continue
            try:
                chunk = os.read(fd, min(_READ, cap + 1 - len(self.buf)))
            except BlockingIOError:
                continue
            except OSError:
                raise McpError("io", "read failed") from None
            if not chunk:
                raise McpError("io", "server closed its output")
            self.buf += chunk

    def _roundtrip(self, method: str, params: dict[str, Any], deadline: float, cap: int) -> dict[str, Any]:
        msg_id = self.next_id
        self.next_id += 1
        self._send(policy.rpc_request(msg_id, method, params), deadline)
        while True:
            line = self._line(deadline, cap)
            if not line.strip():
                continue
            try:
                msg = policy.loads_strict(line)
                kind = policy.classify(msg)
            except (ValueError, RecursionError) as exc:
                raise McpError("protocol", f"bad message: {exc.__class__.__name__}") from None
            if kind == "notification":
                continue  # logging/progress: ignored
            if kind == "request":
                self._send(policy.answer_server_request(msg), deadline)
                continue
            if msg.get("id") != msg_id or isinstance(msg.get("id"), bool):
                continue  # not ours (cannot be a stale answer: an overrun server is killed)
            return policy.response_result(msg)

    def call(self, request: McpRequest, deadline: float, cap: int) -> dict[str, Any]:
        if not self.lock.acquire(timeout=_remaining(deadline)):
            raise McpError("timeout", "server busy past the deadline")
        try:
            try:
                if not self.alive():
                    self.kill()
                    self._start(deadline)
                return self._roundtrip("tools/call", {"name": request.tool, "arguments": request.arguments},
                                       deadline, cap + OVERHEAD)
            except policy.RpcError as exc:
                raise McpError("server_error", str(exc)) from None  # the server is healthy
            except policy.ProtocolError as exc:
                self.kill()
                raise McpError("protocol", str(exc)) from None
            except McpError:
                # timeout, too_large, protocol, io: the server's state is unknown
                # (an answer may still be on its way): kill, restart on next call.
                self.kill()
                raise
        finally:
            self.lock.release()


# -- HTTP ------------------------------------------------------------------------------

def _sse_messages(pieces: Iterator[bytes]) -> Iterator[Any]:
    """JSON messages from a ``text/event-stream`` body, one per event."""
    buf = bytearray()
    data: list[bytes] = []
    for piece in pieces:
        buf += piece
        while True:
            pos = buf.find(b"\n")
            if pos == -1:
                break
            line = bytes(buf[:pos]).rstrip(b"\r")
            del buf[: pos + 1]
            if not line:
                if data:
                    yield _parse(b"\n".join(data))
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[5:][1:] if line[5:6] == b" " else line[5:])
    if data:
        yield _parse(b"\n".join(data))


def _parse(raw: bytes) -> Any:
    try:
        return policy.loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise McpError("protocol", "answer is not JSON") from None


class _HttpServer:
    """The operator's URL; one connection per POST (``Connection: close``)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.session: str | None = None
        self.version: str | None = None
        self.next_id = 1

    def _connect(self, deadline: float) -> socket.socket:
        try:
            # T-PRO-2: host and port are the operator's, parsed at config time.
            sock = socket.create_connection((self.cfg.host, self.cfg.port), timeout=_remaining(deadline))
        except (socket.timeout, TimeoutError):
            raise McpError("timeout", "connect timed out") from None
        except OSError:
            raise McpError("io", "connect failed") from None
        if not self.cfg.tls:
            return sock
        return httpclient.start_tls(sock, self.cfg.host, deadline)  # closes sock if it fails

    def _post(self, body: bytes, want_id: int | None, deadline: float, limit: int) -> tuple[int, str | None, Any]:
        """(HTTP status, Mcp-Session-Id, the answer to ``want_id`` or None)."""
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        lines = [f"POST {self.cfg.path} HTTP/1.1", f"Host: {host}:{self.cfg.port}",
                 "Content-Type: application/json", "Accept: application/json, text/event-stream",
                 f"Content-Length: {len(body)}", "Connection: close", "User-Agent: cell-mcp/1"]
        if self.session is not None:
            lines.append(f"Mcp-Session-Id: {self.session}")
        if self.version is not None:
            lines.append(f"MCP-Protocol-Version: {self.version}")
        lines += [f"{k}: {v}" for k, v in self.cfg.headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            sock = self._connect(deadline)
            try:
                return self._exchange(sock, head + body, want_id, deadline, limit)
            finally:
                sock.close()
        except httpclient.HttpError as exc:
            # The one bounded HTTP/1.1 reader (T-DOS-1, T-PRO-2): caps, strict framing, deadline.
            raise McpError("io" if exc.reason == "tls" else exc.reason, exc.message) from None

    def _exchange(self, sock: socket.socket, request: bytes, want_id: int | None, deadline: float,
                  limit: int) -> tuple[int, str | None, Any]:
        httpclient.send_all(sock, request, deadline)
        reader = httpclient.Reader(sock, deadline)
        answer = httpclient.read_head(reader)
        session = answer.one("mcp-session-id")
        if answer.status != 200 or want_id is None:
            return answer.status, session, None  # 3xx included: never followed (T-PRO-2)
        ctype = (answer.one("content-type") or "").split(";", 1)[0].strip().lower()
        pieces = httpclient.body(reader, answer, limit)
        if ctype == "text/event-stream":
            for msg in _sse_messages(pieces):
                try:
                    kind = policy.classify(msg)
                except policy.ProtocolError as exc:
                    raise McpError("protocol", str(exc)) from None
                if kind == "response" and msg.get("id") == want_id and not isinstance(msg.get("id"), bool):
                    return answer.status, session, msg  # stop reading: the stream may stay open
            raise McpError("protocol", "event stream ended without the answer")
        if ctype != "application/json":
            raise McpError("protocol", "unexpected content type")
        return answer.status, session, _parse(b"".join(pieces))

    def _rpc(self, method: str, params: dict[str, Any], deadline: float, limit: int) -> dict[str, Any]:
        msg_id = self.next_id
        self.next_id += 1
        status, _, msg = self._post(policy.rpc_request(msg_id, method, params), msg_id, deadline, limit)
        if status == 404 and self.session is not None:
            raise _SessionGone()
        if status != 200:
            raise McpError("server_error", f"HTTP {status}")
        try:
            if policy.classify(msg) != "response" or msg.get("id") != msg_id or isinstance(msg.get("id"), bool):
                raise policy.ProtocolError("answer is not the response to our request")
            return policy.response_result(msg)
        except policy.ProtocolError as exc:
            raise McpError("protocol", str(exc)) from None
        except policy.RpcError as exc:
            raise McpError("server_error", str(exc)) from None

    def _initialize(self, deadline: float) -> None:
        self.session = self.version = None
        msg_id = self.next_id
        self.next_id += 1
        status, session, msg = self._post(policy.rpc_request(msg_id, "initialize", policy.initialize_params()),
                                          msg_id, deadline, INIT_CAP)
        if status != 200:
            raise McpError("server_error", f"initialize: HTTP {status}")
        try:
            if policy.classify(msg) != "response" or msg.get("id") != msg_id:
                raise policy.ProtocolError("initialize answer is not our response")
            version = policy.check_initialize(policy.response_result(msg))
        except policy.ProtocolError as exc:
            raise McpError("protocol", f"initialize: {exc}") from None
        except policy.RpcError as exc:
            raise McpError("server_error", f"initialize: {exc}") from None
        if session is not None and not (0 < len(session) <= 256 and all(0x21 <= ord(c) <= 0x7E for c in session)):
            raise McpError("protocol", "bad Mcp-Session-Id")  # it is echoed in a header: no CR/LF
        self.session, self.version = session, version
        status, _, _ = self._post(policy.rpc_notification("notifications/initialized"), None, deadline, INIT_CAP)
        if status not in (200, 202, 204):
            self.session = self.version = None
            raise McpError("server_error", f"initialized: HTTP {status}")

    def call(self, request: McpRequest, deadline: float, cap: int) -> dict[str, Any]:
        if not self.lock.acquire(timeout=_remaining(deadline)):
            raise McpError("timeout", "server busy past the deadline")
        try:
            params = {"name": request.tool, "arguments": request.arguments}
            for _ in range(2):
                if self.version is None:
                    self._initialize(deadline)
                try:
                    return self._rpc("tools/call", params, deadline, cap + OVERHEAD)
                except _SessionGone:
                    self.version = self.session = None  # the spec: start a new session, once
            raise McpError("server_error", "session lost twice")
        finally:
            self.lock.release()


class _SessionGone(Exception):
    pass


# -- client ------------------------------------------------------------------------------

def _id(value: str) -> str:
    return value if policy.NAME_RE.fullmatch(value or "") else "-"


class McpClient:
    """One per node, in the supervisor (the broker). Thread-safe; ``close`` kills every stdio server it started."""

    def __init__(self, config: McpConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._servers: dict[str, _StdioServer | _HttpServer] = {}
        self._lock = threading.Lock()

    def _server(self, cfg: ServerConfig) -> _StdioServer | _HttpServer:
        with self._lock:
            server = self._servers.get(cfg.name)
            if server is None:
                server = _StdioServer(cfg) if cfg.transport == "stdio" else _HttpServer(cfg)
                self._servers[cfg.name] = server
            return server

    def call(self, request: McpRequest, *, deadline: float, max_bytes: int, tenant_id: str = "", cell_id: str = "") -> bytes:
        """The JSON of the ``tools/call`` result (at most ``max_bytes``), or McpError."""
        started = self._clock()
        cap = max(0, min(int(max_bytes), MAX_BYTES_CEILING))  # T-DOS-1
        outcome, size = "ok", 0
        try:
            cfg, reason = policy.check_allowed(self.config, request, tenant_id)
            if cfg is None:
                raise McpError("denied", reason)  # T-PRO-2: only configured servers and tools
            if cfg.timeout_s is not None:
                deadline = min(deadline, started + cfg.timeout_s)
            result = self._server(cfg).call(request, deadline, cap)
            out = policy.dumps_compact(result)
            if len(out) > cap:
                raise McpError("too_large", "result over max_len")  # never truncated
            size = len(out)
            return out
        except McpError as exc:
            outcome = f"denied:{exc.detail}" if exc.reason == "denied" else exc.reason
            raise
        except Exception as exc:  # anything unexpected is an I/O error, never a crash
            outcome = f"io:{exc.__class__.__name__}"
            raise McpError("io", exc.__class__.__name__) from None
        finally:
            # Every call is logged (T-PRO-2 audit). Names were validated by the
            # request parser ([A-Za-z0-9_.-]), so they cannot forge log lines.
            log.info("mcp_call tenant=%s cell=%s server=%s tool=%s outcome=%s bytes=%d ms=%d",
                     _id(tenant_id), _id(cell_id), request.server, request.tool, outcome, size,
                     int((self._clock() - started) * 1000))

    def refused(self, tenant_id: str, cell_id: str, reason: str) -> None:
        """Log a call refused before it reached the client (bad or guest-addressed request)."""
        log.info("mcp_call tenant=%s cell=%s server=- tool=- outcome=refused:%s bytes=0 ms=0",
                 _id(tenant_id), _id(cell_id), reason if policy.NAME_RE.fullmatch(reason) else "-")

    def close(self) -> None:
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            if isinstance(server, _StdioServer):
                server.kill()
