"""The MCP server's rules, without I/O: JSON-RPC shapes, protocol versions,
sessions, the tool table and each tool's arguments.

Threat T-MCP-1 (SECURITY.md): ``/mcp`` is a second door to the same cells.
Everything a client sends is checked here before any service is called:

* a message is one JSON-RPC 2.0 object (no batches) with a string ``method``
  of bounded length, an ``id`` that is a bounded string or integer, and
  ``params`` that is an object when present; anything else is -32600;
* a session belongs to the tenant whose key opened it; another tenant's
  session id is the same as an unknown one (T-TENANT-1). Sessions are bounded
  per tenant (the oldest is dropped) and expire when idle;
* tool arguments are validated field by field, unknown fields refused; a
  failure is a tool result with ``isError`` so a model can correct itself.

The routes (``appliance/web/routes_mcp.py``) do the I/O.
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HANDSHAKE_VERSIONS", "LATEST_VERSION", "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS",
    "RpcError", "Message", "parse_message", "negotiate_version", "Sessions", "TOOLS", "ToolArgsError", "tool_args",
    "rpc_result", "rpc_error",
]

# The revisions reachable with the initialize handshake, oldest to newest
# (the mcp SDK 2.3.0 names 2025-11-25 as its newest handshake revision; its
# stateless 2026-07-28 era, probed with server/discover, is not served).
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_VERSION = HANDSHAKE_VERSIONS[-1]

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
MAX_METHOD = 128
MAX_ID = 128
MAX_SESSIONS_PER_TENANT = 32
SESSION_IDLE_S = 3600.0


class RpcError(Exception):
    """A protocol failure, answered as a JSON-RPC error object."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Message:
    method: str
    id: str | int | None  # None: a notification (or a response the server never asked for)
    params: dict[str, Any]
    is_request: bool


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2 ** 53) <= value <= 2 ** 53
    return isinstance(value, str) and len(value) <= MAX_ID


def parse_message(data: Any) -> Message:
    """One client message, or RpcError(-32600). T-MCP-1: strict shapes."""
    if isinstance(data, list):
        raise RpcError(INVALID_REQUEST, "batches are not accepted; send one JSON-RPC message per request")
    if not isinstance(data, dict) or data.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, "a JSON-RPC 2.0 object is required")
    if "method" not in data:
        # A response or error from the client: the server sends no requests, so
        # there is nothing it could answer; it is accepted and ignored.
        if "id" in data and ("result" in data or "error" in data) and _valid_id(data["id"]):
            return Message("", None, {}, False)
        raise RpcError(INVALID_REQUEST, "method is required")
    method = data["method"]
    if not isinstance(method, str) or not method or len(method) > MAX_METHOD:
        raise RpcError(INVALID_REQUEST, f"method must be a string of 1 to {MAX_METHOD} characters")
    extra = set(data) - {"jsonrpc", "method", "id", "params"}
    if extra:
        raise RpcError(INVALID_REQUEST, f"unknown member(s): {', '.join(sorted(extra))[:200]}")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(INVALID_REQUEST, "params must be an object")
    if "id" not in data:
        return Message(method, None, params, False)
    if not _valid_id(data["id"]):
        raise RpcError(INVALID_REQUEST, f"id must be an integer or a string of at most {MAX_ID} characters")
    return Message(method, data["id"], params, True)


def negotiate_version(params: dict[str, Any]) -> str:
    """The client's revision when this server speaks it, else the newest one."""
    asked = params.get("protocolVersion")
    if not isinstance(asked, str):
        raise RpcError(INVALID_PARAMS, "initialize needs protocolVersion (a string)")
    return asked if asked in HANDSHAKE_VERSIONS else LATEST_VERSION


