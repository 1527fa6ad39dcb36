"""Files routes of the v1 API. Every path goes through ``appliance.confine``
(T-PATH-1/2), the same implementation the guest host functions use."""
from __future__ import annotations

import base64
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from flask import Flask, Response, g, jsonify, request

from appliance.confine import BadPath, ConfinementError, Volume, open_volume
from appliance.errors import BadRequest, CellError, Conflict, NotFound, PayloadTooLarge
from appliance.web import validate

MAX_FILE_BYTES = 10_000_000

_STATUS = {
    "not_found": (NotFound, "file_not_found"),
    "exists": (Conflict, "file_exists"),
    "too_large": (PayloadTooLarge, "file_too_large"),
}


def _translate(exc: ConfinementError) -> CellError:
    if isinstance(exc, BadPath):
        return BadRequest(exc.message, code="bad_path")
    if exc.code in _STATUS:
        cls, code = _STATUS[exc.code]
        return cls(exc.message, code=code)
    if exc.code == "denied":
        return BadRequest(exc.message, code="path_denied")
    if exc.code in ("is_a_directory", "not_a_directory", "not_empty", "invalid"):
        return BadRequest(exc.message, code=exc.code)
    return CellError("file operation failed", code="io_error")


def register_files(app: Flask, services: Any, body: Callable[[], dict[str, Any]]) -> None:
    s = services.settings

    @contextmanager
    def volume(cell_id: str) -> Iterator[Volume]:
        services.cells.cell(g.tenant, cell_id)  # 404 for another tenant's cell (T-TENANT-1)
        try:
            vol = open_volume(s.volumes_dir, g.tenant.id, cell_id, max_file_bytes=MAX_FILE_BYTES)
        except ConfinementError as exc:
            raise NotFound("the cell's volume is gone", code="cell_not_found") if exc.code == "not_found" else _translate(exc)
        try:
            yield vol
        except ConfinementError as exc:
            raise _translate(exc) from None
        finally:
            vol.close()

    def path_arg(required: bool = True) -> str:
        path = request.args.get("path")
        if path is None:
            if required:
                raise BadRequest("the path query parameter is required", code="bad_path")
            return ""
        return path

    @app.post("/v1/cells/<cell_id>/files")
    def write_file(cell_id: str) -> Response:
        path, data = validate.file_content(body())
        record = services.cells.cell(g.tenant, cell_id)
        services.cells.check_quota(g.tenant, len(data))  # T-DOS-1: per-tenant disk quota
        with volume(cell_id) as vol:
            vol.write_bytes(path, data, make_parents=True)
            entry = vol.stat(path).as_dict()
            services.cells.note_usage(g.tenant.id, record.id, services.cells.plus_tmp(g.tenant.id, record.id, vol.usage_bytes()))
            return jsonify(entry)

    @app.get("/v1/cells/<cell_id>/files")
    def read_file(cell_id: str) -> Response:
        path = path_arg()
        with volume(cell_id) as vol:
            entry = vol.stat(path)
            if entry.type != "file":
                raise BadRequest("path is a directory", code="is_a_directory")
            if entry.size > MAX_FILE_BYTES:
                raise PayloadTooLarge("file is over the 10 MB read ceiling", code="file_too_large")
            data = vol.read_bytes(path, MAX_FILE_BYTES)
        if request.args.get("encoding") == "base64":
            return jsonify({"content": base64.b64encode(data).decode("ascii"), "encoding": "base64"})
        try:
            return jsonify({"content": data.decode("utf-8")})
        except UnicodeDecodeError:
            return jsonify({"content": base64.b64encode(data).decode("ascii"), "encoding": "base64"})

    @app.delete("/v1/cells/<cell_id>/files")
    def delete_file(cell_id: str) -> Response:
        path = path_arg()
        with volume(cell_id) as vol:
            vol.remove(path, recursive=request.args.get("recursive") in ("1", "true"))
            services.cells.note_usage(g.tenant.id, cell_id, services.cells.plus_tmp(g.tenant.id, cell_id, vol.usage_bytes()))
        return jsonify({"path": path, "status": "deleted"})

    @app.get("/v1/cells/<cell_id>/files/list")
    def list_files(cell_id: str) -> Response:
        path = path_arg(required=False)
        with volume(cell_id) as vol:
            return jsonify({"files": [e.as_dict() for e in vol.list_dir(path)]})

    @app.get("/v1/cells/<cell_id>/files/exists")
    def file_exists(cell_id: str) -> Response:
        path = path_arg()
        with volume(cell_id) as vol:
            return jsonify({"exists": vol.exists(path)})

    @app.get("/v1/cells/<cell_id>/files/info")
    def file_info(cell_id: str) -> Response:
        path = path_arg()
        with volume(cell_id) as vol:
            return jsonify(vol.stat(path).as_dict())

    @app.post("/v1/cells/<cell_id>/files/mkdir")
    def make_dir(cell_id: str) -> Response:
        data = body()
        validate.unknown_fields(data, {"path"})
        if not isinstance(data.get("path"), str):
            raise BadRequest("path must be a string", code="bad_path")
        with volume(cell_id) as vol:
            return jsonify(vol.make_dir(data["path"], parents=True).as_dict())

    @app.post("/v1/cells/<cell_id>/files/rename")
    def rename(cell_id: str) -> Response:
        data = body()
        validate.unknown_fields(data, {"old_path", "new_path"})
        old, new = data.get("old_path"), data.get("new_path")
        if not isinstance(old, str) or not isinstance(new, str):
            raise BadRequest("old_path and new_path must be strings", code="bad_path")
        with volume(cell_id) as vol:
            return jsonify(vol.rename(old, new).as_dict())
