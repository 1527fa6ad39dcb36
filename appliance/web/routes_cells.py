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
    validate.unknown_fields(data, {"timeout_ms", "timeout"})
    ceiling = svc.settings.cell_timeout_ceiling_ms
    if ("timeout_ms" in data) == ("timeout" in data):
        raise BadRequest("give timeout_ms (or timeout, in seconds, as the Synapse client sends)", code="invalid_field")
    if "timeout" in data:
        timeout = validate.int_field(data, "timeout", 0, 1, ceiling // 1000) * 1000
    else:
        timeout = validate.int_field(data, "timeout_ms", 0, 1000, ceiling)
    record = svc.cells.set_timeout(g.tenant, cell_id, timeout)
    return jsonify(record.public())


@bp.post("/v1/cells/<cell_id>/refresh")
def refresh(cell_id: str) -> Response:
    """Restart the idle clock with the cell's own timeout (Synapse client's refresh())."""
    cells = services().cells
    record = cells.cell(g.tenant, cell_id)
    return jsonify(cells.set_timeout(g.tenant, cell_id, record.timeout_ms).public())


@bp.post("/v1/cells/<cell_id>/fork")
def fork_cell(cell_id: str) -> tuple[Response, int]:
    """A new cell from this one's variables and files, between runs (Python cells)."""
    record = services().cells.fork(g.tenant, cell_id)
    return jsonify(record.public()), 201


@bp.get("/v1/cells/<cell_id>/is_running")
def is_running(cell_id: str) -> Response:
    """A cell is running for as long as it exists; gone or another tenant's is a 404."""
    record = services().cells.cell(g.tenant, cell_id)
    return jsonify({"cell_id": record.id, "running": True})


@bp.get("/v1/cells/<cell_id>/envs")
def get_envs(cell_id: str) -> Response:
    """The environment the cell was created with (fixed for its life)."""
    return jsonify(services().cells.cell(g.tenant, cell_id).envs)


@bp.post("/v1/cells/<cell_id>/exec")
def exec_cell(cell_id: str) -> Response:
    svc = services()
    record = svc.cells.cell(g.tenant, cell_id)
    args = validate.exec_body(json_body(), record.template, svc.settings)
    return jsonify(svc.cells.exec_in_cell(g.tenant, cell_id, args["code"], args["is_text"], args["language"],
                                          timeout_ms=args["timeout_ms"], run_envs=args["envs"]))


@bp.post("/v1/cells/<cell_id>/exec/stream")
def exec_stream(cell_id: str) -> Response:
    svc = services()
    cells = svc.cells
    record = cells.cell(g.tenant, cell_id)
    args = validate.exec_body(json_body(), record.template, svc.settings)
    tenant = g.tenant
    return sse(lambda sink, on_result: cells.exec_in_cell(tenant, cell_id, args["code"], args["is_text"],
                                                          args["language"], on_chunk=sink, timeout_ms=args["timeout_ms"],
                                                          run_envs=args["envs"], on_result=on_result))


@bp.post("/v1/execute")
def execute() -> Response:
    svc = services()
    args = validate.execute_body(json_body(), svc.settings)
    return jsonify(svc.cells.execute_once(g.tenant, args["template"], args["code"], args["is_text"], args["stdin"],
                                          args["timeout_ms"], args["memory_mb"], run_envs=args["envs"]))
