"""The OpenAPI 3.1 description of the v1 API (README, "The API at a glance"), built as data.

A test compares it with the Flask app's url_map (every route, every method)
and checks real error bodies against the one error shape, so this file
cannot silently drift from the routes.
"""
from __future__ import annotations

from typing import Any

from appliance import __version__
from appliance.runtime import templates

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


_ERRORS: dict[str, dict[str, Any]] = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
    "404": {"$ref": "#/components/responses/NotFound"},
    "409": {"$ref": "#/components/responses/Conflict"},
    "413": {"$ref": "#/components/responses/PayloadTooLarge"},
    "429": {"$ref": "#/components/responses/RateLimited"},
    "500": {"$ref": "#/components/responses/Internal"},
    "503": {"$ref": "#/components/responses/Busy"},
}
# Every /v1 route can answer these: the guard runs before the route (auth,
# rate limit, body ceiling) and the one handler renders internal errors.
_V1_COMMON = ("400", "401", "413", "429", "500")


def _op(op_id: str, summary: str, ok: dict[str, Any], *, errors: tuple[str, ...] = (), ok_status: str = "200",
        body: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None, auth: bool = True,
        tags: tuple[str, ...] = ()) -> dict[str, Any]:
    responses: dict[str, Any] = {ok_status: ok}
    for code in sorted(set((_V1_COMMON if auth else ()) + errors)):
        responses[code] = _ERRORS[code]
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses, "tags": list(tags)}
    if not auth:
        op["security"] = []
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "maxLength": 64}}


def _query(name: str, schema: dict[str, Any], required: bool = False, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 4096}}
# A run's own envs (web/validate.py::run_envs): exec, one-shot runs, MCP run_code.
_RUN_ENVS = {**_STRING_MAP, "maxProperties": 64, "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"}}
_TEMPLATE = {"type": "string", "enum": sorted(templates.aliases())}
_LANGUAGE = {"type": "string", "enum": sorted({lang for t in templates.all_templates() for lang in t.languages})}


