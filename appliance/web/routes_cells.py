"""Cells and runs: create, list, show, delete, idle timeout, exec (plain and
streamed) and one-shot execute."""
from __future__ import annotations

from flask import Blueprint, Response, g, jsonify

from appliance.errors import BadRequest
from appliance.web import validate
from appliance.web.common import json_body, services, sse

bp = Blueprint("cells", __name__)


@bp.post("/v1/cells")
def create_cell() -> tuple[Response, int]:
    svc = services()
    args = validate.cell_create(json_body(), svc.settings)
    record = svc.cells.create(g.tenant, **args)
    return jsonify(record.public()), 201


@bp.get("/v1/cells")
def list_cells() -> Response:
    return jsonify({"cells": [c.public() for c in services().store.list_cells(g.tenant.id)]})


@bp.get("/v1/cells/<cell_id>")
def get_cell(cell_id: str) -> Response:
    cells = services().cells
    record = cells.cell(g.tenant, cell_id)
    return jsonify({**record.public(), "disk_bytes": cells.cell_usage(record)})


@bp.delete("/v1/cells/<cell_id>")
def delete_cell(cell_id: str) -> Response:
    services().cells.delete(g.tenant, cell_id)
    return jsonify({"cell_id": cell_id, "status": "deleted"})


@bp.put("/v1/cells/<cell_id>/timeout")
def set_timeout(cell_id: str) -> Response:
    svc = services()
    data = json_body()
    validate.unknown_fields(data, {"timeout_ms"})
    if "timeout_ms" not in data:
        raise BadRequest("timeout_ms is required", code="invalid_field")
    timeout = validate.int_field(data, "timeout_ms", 0, 1000, svc.settings.cell_timeout_ceiling_ms)
    record = svc.cells.set_timeout(g.tenant, cell_id, timeout)
    return jsonify(record.public())


@bp.post("/v1/cells/<cell_id>/exec")
def exec_cell(cell_id: str) -> Response:
    svc = services()
    record = svc.cells.cell(g.tenant, cell_id)
    args = validate.exec_body(json_body(), record.template, svc.settings)
    return jsonify(svc.cells.exec_in_cell(g.tenant, cell_id, args["code"], args["is_text"], args["language"],
                                          timeout_ms=args["timeout_ms"]))


@bp.post("/v1/cells/<cell_id>/exec/stream")
def exec_stream(cell_id: str) -> Response:
    svc = services()
    cells = svc.cells
    record = cells.cell(g.tenant, cell_id)
    args = validate.exec_body(json_body(), record.template, svc.settings)
    tenant = g.tenant
    return sse(lambda sink: cells.exec_in_cell(tenant, cell_id, args["code"], args["is_text"], args["language"],
                                               on_chunk=sink, timeout_ms=args["timeout_ms"]))


@bp.post("/v1/execute")
def execute() -> Response:
    svc = services()
    args = validate.execute_body(json_body(), svc.settings)
    return jsonify(svc.cells.execute_once(g.tenant, args["template"], args["code"], args["is_text"], args["stdin"],
                                          args["timeout_ms"], args["memory_mb"]))
