"""What runs before every request: the per-client rate limit, rotation state,
the API key, and the accounting of requests in flight."""
from __future__ import annotations

import math
import time
from typing import Any

from flask import Flask, g, request

from appliance.errors import BadRequest, Busy, PayloadTooLarge, RateLimited, Unauthorized
from appliance.policy.ratelimit import client_key

# WSGI environ key set by appliance.web.server when it refused to read the
# body (T-DOS-2); the value says why (too_large, unauthorized, ...).
BODY_REFUSED = "cell.body_refused"

# The authenticated API: /v1 and the MCP server at /mcp (T-MCP-1: the same
# rate limit, key, body bound and rotation state as /v1).
AUTHENTICATED = ("/v1", "/mcp")


def install_guard(app: Flask, services: Any) -> None:
    s = services.settings

    @app.before_request
    def guard() -> None:
        req = request._get_current_object()  # type: ignore[attr-defined]  # one context lookup, not one per use
        path = req.path
        if not path.startswith((*AUTHENTICATED, "/mirror")):
            return
        headers = req.headers
        # T-DOS-2: rate limit per client (XFF only from trusted proxies).
        key = client_key(req.remote_addr or "", headers.get("X-Forwarded-For"), s.trusted_proxies)
        rate = services.limits().rate_limit_rps
        allowed, retry = services.limiter_for(rate).check(key, time.monotonic())
        if not allowed:
            raise RateLimited("too many requests", retry_after=max(1, int(math.ceil(retry))))
        if not path.startswith(AUTHENTICATED):
            return  # the mirror is read-only and public to LAN peers
        if services.incident.is_set():
            raise Busy("this node is out of rotation for an incident investigation", code="incident", retry_after=60)
        if services.draining.is_set():
            raise Busy("the appliance is shutting down; retry on another node or after restart", code="draining", retry_after=5)
        length = req.content_length
        if length is not None and length > s.max_body_bytes:
            raise PayloadTooLarge(f"request body over {s.max_body_bytes} bytes")
        auth = headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or len(auth) > 512:
            raise Unauthorized("missing or malformed Authorization: Bearer <api key>")
        tenant = services.store.tenant_for_key(auth[7:].strip())
        if tenant is None:
            raise Unauthorized("unknown or revoked API key", code="bad_key")
        g.tenant = tenant
        if req.environ.get(BODY_REFUSED):
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
        if request.path.startswith(AUTHENTICATED):
            g.counted = True
            services.begin_request()

    @app.teardown_request
    def count_out(_exc: BaseException | None) -> None:
        if g.pop("counted", False):
            services.end_request()