def _schemas() -> dict[str, Any]:
    entry = {
        "type": "object", "required": ["name", "path", "type", "size", "modified_time"],
        "properties": {"name": {"type": "string"}, "path": {"type": "string"}, "type": {"enum": ["file", "dir"]},
                       "size": {"type": "integer"}, "modified_time": {"type": "string"}},
    }
    receipt = {
        "type": "object",
        "required": ["schema", "execution_id", "code_hash", "result_hash", "template", "timestamp", "receipt_hash",
                     "seq", "prev_chain_hash", "chain_hash", "signature", "key_id"],
        "properties": {
            "schema": {"const": "v1"}, "execution_id": {"type": "string"}, "code_hash": {"type": "string"},
            "result_hash": {"type": "string"}, "template": {"type": "string"}, "timestamp": {"type": "integer"},
            "receipt_hash": {"type": "string"}, "seq": {"type": "integer"}, "prev_chain_hash": {"type": "string"},
            "chain_hash": {"type": "string"}, "key_id": {"type": "string"},
            "signature": {"type": "string", "description": "Ed25519 over the canonical JSON envelope "
                          "(docs/receipts.md); over chain_hash alone when envelope is null (older receipts)"},
            "cell_id": {"type": ["string", "null"]}, "tenant_id": {"type": "string"},
            "envelope": {"type": ["string", "null"]}, "extensions": {"type": ["object", "null"]},
        },
    }
    return {
        "Error": {
            "type": "object", "required": ["error", "code"], "additionalProperties": False,
            "properties": {"error": {"type": "string"}, "code": {"type": "string", "pattern": "^[a-z0-9_]+$"}},
        },
        "Cell": {
            "type": "object", "required": ["cell_id", "template", "created_at", "timeout_ms", "status"],
            "properties": {"cell_id": {"type": "string"}, "template": {"type": "string"},
                           "created_at": {"type": "integer", "description": "Unix ms"},
                           "timeout_ms": {"type": "integer"}, "expires_at": {"type": "integer"},
                           "persistent": {"type": "boolean"}, "metadata": _STRING_MAP,
                           "allow_internet_access": {"type": "boolean", "description": "false: no egress for this "
                                                     "cell; true: the node's egress policy applies"},
                           "status": {"const": "running"}},
        },
        "CellCreate": {
            "type": "object", "additionalProperties": False,
            "properties": {"template": _TEMPLATE, "timeout_ms": {"type": "integer", "minimum": 1000},
                           "persistent": {"type": "boolean"}, "metadata": _STRING_MAP, "envs": _STRING_MAP,
                           "memory_mb": {"type": "integer", "minimum": 16},
                           # Sent by the original Synapse client; docs/migrating-from-e2b.md says what each means.
                           "secure": {"const": True, "description": "Cell is always secure; false is a 400 secure_required"},
                           "allow_internet_access": {"type": "boolean", "description": "false: no egress for this cell; "
                                                     "true on a node with egress off: 403 egress_disabled"},
                           "network": {"type": "object", "description": "E2B options: only deny_out [\"0.0.0.0/0\"] "
                                       "(no egress) and allow_public_traffic false are accepted"},
                           "volume_mounts": {"type": "array", "maxItems": 0, "description": "named volumes are not offered"},
                           "lifecycle": {"type": "object", "description": "only on_timeout \"kill\" (what an idle "
                                         "cell gets) and auto_resume false are accepted"},
                           "volume_id": {"type": "null", "description": "named volumes are not offered"}},
        },
        "Exec": {
            "type": "object", "additionalProperties": False,
            "description": "Exactly one of code (text; WAT for wasm cells) or code_b64 (a wasm module).",
            "properties": {"code": {"oneOf": [{"type": "string"}, {"type": "object", "properties": {"code_b64": {"type": "string"}}}]},
                           "code_b64": {"type": "string", "contentEncoding": "base64"},
                           "language": {"type": "string"}, "timeout_ms": {"type": "integer", "minimum": 10},
                           "envs": {**_RUN_ENVS, "description": "environment variables for this run only (Python, "
                                    "JavaScript), over the cell's own; not part of the receipt; a bad name or value "
                                    "is a 400 invalid_field"}},
        },
        "Execute": {
            "type": "object", "additionalProperties": False,
            "properties": {"template": _TEMPLATE, "language": _LANGUAGE, "code": {"type": "string"},
                           "code_b64": {"type": "string", "contentEncoding": "base64"},
                           "stdin": {"type": "string", "maxLength": 1_000_000,
                                     "description": "what a Python or wasm run reads on its standard input; "
                                                    "refused (invalid_field) for JavaScript"},
                           "timeout_ms": {"type": "integer", "minimum": 10}, "memory_mb": {"type": "integer", "minimum": 16},
                           "envs": {**_RUN_ENVS, "description": "environment variables for this run (Python, "
                                    "JavaScript), over the throw-away session's defaults (HOME, TMPDIR, ...); not part "
                                    "of the receipt; a bad name or value, or any envs for a wasm module, is a 400 "
                                    "invalid_field"}},
        },
        "RunResult": {
            "type": "object",
            "required": ["execution_id", "stdout", "stderr", "exit_code", "status", "latency_ms", "truncated", "results",
                         "receipt"],
            "properties": {
                "execution_id": {"type": "string"}, "stdout": {"type": "string"}, "stderr": {"type": "string"},
                "exit_code": {"type": "integer"},
                "status": {"enum": ["ok", "error", "timeout", "memory_limit", "output_limit", "killed"]},
                "latency_ms": {"type": "number"}, "truncated": {"type": "boolean"}, "receipt": _ref("Receipt"),
                "results": {"type": "array", "maxItems": 64, "description": "rich results (Python): MIME type -> text, "
                            "plus is_main_result; signed in the receipt's results/1 extension",
                            "items": {"type": "object", "required": ["is_main_result"],
                                      "properties": {"is_main_result": {"type": "boolean"},
                                                     **{m: {"type": "string"} for m in (
                                                         "text/plain", "text/html", "text/markdown", "text/latex",
                                                         "image/png", "image/jpeg", "image/svg+xml", "application/json")}},
                                      "additionalProperties": False}},
                "results_truncated": {"type": "boolean"},
                "cell_id": {"type": "string"}, "restarted": {"type": "boolean"}, "note": {"type": "string"},
                "restored": {"const": True, "description": "the cell's interpreter was restored from its snapshot "
                             "(taken when the service stopped, when it was paused or idle) before this run; the note "
                             "says how many runs it is behind when it is not current"},
                "rolled_back": {"const": True, "description": "the run crashed the interpreter (trap, memory, "
                                "deadline) and the cell went back to its capture from before the run: the variables "
                                "from before it are kept (the note says so)"},
                "cell_deleted": {"const": True, "description": "the run was stopped (status killed) because its cell "
                                 "was deleted while it ran"},
                "denials": {"type": "array", "items": {"type": "object", "properties": {
                    "threat": {"type": "string"}, "function": {"type": "string"}, "reason": {"type": "string"}}}},
            },
        },
        "Receipt": receipt,
        "FileWrite": {
            "type": "object", "required": ["path", "content"], "additionalProperties": False,
            "properties": {"path": {"type": "string"}, "content": {"type": "string"},
                           "encoding": {"enum": ["utf-8", "utf8", "text", "base64"]}},
        },
        "Entry": entry,
    }


