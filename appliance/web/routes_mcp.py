"""The MCP server at ``/mcp``: Streamable HTTP transport, JSON-RPC over POST.

Threat T-MCP-1 (SECURITY.md). The official ``mcp`` SDK's server side is an
ASGI (Starlette/anyio) application; this service is a WSGI app on waitress,
whose body gate (``appliance/web/server.py``), guard and access log every
request must pass. So the transport is implemented here against the
specification, and the SDK is used only as the client in the tests:

* ``/mcp`` goes through the same guard as ``/v1`` (rate limit, bearer key,
  body bound, drain refusal), so no key is a 401 before anything here runs;
* POST carries one JSON-RPC message; a request is answered with one
  ``application/json`` body, a notification or response with 202; a
  ``run_code`` call carrying a ``progressToken`` from a client that accepts
  ``text/event-stream`` is answered as SSE: output as progress notifications,
  then the result;
* ``initialize`` issues an ``Mcp-Session-Id`` bound to the tenant; every
  later POST must carry it (missing: 400, unknown/expired/another tenant's:
  404, after which a client initializes again); DELETE ends it; GET (no
  server-initiated stream is offered) is 405;
* the tools (``appliance/web/mcp_tools.py``) call the same services as the
  HTTP API: ``CellService`` for cells and runs (another tenant's cell is "no
  such cell", T-TENANT-1), the files routes' confined volume for files
  (T-PATH-1/2, T-DISK-1).

The pure rules (message shapes, sessions, tool arguments) live in
:mod:`appliance.policy.mcp_server`.
"""
from __future__ import annotations

import codecs
import json
import queue
import threading
import time
from typing import Any, Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from appliance import __version__
from appliance.policy import mcp_server as rules
from appliance.policy.mcp_server import RpcError
from appliance.web import mcp_tools
from appliance.web.common import services

bp = Blueprint("mcp", __name__)
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
SERVED = frozenset({"ping", "tools/list", "tools/call"})  # besides initialize
SERVER_INFO = {"name": "cell", "title": "Cell code sandbox"}
INSTRUCTIONS = ("Run Python or JavaScript in isolated, persistent sandboxes (cells) on an air-gapped appliance. "
                "Use run_code; pass back the cell_id it returns to keep state. No network access.")


def _sessions() -> rules.Sessions:
    """This app's session table (one per app, made on first use)."""
    ext: dict[str, Any] = current_app.extensions.setdefault("cell.mcp", {"sessions": rules.Sessions()})
    sessions: rules.Sessions = ext["sessions"]
    return sessions


