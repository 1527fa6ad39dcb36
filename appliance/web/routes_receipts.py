"""Receipts of the caller's runs, and the per-tenant chain status."""
from __future__ import annotations

import math
import time

from flask import Blueprint, Response, g, jsonify

from appliance.errors import NotFound, RateLimited
from appliance.web.common import query_int, services

bp = Blueprint("receipts", __name__)


@bp.get("/v1/receipts/verify")
def verify_receipts() -> Response:
    svc = services()
    # T-DOS-2: a per-tenant budget; the check itself is incremental, cached
    # and runs on the auditor's own thread, never on this one.
    allowed, retry = svc.verify_limiter.check(g.tenant.id, time.monotonic())
    if not allowed:
        raise RateLimited("receipt verification is limited per tenant; retry later",
                          code="verify_rate_limited", retry_after=max(1, int(math.ceil(retry))))
    # T-TENANT-1: the answer describes this tenant's own receipts only.
    return jsonify(svc.auditor().tenant_status(g.tenant.id))


@bp.get("/v1/receipts/<execution_id>")
def get_receipt(execution_id: str) -> Response:
    receipt = services().receipts.get(execution_id, g.tenant.id) if len(execution_id) <= 64 else None
    if receipt is None:
        raise NotFound("no such receipt", code="receipt_not_found")
    return jsonify(receipt)


@bp.get("/v1/receipts")
def list_receipts() -> Response:
    after = query_int("after", None, 0, 2**62)
    limit = query_int("limit", 100, 1, 1000)
    items = services().receipts.page(tenant_id=g.tenant.id, after=after, limit=limit or 100)
    nxt = items[-1]["seq"] if items else None
    return jsonify({"receipts": items, "next_after": nxt})
