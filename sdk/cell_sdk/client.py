"""``CellClient``: what Cell has beyond E2B's ``Sandbox`` — one-shot runs,
receipts and their chain, node status. Standard library only."""
from __future__ import annotations

from typing import Any

from cell_sdk._http import ConnectionConfig, Transport
from cell_sdk.models import Execution
from cell_sdk.sandbox import DEFAULT_TEMPLATE, LANGUAGE_TEMPLATES, RUN_CEILING_S, _code_body, execution_from_answer


class CellClient:
    def __init__(self, api_url: str | None = None, api_key: str | None = None, *, request_timeout: float | None = None,
                 retries: int | None = None) -> None:
        self._http = Transport(ConnectionConfig.resolve(api_url, api_key, request_timeout, retries))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CellClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, code: str | bytes, template: str = DEFAULT_TEMPLATE, *, stdin: str | None = None, timeout: float | None = None,
                memory_mb: int | None = None, envs: dict[str, str] | None = None) -> Execution:
        """Run once in a throw-away cell (``POST /v1/execute``); sent once, never retried after it may have run.
        ``envs``: environment variables for this run, over the throw-away cell's defaults (not for wasm)."""
        tmpl = LANGUAGE_TEMPLATES.get(template, template)
        body: dict[str, Any] = {"template": tmpl, **_code_body(code)}
        if stdin is not None:
            body["stdin"] = stdin
        if timeout is not None:
            body["timeout_ms"] = max(10, int(timeout * 1000))
        if memory_mb is not None:
            body["memory_mb"] = memory_mb
        if envs:
            body["envs"] = dict(envs)
        wait = max(self._http.config.request_timeout, (timeout or RUN_CEILING_S) + 30.0)
        return execution_from_answer(self._http.request("POST", "/v1/execute", body=body, timeout=wait), tmpl, code, None)

    def status(self) -> dict[str, Any]:
        return dict(self._http.request("GET", "/v1/status"))

    def templates(self) -> list[dict[str, Any]]:
        return list(self._http.request("GET", "/v1/templates").get("templates", []))

    def get_receipt(self, execution_id: str) -> dict[str, Any]:
        return dict(self._http.request("GET", f"/v1/receipts/{execution_id}"))

    def list_receipts(self, after: int | None = None, limit: int = 100) -> dict[str, Any]:
        query = {"limit": str(limit), **({"after": str(after)} if after is not None else {})}
        return dict(self._http.request("GET", "/v1/receipts", query=query))

    def verify_receipts(self) -> dict[str, Any]:
        """Status of this tenant's own receipts in the node's checked chain (``{"ok": bool, "status": ...}``)."""
        return dict(self._http.request("GET", "/v1/receipts/verify"))