def rpc_result(msg_id: str | int, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def rpc_error(msg_id: str | int | None, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


@dataclass
class _Session:
    tenant_id: str
    version: str
    last_used: float


class Sessions:
    """Session ids, each bound to the tenant that opened it (T-MCP-1, T-TENANT-1).

    ``now`` is a monotonic clock reading passed in by the caller."""

    def __init__(self, per_tenant: int = MAX_SESSIONS_PER_TENANT, idle_s: float = SESSION_IDLE_S) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, _Session] = {}
        self.per_tenant, self.idle_s = per_tenant, idle_s

    def open(self, tenant_id: str, version: str, now: float) -> str:
        sid = secrets.token_urlsafe(24)  # visible ASCII only, as the transport requires
        with self._lock:
            self._expire(now)
            mine = sorted((s.last_used, k) for k, s in self._by_id.items() if s.tenant_id == tenant_id)
            for _, old in mine[: max(0, len(mine) - self.per_tenant + 1)]:
                del self._by_id[old]  # bounded per tenant: the least recently used goes
            self._by_id[sid] = _Session(tenant_id, version, now)
        return sid

    def use(self, sid: str, tenant_id: str, now: float) -> str | None:
        """The session's protocol version, or None: unknown, expired or another tenant's."""
        with self._lock:
            session = self._by_id.get(sid)
            if session is None or session.tenant_id != tenant_id or now - session.last_used > self.idle_s:
                return None
            session.last_used = now
            return session.version

    def close(self, sid: str, tenant_id: str) -> bool:
        with self._lock:
            session = self._by_id.get(sid)
            if session is None or session.tenant_id != tenant_id:
                return False
            del self._by_id[sid]
            return True

    def _expire(self, now: float) -> None:
        for k in [k for k, s in self._by_id.items() if now - s.last_used > self.idle_s]:
            del self._by_id[k]


# -- tools -------------------------------------------------------------------

_SANDBOX = (
    "Cell runs code in a WebAssembly sandbox on an air-gapped appliance: no network, no shell, no subprocesses, "
    "no threads, no pip install. Python is CPython with numpy, pandas, scipy, scikit-learn (and its bundled "
    "datasets), statsmodels, matplotlib (Agg backend: save figures to a file such as /tmp/plot.png), lxml and "
    "Pillow. JavaScript is QuickJS (not Node: no require, no npm, no process; top-level await and timers work). "
    "Each cell has its own persistent files under /data."
)
_CELL_ID = {"type": "string", "maxLength": 64, "description": "A cell id returned by run_code or create_cell."}
_LANGUAGE = {"type": "string", "enum": ["python", "javascript"], "description": "Language of the code; default python."}
_PATH = {"type": "string", "maxLength": 4096,
         "description": "A path inside the cell's volume, relative (results/out.csv) or under /data."}

# The same rules as the HTTP API's per-run envs (web/validate.py::run_envs,
# which the tool applies: a bad value is the same invalid_field, T-ENV-1).
_RUN_ENVS = {"type": "object", "maxProperties": 64, "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
             "additionalProperties": {"type": "string", "maxLength": 4096},
             "description": "Environment variables for this run only (os.environ in Python, process.env in "
                            "JavaScript), over the cell's own; never logged and not part of the receipt."}

TOOLS: list[dict[str, Any]] = [
    {"name": "run_code",
     "description": (
         "Run code and get its stdout, stderr and status. " + _SANDBOX + " Without cell_id, a new persistent cell is "
         "created and its cell_id is in the answer: pass it back to keep variables, imports and files between calls "
         "(a cell's language is fixed when it is created). The last expression's value is printed like a notebook. "
         "Each run has a time limit (timeout_ms, default 10 s); first imports of pandas or scikit-learn can take "
         "several seconds. Every run is recorded with a signed receipt (execution_id and receipt hash in the answer)."),
     "inputSchema": {"type": "object", "additionalProperties": False, "required": ["code"], "properties": {
         "code": {"type": "string", "description": "The source code to run."},
         "language": _LANGUAGE, "cell_id": _CELL_ID,
         "timeout_ms": {"type": "integer", "minimum": 10, "description": "Run time limit in milliseconds."},
         "envs": _RUN_ENVS}}},
    {"name": "create_cell",
     "description": "Create a persistent cell (an isolated interpreter with its own /data volume) and return its "
                    "cell_id. " + _SANDBOX + " A cell is removed after it has been idle for its timeout.",
     "inputSchema": {"type": "object", "additionalProperties": False, "properties": {
         "language": _LANGUAGE,
         "timeout_ms": {"type": "integer", "minimum": 1000, "description": "Idle time before the cell is removed."}}}},
    {"name": "delete_cell", "description": "Delete a cell, its interpreter state and its /data files.",
     "inputSchema": {"type": "object", "additionalProperties": False, "required": ["cell_id"],
                     "properties": {"cell_id": _CELL_ID}}},
    {"name": "list_cells", "description": "List your cells: id, language (template), creation and expiry times.",
     "inputSchema": {"type": "object", "additionalProperties": False, "properties": {}}},
    {"name": "read_file",
     "description": "Read a file from a cell's /data volume (at most 10 MB). Text comes back as text; other bytes "
                    "as base64.",
     "inputSchema": {"type": "object", "additionalProperties": False, "required": ["cell_id", "path"],
                     "properties": {"cell_id": _CELL_ID, "path": _PATH}}},
    {"name": "write_file",
     "description": "Write a file into a cell's /data volume (parents are created; code in the cell sees it at "
                    "/data/<path>). Use encoding base64 for binary content.",
     "inputSchema": {"type": "object", "additionalProperties": False, "required": ["cell_id", "path", "content"],
                     "properties": {"cell_id": _CELL_ID, "path": _PATH, "content": {"type": "string"},
                                    "encoding": {"type": "string", "enum": ["utf-8", "base64"]}}}},
    {"name": "list_files",
     "description": "List a directory of a cell's /data volume (the volume's root when path is empty).",
     "inputSchema": {"type": "object", "additionalProperties": False, "required": ["cell_id"],
                     "properties": {"cell_id": _CELL_ID, "path": _PATH}}},
]
TOOL_NAMES = frozenset(t["name"] for t in TOOLS)
LANGUAGE_TEMPLATE = {"python": "python3", "javascript": "javascript"}


class ToolArgsError(Exception):
    """The arguments do not fit the tool; told to the model as a tool error."""


def tool_args(name: str, args: Any) -> dict[str, Any]:
    """Check ``args`` against the tool's input schema (T-MCP-1): types, required
    fields, enums, string lengths; nothing outside the schema passes. Numeric
    ranges past the schema's minimum are the services' (their own limits)."""
    if name not in TOOL_NAMES:
        raise RpcError(INVALID_PARAMS, f"unknown tool {name[:64]!r}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ToolArgsError("arguments must be an object")
    schema = next(t for t in TOOLS if t["name"] == name)["inputSchema"]
    props: dict[str, Any] = schema["properties"]
    extra = sorted(set(args) - set(props))
    if extra:
        raise ToolArgsError(f"unknown argument(s): {', '.join(extra)[:200]}; {name} takes {', '.join(props) or 'none'}")
    for field in schema.get("required", []):
        if field not in args:
            raise ToolArgsError(f"{field} is required")
    for field, value in args.items():
        spec = props[field]
        if spec["type"] == "string":
            if not isinstance(value, str):
                raise ToolArgsError(f"{field} must be a string")
            if "maxLength" in spec and len(value) > spec["maxLength"]:
                raise ToolArgsError(f"{field} is longer than {spec['maxLength']} characters")
            if "enum" in spec and value not in spec["enum"]:
                raise ToolArgsError(f"{field} must be one of {', '.join(spec['enum'])}")
        elif spec["type"] == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ToolArgsError(f"{field} must be an integer")
            if value < spec.get("minimum", 0):
                raise ToolArgsError(f"{field} must be at least {spec.get('minimum', 0)}")
        elif spec["type"] == "object":
            pass  # its tool checks it in full with the HTTP API's rules and codes (run_code's envs: validate.run_envs)
        else:
            raise ToolArgsError(f"{field}: no rule for this argument")  # T-MCP-1: unknown means refused
    return dict(args)
