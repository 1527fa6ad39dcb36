"""Health, status and the template list."""
from __future__ import annotations

from flask import Blueprint, Response, g, jsonify

from appliance.web.common import services

bp = Blueprint("status", __name__)


@bp.get("/healthz")
def healthz() -> Response | tuple[Response, int]:
    if services().incident.is_set():
        return jsonify({"status": "incident"}), 503  # a proxy takes the node out of rotation
    if services().draining.is_set():
        return jsonify({"status": "draining"}), 503  # HAProxy stops sending new work before it closes
    if not services().pool.ready():
        return jsonify({"status": "starting"}), 503  # listening, but no worker is up yet to serve a run
    return jsonify({"status": "ok"})


@bp.get("/v1/status")
def status() -> Response:
    svc = services()
    cells = svc.cells
    answer = svc.status()
    answer["quota"] = {"used_bytes": cells.tenant_usage(g.tenant), "limit_bytes": cells.quota_bytes(),
                       "used_files": cells.tenant_files(g.tenant), "limit_files": cells.settings.tenant_file_limit}
    return jsonify(answer)


@bp.get("/v1/templates")
def templates() -> Response:
    return jsonify({"templates": services().templates()})
