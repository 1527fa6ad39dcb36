"""MCP policy: the operator's server table, the guest's request, the server's answer. Pure.

No I/O here (no sockets, files, processes, clock or environment); the
transports live in :mod:`appliance.mcp`. Threat T-PRO-2 (SECURITY.md):

* The guest never chooses an address. A request names a *configured* server
  by name; any other key (``url``, ``command``, ``env``, ``host`` ...) is
  refused as ``denied`` — unknown means denied — so no field of guest JSON can
  ever reach a socket address, an argv or an environment.
* The table is the operator's: each server is either a stdio command (argv,
  started by the appliance) or one HTTP(S) URL, parsed strictly here (no
  userinfo, no fragment, no CR/LF/space anywhere, explicit port range).
* Optional ``tools`` (allow-list of tool names) and ``tenants`` (allow-list
  of tenant ids) narrow what a guest may call; they can never widen.
* Guest JSON and server JSON are parsed with duplicate keys refused and
  ``NaN``/``Infinity`` refused (parser differentials, invalid JSON out).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

# Versions of the MCP spec whose initialize/tools-call shape we speak.
PROTOCOL_VERSION = "2025-06-18"
SUPPORTED_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # server names and tenant ids (same as confine ids)
TOOL_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # MCP tool-name convention; also safe to log
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
HEADER_NAME_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
HARD_TIMEOUT_S = 60.0  # the run-time ceiling (SECURITY.md §4); a server timeout can only be shorter
REQUEST_KEYS = frozenset({"server", "tool", "arguments"})
DENIED, INVALID = -1, -3


class McpConfigError(ValueError):
    """The operator's server table is malformed (the appliance refuses to start with it)."""


class RequestRejected(ValueError):
    """A guest request refused before any I/O. ``code`` is -1 (denied) or -3 (invalid)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ProtocolError(ValueError):
    """A server's JSON-RPC message is not what the protocol allows."""


@dataclass(frozen=True)
class ServerConfig:
    name: str
    transport: Literal["stdio", "http"]
    command: tuple[str, ...] = ()  # stdio: argv, run without a shell
    env: tuple[tuple[str, str], ...] = ()  # stdio: the child's ONLY extra environment
    cwd: str = "/"
    url: str = ""  # http: the operator-named endpoint, exactly
    tls: bool = False
    host: str = ""
    port: int = 0
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()  # http: e.g. Authorization, never logged
    tools: frozenset[str] | None = None  # None: every tool the server offers
    tenants: frozenset[str] | None = None  # None: every tenant with a Pro license
    timeout_s: float | None = None  # per call, within the run's deadline


@dataclass(frozen=True)
class McpConfig:
    servers: dict[str, ServerConfig]


@dataclass(frozen=True)
class McpRequest:
    server: str
    tool: str
    arguments: dict[str, Any]


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str | bytes) -> Any:
    """json.loads refusing duplicate keys and NaN/Infinity; raises ValueError (RecursionError too)."""
    return json.loads(text, object_pairs_hook=_no_dupes, parse_constant=_no_constant)


