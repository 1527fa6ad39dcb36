"""The one renderer of request failures: every error is ``{"error", "code"}``
with its status (and ``Retry-After`` when the client should come back); no
traceback ever reaches a client."""
from __future__ import annotations

import logging
import math

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from appliance.errors import CellError, PayloadTooLarge
from appliance.web import compat

log = logging.getLogger("cell.web")


# JSON-RPC's range for server-defined errors: a refusal of the guard at /mcp
# (401, 413, 429, 503) reaches an MCP client as a JSON-RPC error it can show.
MCP_SERVER_ERROR = -32000


def render(exc: CellError) -> Response:
    if request.path.startswith("/mcp"):
        resp = jsonify({"jsonrpc": "2.0", "id": None, "error": {
            "code": MCP_SERVER_ERROR, "message": f"{exc.code}: {exc.message}", "data": {"code": exc.code}}})
    else:
        resp = jsonify({"error": exc.message, "code": exc.code})
    resp.status_code = exc.status
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, int(math.ceil(exc.retry_after))))
    return resp


def register_error_handlers(app: Flask, max_body_bytes: int) -> None:
    @app.errorhandler(CellError)
    def on_cell_error(exc: CellError) -> Response:
        return render(exc)

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            return render(PayloadTooLarge(f"request body over {max_body_bytes} bytes"))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.code or 500, "http_error")
        why = compat.explain(request.path) if exc.code in (404, 405) else None
        err = CellError(why, code="not_offered") if why else CellError(exc.description or exc.name, code=code)
        err.status = exc.code or 500
        return render(err)

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return render(CellError("internal error", code="internal"))
