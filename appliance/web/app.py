"""The Flask app factory.

Nothing is built at import time: ``create_app(services)`` receives the one
object graph (``appliance.services``) and registers, in this order, the error
renderer, the operations layer (its request-id hook must run before the
guard, so a 401 or 429 carries an id too), the guard, and one blueprint per
part of the API: status, cells and runs, files, receipts, the MCP server
(``/mcp``), and the mirror.
"""
from __future__ import annotations

from typing import Any, Callable

from flask import Flask

from appliance.ops.web import register_ops
from appliance.web import files, routes_cells, routes_mcp, routes_receipts, routes_status
from appliance.web.errors import register_error_handlers
from appliance.web.guard import BODY_REFUSED, install_guard

__all__ = ["BODY_REFUSED", "create_app"]


class _CellFlask(Flask):
    """Flask, with the answer of ``ensure_sync`` kept per function: Flask asks
    it for every hook and view on every request, and a function does not turn
    into a coroutine function after it is registered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        sync = self._sync.get(func)
        if sync is None:
            sync = super().ensure_sync(func)
            if len(self._sync) < 1024:  # hooks and views are few; a bound all the same
                self._sync[func] = sync
        return sync


def create_app(services: Any) -> Flask:
    app = _CellFlask("cell", static_folder=None)
    s = services.settings
    app.config["MAX_CONTENT_LENGTH"] = s.max_body_bytes  # 413 before the body is read whole (T-DOS-2)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["cell"] = services
    register_error_handlers(app, s.max_body_bytes)
    register_ops(app, services)  # logs, /metrics, /v1/openapi.json, request ids
    install_guard(app, services)
    for blueprint in (routes_status.bp, routes_cells.bp, files.bp, routes_receipts.bp, routes_mcp.bp):
        app.register_blueprint(blueprint)
    if s.clustered:
        from appliance.cluster.web import bp as cluster_bp  # layering: the cluster package only when clustered

        app.register_blueprint(cluster_bp)
    if getattr(services, "mirror", None) is not None:
        from mirror.web import mirror_blueprint  # the mirror package sits beside the core; only when it serves

        app.register_blueprint(mirror_blueprint(services.mirror))
    return app