def _rpc(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = jsonify(body)
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _http_error(status: int, code: int, message: str) -> Response:
    """A transport-level refusal: the HTTP status the spec names, a JSON-RPC error body."""
    return _rpc(rules.rpc_error(None, code, message), status)


@bp.get("/mcp")
def mcp_get() -> Response:
    resp = _http_error(405, rules.METHOD_NOT_FOUND, "this server offers no server-initiated stream; POST messages")
    resp.headers["Allow"] = "POST, DELETE"
    return resp


@bp.delete("/mcp")
def mcp_delete() -> Response:
    sid = request.headers.get(SESSION_HEADER, "")
    if not sid:
        return _http_error(400, rules.INVALID_REQUEST, f"{SESSION_HEADER} header is required")
    if not _sessions().close(sid, g.tenant.id):
        return _http_error(404, rules.INVALID_REQUEST, "no such session")
    return Response(status=204)


def _origin_ok() -> bool:
    """The transport's DNS-rebinding rule: a browser Origin must be this host."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    host = origin.split("://", 1)[-1].rstrip("/")
    return host == request.host


@bp.post("/mcp")
def mcp_post() -> Response:
    if not _origin_ok():
        return _http_error(403, rules.INVALID_REQUEST, "Origin does not match this server")
    raw = request.get_data(cache=True, parse_form_data=False)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return _http_error(400, rules.PARSE_ERROR, "the body is not valid JSON")
    try:
        msg = rules.parse_message(data)
    except RpcError as exc:
        return _http_error(400, exc.code, exc.message)
    tenant = g.tenant
    now = time.monotonic()
    if msg.method == "initialize":
        if not msg.is_request:
            return _http_error(400, rules.INVALID_REQUEST, "initialize must be a request (with an id)")
        assert msg.id is not None
        try:
            version = rules.negotiate_version(msg.params)
        except RpcError as exc:
            return _rpc(rules.rpc_error(msg.id, exc.code, exc.message))
        sid = _sessions().open(tenant.id, version, now)
        result = {"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                  "serverInfo": {**SERVER_INFO, "version": __version__}, "instructions": INSTRUCTIONS}
        return _rpc(rules.rpc_result(msg.id, result), headers={SESSION_HEADER: sid})
    if msg.is_request and msg.method not in SERVED:
        # Before the session check: a 2.x client's server/discover probe (the
        # stateless revision, not served) learns it must use initialize.
        assert msg.id is not None
        return _rpc(rules.rpc_error(msg.id, rules.METHOD_NOT_FOUND, f"method {msg.method[:64]!r} is not offered"))
    sid = request.headers.get(SESSION_HEADER, "")
    if not sid:
        return _http_error(400, rules.INVALID_REQUEST, f"{SESSION_HEADER} header is required; call initialize first")
    if _sessions().use(sid, tenant.id, now) is None:
        return _http_error(404, rules.INVALID_REQUEST, "no such session; initialize again")
    asked = request.headers.get(VERSION_HEADER)
    if asked is not None and asked not in rules.HANDSHAKE_VERSIONS:
        return _http_error(400, rules.INVALID_REQUEST, f"unsupported {VERSION_HEADER}")
    if not msg.is_request:
        return Response(status=202)  # notifications/initialized, cancellations, responses: nothing to answer
    assert msg.id is not None
    token = _progress_token(msg.params)
    if (msg.method == "tools/call" and msg.params.get("name") == "run_code" and token is not None
            and "text/event-stream" in request.headers.get("Accept", "")):
        return _stream_run(msg.id, token, msg.params.get("arguments"))
    try:
        result = _dispatch(msg.method, msg.params)
    except RpcError as exc:
        return _rpc(rules.rpc_error(msg.id, exc.code, exc.message))
    return _rpc(rules.rpc_result(msg.id, result))


def _dispatch(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": rules.TOOLS}
    if method == "tools/call":
        name = params.get("name")
        if not isinstance(name, str):
            raise RpcError(rules.INVALID_PARAMS, "tools/call needs name (a string)")
        if name not in mcp_tools.TOOLS:
            raise RpcError(rules.INVALID_PARAMS, f"unknown tool {name[:64]!r}")
        g.mcp_tool = name  # the access log line names the tool
        return mcp_tools.call_tool(mcp_tools.Ctx(g.tenant, services()), name, params.get("arguments"))
    raise RpcError(rules.METHOD_NOT_FOUND, f"method {method[:64]!r} is not offered")


def _progress_token(params: dict[str, Any]) -> str | int | None:
    meta = params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        return None
    if isinstance(token, str) and len(token) > rules.MAX_ID or isinstance(token, int) and abs(token) > 2 ** 53:
        return None  # T-MCP-1: an unusable token is ignored (the answer comes as plain JSON)
    return token


def _stream_run(msg_id: str | int, token: str | int, arguments: Any) -> Response:
    """run_code answered as Server-Sent Events: the output as progress
    notifications while the run goes, then the result (the client asked for
    progress and accepts a stream)."""
    g.mcp_tool = "run_code"
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def sink(fd: int, data: bytes) -> None:
        events.put(("chunk", (fd, data)))

    ctx = mcp_tools.Ctx(g.tenant, services(), sink)
    threading.Thread(target=lambda: events.put(("done", mcp_tools.call_tool(ctx, "run_code", arguments))),
                     name="mcp-run", daemon=True).start()

    def generate() -> Iterator[str]:
        decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in (1, 2)}
        sent = 0
        while True:
            kind, payload = events.get()
            if kind == "done":
                yield "event: message\ndata: " + json.dumps(rules.rpc_result(msg_id, payload)) + "\n\n"
                return
            fd, data = payload
            text = decoders.get(fd, decoders[2]).decode(data)
            if not text:
                continue
            sent += 1
            note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                "progressToken": token, "progress": sent, "message": text if fd == 1 else "[stderr] " + text}}
            yield "event: message\ndata: " + json.dumps(note) + "\n\n"

    return Response(generate(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