def dumps_compact(value: Any) -> bytes:
    """Compact UTF-8 JSON; falls back to ASCII escapes for lone surrogates (never invalid UTF-8)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


# -- operator configuration ------------------------------------------------------

def _plain(text: str) -> bool:
    return all(0x20 < ord(ch) < 0x7F for ch in text)


def _parse_url(name: str, url: Any) -> tuple[bool, str, int, str]:
    if not isinstance(url, str) or not url or len(url) > 2048 or not _plain(url):
        raise McpConfigError(f"{name}: url must be a plain http(s) URL")
    m = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?(/[^#?]*(?:\?[^#]*)?)?", url)
    if m is None:  # userinfo, fragment, odd host syntax: all refused
        raise McpConfigError(f"{name}: url must be http(s)://host[:port]/path without userinfo or fragment")
    tls = m.group(1) == "https"
    port = int(m.group(3)) if m.group(3) else (443 if tls else 80)
    if not 0 < port < 65536:
        raise McpConfigError(f"{name}: bad port")
    host = m.group(2)
    return tls, host[1:-1] if host.startswith("[") else host, port, m.group(4) or "/"


def _names(name: str, field: str, value: Any, pattern: re.Pattern[str]) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and pattern.fullmatch(v) for v in value):
        raise McpConfigError(f"{name}: {field} must be a list of names")
    return frozenset(value)


def _pairs(name: str, field: str, value: Any, key_re: re.Pattern[str]) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise McpConfigError(f"{name}: {field} must be an object of strings")
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not key_re.fullmatch(k) or not isinstance(v, str) or "\x00" in v or "\r" in v or "\n" in v:
            raise McpConfigError(f"{name}: bad {field} entry {k!r}")
        out.append((k, v))
    return tuple(sorted(out))


def parse_server(name: str, spec: Any) -> ServerConfig:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise McpConfigError(f"bad server name {name!r}")
    if not isinstance(spec, dict):
        raise McpConfigError(f"{name}: must be an object")
    common = {"tools", "tenants", "timeout_ms"}
    kind: Literal["stdio", "http"]
    if "command" in spec and "url" not in spec:
        kind, allowed = "stdio", common | {"command", "env", "cwd"}
    elif "url" in spec and "command" not in spec:
        kind, allowed = "http", common | {"url", "headers"}
    else:
        raise McpConfigError(f"{name}: exactly one of command or url")
    unknown = set(spec) - allowed
    if unknown:  # unknown means denied (SECURITY.md §6)
        raise McpConfigError(f"{name}: unknown fields {sorted(unknown)}")
    timeout_s = None
    if "timeout_ms" in spec:
        t = spec["timeout_ms"]
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= HARD_TIMEOUT_S * 1000:
            raise McpConfigError(f"{name}: timeout_ms must be 1..60000")
        timeout_s = t / 1000
    tools = _names(name, "tools", spec.get("tools"), TOOL_RE)
    tenants = _names(name, "tenants", spec.get("tenants"), NAME_RE)
    if kind == "stdio":
        argv = spec["command"]
        if not isinstance(argv, list) or not argv or len(argv) > 256 or not all(
            isinstance(a, str) and a and "\x00" not in a for a in argv
        ):
            raise McpConfigError(f"{name}: command must be a non-empty argv list")
        cwd = spec.get("cwd", "/")
        if not isinstance(cwd, str) or not cwd.startswith("/") or "\x00" in cwd:
            raise McpConfigError(f"{name}: cwd must be an absolute path")
        return ServerConfig(name, "stdio", command=tuple(argv), env=_pairs(name, "env", spec.get("env"), ENV_NAME_RE),
                            cwd=cwd, tools=tools, tenants=tenants, timeout_s=timeout_s)
    tls, host, port, path = _parse_url(name, spec["url"])
    headers = _pairs(name, "headers", spec.get("headers"), HEADER_NAME_RE)
    reserved = {"host", "content-length", "content-type", "accept", "connection", "transfer-encoding",
                "mcp-session-id", "mcp-protocol-version"}
    if any(k.lower() in reserved for k, _ in headers):
        raise McpConfigError(f"{name}: headers may not set {sorted(reserved)}")
    if any(not all(0x20 <= ord(c) < 0x7F for c in v) for _, v in headers):
        raise McpConfigError(f"{name}: header values must be printable ASCII")
    return ServerConfig(name, "http", url=spec["url"], tls=tls, host=host, port=port, path=path, headers=headers,
                        tools=tools, tenants=tenants, timeout_s=timeout_s)


def parse_config(data: Any) -> McpConfig:
    """``{"servers": {name: {"command": [...], "env": {...}} | {"url": "..."}}}``."""
    if not isinstance(data, dict) or set(data) != {"servers"} or not isinstance(data["servers"], dict):
        raise McpConfigError('the MCP config must be {"servers": {name: spec, ...}}')
    if len(data["servers"]) > 256:
        raise McpConfigError("too many servers")
    return McpConfig({name: parse_server(name, spec) for name, spec in data["servers"].items()})


def parse_config_text(text: str) -> McpConfig:
    try:
        data = loads_strict(text)
    except (ValueError, RecursionError) as exc:
        raise McpConfigError(f"not JSON: {exc}") from None
    return parse_config(data)


# -- guest request ---------------------------------------------------------------

def parse_request(raw: bytes) -> McpRequest:
    """The guest's ``{"server", "tool", "arguments"}``; raises RequestRejected."""
    try:
        data = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestRejected(INVALID, "bad_json") from None
    if not isinstance(data, dict):
        raise RequestRejected(INVALID, "not_an_object")
    extra = set(data) - REQUEST_KEYS
    if extra:
        # T-PRO-2: a guest-supplied url/command/env/host is never honoured, and
        # anything else unknown is refused the same way (unknown means denied).
        addressy = {"url", "uri", "endpoint", "host", "port", "address", "command", "argv", "env", "headers"}
        raise RequestRejected(DENIED, "guest_address" if extra & addressy else "unknown_field")
    server, tool, arguments = data.get("server"), data.get("tool"), data.get("arguments", {})
    if not isinstance(server, str) or not isinstance(tool, str) or not isinstance(arguments, dict):
        raise RequestRejected(INVALID, "bad_fields")
    if not NAME_RE.fullmatch(server):
        raise RequestRejected(DENIED, "unknown_server")  # cannot name a configured server
    if not TOOL_RE.fullmatch(tool):
        raise RequestRejected(INVALID, "bad_tool_name")
    return McpRequest(server, tool, arguments)


