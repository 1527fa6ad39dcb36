"""The MCP server at /mcp (T-MCP-1): the official `mcp` client against a live
server (tools, runs in both languages, state across calls, files, tenant
isolation, no key), the transport's refusals over raw HTTP, and the pure rules
(message shapes, tool arguments, sessions) as attack tables."""
from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio
import mcp.client.session as mcp_client  # the official SDK (test extra, mcp==2.3.0)
import mcp.client.streamable_http as streamable_http
import mcp.shared._httpx_utils as httpx_utils
import pytest

from appliance.policy import mcp_server as rules
from tests.liveserver import ServerProcess

REPO = Path(__file__).resolve().parents[2]


def _session_run(srv: ServerProcess, key: str | None, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """Open the official client (Streamable HTTP + ClientSession), initialize, run ``body``."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}

    async def main() -> Any:
        async with httpx_utils.create_mcp_http_client(headers=headers) as http:
            async with streamable_http.streamable_http_client(srv.url + "/mcp", http_client=http) as (read, write):
                async with mcp_client.ClientSession(read, write) as session:
                    await session.initialize()
                    return await body(session)

    return anyio.run(main)


def _add_tenant(srv: ServerProcess, name: str) -> str:
    env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "tenant", "add", name], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return out.strip().rsplit(" ", 1)[-1]


def _text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


# -- the official client against a live server --------------------------------

def test_mcp_lists_the_tools_with_schemas(live: ServerProcess) -> None:
    async def body(session: Any) -> Any:
        return await session.list_tools()

    tools = {t.name: t for t in _session_run(live, live.api_key, body).tools}
    assert set(tools) == {"run_code", "create_cell", "delete_cell", "list_cells", "read_file", "write_file", "list_files"}
    assert "no network" in (tools["run_code"].description or "").lower()
    assert tools["run_code"].input_schema["required"] == ["code"]
    envs = tools["run_code"].input_schema["properties"]["envs"]
    assert envs["type"] == "object" and envs["maxProperties"] == 64 and envs["additionalProperties"]["type"] == "string"


def test_mcp_high_level_client_in_auto_mode_falls_back_to_initialize(live: ServerProcess) -> None:
    # mcp.Client probes server/discover (the stateless 2026-07-28 revision) first;
    # the answer -32601 sends it to the initialize handshake this server speaks.
    from mcp import Client

    async def main() -> Any:
        async with httpx_utils.create_mcp_http_client(headers={"Authorization": f"Bearer {live.api_key}"}) as http:
            async with Client(streamable_http.streamable_http_client(live.url + "/mcp", http_client=http)) as client:
                return await client.call_tool("run_code", {"code": "print(sum(range(10)))"})

    result = anyio.run(main)
    assert not result.is_error and result.structured_content["stdout"] == "45\n"


def test_mcp_run_code_python_then_javascript_and_state_kept_by_cell_id(live: ServerProcess) -> None:
    async def body(session: Any) -> Any:
        first = await session.call_tool("run_code", {"code": "x = 6 * 7\nprint('hello from python')"})
        cell_id = first.structured_content["cell_id"]
        second = await session.call_tool("run_code", {"code": "print(x + 1)", "cell_id": cell_id})
        js = await session.call_tool("run_code", {"code": "let y = 20; console.log('js', y + 1)", "language": "javascript"})
        js_again = await session.call_tool("run_code", {"code": "console.log(y * 2)",
                                                        "cell_id": js.structured_content["cell_id"]})
        return first, second, js, js_again

    first, second, js, js_again = _session_run(live, live.api_key, body)
    assert not first.is_error and "hello from python" in _text(first)
    sc = first.structured_content
    assert sc["status"] == "ok" and sc["stdout"] == "hello from python\n"
    assert len(sc["execution_id"]) == 36 and len(sc["receipt_hash"]) == 64
    assert sc["execution_id"] in _text(first) and sc["receipt_hash"] in _text(first)
    assert second.structured_content["stdout"] == "43\n" and second.structured_content["cell_id"] == sc["cell_id"]
    assert js.structured_content["stdout"] == "js 21\n"
    assert js_again.structured_content["stdout"] == "40\n"
    # The receipt is the one the HTTP API serves for this execution.
    status, receipt, _ = live.request("GET", f"/v1/receipts/{sc['execution_id']}")
    assert status == 200 and receipt["receipt_hash"] == sc["receipt_hash"]


def test_mcp_run_code_returns_a_chart_as_image_content(live: ServerProcess) -> None:
    async def body(session: Any) -> Any:
        return await session.call_tool("run_code", {"code": (
            "import matplotlib.pyplot as plt\nimport pandas as pd\n"
            "plt.figure(figsize=(4, 3), dpi=50)\nplt.plot([1, 3, 2])\nplt.show()\npd.DataFrame({'a': [1, 2]})"),
            "timeout_ms": 60000})

    result = _session_run(live, live.api_key, body)
    assert not result.is_error, _text(result)
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    png = base64.b64decode(images[0].data)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (200, 150)
    assert "<table" in _text(result)  # the DataFrame's HTML form


def test_mcp_run_code_streams_output_as_progress_when_asked(live: ServerProcess) -> None:
    # With a progress callback the client sends a progressToken: the answer is an
    # SSE stream, the output arriving as progress notifications before the result.
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async def body(session: Any) -> Any:
        return await session.call_tool("run_code", {"code": (
            "import sys\nprint('first', flush=True)\nprint('oops', file=sys.stderr, flush=True)\n"
            "print('last', flush=True)")}, progress_callback=on_progress)

    result = _session_run(live, live.api_key, body)
    assert not result.is_error and result.structured_content["stdout"] == "first\nlast\n"
    streamed = "".join(m or "" for _, m in seen)
    assert "first" in streamed and "last" in streamed and "[stderr] oops" in streamed, seen
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)  # progress only grows


def test_mcp_run_code_envs_are_for_that_run_only(live: ServerProcess) -> None:
    # As an exec's envs: set over the cell's own environment (HOME replaced, TMPDIR
    # kept) for this run, gone for the next run in the same cell.
    async def body(session: Any) -> Any:
        envs = {"A": "run", "HOME": "/over"}
        py = await session.call_tool("run_code", {"code": "import os; e = os.environ; print(e['A'], e['HOME'], e['TMPDIR'])",
                                                  "envs": envs})
        py_after = await session.call_tool("run_code", {"code": "import os; print(os.environ.get('A'), os.environ['HOME'])",
                                                        "cell_id": py.structured_content["cell_id"]})
        js = await session.call_tool("run_code", {"code": "console.log(process.env.A, std.getenv('HOME'))",
                                                  "language": "javascript", "envs": envs})
        js_after = await session.call_tool("run_code", {"code": "console.log(process.env.A ?? null, process.env.HOME)",
                                                        "cell_id": js.structured_content["cell_id"], "envs": {}})
        return py, py_after, js, js_after

    py, py_after, js, js_after = _session_run(live, live.api_key, body)
    assert not py.is_error and py.structured_content["stdout"] == "run /over /tmp\n", _text(py)
    assert py_after.structured_content["stdout"] == "None /data\n"
    assert not js.is_error and js.structured_content["stdout"] == "run /over\n", _text(js)
    assert js_after.structured_content["stdout"] == "null /data\n"


def test_mcp_guest_error_is_a_tool_error_with_stderr(live: ServerProcess) -> None:
    async def body(session: Any) -> Any:
        return await session.call_tool("run_code", {"code": "raise ValueError('boom')"})

    result = _session_run(live, live.api_key, body)
    assert result.is_error and result.structured_content["status"] == "error"
    assert "ValueError: boom" in _text(result)


def test_mcp_file_round_trip_and_cell_lifecycle(live: ServerProcess) -> None:
    async def body(session: Any) -> Any:
        made = await session.call_tool("create_cell", {})
        cid = made.structured_content["cell_id"]
        wrote = await session.call_tool("write_file", {"cell_id": cid, "path": "in/data.txt", "content": "a,b\n1,2\n"})
        ran = await session.call_tool("run_code", {"cell_id": cid, "code": (
            "t = open('/data/in/data.txt').read()\nopen('/data/out.txt', 'w').write(t.upper())\nprint(len(t))")})
        listed = await session.call_tool("list_files", {"cell_id": cid})
        read = await session.call_tool("read_file", {"cell_id": cid, "path": "out.txt"})
        cells = await session.call_tool("list_cells", {})
        gone = await session.call_tool("delete_cell", {"cell_id": cid})
        after = await session.call_tool("read_file", {"cell_id": cid, "path": "out.txt"})
        return cid, wrote, ran, listed, read, cells, gone, after

    cid, wrote, ran, listed, read, cells, gone, after = _session_run(live, live.api_key, body)
    assert not wrote.is_error and ran.structured_content["stdout"] == "8\n"
    assert {f["name"] for f in listed.structured_content["files"]} >= {"in", "out.txt"}
    assert _text(read) == "A,B\n1,2\n"
    assert cid in {c["cell_id"] for c in cells.structured_content["cells"]}
    assert not gone.is_error
    assert after.is_error and "cell_not_found" in _text(after)


@pytest.mark.parametrize("tool,arguments,expected", [
    ("read_file", {"cell_id": "{cid}", "path": "../../etc/passwd"}, "bad_path"),
    ("write_file", {"cell_id": "{cid}", "path": "/etc/x", "content": "y"}, "bad_path"),
    ("run_code", {"code": 42}, "code must be a string"),
    ("run_code", {"code": "1", "language": "ruby"}, "language must be one of"),
    ("run_code", {"code": "1", "cell_id": "{cid}", "language": "javascript"}, "language_mismatch"),
    ("run_code", {"code": "1", "timeout_ms": 10**9}, "out_of_range"),
    ("run_code", {"code": "1", "shell": True}, "unknown argument"),
    # T-ENV-1: the HTTP API's code for the same envs, from the same rules (validate.run_envs).
    ("run_code", {"code": "1", "envs": {"1BAD": "x"}}, "invalid_field: envs: invalid key"),
    ("run_code", {"code": "1", "envs": {"A": 5}}, "invalid_field: envs.A must be a string"),
    ("run_code", {"code": "1", "envs": ["A=1"]}, "invalid_field: envs must be an object"),
    ("run_code", {"code": "1", "cell_id": "{cid}", "envs": {"A": "x\x00"}}, "invalid_field: envs.A must be a string"),
    ("create_cell", {"timeout_ms": "soon"}, "timeout_ms must be an integer"),
    ("delete_cell", {}, "cell_id is required"),
])
def test_t_mcp_1_bad_tool_arguments_are_tool_errors(live: ServerProcess, tool: str, arguments: dict[str, Any],
                                                    expected: str) -> None:
    status, cell, _ = live.request("POST", "/v1/cells", {"template": "python3"})
    assert status == 201
    args = {k: (v.replace("{cid}", cell["cell_id"]) if isinstance(v, str) else v) for k, v in arguments.items()}

    async def body(session: Any) -> Any:
        return await session.call_tool(tool, args)

    result = _session_run(live, live.api_key, body)
    assert result.is_error and expected in _text(result), _text(result)


def test_t_mcp_1_another_tenants_cell_id_is_not_found(live: ServerProcess) -> None:
    mallory = _add_tenant(live, "mcp-mallory")
    _, cell, _ = live.request("POST", "/v1/cells", {"template": "python3"})
    cid = cell["cell_id"]
    live.request("POST", f"/v1/cells/{cid}/exec", {"code": "secret = 'victim'"})
    live.request("POST", f"/v1/cells/{cid}/files", {"path": "s.txt", "content": "victim"})

    async def body(session: Any) -> Any:
        return [await session.call_tool(tool, args) for tool, args in (
            ("run_code", {"code": "print(secret)", "cell_id": cid}),
            ("read_file", {"cell_id": cid, "path": "s.txt"}),
            ("write_file", {"cell_id": cid, "path": "s.txt", "content": "x"}),
            ("list_files", {"cell_id": cid}),
            ("delete_cell", {"cell_id": cid}),
        )] + [await session.call_tool("list_cells", {})]

    *attempts, listing = _session_run(live, mallory, body)
    for result in attempts:
        assert result.is_error and "cell_not_found" in _text(result) and "victim" not in _text(result)
    assert cid not in json.dumps(listing.structured_content)
    status, still, _ = live.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(secret)"})
    assert status == 200 and still["stdout"] == "victim\n"


def test_t_mcp_1_no_key_is_401_and_the_client_cannot_connect(live: ServerProcess) -> None:
    async def body(session: Any) -> Any:
        return await session.list_tools()

    for key in (None, "cell_forged"):
        with pytest.raises(BaseExceptionGroup) as caught:  # anyio task groups wrap the client's MCPError
            _session_run(live, key, body)
        assert "unauthorized" in repr(caught.value) or "bad_key" in repr(caught.value), repr(caught.value)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": rules.LATEST_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    for key in ("", "not-a-key"):
        status, answer, _ = live.request("POST", "/mcp", init, key=key)
        assert status == 401 and answer["error"]["data"]["code"] in ("unauthorized", "bad_key")


# -- the transport over raw HTTP ----------------------------------------------

def _init(srv: ServerProcess, key: str | None = None) -> str:
    status, answer, headers = srv.request("POST", "/mcp", {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "1999-01-01", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}},
        key=key)
    assert status == 200 and answer["result"]["protocolVersion"] == rules.LATEST_VERSION  # an unknown one is countered
    sid = {k.lower(): v for k, v in headers.items()}["mcp-session-id"]
    assert sid
    return sid


@pytest.mark.parametrize("raw,status,code", [
    (b"{not json", 400, rules.PARSE_ERROR),
    (b"[]", 400, rules.INVALID_REQUEST),
    (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', 400, rules.INVALID_REQUEST),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', 400, rules.INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}', 400, rules.INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}', 400, rules.INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "x", "extra": 1}', 400, rules.INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "resources/list"}', 200, rules.METHOD_NOT_FOUND),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "server/discover"}', 200, rules.METHOD_NOT_FOUND),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sh"}}', 200, rules.INVALID_PARAMS),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}', 200, rules.INVALID_PARAMS),
])
def test_t_mcp_1_protocol_errors(live: ServerProcess, raw: bytes, status: int, code: int) -> None:
    sid = _init(live)
    got, answer, _ = live.request("POST", "/mcp", raw=raw, headers={"Mcp-Session-Id": sid})
    assert got == status and answer["error"]["code"] == code, answer


def test_t_mcp_1_sessions_are_required_and_bound_to_their_tenant(live: ServerProcess) -> None:
    ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
    sid = _init(live)
    status, answer, _ = live.request("POST", "/mcp", ping, headers={"Mcp-Session-Id": sid})
    assert status == 200 and answer == {"jsonrpc": "2.0", "id": 7, "result": {}}
    assert live.request("POST", "/mcp", ping)[0] == 400  # no session id
    assert live.request("POST", "/mcp", ping, headers={"Mcp-Session-Id": "made-up"})[0] == 404
    assert live.request("POST", "/mcp", ping, headers={"Mcp-Session-Id": sid, "MCP-Protocol-Version": "1999-01-01"})[0] == 400
    other = _add_tenant(live, "mcp-eve")
    assert live.request("POST", "/mcp", ping, key=other, headers={"Mcp-Session-Id": sid})[0] == 404  # T-TENANT-1
    assert live.request("DELETE", "/mcp", key=other, headers={"Mcp-Session-Id": sid})[0] == 404
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert live.request("POST", "/mcp", note, headers={"Mcp-Session-Id": sid})[0] == 202
    assert live.request("POST", "/mcp", ping, headers={"Mcp-Session-Id": sid, "Origin": "http://evil.example"})[0] == 403
    assert live.request("GET", "/mcp", headers={"Mcp-Session-Id": sid})[0] == 405
    assert live.request("DELETE", "/mcp", headers={"Mcp-Session-Id": sid})[0] == 204
    assert live.request("POST", "/mcp", ping, headers={"Mcp-Session-Id": sid})[0] == 404  # ended


def test_t_mcp_1_body_limit_and_gate_apply_to_mcp(live: ServerProcess) -> None:
    sid = _init(live)
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "run_code", "arguments": {"code": "#" + "x" * 11_000_000}}}).encode()
    status, answer, _ = live.request("POST", "/mcp", raw=big, headers={"Mcp-Session-Id": sid})
    assert status == 413 and answer["error"]["data"]["code"] == "payload_too_large"
    status, answer, _ = live.request("POST", "/mcp", raw=b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', key="bogus")
    assert status == 401  # the body was never read (T-DOS-2)


# -- the pure rules ---------------------------------------------------------------

@pytest.mark.parametrize("data", [
    None, 1, "ping", [], [{"jsonrpc": "2.0", "id": 1, "method": "ping"}], {"id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1}, {"jsonrpc": "2.0", "id": 1, "method": ""}, {"jsonrpc": "2.0", "id": 1, "method": 5},
    {"jsonrpc": "2.0", "id": 1, "method": "m" * 129}, {"jsonrpc": "2.0", "id": True, "method": "ping"},
    {"jsonrpc": "2.0", "id": 2 ** 60, "method": "ping"}, {"jsonrpc": "2.0", "id": "i" * 129, "method": "ping"},
    {"jsonrpc": "2.0", "id": None, "method": "ping"}, {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"}, {"jsonrpc": "2.0", "id": 1, "method": "ping", "x": 1},
])
def test_t_mcp_1_malformed_messages_are_invalid_requests(data: Any) -> None:
    with pytest.raises(rules.RpcError) as caught:
        rules.parse_message(data)
    assert caught.value.code == rules.INVALID_REQUEST


def test_messages_requests_notifications_and_responses() -> None:
    assert rules.parse_message({"jsonrpc": "2.0", "id": "a", "method": "ping"}).is_request
    note = rules.parse_message({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert not note.is_request and note.id is None
    assert not rules.parse_message({"jsonrpc": "2.0", "id": 3, "result": {}}).is_request
    assert rules.negotiate_version({"protocolVersion": "2025-06-18"}) == "2025-06-18"
    assert rules.negotiate_version({"protocolVersion": "2099-01-01"}) == rules.LATEST_VERSION
    with pytest.raises(rules.RpcError):
        rules.negotiate_version({})


@pytest.mark.parametrize("tool,args", [
    ("run_code", {}), ("run_code", {"code": None}), ("run_code", {"code": "1", "cell_id": 5}),
    ("run_code", {"code": "1", "cell_id": "c" * 65}), ("run_code", {"code": "1", "timeout_ms": True}),
    ("run_code", {"code": "1", "timeout_ms": 1}), ("run_code", {"code": "1", "language": "Python"}),
    ("run_code", ["print(1)"]), ("list_cells", {"all_tenants": True}), ("read_file", {"cell_id": "c"}),
    ("read_file", {"cell_id": "c", "path": "p" * 4097}), ("write_file", {"cell_id": "c", "path": "p", "content": b"x"}),
    ("write_file", {"cell_id": "c", "path": "p", "content": "x", "encoding": "latin-1"}),
])
def test_t_mcp_1_tool_arguments_outside_the_schema_are_refused(tool: str, args: Any) -> None:
    with pytest.raises(rules.ToolArgsError):
        rules.tool_args(tool, args)


def test_t_mcp_1_run_code_envs_pass_the_schema_check_to_the_tool() -> None:
    # The schema check lets an object through; the tool checks it in full (validate.run_envs).
    assert rules.tool_args("run_code", {"code": "1", "envs": {"A": "b"}})["envs"] == {"A": "b"}


def test_t_mcp_1_an_argument_type_without_a_rule_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    props = next(t for t in rules.TOOLS if t["name"] == "run_code")["inputSchema"]["properties"]
    monkeypatch.setitem(props, "extra", {"type": "array"})
    with pytest.raises(rules.ToolArgsError, match="no rule"):
        rules.tool_args("run_code", {"code": "1", "extra": []})


def test_t_mcp_1_unknown_tool_is_invalid_params() -> None:
    with pytest.raises(rules.RpcError) as caught:
        rules.tool_args("exec_shell", {})
    assert caught.value.code == rules.INVALID_PARAMS


def test_t_mcp_1_sessions_bound_to_tenant_bounded_and_expiring() -> None:
    table = rules.Sessions(per_tenant=2, idle_s=10)
    a = table.open("alice", "2025-11-25", 0)
    assert table.use(a, "alice", 1) == "2025-11-25"
    assert table.use(a, "bob", 1) is None and not table.close(a, "bob")  # T-TENANT-1
    b, c = table.open("alice", "2025-11-25", 2), table.open("alice", "2025-11-25", 3)
    assert table.use(a, "alice", 4) is None  # the least recently used went
    assert table.use(b, "alice", 4) and table.use(c, "alice", 4)
    assert table.use(b, "alice", 20) is None  # idle past its limit
    d = table.open("alice", "2025-11-25", 30)
    assert table.close(d, "alice") and table.use(d, "alice", 30) is None