def _responses() -> dict[str, Any]:
    def err(description: str, retry: bool = False) -> dict[str, Any]:
        out = _json(_ref("Error"), description)
        if retry:
            out["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}, "required": True}}
        return out

    return {
        "BadRequest": err("Malformed JSON, unknown field or template, invalid module, bad path syntax"),
        "Unauthorized": err("No API key, or an unknown or revoked one"),
        "Forbidden": err("A Pro feature without a Pro license; /metrics from off-host without the operator token"),
        "NotFound": err("No such cell, file or receipt (another tenant's is indistinguishable from none)"),
        "Conflict": err("The file exists, or the cell's interpreter was lost with its worker (cell_lost)"),
        "PayloadTooLarge": err("Body over 10 MB, or a file over the ceiling"),
        "RateLimited": err("Over the per-client rate limit", retry=True),
        "Internal": err("Unexpected server error (never a traceback)"),
        "Busy": err("Every worker busy and the queue full", retry=True),
    }


def build_spec() -> dict[str, Any]:
    cell = [_path_param("cell_id", "the cell's id")]
    path_q = _query("path", {"type": "string"}, True, "a path inside the cell's /data volume")
    run = _json(_ref("RunResult"))
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("healthz", "Liveness", _json({"type": "object", "required": ["status"],
                                                              "properties": {"status": {"const": "ok"}}}), auth=False, tags=("ops",))},
        "/metrics": {"get": _op("metrics", "Prometheus text exposition (loopback, or Bearer operator token)",
                                {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                                errors=("403", "500"), auth=False, tags=("ops",))},
        "/v1/openapi.json": {"get": _op("openapi", "This document", _json({"type": "object"}), tags=("ops",))},
        "/v1/status": {"get": _op("status", "Version, tier, license, egress, node key, templates", _json({"type": "object"}))},
        "/v1/templates": {"get": _op("templates", "Templates", _json({"type": "object", "required": ["templates"], "properties": {
            "templates": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}))},
        "/v1/cells": {
            "post": _op("createCell", "Create a cell", _json(_ref("Cell"), "Created"), ok_status="201",
                        body=_ref("CellCreate"), errors=("403", "503"), tags=("cells",)),
            "get": _op("listCells", "The tenant's cells", _json({"type": "object", "required": ["cells"], "properties": {
                "cells": {"type": "array", "items": _ref("Cell")}}}), tags=("cells",)),
        },
        "/v1/cells/{cell_id}": {
            "parameters": cell,
            "get": _op("getCell", "One cell", _json(_ref("Cell")), errors=("404",), tags=("cells",)),
            "delete": _op("deleteCell", "Delete a cell and its volume", _json({"type": "object", "properties": {
                "cell_id": {"type": "string"}, "status": {"const": "deleted"}}}), errors=("404",), tags=("cells",)),
        },
        "/v1/cells/{cell_id}/timeout": {
            "parameters": cell,
            "put": _op("setTimeout", "New idle expiry", _json(_ref("Cell")), errors=("404",),
                       body={"type": "object", "additionalProperties": False,
                             "description": "exactly one of timeout_ms, or timeout in seconds (the Synapse client's form)",
                             "properties": {"timeout_ms": {"type": "integer", "minimum": 1000},
                                            "timeout": {"type": "integer", "minimum": 1}}}, tags=("cells",)),
        },
        "/v1/cells/{cell_id}/fork": {
            "parameters": cell,
            "post": _op("forkCell", "A new cell (same tenant and template) from this Python cell's variables and files "
                        "between runs; 409 cell_busy while it runs code, fork_unsupported for other templates",
                        _json(_ref("Cell"), "Created"), ok_status="201", errors=("403", "404", "409", "413", "503"),
                        tags=("cells",)),
        },
        "/v1/cells/{cell_id}/refresh": {
            "parameters": cell,
            "post": _op("refreshCell", "Restart the idle clock with the cell's timeout", _json(_ref("Cell")),
                        errors=("404",), tags=("cells",)),
        },
        "/v1/cells/{cell_id}/is_running": {
            "parameters": cell,
            "get": _op("cellIsRunning", "Whether the cell exists (it runs until deleted or idle past its timeout)",
                       _json({"type": "object", "required": ["cell_id", "running"], "properties": {
                           "cell_id": {"type": "string"}, "running": {"const": True}}}), errors=("404",), tags=("cells",)),
        },
        "/v1/cells/{cell_id}/envs": {
            "parameters": cell,
            "get": _op("cellEnvs", "The environment the cell was created with", _json(_STRING_MAP),
                       errors=("404",), tags=("cells",)),
        },
        "/v1/cells/{cell_id}/exec": {
            "parameters": cell,
            "post": _op("execInCell", "Run code in the cell", run, body=_ref("Exec"), errors=("403", "404", "409", "503"), tags=("runs",)),
        },
        "/v1/cells/{cell_id}/exec/stream": {
            "parameters": cell,
            "post": _op("execStream", "Run code, stream output as Server-Sent Events",
                        {"description": "data: {type: stdout|stderr, text} lines, data: {type: rich_result, index, result} for each "
                                        "rich result the moment it is shown, then data: {type: result, ...RunResult} "
                                        "whose results list exactly those",
                         "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        body=_ref("Exec"), errors=("403", "404", "409", "503"), tags=("runs",)),
        },
        "/v1/execute": {"post": _op("execute", "One-shot run in a throw-away cell", run, body=_ref("Execute"),
                                    errors=("403", "503"), tags=("runs",))},
        "/v1/cells/{cell_id}/files": {
            "parameters": cell,
            "post": _op("writeFile", "Write a file", _json(_ref("Entry")), body=_ref("FileWrite"), errors=("404", "409"), tags=("files",)),
            "get": _op("readFile", "Read a file (UTF-8, else base64)", _json({"type": "object", "required": ["content"], "properties": {
                "content": {"type": "string"}, "encoding": {"const": "base64"}}}), errors=("404",),
                params=[path_q, _query("encoding", {"enum": ["base64"]})], tags=("files",)),
            "delete": _op("deleteFile", "Delete a file or directory", _json({"type": "object"}), errors=("404", "409"),
                          params=[path_q, _query("recursive", {"enum": ["1", "true", "0", "false"]})], tags=("files",)),
        },
        "/v1/cells/{cell_id}/files/list": {"parameters": cell, "get": _op(
            "listFiles", "List a directory", _json({"type": "object", "required": ["files"], "properties": {
                "files": {"type": "array", "items": _ref("Entry")}}}), errors=("404",),
            params=[_query("path", {"type": "string"})], tags=("files",))},
        "/v1/cells/{cell_id}/files/exists": {"parameters": cell, "get": _op(
            "fileExists", "Whether a path exists", _json({"type": "object", "required": ["exists"], "properties": {
                "exists": {"type": "boolean"}}}), errors=("404",), params=[path_q], tags=("files",))},
        "/v1/cells/{cell_id}/files/info": {"parameters": cell, "get": _op(
            "fileInfo", "One entry", _json(_ref("Entry")), errors=("404",), params=[path_q], tags=("files",))},
        "/v1/cells/{cell_id}/files/mkdir": {"parameters": cell, "post": _op(
            "makeDir", "Create a directory (and parents)", _json(_ref("Entry")), errors=("404", "409"),
            body={"type": "object", "required": ["path"], "additionalProperties": False, "properties": {"path": {"type": "string"}}},
            tags=("files",))},
        "/v1/cells/{cell_id}/files/rename": {"parameters": cell, "post": _op(
            "renameFile", "Rename within the volume", _json(_ref("Entry")), errors=("404", "409"),
            body={"type": "object", "required": ["old_path", "new_path"], "additionalProperties": False,
                  "properties": {"old_path": {"type": "string"}, "new_path": {"type": "string"}}}, tags=("files",))},
        "/v1/receipts": {"get": _op("listReceipts", "A page of the tenant's receipts", _json({
            "type": "object", "required": ["receipts", "next_after"], "properties": {
                "receipts": {"type": "array", "items": _ref("Receipt")}, "next_after": {"type": ["integer", "null"]}}}),
            params=[_query("after", {"type": "integer", "minimum": 0}), _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})],
            tags=("receipts",))},
        "/v1/receipts/verify": {"get": _op("verifyReceipts", "Status of the tenant's own receipts in the node's "
                                           "verified chain (rate-limited per tenant: 429 verify_rate_limited)", _json({
            "type": "object", "required": ["ok", "status", "receipts", "verified", "unverified", "first_problem"],
            "properties": {"ok": {"type": "boolean"}, "status": {"enum": ["verified", "pending", "failed"]},
                           "receipts": {"type": "integer"}, "verified": {"type": "integer"},
                           "unverified": {"type": "integer"},
                           "first_problem": {"type": ["object", "null"], "required": ["kind", "yours"],
                                             "properties": {"kind": {"type": "string"}, "yours": {"type": "boolean"},
                                                            "seq": {"type": "integer"},
                                                            "execution_id": {"type": "string"}}}}}),
            tags=("receipts",))},
        "/v1/receipts/{execution_id}": {"parameters": [_path_param("execution_id", "UUID4 of the run")], "get": _op(
            "getReceipt", "One receipt", _json(_ref("Receipt")), errors=("404",), tags=("receipts",))},
        "/mirror": {"get": _op("mirrorBare", "Trust-registry repository root (LAN peers, read-only)",
                               {"description": "OK"}, errors=("404", "429"), auth=False, tags=("mirror",))},
        "/mirror/": {"get": _op("mirrorIndex", "Trust-registry repository root (LAN peers, read-only)",
                                {"description": "OK"}, errors=("404", "429"), auth=False, tags=("mirror",))},
        "/mirror/{subpath}": {"parameters": [{"name": "subpath", "in": "path", "required": True, "schema": {"type": "string"}}],
                              "get": _op("mirrorFile", "A metadata or target file of the trust registry",
                                         {"description": "the file", "content": {"application/octet-stream": {"schema": {"type": "string"}}}},
                                         errors=("400", "404", "429"), auth=False, tags=("mirror",))},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cell appliance API", "version": __version__,
                 "description": "JSON in and out. Every /v1 route needs Authorization: Bearer <api key>. "
                                "Every error body is {\"error\", \"code\"}. A guest's failure is a 200 with a status."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": _schemas(), "responses": _responses()},
        "paths": paths,
    }


def flask_rule_to_path(rule: str) -> str:
    """``/v1/cells/<cell_id>`` -> ``/v1/cells/{cell_id}`` (converters dropped)."""
    out, i = [], 0
    while i < len(rule):
        if rule[i] == "<":
            end = rule.index(">", i)
            out.append("{" + rule[i + 1:end].split(":")[-1] + "}")
            i = end + 1
        else:
            out.append(rule[i])
            i += 1
    return "".join(out)
