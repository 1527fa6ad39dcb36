"""The Flask app factory and the v1 routes.

Nothing is built at import time: ``create_app(services)`` receives the one
object graph (``appliance.services``). Every failure is rendered by one
handler as ``{"error": message, "code": code}``; no traceback reaches a client.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Iterator

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from appliance import __version__
from appliance.errors import BadRequest, Busy, CellError, NotFound, PayloadTooLarge, RateLimited, Unauthorized
from appliance.policy.ratelimit import client_key
from appliance.web import validate

log = logging.getLogger("cell.web")

# WSGI environ key set by appliance.web.server when it refused to read the
# body (T-DOS-2); the value says why (too_large, unauthorized, ...).
BODY_REFUSED = "cell.body_refused"


def _error(exc: CellError) -> Response:
    resp = jsonify({"error": exc.message, "code": exc.code})
    resp.status_code = exc.status
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, int(math.ceil(exc.retry_after))))
    return resp


def create_app(services: Any) -> Flask:
    app = Flask("cell", static_folder=None)
    s = services.settings
    app.config["MAX_CONTENT_LENGTH"] = s.max_body_bytes  # 413 before the body is read whole (T-DOS-2)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["cell"] = services
    cells = services.cells

    @app.errorhandler(CellError)
    def on_cell_error(exc: CellError) -> Response:
        return _error(exc)

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            return _error(PayloadTooLarge(f"request body over {s.max_body_bytes} bytes"))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.code or 500, "http_error")
        err = CellError(exc.description or exc.name, code=code)
        err.status = exc.code or 500
        return _error(err)

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return _error(CellError("internal error", code="internal"))

    @app.before_request
    def guard() -> None:
        if not request.path.startswith(("/v1", "/mirror")):
            return
        # T-DOS-2: rate limit per client (XFF only from trusted proxies).
        key = client_key(request.remote_addr or "", request.headers.get("X-Forwarded-For"), s.trusted_proxies)
        rate = services.limits().rate_limit_rps
        allowed, retry = services.limiter_for(rate).check(key, time.monotonic())
        if not allowed:
            raise RateLimited("too many requests", retry_after=max(1, int(math.ceil(retry))))
        if not request.path.startswith("/v1"):
            return  # the mirror is read-only and public to LAN peers
        if services.incident.is_set():
            raise Busy("this node is out of rotation for an incident investigation", code="incident", retry_after=60)
        if services.draining.is_set():
            raise Busy("the appliance is shutting down; retry on another node or after restart", code="draining", retry_after=5)
        length = request.content_length
        if length is not None and length > s.max_body_bytes:
            raise PayloadTooLarge(f"request body over {s.max_body_bytes} bytes")
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or len(auth) > 512:
            raise Unauthorized("missing or malformed Authorization: Bearer <api key>")
        tenant = services.store.tenant_for_key(auth[7:].strip())
        if tenant is None:
            raise Unauthorized("unknown or revoked API key", code="bad_key")
        g.tenant = tenant
        if request.environ.get(BODY_REFUSED):
            # T-DOS-2: the server did not read this body (the key was not valid
            # when the headers arrived); it must never pass for an empty one.
            raise BadRequest("the request body was refused before it was read; send it again", code="body_refused")
        if services.allows("multi_tenant"):
            # Hub multi-tenant mode (a hub license listing multi_tenant, T-LIC-2): tenants
            # share the node, so each tenant also gets its own bucket (T-DOS-2).
            allowed, retry = services.tenant_limiter().check("tenant:" + tenant.id, time.monotonic())
            if not allowed:
                raise RateLimited("this tenant is over its request rate", retry_after=max(1, int(math.ceil(retry))))

    @app.before_request
    def count_in() -> None:
        if request.path.startswith("/v1"):
            g.counted = True
            services.begin_request()

    @app.teardown_request
    def count_out(_exc: BaseException | None) -> None:
        if g.pop("counted", False):
            services.end_request()

    def body() -> dict[str, Any]:
        raw = request.get_data(cache=True, parse_form_data=False)  # JSON whatever the Content-Type says
        if not raw:
            raise BadRequest("a JSON body is required", code="invalid_json")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("malformed JSON", code="invalid_json") from None
        return validate.obj(data)

    @app.get("/healthz")
    def healthz() -> Response | tuple[Response, int]:
        if services.incident.is_set():
            return jsonify({"status": "incident"}), 503  # a proxy takes the node out of rotation
        return jsonify({"status": "ok"})

    @app.get("/v1/status")
    def status() -> Response:
        answer = services.status()
        answer["quota"] = {"used_bytes": cells.tenant_usage(g.tenant), "limit_bytes": cells.quota_bytes(),
                           "used_files": cells.tenant_files(g.tenant), "limit_files": cells.settings.tenant_file_limit}
        return jsonify(answer)

    @app.get("/v1/templates")
    def templates() -> Response:
        return jsonify({"templates": services.templates()})

    # -- cells -----------------------------------------------------------
    @app.post("/v1/cells")
    def create_cell() -> tuple[Response, int]:
        args = validate.cell_create(body(), s)
        record = cells.create(g.tenant, **args)
        return jsonify(record.public()), 201

    @app.get("/v1/cells")
    def list_cells() -> Response:
        return jsonify({"cells": [c.public() for c in services.store.list_cells(g.tenant.id)]})

    @app.get("/v1/cells/<cell_id>")
    def get_cell(cell_id: str) -> Response:
        record = cells.cell(g.tenant, cell_id)
        return jsonify({**record.public(), "disk_bytes": cells.cell_usage(record)})

    @app.delete("/v1/cells/<cell_id>")
    def delete_cell(cell_id: str) -> Response:
        cells.delete(g.tenant, cell_id)
        return jsonify({"cell_id": cell_id, "status": "deleted"})

    @app.put("/v1/cells/<cell_id>/timeout")
    def set_timeout(cell_id: str) -> Response:
        data = body()
        validate.unknown_fields(data, {"timeout_ms"})
        if "timeout_ms" not in data:
            raise BadRequest("timeout_ms is required", code="invalid_field")
        timeout = validate.int_field(data, "timeout_ms", 0, 1000, s.cell_timeout_ceiling_ms)
        record = cells.set_timeout(g.tenant, cell_id, timeout)
        return jsonify(record.public())

    @app.post("/v1/cells/<cell_id>/exec")
    def exec_cell(cell_id: str) -> Response:
        record = cells.cell(g.tenant, cell_id)
        args = validate.exec_body(body(), record.template, s)
        return jsonify(cells.exec_in_cell(g.tenant, cell_id, args["code"], args["is_text"], args["language"], timeout_ms=args["timeout_ms"]))

    @app.post("/v1/cells/<cell_id>/exec/stream")
    def exec_stream(cell_id: str) -> Response:
        record = cells.cell(g.tenant, cell_id)
        args = validate.exec_body(body(), record.template, s)
        tenant = g.tenant
        return _sse(lambda sink: cells.exec_in_cell(tenant, cell_id, args["code"], args["is_text"], args["language"], on_chunk=sink, timeout_ms=args["timeout_ms"]))

    @app.post("/v1/execute")
    def execute() -> Response:
        args = validate.execute_body(body(), s)
        return jsonify(cells.execute_once(g.tenant, args["template"], args["code"], args["is_text"], args["stdin"], args["timeout_ms"], args["memory_mb"]))

    # -- files -----------------------------------------------------------
    from appliance.web.files import register_files

    register_files(app, services, body)
    if getattr(services, "mirror", None) is not None:
        from mirror.web import register_mirror_routes

        register_mirror_routes(app, services.mirror)

    # -- receipts --------------------------------------------------------
    @app.get("/v1/receipts/verify")
    def verify_receipts() -> Response:
        # T-DOS-2: a per-tenant budget; the check itself is incremental, cached
        # and runs on the auditor's own thread, never on this one.
        allowed, retry = services.verify_limiter.check(g.tenant.id, time.monotonic())
        if not allowed:
            raise RateLimited("receipt verification is limited per tenant; retry later",
                              code="verify_rate_limited", retry_after=max(1, int(math.ceil(retry))))
        # T-TENANT-1: the answer describes this tenant's own receipts only.
        return jsonify(services.auditor().tenant_status(g.tenant.id))

    @app.get("/v1/receipts/<execution_id>")
    def get_receipt(execution_id: str) -> Response:
        receipt = services.receipts.get(execution_id, g.tenant.id) if len(execution_id) <= 64 else None
        if receipt is None:
            raise NotFound("no such receipt", code="receipt_not_found")
        return jsonify(receipt)

    @app.get("/v1/receipts")
    def list_receipts() -> Response:
        after = _query_int("after", None, 0, 2**62)
        limit = _query_int("limit", 100, 1, 1000)
        items = services.receipts.page(tenant_id=g.tenant.id, after=after, limit=limit or 100)
        nxt = items[-1]["seq"] if items else None
        return jsonify({"receipts": items, "next_after": nxt})

    from appliance.ops.web import register_ops

    register_ops(app, services)  # logs, /metrics, /v1/openapi.json, request ids
    return app


def _query_int(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be an integer between {lo} and {hi}", code="invalid_query")
    return int(raw)


def _sse(run: Callable[[Callable[[int, bytes], None]], dict[str, Any]]) -> Response:
    """Server-Sent Events: output as it is produced, then the result."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def sink(fd: int, data: bytes) -> None:
        events.put(("chunk", (fd, data)))

    def worker() -> None:
        try:
            events.put(("result", run(sink)))
        except CellError as exc:
            events.put(("error", {"error": exc.message, "code": exc.code, "status": exc.status}))
        except Exception:
            log.exception("stream run failed")
            events.put(("error", {"error": "internal error", "code": "internal", "status": 500}))

    threading.Thread(target=worker, name="sse-run", daemon=True).start()

    def generate() -> Iterator[str]:
        while True:
            kind, payload = events.get()
            if kind == "chunk":
                fd, data = payload
                text = data.decode("utf-8", "replace")
                yield "data: " + json.dumps({"type": "stdout" if fd == 1 else "stderr", "text": text}) + "\n\n"
            elif kind == "result":
                yield "data: " + json.dumps({"type": "result", **payload}) + "\n\n"
                return
            else:
                yield "data: " + json.dumps({"type": "error", **payload}) + "\n\n"
                return

    return Response(generate(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
