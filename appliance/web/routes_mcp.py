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
* tools call the same services as the HTTP API: ``CellService`` for cells
  and runs (another tenant's cell is "no such cell", T-TENANT-1), the files
  routes' confined volume for files (T-PATH-1/2, T-DISK-1).

The pure rules (message shapes, sessions, tool arguments) live in
:mod:`appliance.policy.mcp_server`.
"""
from __future__ import annotations

import base64
import codecs
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from appliance import __version__
from appliance.errors import BadRequest, CellError, PayloadTooLarge
from appliance.policy import mcp_server as rules
from appliance.policy.mcp_server import RpcError, ToolArgsError
from appliance.web import validate
from appliance.web.common import services
from appliance.web.files import MAX_FILE_BYTES, _new_entries, _volume

log = logging.getLogger("cell.mcp.server")

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
        if name not in _TOOLS:
            raise RpcError(rules.INVALID_PARAMS, f"unknown tool {name[:64]!r}")
        g.mcp_tool = name  # the access log line names the tool
        return _call_tool(_Ctx(g.tenant, services()), name, params.get("arguments"))
    raise RpcError(rules.METHOD_NOT_FOUND, f"method {method[:64]!r} is not offered")


# -- tools -------------------------------------------------------------------

def _text(text: str, *, error: bool = False, structured: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": error}
    if structured is not None:
        out["structuredContent"] = structured
    return out


@dataclass
class _Ctx:
    """What a tool may use: the caller's tenant, the services, and for a
    streamed run the sink of its output (tools may run off the request thread)."""
    tenant: Any
    svc: Any
    on_chunk: Callable[[int, bytes], None] | None = None


def _call_tool(ctx: _Ctx, name: str, arguments: Any) -> dict[str, Any]:
    started = time.perf_counter()
    outcome = "ok"
    try:
        result = _TOOLS[name](ctx, rules.tool_args(name, arguments))
        if result.get("isError"):
            outcome = "tool_error"
        return result
    except ToolArgsError as exc:
        outcome = "invalid_arguments"
        return _text(f"invalid arguments: {exc}", error=True)
    except CellError as exc:
        outcome = exc.code
        return _text(f"{exc.code}: {exc.message}", error=True)
    except Exception:
        log.exception("mcp tool %s failed", name)
        outcome = "internal"
        return _text("internal: internal error", error=True)
    finally:
        # T-MCP-1 audit: who called which tool, how it ended; never the arguments.
        log.info("mcp_tool tenant=%s tool=%s outcome=%s ms=%d", ctx.tenant.id, name, outcome,
                 int((time.perf_counter() - started) * 1000))


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

    ctx = _Ctx(g.tenant, services(), sink)
    threading.Thread(target=lambda: events.put(("done", _call_tool(ctx, "run_code", arguments))),
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


def _run_code(ctx: _Ctx, args: dict[str, Any]) -> dict[str, Any]:
    svc, tenant = ctx.svc, ctx.tenant
    cells = svc.cells
    language = args.get("language")
    exec_req: dict[str, Any] = {"code": args["code"]}
    if language is not None:
        exec_req["language"] = language
    if "timeout_ms" in args:
        exec_req["timeout_ms"] = args["timeout_ms"]
    cell_id = args.get("cell_id")
    if cell_id is None:
        template = rules.LANGUAGE_TEMPLATE[language or "python"]
        run = validate.exec_body(exec_req, template, svc.settings)  # checked before a cell is made for it
        cell_id = cells.create(tenant, **validate.cell_create({"template": template}, svc.settings)).id
    else:
        run = validate.exec_body(exec_req, cells.cell(tenant, cell_id).template, svc.settings)
    try:
        answer = cells.exec_in_cell(tenant, cell_id, run["code"], run["is_text"], run["language"],
                                    on_chunk=ctx.on_chunk, timeout_ms=run["timeout_ms"])
    except CellError as exc:
        if "cell_id" not in args:  # the model must learn the id of the cell it now holds
            exc.message = f"{exc.message} (cell {cell_id} was created for this run; pass it as cell_id or delete it)"
        raise
    return _run_result(answer, cell_id)


def _run_result(answer: dict[str, Any], cell_id: str) -> dict[str, Any]:
    receipt = answer.get("receipt") or {}
    structured = {
        "cell_id": cell_id, "status": answer["status"], "exit_code": answer["exit_code"],
        "stdout": answer["stdout"], "stderr": answer["stderr"], "truncated": answer["truncated"],
        "execution_id": answer["execution_id"], "receipt_hash": receipt.get("receipt_hash"),
        "receipt_seq": receipt.get("seq"),
    }
    for extra in ("note", "denials", "restarted"):
        if extra in answer:
            structured[extra] = answer[extra]
    lines = [f"status: {answer['status']} (exit code {answer['exit_code']})", f"cell_id: {cell_id}"]
    if answer["stdout"]:
        lines += ["stdout:", answer["stdout"].rstrip("\n")]
    if answer["stderr"]:
        lines += ["stderr:", answer["stderr"].rstrip("\n")]
    if answer["truncated"]:
        lines.append("(output truncated at the appliance's limit)")
    if answer.get("note"):
        lines.append(f"note: {answer['note']}")
    lines.append(f"execution_id: {answer['execution_id']} receipt_hash: {receipt.get('receipt_hash')}")
    return _text("\n".join(lines), error=answer["status"] != "ok", structured=structured)


def _cell_summary(record: Any) -> dict[str, Any]:
    public: dict[str, Any] = record.public()
    return public


def _create_cell(ctx: _Ctx, args: dict[str, Any]) -> dict[str, Any]:
    svc = ctx.svc
    body: dict[str, Any] = {"template": rules.LANGUAGE_TEMPLATE[args.get("language") or "python"]}
    if "timeout_ms" in args:
        body["timeout_ms"] = args["timeout_ms"]
    record = svc.cells.create(ctx.tenant, **validate.cell_create(body, svc.settings))
    cell = _cell_summary(record)
    return _text(f"created cell {record.id} ({record.template}); pass cell_id={record.id} to run_code", structured=cell)


def _delete_cell(ctx: _Ctx, args: dict[str, Any]) -> dict[str, Any]:
    ctx.svc.cells.delete(ctx.tenant, args["cell_id"])
    return _text(f"deleted cell {args['cell_id']}", structured={"cell_id": args["cell_id"], "status": "deleted"})


def _list_cells(ctx: _Ctx, _args: dict[str, Any]) -> dict[str, Any]:
    cells = [_cell_summary(c) for c in ctx.svc.store.list_cells(ctx.tenant.id)]
    text = "\n".join(f"{c['cell_id']} {c.get('template')}" for c in cells) or "no cells"
    return _text(text, structured={"cells": cells})


# The file tools run on the request thread: the files routes' _volume reads
# the tenant from the request (and is the same confinement, T-PATH-1/2).
def _read_file(ctx: _Ctx, args: dict[str, Any]) -> dict[str, Any]:
    path = args["path"]
    with _volume(args["cell_id"]) as vol:
        entry = vol.stat(path)
        if entry.type != "file":
            raise BadRequest("path is a directory", code="is_a_directory")
        if entry.size > MAX_FILE_BYTES:
            raise PayloadTooLarge("file is over the 10 MB read ceiling", code="file_too_large")
        data = vol.read_bytes(path, MAX_FILE_BYTES)
    try:
        return _text(data.decode("utf-8"), structured={"path": path, "encoding": "utf-8", "size": len(data)})
    except UnicodeDecodeError:
        encoded = base64.b64encode(data).decode("ascii")
        return _text(encoded, structured={"path": path, "encoding": "base64", "size": len(data)})


def _write_file(ctx: _Ctx, args: dict[str, Any]) -> dict[str, Any]:
    cells = ctx.svc.cells
    path, data = validate.file_content({k: args[k] for k in ("path", "content", "encoding") if k in args})
    record = cells.cell(ctx.tenant, args["cell_id"])
    with _volume(record.id) as vol:
        cells.check_quota(ctx.tenant, len(data), _new_entries(vol, path))  # T-DISK-1: quota and file count
        vol.write_bytes(path, data, make_parents=True)
        entry = vol.stat(path).as_dict()
        cells.quota.remeasure(ctx.tenant.id, record.id, vol)
    return _text(f"wrote {len(data)} bytes to {path}", structured=entry)


def _list_files(ctx: _Ctx, args: dict[str, Any]) -> dict[str, Any]:
    with _volume(args["cell_id"]) as vol:
        entries = [e.as_dict() for e in vol.list_dir(args.get("path", ""))]
    text = "\n".join(f"{e.get('type')} {e.get('path', e.get('name'))} {e.get('size', '')}".rstrip() for e in entries)
    return _text(text or "empty directory", structured={"files": entries})


_TOOLS = {"run_code": _run_code, "create_cell": _create_cell, "delete_cell": _delete_cell, "list_cells": _list_cells,
          "read_file": _read_file, "write_file": _write_file, "list_files": _list_files}
