"""Attach the operations layer to a Flask app: request ids and access logs,
/metrics, /v1/openapi.json, and a run observer for logs and metrics.

The app owner calls ``register_ops(app, services)`` once, after the routes.
"""
from __future__ import annotations

import fcntl
import hmac
import ipaddress
import itertools
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, g, has_request_context, jsonify, request

from appliance.errors import Forbidden
from appliance.ops.logs import OpsLog
from appliance.ops.metrics import CONTENT_TYPE, OpsMetrics
from appliance.ops.openapi import build_spec

log = logging.getLogger("cell.ops")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LOCK_FILE = "serve.lock"


class OpsState:
    """Per-app operations objects, kept in ``app.extensions["cell_ops"]``."""

    def __init__(self, metrics: OpsMetrics, events: OpsLog, metrics_token: str, lock_fd: int) -> None:
        self.metrics = metrics
        self.events = events
        self._metrics_token = metrics_token.encode()
        self.lock_fd = lock_fd

    def token_ok(self, presented: str) -> bool:
        # T-OPS-1: constant-time compare, and an unset token never matches.
        return bool(self._metrics_token) and hmac.compare_digest(presented.encode(), self._metrics_token)

    def close(self) -> None:
        self.events.close()
        if self.lock_fd >= 0:
            fd, self.lock_fd = self.lock_fd, -1
            os.close(fd)  # closing the fd releases the flock


def take_serve_lock(root: Path) -> int:
    """Hold an exclusive flock on ``<root>/serve.lock`` while this app lives,
    so ``cell restore`` can tell that a server is using the data (-1 if another
    app of this process or another server already holds it)."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class RequestIds:
    """Ids for requests that bring none: 32 hex digits, a random half drawn once
    per process and a counter. Unique within the process and, by the random
    half, across restarts and nodes; only logs and the X-Request-Id header use
    them (never a secret). Unlike uuid4 per request, no getrandom call, whose
    GIL hand-off costs the request thread a wake-up under load."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _error_code(response: Response) -> str | None:
    """The machine code of an error answer (our own JSON), for the access log."""
    if response.status_code < 400 or response.is_streamed or not response.is_json:
        return None
    data = response.get_json(silent=True)
    code = data.get("code") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):  # a JSON-RPC error from /mcp
        detail = data["error"].get("data")
        code = detail.get("code") if isinstance(detail, dict) else str(data["error"].get("code"))
    return code[:64] if isinstance(code, str) else None


def register_ops(app: Flask, services: Any, *, metrics_token: str | None = None, log_file: Path | None = None,
                 log_level: str | None = None, log_stderr: bool = True) -> OpsState:
    """Keyword arguments override the settings (tests); by default they come from
    ``settings.metrics_token``, ``settings.log_file`` and ``settings.log_level``."""
    existing = app.extensions.get("cell_ops")
    if isinstance(existing, OpsState):
        return existing  # idempotent: create_app may already have called it
    s = services.settings
    token = metrics_token if metrics_token is not None else (getattr(s, "metrics_token", "") or "")
    lf = log_file if log_file is not None else getattr(s, "log_file", None)
    level = log_level or getattr(s, "log_level", None) or "info"
    state = OpsState(OpsMetrics(services), OpsLog(level=level, log_file=lf, stderr=log_stderr), token,
                     take_serve_lock(Path(s.root)))
    app.extensions["cell_ops"] = state
    spec = build_spec()
    new_id = RequestIds()

    def start() -> None:
        ctx = g._get_current_object()  # one context lookup per hook
        ctx.ops_started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        # A client may correlate with its own id, but only a short, plain one
        # (T-LOG-2: a header must not inject into the log).
        ctx.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else new_id()

    # The factory registers the ops layer before the guard, so this hook runs
    # first: a 401 or 429 from the guard needs a start time and a request id too.
    app.before_request(start)

    # At info level (and debug) every answer gets an access line: a run's
    # lines are held in g.ops_lines until then and go out with it in one write
    # (the same lines in the same order, one system call). g.ops_lines is None
    # once finish() has written, so a later run's lines are written at once.
    # At warning or error nothing is held, so nothing is added per request.
    hold = state.events.enabled(logging.INFO)

    @app.after_request
    def finish(response: Response) -> Response:
        ctx = g._get_current_object()  # one context lookup per hook
        req = request._get_current_object()  # type: ignore[attr-defined]
        started = ctx.get("ops_started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        rid = ctx.get("request_id") or new_id()
        response.headers["X-Request-Id"] = rid
        status = response.status_code
        route = req.url_rule.rule if req.url_rule is not None else "unmatched"
        state.metrics.observe_request(req.method, route, status, seconds)
        if not state.events.logs_request(status):
            return response  # the access log is off at this level: nothing more to gather (and nothing held)
        tenant = ctx.get("tenant")
        view_args = req.view_args or {}
        fields = {
            "request_id": rid, "method": req.method, "route": route,
            "tenant_id": getattr(tenant, "id", None), "cell_id": view_args.get("cell_id"),
            "latency_ms": round(seconds * 1000, 3), "bytes_in": req.content_length or 0,
            "bytes_out": response.content_length, "remote_addr": req.remote_addr,
            "execution_id": ctx.get("ops_execution_id"), "receipt_seq": ctx.get("ops_receipt_seq"),
            "error_code": _error_code(response),
        }
        if "mcp_tool" in ctx:
            fields["mcp_tool"] = ctx.mcp_tool
        line = state.events.request_line(status, fields)
        if hold:
            line = (ctx.get("ops_lines") or "") + line
            ctx.ops_lines = None
        state.events.write(line)
        return response

    def flush_lines(_exc: BaseException | None) -> None:
        # A request that never reached finish() (another after_request hook
        # raised) still writes the lines of its runs.
        held = g.get("ops_lines")
        if held:
            state.events.write(held)

    if hold:
        app.teardown_request(flush_lines)

    def observe(summary: dict[str, Any]) -> None:
        state.metrics.observe_run(summary)
        if has_request_context():  # streaming runs finish on their own thread
            ctx = g._get_current_object()  # one context lookup
            ctx.ops_execution_id = summary.get("execution_id")
            ctx.ops_receipt_seq = summary.get("receipt_seq")
            lines = state.events.run_lines(summary, ctx.get("request_id"))
            if hold:
                held = ctx.get("ops_lines", "")
                if held is not None:  # finish() has not written yet: held for it
                    ctx.ops_lines = held + lines
                    return
            state.events.write(lines)
            return
        state.events.run(summary, None)

    services.cells.observers.append(observe)

    bp = Blueprint("ops", __name__)

    @bp.get("/metrics")
    def metrics() -> Response:
        auth = request.headers.get("Authorization", "")
        presented = auth[7:].strip() if auth.startswith("Bearer ") and len(auth) <= 512 else ""
        # T-OPS-1: loopback only, unless the operator token is presented. A
        # request relayed by a local proxy carries X-Forwarded-For and is not
        # treated as local.
        local = _is_loopback(request.remote_addr or "") and "X-Forwarded-For" not in request.headers
        if not (local or state.token_ok(presented)):
            raise Forbidden("metrics are served to loopback or with the operator token", code="metrics_forbidden")
        return Response(state.metrics.exposition(), mimetype=None, content_type=CONTENT_TYPE)

    @bp.get("/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(spec)

    app.register_blueprint(bp)
    return state
