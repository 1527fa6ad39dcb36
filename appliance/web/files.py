"""Files routes of the v1 API. Every path goes through ``appliance.confine``
(T-PATH-1/2), the same implementation the guest host functions use."""
from __future__ import annotations

import base64
from contextlib import contextmanager
from typing import Iterator

from flask import Blueprint, Response, g, jsonify, request

from appliance.confine import BadPath, ConfinementError, Volume, open_volume
from appliance.errors import BadRequest, CellError, Conflict, NotFound, PayloadTooLarge
from appliance.policy.paths import PathRejected, join_components, split_guest_path
from appliance.web import validate
from appliance.web.common import json_body, services

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


def _new_entries(vol: Volume, path: str) -> int:
    """How many names writing or making ``path`` would create: the leaf and any
    missing parents (T-DISK-1, the file-count limit)."""
    try:
        comps = split_guest_path(path, allow_data_prefix=True)
    except PathRejected as exc:
        raise BadPath(exc) from None
    for depth in range(1, len(comps) + 1):
        if not vol.exists(join_components(comps[:depth])):
            return len(comps) - depth + 1
    return 0


bp = Blueprint("files", __name__)


@contextmanager
def _volume(cell_id: str) -> Iterator[Volume]:
    svc = services()
    svc.cells.cell(g.tenant, cell_id)  # 404 for another tenant's cell (T-TENANT-1)
    try:
        vol = open_volume(svc.settings.volumes_dir, g.tenant.id, cell_id, max_file_bytes=MAX_FILE_BYTES)
    except ConfinementError as exc:
        raise NotFound("the cell's volume is gone", code="cell_not_found") if exc.code == "not_found" else _translate(exc)
    try:
        yield vol
    except ConfinementError as exc:
        raise _translate(exc) from None
    finally:
        vol.close()


def _path_arg(required: bool = True) -> str:
    path = request.args.get("path")
    if path is None:
        if required:
            raise BadRequest("the path query parameter is required", code="bad_path")
        return ""
    return path


@bp.post("/v1/cells/<cell_id>/files")
def write_file(cell_id: str) -> Response:
    cells = services().cells
    path, data = validate.file_content(json_body())
    record = cells.cell(g.tenant, cell_id)
    with _volume(cell_id) as vol:
        # T-DISK-1: per-tenant disk quota and file-count limit
        cells.check_quota(g.tenant, len(data), _new_entries(vol, path))
        vol.write_bytes(path, data, make_parents=True)
        entry = vol.stat(path).as_dict()
        cells.quota.remeasure(g.tenant.id, record.id, vol)
        return jsonify(entry)


@bp.get("/v1/cells/<cell_id>/files")
def read_file(cell_id: str) -> Response:
    path = _path_arg()
    with _volume(cell_id) as vol:
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


@bp.delete("/v1/cells/<cell_id>/files")
def delete_file(cell_id: str) -> Response:
    path = _path_arg()
    with _volume(cell_id) as vol:
        vol.remove(path, recursive=request.args.get("recursive") in ("1", "true"))
        services().cells.quota.remeasure(g.tenant.id, cell_id, vol)
    return jsonify({"path": path, "status": "deleted"})


@bp.get("/v1/cells/<cell_id>/files/list")
def list_files(cell_id: str) -> Response:
    path = _path_arg(required=False)
    with _volume(cell_id) as vol:
        return jsonify({"files": [e.as_dict() for e in vol.list_dir(path)]})


@bp.get("/v1/cells/<cell_id>/files/exists")
def file_exists(cell_id: str) -> Response:
    path = _path_arg()
    with _volume(cell_id) as vol:
        return jsonify({"exists": vol.exists(path)})


@bp.get("/v1/cells/<cell_id>/files/info")
def file_info(cell_id: str) -> Response:
    path = _path_arg()
    with _volume(cell_id) as vol:
        return jsonify(vol.stat(path).as_dict())


@bp.post("/v1/cells/<cell_id>/files/mkdir")
def make_dir(cell_id: str) -> Response:
    cells = services().cells
    data = json_body()
    validate.unknown_fields(data, {"path"})
    if not isinstance(data.get("path"), str):
        raise BadRequest("path must be a string", code="bad_path")
    with _volume(cell_id) as vol:
        cells.check_quota(g.tenant, 0, _new_entries(vol, data["path"]))  # T-DISK-1: file-count limit
        entry = vol.make_dir(data["path"], parents=True).as_dict()
        cells.quota.remeasure(g.tenant.id, cell_id, vol)
        return jsonify(entry)


@bp.post("/v1/cells/<cell_id>/files/rename")
def rename(cell_id: str) -> Response:
    data = json_body()
    validate.unknown_fields(data, {"old_path", "new_path"})
    old, new = data.get("old_path"), data.get("new_path")
    if not isinstance(old, str) or not isinstance(new, str):
        raise BadRequest("old_path and new_path must be strings", code="bad_path")
    with _volume(cell_id) as vol:
        return jsonify(vol.rename(old, new).as_dict())
