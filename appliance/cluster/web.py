"""Node-to-node routes: this node's whole receipt export for `cell receipts verify --cluster`.

Not under /v1 (no tenant key opens it): the caller shows the cluster token
(``SYNAPSE_CLUSTER_TOKEN``). Without a token configured the route answers
404, as if it did not exist (T-CLUSTER-3). The generated haproxy.cfg never
passes /cluster/ through the front.
"""
from __future__ import annotations

import hmac
import os
import tempfile
from pathlib import Path
from typing import Iterator

from flask import Blueprint, Response, request

from appliance.errors import NotFound, Unauthorized
from appliance.web.common import services

bp = Blueprint("cluster", __name__)

EXPORT_PATH = "/cluster/receipts/export"


def token_matches(configured: str, header: str) -> bool:
    """T-CLUSTER-3: only a configured token, compared in constant time, opens the route."""
    if not configured or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode("utf-8"), configured.encode("utf-8"))


@bp.get(EXPORT_PATH)
def export_receipts() -> Response:
    svc = services()
    configured = svc.settings.cluster_token
    if not configured:
        raise NotFound("not found", code="not_found")
    if not token_matches(configured, request.headers.get("Authorization", "")):
        raise Unauthorized("the cluster token is missing or wrong", code="bad_cluster_token")
    fd, tmp = tempfile.mkstemp(prefix=".cluster-export.", dir=svc.settings.db_path.parent)
    os.close(fd)
    path = Path(tmp)
    try:
        svc.receipts.export_to(path)
        fh = path.open("rb")
    finally:
        path.unlink(missing_ok=True)  # the open handle keeps the data until it is sent

    def stream() -> Iterator[bytes]:
        with fh:
            while chunk := fh.read(64 * 1024):
                yield chunk

    return Response(stream(), mimetype="application/x-ndjson",
                    headers={"X-Cell-Node-Id": svc.settings.node_id, "Cache-Control": "no-store"})