def check_allowed(config: McpConfig, request: McpRequest, tenant_id: str) -> tuple[ServerConfig | None, str]:
    """(server, "") when the call may proceed, else (None, reason) — all reasons are "denied"."""
    server = config.servers.get(request.server)
    if server is None:
        return None, "unknown_server"
    if server.tenants is not None and tenant_id not in server.tenants:
        return None, "tenant_not_allowed"
    if server.tools is not None and request.tool not in server.tools:
        return None, "tool_not_allowed"
    return server, ""


# -- JSON-RPC 2.0 messages ---------------------------------------------------------

def rpc_request(msg_id: int, method: str, params: dict[str, Any]) -> bytes:
    return dumps_compact({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})


def rpc_notification(method: str) -> bytes:
    return dumps_compact({"jsonrpc": "2.0", "method": method})


def initialize_params() -> dict[str, Any]:
    return {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "cell-appliance", "version": "1"}}


def classify(msg: Any) -> Literal["response", "request", "notification"]:
    """What a server sent; raises ProtocolError for anything that is not JSON-RPC 2.0."""
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        raise ProtocolError("not a JSON-RPC 2.0 object")
    if "method" in msg:
        if not isinstance(msg["method"], str):
            raise ProtocolError("method is not a string")
        return "request" if "id" in msg else "notification"
    if "id" not in msg:
        raise ProtocolError("response without id")
    return "response"


def response_result(msg: dict[str, Any]) -> dict[str, Any]:
    """The ``result`` of a response; ProtocolError when malformed, RpcError when the server says error."""
    has_result, has_error = "result" in msg, "error" in msg
    if has_result == has_error:
        raise ProtocolError("a response needs exactly one of result and error")
    if has_error:
        err = msg["error"]
        if not isinstance(err, dict) or not isinstance(err.get("code"), int) or isinstance(err.get("code"), bool):
            raise ProtocolError("malformed error object")
        raise RpcError(int(err["code"]))
    if not isinstance(msg["result"], dict):
        raise ProtocolError("result is not an object")
    return msg["result"]


class RpcError(Exception):
    """The server answered with a JSON-RPC error (its message is not kept: it is server text)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"JSON-RPC error {code}")
        self.code = code


def check_initialize(result: dict[str, Any]) -> str:
    version = result.get("protocolVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise ProtocolError("unsupported protocolVersion")
    return version


def answer_server_request(msg: dict[str, Any]) -> bytes:
    """Reply to a server-to-client request: ``ping`` is answered, everything else is refused.

    We offer the server no capabilities (no sampling, roots, elicitation): a tool
    server must not reach back through the appliance.
    """
    if msg.get("method") == "ping":
        return dumps_compact({"jsonrpc": "2.0", "id": msg.get("id"), "result": {}})
    return dumps_compact({"jsonrpc": "2.0", "id": msg.get("id"),
                          "error": {"code": -32601, "message": "method not offered by this client"}})
