"""Attack tests of the Pro host functions ``load_weights`` and ``host_mcp_call``.

Threats: T-PRO-1 (weights: traversal, symlinks, absolute names, special files,
hard links, writes, offset/size tricks), T-PRO-2 (MCP: guest-chosen address,
unknown server/tool/tenant, hang, 50 MB answer, malformed JSON-RPC, server
death, restart loops, environment leak), T-MEM-1 (pointers), T-IMPORT-1.
Every guest is a real WAT module run through ModuleRunner in a real Store;
every server is local: a stdio child (tests/mcp_fake_server.py) or a loopback
HTTP server in this file.
"""
from __future__ import annotations

import http.server
import inspect
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import wasmtime

from appliance import mcp
from appliance.confine import Volume
from appliance.policy import mcp as mcp_policy
from appliance.runtime import context, hostfuncs, modules, profuncs
from appliance.runtime.broker import Broker
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import ModuleRefused, ModuleRunner
from tests import broker_loop
from tests.appliance.test_httpclient import (
    ACCEPTED,
    ACCEPTED_BODY,
    DEADLINE_S,
    LIMIT,
    RESPONSE_ATTACKS,
    Answer,
    check_refused,
    ids,
    serve,
)

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "mcp_fake_server.py"
PAYLOAD_AT = 1024
BUF_AT = 1 << 20
OP_WEIGHTS, OP_MCP = 0, 1

PROBE = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "cell" "load_weights" (func $lw (param i32 i32 i64 i32 i32) (result i32)))
  (import "cell" "host_mcp_call" (func $mcp (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") __PAGES__)
  ;; 0: op (0 load_weights, 1 host_mcp_call); 4: a; 8: b; 12: echo result to stdout;
  ;; 16: i64 offset; 24: c (buffer); 28: d (max_len). 1024..: name / request bytes.
  (func (export "run") (result i32)
    (local $r i32)
    (local.set $r
      (if (result i32) (i32.eqz (i32.load (i32.const 0)))
        (then (call $lw (i32.load (i32.const 4)) (i32.load (i32.const 8)) (i64.load (i32.const 16))
                        (i32.load (i32.const 24)) (i32.load (i32.const 28))))
        (else (call $mcp (i32.load (i32.const 4)) (i32.load (i32.const 8))
                         (i32.load (i32.const 24)) (i32.load (i32.const 28))))))
    (if (i32.and (i32.gt_s (local.get $r) (i32.const 0)) (i32.ne (i32.load (i32.const 12)) (i32.const 0)))
      (then
        (i32.store (i32.const 32) (i32.load (i32.const 24)))
        (i32.store (i32.const 36) (local.get $r))
        (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40)))))
    (local.get $r))
  (data (i32.const 0) "__HEADER__")
  (data (i32.const 1024) "__PAYLOAD__"))
"""


def _escape(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def probe(op: int, a: int, b: int, offset: int, c: int, d: int, payload: bytes = b"", *, echo: bool = True,
          pages: int = 32) -> bytes:
    header = struct.pack("<4Iq2I", op, a & 0xFFFFFFFF, b & 0xFFFFFFFF, int(echo), offset,
                         c & 0xFFFFFFFF, d & 0xFFFFFFFF)
    return (PROBE.replace("__PAGES__", str(pages)).replace("__HEADER__", _escape(header))
            .replace("__PAYLOAD__", _escape(payload))).encode()


def weights_probe(name: str | bytes, offset: int = 0, max_len: int = 4096, **kw: Any) -> bytes:
    n = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else name
    return probe(OP_WEIGHTS, PAYLOAD_AT, len(n), offset, BUF_AT, max_len, n, **kw)


def mcp_probe(request: Any, max_len: int = 65536, **kw: Any) -> bytes:
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    return probe(OP_MCP, PAYLOAD_AT, len(raw), 0, BUF_AT, max_len, raw, **kw)


# -- runner: the proposed modules.py change, emulated until it lands ------------------

def _proposed_check_shape(self: ModuleRunner, module: wasmtime.Module, pro_allowed: bool) -> None:
    for imp in module.imports:
        name = imp.name or ""
        if imp.module == "cell":
            if name in modules.PRO_FUNCTIONS and not pro_allowed:
                raise ModuleRefused(403, "license_required", f"cell.{name} needs a Pro license")
            if name not in hostfuncs.FUNCTIONS and name not in profuncs.FUNCTIONS:
                raise ModuleRefused(400, "unknown_import", f"unknown import cell.{name}")
        elif imp.module != "wasi_snapshot_preview1":
            raise ModuleRefused(400, "unknown_import", f"unknown import {imp.module}.{name}")


@pytest.fixture(autouse=True)
def _pro_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    if "not_available" in inspect.getsource(ModuleRunner._check_shape):
        orig = ModuleRunner._check_shape

        def check(self: ModuleRunner, module: wasmtime.Module, pro_allowed: bool) -> None:
            _proposed_check_shape(self, module, pro_allowed)
            exports = {e.name for e in module.exports}
            if "memory" in exports and ("run" in exports or "_start" in exports):
                return
            orig(self, module, pro_allowed)

        monkeypatch.setattr(ModuleRunner, "_check_shape", check)


@pytest.fixture(scope="module")
def runner() -> Iterator[ModuleRunner]:
    rt = Runtimes(Path(tempfile.mkdtemp(prefix="cell-pro-cache-")))

    def factory() -> wasmtime.Linker:
        lk = rt.base_linker()
        lk.allow_shadowing = True  # modules.py may define these too once it links profuncs itself
        profuncs.define(lk)
        return lk

    yield ModuleRunner(rt.engine, factory)
    rt.close()


class Result:
    def __init__(self, code: int, status: str, stdout: str, denials: list[dict[str, str]], elapsed: float) -> None:
        self.code, self.status, self.stdout, self.denials, self.elapsed = code, status, stdout, denials, elapsed


# T-ESCAPE-3: every host_mcp_call test runs twice, in this process and through
# the supervisor's broker as a pooled worker makes the call (tests/broker_loop.py).
VIA = ["in_process", "broker"]
_via = ["in_process"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    name = metafunc.function.__name__
    if "via" in metafunc.fixturenames and ("mcp" in name or "pro_2" in name):
        metafunc.parametrize("via", VIA, indirect=True)


@pytest.fixture(autouse=True)
def via(request: pytest.FixtureRequest) -> Iterator[str]:
    _via[0] = getattr(request, "param", "in_process")
    yield _via[0]
    _via[0] = "in_process"


def run(runner: ModuleRunner, wat: bytes, cell_root: Path, *, weights: Volume | None = None,
        client: mcp.McpClient | None = None, timeout: float = 5.0, cap: int = 16 << 20,
        tenant: str = "tenant1", cell: str = "cell1") -> Result:
    module = runner.compile(wat, True, 8 << 20, True)
    ctx = context.RunContext(governor=None, tenant_id=tenant, cell_id=cell)  # type: ignore[arg-type]
    setattr(ctx, "weights", weights)  # proposed RunContext fields
    setattr(ctx, "mcp", client)
    if _via[0] == "broker" and client is not None:
        # The supervisor holds the client; the grant names the run's tenant, cell and licensed features.
        supervisor = Broker(SimpleNamespace(lanes_per_worker=2, mcp_servers=None))
        supervisor.set_mcp_client(client)
        ctx.broker = broker_loop.LoopbackCalls(
            supervisor, broker_loop.run_message(features=["host_mcp_call"], tenant=tenant, cell=cell), deadline_s=timeout)
    with Volume(str(cell_root)) as vol:
        ctx.volume = vol
        started = time.monotonic()
        out = runner.run(module, str(cell_root), ctx, timeout, 256 << 20, cap, None)
    return Result(out.exit_code, out.status, out.stdout, out.denials, time.monotonic() - started)


@pytest.fixture
def cell_root(tmp_path: Path) -> Path:
    root = tmp_path / "cell"
    root.mkdir(mode=0o700)
    return root


# ======================================================================================
# T-PRO-1: load_weights
# ======================================================================================

MODEL = bytes((i * 7 + 3) % 26 + 65 for i in range(100_000))  # printable, position-dependent


@pytest.fixture
def weights(tmp_path: Path) -> Iterator[tuple[Path, Volume]]:
    root = tmp_path / "weights"
    (root / "llama").mkdir(parents=True, mode=0o700)
    (root / "model.bin").write_bytes(MODEL)
    (root / "llama" / "shard-0.bin").write_bytes(b"SHARD0")
    vol = Volume(str(root))
    yield root, vol
    vol.close()


@pytest.mark.parametrize("offset,max_len", [(0, 4096), (4096, 4096), (99_000, 4096), (123, 1), (0, 100_000)])
def test_load_weights_reads_chunks_at_offsets(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume],
                                              offset: int, max_len: int) -> None:
    r = run(runner, weights_probe("model.bin", offset, max_len, pages=64), cell_root, weights=weights[1])
    expected = MODEL[offset: offset + max_len]
    assert r.code == len(expected)
    assert r.stdout == expected.decode()


def test_load_weights_subdirectory_and_whole_file_in_chunks(runner: ModuleRunner, cell_root: Path,
                                                            weights: tuple[Path, Volume]) -> None:
    assert run(runner, weights_probe("llama/shard-0.bin"), cell_root, weights=weights[1]).stdout == "SHARD0"
    got, offset = b"", 0
    while True:
        r = run(runner, weights_probe("model.bin", offset, 30_000, pages=64), cell_root, weights=weights[1])
        assert r.code >= 0
        if r.code == 0:
            break
        got += r.stdout.encode()
        offset += r.code
    assert got == MODEL


@pytest.mark.parametrize("offset", [100_000, 100_001, 1 << 40, (1 << 63) - 1])
def test_t_pro_1_offset_at_or_past_eof_is_zero(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume],
                                                offset: int) -> None:
    assert run(runner, weights_probe("model.bin", offset), cell_root, weights=weights[1]).code == 0


@pytest.mark.parametrize("offset", [-1, -(1 << 63), -4096])
def test_t_pro_1_negative_offset_is_invalid(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume],
                                            offset: int) -> None:
    assert run(runner, weights_probe("model.bin", offset), cell_root, weights=weights[1]).code == -3


def test_t_pro_1_max_len_capped_at_ten_million(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume]) -> None:
    root, vol = weights
    (root / "big.bin").write_bytes(b"\x01" * 10_000_123)
    # max_len 0x7FFFFFFF: served up to the ceiling, and memory holds exactly the ceiling past BUF_AT.
    pages = (BUF_AT + 10_000_000 + 65535) // 65536
    r = run(runner, weights_probe("big.bin", 0, 0x7FFFFFFF, echo=False, pages=pages), cell_root, weights=vol)
    assert r.code == 10_000_000
    r = run(runner, weights_probe("big.bin", 10_000_000, -1, echo=False, pages=pages), cell_root, weights=vol)
    assert r.code == 123


WEIGHT_TRAVERSALS = [
    "../cell/secret.txt", "../../etc/passwd", "/etc/passwd", "/data/model.bin", "/weights/model.bin", "..",
    "llama/../../x", "\x00model.bin", "model.bin\x00", "llama\\..\\..\\x", "\u2025/etc/passwd", "", ".", "/dev/zero",
    "/proc/self/environ",
]


@pytest.mark.parametrize("name", WEIGHT_TRAVERSALS)
def test_t_pro_1_traversal_and_absolute_names_denied(runner: ModuleRunner, cell_root: Path,
                                                     weights: tuple[Path, Volume], name: str) -> None:
    (cell_root / "secret.txt").write_text("CELL-SECRET")
    r = run(runner, weights_probe(name), cell_root, weights=weights[1])
    assert r.code == -1
    assert r.denials and r.denials[0]["threat"] == "T-PRO-1" and r.denials[0]["function"] == "load_weights"
    assert "SECRET" not in r.stdout and "root:" not in r.stdout


def test_t_pro_1_symlink_leaf_denied(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume],
                                     tmp_path: Path) -> None:
    root, vol = weights
    (tmp_path / "secret").write_text("TOP-SECRET")
    os.symlink(tmp_path / "secret", root / "out.bin")
    os.symlink("model.bin", root / "alias.bin")  # even a link that stays inside is refused
    for name in ("out.bin", "alias.bin"):
        r = run(runner, weights_probe(name), cell_root, weights=vol)
        assert r.code == -1 and "SECRET" not in r.stdout
        assert r.denials[0]["reason"] == "symlink"


def test_t_pro_1_symlinked_directory_denied(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume],
                                            tmp_path: Path) -> None:
    root, vol = weights
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_text("TOP-SECRET")
    os.symlink(outside, root / "linked")
    r = run(runner, weights_probe("linked/secret.bin"), cell_root, weights=vol)
    assert r.code == -1 and "SECRET" not in r.stdout


def test_t_pro_1_hard_link_to_outside_file_denied(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume],
                                                  tmp_path: Path) -> None:
    root, vol = weights
    secret = tmp_path / "hard-secret"
    secret.write_text("TOP-SECRET")
    os.link(secret, root / "hard.bin")
    r = run(runner, weights_probe("hard.bin"), cell_root, weights=vol)
    assert r.code == -1 and r.denials[0]["reason"] == "hard_link"


def test_t_pro_1_fifo_denied_without_hanging(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume]) -> None:
    root, vol = weights
    os.mkfifo(root / "pipe.bin")
    r = run(runner, weights_probe("pipe.bin"), cell_root, weights=vol, timeout=3.0)
    assert r.code == -1 and r.elapsed < 2.0
    assert r.denials[0]["reason"] == "special_file"


def test_t_pro_1_unix_socket_denied(runner: ModuleRunner, cell_root: Path, tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))  # short path for AF_UNIX
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(root / "s"))
        with Volume(str(root)) as vol:
            assert run(runner, weights_probe("s"), cell_root, weights=vol).code == -1
        sock.close()
    finally:
        for p in root.iterdir():
            p.unlink()
        root.rmdir()


def test_t_pro_1_directory_and_missing(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume]) -> None:
    assert run(runner, weights_probe("llama"), cell_root, weights=weights[1]).code == -6
    assert run(runner, weights_probe("nothere.bin"), cell_root, weights=weights[1]).code == -2
    assert run(runner, weights_probe("nothere/x.bin"), cell_root, weights=weights[1]).code == -2


@pytest.mark.parametrize("name", ["model.bin/", "model.bin//", "model.bin/.", "llama/shard-0.bin/"])
def test_t_pro_1_trailing_slash_on_weights_file_refused(runner: ModuleRunner, cell_root: Path,
                                                        weights: tuple[Path, Volume], name: str) -> None:
    # T-PATH-1 through load_weights: "model.bin/" is ENOTDIR (-3), never the file's bytes.
    r = run(runner, weights_probe(name), cell_root, weights=weights[1])
    assert r.code == -3 and r.stdout == ""
    assert run(runner, weights_probe("llama/"), cell_root, weights=weights[1]).code == -6


def test_t_pro_1_writes_impossible(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume]) -> None:
    root, vol = weights
    target = root / "model.bin"
    os.chmod(target, 0o444)
    os.chmod(root, 0o555)  # an O_RDWR/O_CREAT anywhere would now fail: every read still works
    try:
        before = os.stat(target)
        assert run(runner, weights_probe("model.bin", 10, 10), cell_root, weights=vol).code == 10
        # The cell's own write function reaches the cell volume, never the weights directory.
        from tests.guests import write_probe

        r = runner.run(runner.compile(write_probe("../weights/model.bin", b"PWNED").encode(), True, 8 << 20, False),
                       str(cell_root), _ctx_with_volume(cell_root), 5.0, 64 << 20, 1 << 20, None)
        assert r.exit_code == -1
        after = os.stat(target)
        assert (before.st_mtime_ns, before.st_size, before.st_ino) == (after.st_mtime_ns, after.st_size, after.st_ino)
        assert target.read_bytes() == MODEL
        assert sorted(p.name for p in root.iterdir()) == ["llama", "model.bin"]  # no temp files appeared
    finally:
        os.chmod(root, 0o700)
    # The ABI offers no write: only the two Pro functions exist, and neither takes a write path.
    assert profuncs.FUNCTIONS == ("load_weights", "host_mcp_call")


def _ctx_with_volume(root: Path) -> context.RunContext:
    ctx = context.RunContext(governor=None)  # type: ignore[arg-type]
    ctx.volume = Volume(str(root))
    return ctx


def test_t_pro_1_weights_off_denied(runner: ModuleRunner, cell_root: Path) -> None:
    r = run(runner, weights_probe("model.bin"), cell_root, weights=None)
    assert r.code == -1 and r.denials[0]["reason"] == "weights_off"


BAD_WEIGHT_SPANS = [
    pytest.param(-16, 4, BUF_AT, 16, id="negative-name-pointer"),
    pytest.param(0xFFFFFFF0, 32, BUF_AT, 16, id="name-pointer-near-4GiB"),
    pytest.param(PAYLOAD_AT, 0x7FFFFFFF, BUF_AT, 16, id="huge-name-length"),
    pytest.param(PAYLOAD_AT, 9, -1, 16, id="negative-buffer-pointer"),
    pytest.param(PAYLOAD_AT, 9, 32 * 65536 - 8, 64, id="buffer-past-end"),
    pytest.param(PAYLOAD_AT, 9, BUF_AT, -1, id="max-len-4GiB-capped-still-past-end"),
    pytest.param(PAYLOAD_AT, 9, 0, 0x7FFFFFFF, id="buffer-from-zero-past-end"),
]


@pytest.mark.parametrize("a,b,c,d", BAD_WEIGHT_SPANS)
def test_t_mem_1_load_weights_bad_pointers(runner: ModuleRunner, cell_root: Path, weights: tuple[Path, Volume],
                                           a: int, b: int, c: int, d: int) -> None:
    r = run(runner, probe(OP_WEIGHTS, a, b, 0, c, d, b"model.bin"), cell_root, weights=weights[1])
    assert r.code == -3


def test_t_import_1_pro_functions_need_license(runner: ModuleRunner) -> None:
    with pytest.raises(ModuleRefused) as info:
        runner.compile(weights_probe("model.bin"), True, 8 << 20, False)
    assert (info.value.status, info.value.code) == (403, "license_required")


def test_read_at_helper_refuses_negative_and_absolute(weights: tuple[Path, Volume]) -> None:
    from appliance.confine import ConfinementError

    for name, offset in (("model.bin", -1), ("/model.bin", 0)):
        with pytest.raises(ConfinementError):
            profuncs.read_at(weights[1], name, offset, 10)
    assert profuncs.read_at(weights[1], "model.bin", 5, 3) == MODEL[5:8]


# ======================================================================================
# T-PRO-2: host_mcp_call over stdio
# ======================================================================================

def stdio_config(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"command": [sys.executable, str(FAKE)]}
    spec.update(extra)
    return spec


def make_client(servers: dict[str, Any]) -> mcp.McpClient:
    return mcp.McpClient(mcp_policy.parse_config({"servers": servers}))


@pytest.fixture
def client() -> Iterator[mcp.McpClient]:
    c = make_client({
        "fake": stdio_config(),
        "limited": stdio_config(tools=["echo"]),
        "quick": stdio_config(timeout_ms=300),
        "tenant2only": stdio_config(tenants=["tenant2"]),
        "badver": stdio_config(env={"FAKE_MCP_VERSION": "1999-01-01"}),
    })
    yield c
    c.close()


def call(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient, server: str, tool: str,
         arguments: dict[str, Any] | None = None, **kw: Any) -> Result:
    req = {"server": server, "tool": tool, "arguments": arguments or {}}
    max_len = kw.pop("max_len", 65536)
    return run(runner, mcp_probe(req, max_len), cell_root, client=client, **kw)


def _text(stdout: str) -> str:
    result = json.loads(stdout)
    assert result["isError"] is False
    return str(result["content"][0]["text"])


def test_host_mcp_call_stdio_echo_roundtrip(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    r = call(runner, cell_root, client, "fake", "echo", {"q": "héllo", "n": [1, 2]})
    assert r.code == len(r.stdout.encode()) > 0
    assert json.loads(_text(r.stdout)) == {"n": [1, 2], "q": "héllo"}
    # One process per server per worker: the second call reuses it.
    pid1 = _text(call(runner, cell_root, client, "fake", "pid").stdout)
    pid2 = _text(call(runner, cell_root, client, "fake", "pid").stdout)
    assert pid1 == pid2


@pytest.mark.parametrize("request_json", [
    {"server": "fake", "tool": "echo", "url": "http://169.254.169.254/latest/meta-data/"},
    {"url": "http://127.0.0.1:22/", "tool": "echo"},
    {"server": "fake", "tool": "echo", "command": ["/bin/sh", "-c", "id"]},
    {"server": "fake", "tool": "echo", "env": {"LD_PRELOAD": "/tmp/x.so"}},
    {"server": "fake", "tool": "echo", "host": "10.0.0.1"},
    {"server": "fake", "tool": "echo", "arguments": {}, "extra": 1},
], ids=["url-beside-server", "url-only", "command", "env", "host", "unknown-field"])
def test_t_pro_2_guest_chosen_address_refused(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient,
                                              request_json: dict[str, Any]) -> None:
    r = run(runner, mcp_probe(request_json), cell_root, client=client)
    assert r.code == -1
    assert r.denials[0]["threat"] == "T-PRO-2"
    assert r.denials[0]["reason"] in ("guest_address", "unknown_field")
    assert client._servers == {}  # nothing was started, nothing was connected


@pytest.mark.parametrize("server", ["nope", "http://127.0.0.1:9000/mcp", "../fake", "FAKE", "a" * 65])
def test_t_pro_2_unknown_server_refused(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient, server: str) -> None:
    r = call(runner, cell_root, client, server, "echo")
    assert r.code == -1 and r.denials[0]["reason"] == "unknown_server"


def test_t_pro_2_tool_not_in_allow_list_refused(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    r = call(runner, cell_root, client, "limited", "env")
    assert r.code == -1 and r.denials[0]["reason"] == "tool_not_allowed"
    assert "limited" not in client._servers  # refused before the server was started
    assert call(runner, cell_root, client, "limited", "echo").code > 0


def test_t_pro_2_other_tenants_server_refused(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    assert call(runner, cell_root, client, "tenant2only", "echo", tenant="tenant1").code == -1
    assert call(runner, cell_root, client, "tenant2only", "echo", tenant="tenant2").code > 0


@pytest.mark.parametrize("raw", [
    b"not json", b"", b"[1]", b"\xff\xfe{}", b'{"server": "fake", "server": "fake", "tool": "echo"}',
    b'{"server": "fake", "tool": "echo", "arguments": {"x": NaN}}', b'{"server": "fake", "tool": "echo", "arguments": []}',
    b'{"server": 1, "tool": "echo"}', b'{"server": "fake", "tool": "ec ho"}', b'{"server": "fake", "tool": "echo\\n"}',
    b'{"server": "fake", "tool": "echo", "arguments": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
], ids=["text", "empty", "array", "bad-utf8", "duplicate-key", "nan", "args-not-object", "server-not-string",
        "tool-with-space", "tool-with-newline", "deep-nesting"])
def test_t_pro_2_bad_request_json_invalid(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient, raw: bytes) -> None:
    r = run(runner, mcp_probe(raw), cell_root, client=client)
    assert r.code == -3
    assert client._servers == {}


BAD_MCP_SPANS = [
    pytest.param(-16, 4, BUF_AT, 16, id="negative-request-pointer"),
    pytest.param(PAYLOAD_AT, 0x7FFFFFFF, BUF_AT, 16, id="huge-request-length"),
    pytest.param(0xFFFFFFFF, 8, BUF_AT, 16, id="request-pointer-wraps"),
    pytest.param(PAYLOAD_AT, 10, -1, 16, id="negative-buffer-pointer"),
    pytest.param(PAYLOAD_AT, 10, 32 * 65536 - 4, 64, id="buffer-past-end"),
]


@pytest.mark.parametrize("a,b,c,d", BAD_MCP_SPANS)
def test_t_mem_1_host_mcp_call_bad_pointers(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient,
                                            a: int, b: int, c: int, d: int) -> None:
    r = run(runner, probe(OP_MCP, a, b, 0, c, d, b'{"server":"fake","tool":"echo"}'), cell_root, client=client)
    assert r.code == -3


def _until_answered(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient, server: str, tool: str) -> Result:
    """The first answer of ``tool``: a server with a short per-call limit may
    need more than that limit to start on a loaded machine, and a call that
    starts it is then refused (-4); wait on the answer, never on a sleep."""
    deadline = time.monotonic() + 60
    while True:
        r = call(runner, cell_root, client, server, tool)
        if r.code > 0 or time.monotonic() > deadline:
            return r


def test_t_pro_2_hang_returns_minus_4_at_server_timeout_then_recovers(runner: ModuleRunner, cell_root: Path,
                                                                     client: mcp.McpClient) -> None:
    pid = _text(_until_answered(runner, cell_root, client, "quick", "pid").stdout)
    r = call(runner, cell_root, client, "quick", "hang", timeout=5.0)
    assert r.code == -4 and r.status != "timeout"  # the guest saw the code before its deadline
    assert r.elapsed < 0.3 + 0.7
    assert not _alive(int(pid))  # the overrunning server was killed (and reaped) ...
    assert _until_answered(runner, cell_root, client, "quick", "echo").code > 0  # ... and restarted on a later call


def test_t_pro_2_hang_bounded_by_run_deadline(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    pid = _text(call(runner, cell_root, client, "fake", "pid").stdout)
    r = call(runner, cell_root, client, "fake", "hang", timeout=1.0)
    # The host call returned -4 at the deadline; the guest either returned it or the governor stopped it first.
    assert r.status == "timeout" or r.code == -4
    assert r.elapsed < 1.0 + 0.5
    assert not _alive(int(pid))
    assert call(runner, cell_root, client, "fake", "echo").code > 0


def test_t_pro_2_hang_direct_call_returns_minus_4_within_deadline(client: mcp.McpClient) -> None:
    req = mcp_policy.McpRequest("fake", "hang", {})
    started = time.monotonic()
    with pytest.raises(mcp.McpError) as info:
        client.call(req, deadline=started + 0.5, max_bytes=4096)
    assert info.value.code == -4 and info.value.reason == "timeout"
    assert time.monotonic() - started < 0.5 + 0.3


def test_t_pro_2_huge_answer_is_minus_5(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    r = call(runner, cell_root, client, "fake", "huge", max_len=65536)
    assert r.code == -5 and r.elapsed < 3.0
    assert call(runner, cell_root, client, "fake", "echo").code > 0  # killed, restarted


def test_t_pro_2_huge_answer_buffers_at_most_cap_plus_overhead(client: mcp.McpClient) -> None:
    cap = 1 << 20
    req = mcp_policy.McpRequest("fake", "huge", {})
    client.call(mcp_policy.McpRequest("fake", "echo", {}), deadline=time.monotonic() + 10, max_bytes=4096)  # warm up
    tracemalloc.start()
    try:
        with pytest.raises(mcp.McpError) as info:
            client.call(req, deadline=time.monotonic() + 10, max_bytes=cap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == -5
    assert peak < cap + mcp.OVERHEAD + (512 << 10), peak  # measured ~cap + 250 KiB; the answer is 50 MB


@pytest.mark.parametrize("n,max_len,expected", [(50, 4096, "ok"), (1000, 100, -5), (9000, 9000, -5)])
def test_t_pro_2_result_over_max_len_is_minus_5_never_truncated(runner: ModuleRunner, cell_root: Path,
                                                                 client: mcp.McpClient, n: int, max_len: int,
                                                                 expected: Any) -> None:
    r = call(runner, cell_root, client, "fake", "big", {"n": n}, max_len=max_len)
    if expected == "ok":
        assert _text(r.stdout) == "x" * n
    else:
        assert r.code == expected and r.stdout == ""


@pytest.mark.parametrize("tool", ["garbage", "no_result"])
def test_t_pro_2_malformed_response_is_minus_4_then_recovers(runner: ModuleRunner, cell_root: Path,
                                                             client: mcp.McpClient, tool: str) -> None:
    assert call(runner, cell_root, client, "fake", tool).code == -4
    assert call(runner, cell_root, client, "fake", "echo").code > 0


def test_t_pro_2_rpc_error_is_minus_4_and_server_kept(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    pid = _text(call(runner, cell_root, client, "fake", "pid").stdout)
    assert call(runner, cell_root, client, "fake", "rpc_error").code == -4
    assert call(runner, cell_root, client, "fake", "nosuchtool").code == -4
    assert _text(call(runner, cell_root, client, "fake", "pid").stdout) == pid


def test_t_pro_2_server_death_mid_call_then_next_call_works(runner: ModuleRunner, cell_root: Path,
                                                            client: mcp.McpClient) -> None:
    pid = _text(call(runner, cell_root, client, "fake", "pid").stdout)
    r = call(runner, cell_root, client, "fake", "die")
    assert r.code == -4 and r.elapsed < 2.0
    new_pid = _text(call(runner, cell_root, client, "fake", "pid").stdout)
    assert new_pid != pid


def test_t_pro_2_crash_loop_is_restart_budgeted(client: mcp.McpClient) -> None:
    req = mcp_policy.McpRequest("fake", "die", {})
    started = time.monotonic()
    reasons = []
    for _ in range(20):
        with pytest.raises(mcp.McpError) as info:
            client.call(req, deadline=time.monotonic() + 5, max_bytes=4096)
        reasons.append(str(info.value))
    assert sum("restart budget" in r for r in reasons) >= 20 - mcp.RESTARTS
    assert time.monotonic() - started < 10


def test_t_pro_2_server_requests_get_no_capabilities(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    r = call(runner, cell_root, client, "fake", "chatty")
    assert json.loads(_text(r.stdout)) == {"ping": {}, "roots": -32601}


def test_t_pro_2_server_environment_is_minimal(runner: ModuleRunner, cell_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_LICENSE", "/secret/license.json")
    monkeypatch.setenv("CELL_TEST_SECRET", "leak")
    c = make_client({"s": stdio_config(env={"MODEL_DIR": "/models"})})
    try:
        names = json.loads(_text(call(runner, cell_root, c, "s", "env").stdout))
    finally:
        c.close()
    assert set(names) - {"LC_CTYPE"} == {"LANG", "MODEL_DIR", "PATH"}  # LC_CTYPE: set by Python itself


def test_t_pro_2_unsupported_protocol_version_refused(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient) -> None:
    assert call(runner, cell_root, client, "badver", "echo").code == -4


def test_t_pro_2_mcp_off_denied(runner: ModuleRunner, cell_root: Path) -> None:
    r = run(runner, mcp_probe({"server": "fake", "tool": "echo"}), cell_root, client=None)
    assert r.code == -1 and r.denials[0]["reason"] == "mcp_off"


def test_t_pro_2_every_call_logged_with_tenant_and_cell(runner: ModuleRunner, cell_root: Path, client: mcp.McpClient,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cell.mcp")
    call(runner, cell_root, client, "fake", "echo", {"secret": "s3cr3t-arg"}, tenant="acme", cell="c42")
    call(runner, cell_root, client, "nope", "echo", tenant="acme", cell="c42")
    run(runner, mcp_probe({"server": "fake", "tool": "echo", "url": "http://x/"}), cell_root, client=client,
        tenant="acme", cell="c42")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "cell.mcp"]
    assert len(lines) == 3
    assert all("tenant=acme" in line and "cell=c42" in line for line in lines)
    assert "outcome=ok" in lines[0] and "tool=echo" in lines[0]
    assert "denied:unknown_server" in lines[1]
    assert "refused:guest_address" in lines[2]
    assert not any("s3cr3t" in line for line in lines)  # arguments are never logged


def test_client_close_kills_servers(client: mcp.McpClient) -> None:
    out = client.call(mcp_policy.McpRequest("fake", "pid", {}), deadline=time.monotonic() + 10, max_bytes=4096)
    pid = int(json.loads(out)["content"][0]["text"])
    client.close()
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): look at its state
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ======================================================================================
# T-PRO-2: host_mcp_call over HTTP (loopback fake)
# ======================================================================================

class FakeHttpMcp(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.sessions: set[str] = set()
        self.expire_next = False
        self.answer: Answer | None = None  # what the "raw" tool plays on the wire
        self.stop = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client closing mid-answer is the point of several tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeHttpMcp
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        msg = json.loads(body)
        self.server.requests.append({"path": self.path, "msg": msg, "session": self.headers.get("Mcp-Session-Id"),
                                     "version": self.headers.get("MCP-Protocol-Version"),
                                     "auth": self.headers.get("Authorization")})
        method, msg_id = msg.get("method"), msg.get("id")
        if method == "initialize":
            sid = f"sess-{len(self.server.sessions)}"
            self.server.sessions.add(sid)
            return self._json(200, {"jsonrpc": "2.0", "id": msg_id, "result": {
                "protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "h"}}},
                {"Mcp-Session-Id": sid})
        if self.headers.get("Mcp-Session-Id") not in self.server.sessions:
            return self._json(400, {"error": "no session"})
        if method == "notifications/initialized":
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.expire_next:
            self.server.expire_next = False
            self.server.sessions.clear()
            return self._json(404, {"error": "session expired"})
        tool, args = msg["params"]["name"], msg["params"].get("arguments", {})
        result = {"content": [{"type": "text", "text": json.dumps(args, sort_keys=True)}], "isError": False}
        if tool == "echo" and self.path == "/sse":
            data = json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in ('event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n',
                          f"id: 1\ndata: {data}\n\n"):
                raw = event.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
                self.wfile.flush()
            time.sleep(3)  # keeps the stream open: the client must stop at its answer
        elif tool == "echo":
            self._json(200, {"jsonrpc": "2.0", "id": msg_id, "result": result})
        elif tool == "hang":
            time.sleep(5)
        elif tool == "huge_length":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
            self._flood(50)
        elif tool in ("huge_chunked", "huge_close"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if tool == "huge_chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(_CHUNK if tool == "huge_chunked" else _PIECE)
            self.close_connection = True
        elif tool == "redirect":
            self.send_response(307)
            self.send_header("Location", str(args.get("to")))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif tool == "garbage":
            body = b"<html>not json</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif tool == "wrong_id":
            self._json(200, {"jsonrpc": "2.0", "id": 999999, "result": result})
        elif tool == "not_rpc":
            self._json(200, {"result": result})
        elif tool == "status500":
            self._json(500, {"error": "boom"})
        elif tool == "raw" and self.server.answer is not None:
            self.close_connection = True
            serve(self.connection, self.server.answer, self.server.stop)

    def _flood(self, mb: int) -> None:
        for _ in range(mb):
            self.wfile.write(_PIECE)


# Built once, before any test traces memory: the fake's own writes must not count as the client's.
_PIECE = b"A" * (1 << 20)
_CHUNK = b"%x\r\n%s\r\n" % (len(_PIECE), _PIECE)


@pytest.fixture
def http_server() -> Iterator[FakeHttpMcp]:
    server = FakeHttpMcp()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_client(http_server: FakeHttpMcp) -> Iterator[mcp.McpClient]:
    c = make_client({
        "web": {"url": http_server.url + "/mcp", "headers": {"Authorization": "Bearer operator-token"}},
        "sse": {"url": http_server.url + "/sse"},
        "quickweb": {"url": http_server.url + "/mcp", "timeout_ms": 300},
    })
    yield c
    c.close()


def test_host_mcp_call_http_echo_with_session(runner: ModuleRunner, cell_root: Path, http_client: mcp.McpClient,
                                              http_server: FakeHttpMcp) -> None:
    r = call(runner, cell_root, http_client, "web", "echo", {"a": 1})
    assert json.loads(_text(r.stdout)) == {"a": 1}
    call(runner, cell_root, http_client, "web", "echo", {"a": 2})
    methods = [q["msg"].get("method") for q in http_server.requests]
    assert methods == ["initialize", "notifications/initialized", "tools/call", "tools/call"]  # one handshake
    assert all(q["path"] == "/mcp" and q["auth"] == "Bearer operator-token" for q in http_server.requests)
    assert http_server.requests[-1]["session"] == "sess-0" and http_server.requests[-1]["version"] == "2025-06-18"


def test_host_mcp_call_http_sse_answer(runner: ModuleRunner, cell_root: Path, http_client: mcp.McpClient) -> None:
    r = call(runner, cell_root, http_client, "sse", "echo", {"b": 2})
    assert json.loads(_text(r.stdout)) == {"b": 2}
    assert r.elapsed < 2.0  # stopped reading at its answer although the stream stayed open


def test_host_mcp_call_http_expired_session_reinitialises(runner: ModuleRunner, cell_root: Path,
                                                          http_client: mcp.McpClient, http_server: FakeHttpMcp) -> None:
    assert call(runner, cell_root, http_client, "web", "echo").code > 0
    http_server.expire_next = True
    assert call(runner, cell_root, http_client, "web", "echo").code > 0
    assert [q["msg"].get("method") for q in http_server.requests].count("initialize") == 2


def test_t_pro_2_http_hang_returns_within_deadline(runner: ModuleRunner, cell_root: Path, http_client: mcp.McpClient) -> None:
    r = call(runner, cell_root, http_client, "quickweb", "hang")
    assert r.code == -4 and r.elapsed < 0.3 + 0.7
    r = call(runner, cell_root, http_client, "web", "hang", timeout=1.0)
    assert (r.status == "timeout" or r.code == -4) and r.elapsed < 1.5


@pytest.mark.parametrize("tool", ["huge_length", "huge_chunked", "huge_close"])
def test_t_pro_2_http_huge_answer_is_minus_5(runner: ModuleRunner, cell_root: Path, http_client: mcp.McpClient,
                                             tool: str) -> None:
    r = call(runner, cell_root, http_client, "web", tool, max_len=65536)
    assert r.code == -5 and r.elapsed < 3.0


@pytest.mark.parametrize("tool", ["huge_chunked", "huge_close"])
def test_t_pro_2_http_huge_answer_buffers_at_most_cap_plus_overhead(http_client: mcp.McpClient, tool: str) -> None:
    cap = 1 << 20
    http_client.call(mcp_policy.McpRequest("web", "echo", {}), deadline=time.monotonic() + 10, max_bytes=4096)
    tracemalloc.start()
    try:
        with pytest.raises(mcp.McpError) as info:
            http_client.call(mcp_policy.McpRequest("web", tool, {}), deadline=time.monotonic() + 10, max_bytes=cap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == -5
    assert peak < cap + mcp.OVERHEAD + (512 << 10), peak  # measured ~cap + 250 KiB; the answer is 50 MB


def test_t_pro_2_http_redirect_not_followed(runner: ModuleRunner, cell_root: Path, http_client: mcp.McpClient,
                                            http_server: FakeHttpMcp) -> None:
    other = FakeHttpMcp()
    thread = threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        r = call(runner, cell_root, http_client, "web", "redirect", {"to": other.url + "/mcp"})
        assert r.code == -4
        assert other.requests == []  # the operator's URL is the only address ever contacted
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.parametrize("tool", ["garbage", "wrong_id", "not_rpc", "status500"])
def test_t_pro_2_http_malformed_response_is_minus_4(runner: ModuleRunner, cell_root: Path, http_client: mcp.McpClient,
                                                    tool: str) -> None:
    assert call(runner, cell_root, http_client, "web", tool).code == -4
    assert call(runner, cell_root, http_client, "web", "echo").code > 0


def _raw_call(server: FakeHttpMcp, answer: Answer, deadline_s: float) -> bytes:
    """One tools/call whose HTTP answer is ``answer``, through a fresh client (so the call's id is 2)."""
    server.answer = answer
    c = make_client({"web": {"url": server.url + "/mcp"}})
    try:
        # max_bytes + OVERHEAD is the body cap: the same LIMIT the table uses on every path.
        return c.call(mcp_policy.McpRequest("web", "raw", {}), deadline=time.monotonic() + deadline_s,
                      max_bytes=LIMIT - mcp.OVERHEAD)
    finally:
        c.close()


@pytest.mark.parametrize("answer", RESPONSE_ATTACKS, ids=ids(RESPONSE_ATTACKS))
def test_t_pro_2_http_refuses_malformed_answer(http_server: FakeHttpMcp, answer: Answer) -> None:
    # The shared reader's attack table (tests/appliance/test_httpclient.py) as the tools/call answer.
    err = check_refused(answer, lambda: _raw_call(http_server, answer, answer.deadline_s), mcp.McpError, "detail")
    assert isinstance(err, mcp.McpError) and err.code == (-5 if answer.reason == "too_large" else -4)
    assert [q["msg"].get("method") for q in http_server.requests] == [
        "initialize", "notifications/initialized", "tools/call"]  # refused at the answer, not before


@pytest.mark.parametrize("answer", ACCEPTED, ids=ids(ACCEPTED))
def test_host_mcp_call_http_accepts_well_formed_answer(http_server: FakeHttpMcp, answer: Answer) -> None:
    assert ACCEPTED_BODY[answer.name].startswith(b'{"jsonrpc":"2.0","id":2,')
    assert json.loads(_raw_call(http_server, answer, DEADLINE_S)) == {"content": [], "isError": False}


def test_t_pro_2_http_server_down_is_minus_4(runner: ModuleRunner, cell_root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    c = make_client({"down": {"url": f"http://127.0.0.1:{port}/mcp"}})
    try:
        assert call(runner, cell_root, c, "down", "echo").code == -4
    finally:
        c.close()


# ======================================================================================
# Config parsing (pure) and layering
# ======================================================================================

BAD_CONFIGS = [
    pytest.param({}, id="no-servers"),
    pytest.param({"servers": {"a": {}}}, id="neither-command-nor-url"),
    pytest.param({"servers": {"a": {"command": ["x"], "url": "http://127.0.0.1/"}}}, id="both"),
    pytest.param({"servers": {"a": {"command": "python server.py"}}}, id="command-string-not-argv"),
    pytest.param({"servers": {"a": {"command": []}}}, id="empty-argv"),
    pytest.param({"servers": {"a": {"command": ["x"], "shell": True}}}, id="unknown-field"),
    pytest.param({"servers": {"a": {"url": "http://user:pw@127.0.0.1/mcp"}}}, id="userinfo"),
    pytest.param({"servers": {"a": {"url": "http://127.0.0.1/mcp#frag"}}}, id="fragment"),
    pytest.param({"servers": {"a": {"url": "file:///etc/passwd"}}}, id="file-scheme"),
    pytest.param({"servers": {"a": {"url": "http://127.0.0.1:99999/"}}}, id="bad-port"),
    pytest.param({"servers": {"a": {"url": "http://127.0.0.1/\r\nX: y"}}}, id="crlf-in-url"),
    pytest.param({"servers": {"a": {"url": "http://127.0.0.1/", "headers": {"Host": "evil"}}}}, id="reserved-header"),
    pytest.param({"servers": {"a": {"url": "http://127.0.0.1/", "headers": {"X": "a\r\nb"}}}}, id="crlf-header"),
    pytest.param({"servers": {"a": {"url": "http://127.0.0.1/", "env": {"A": "b"}}}}, id="env-on-http"),
    pytest.param({"servers": {"a b": {"command": ["x"]}}}, id="bad-name"),
    pytest.param({"servers": {"a": {"command": ["x"], "timeout_ms": 600000}}}, id="timeout-over-ceiling"),
    pytest.param({"servers": {"a": {"command": ["x"], "tools": "echo"}}}, id="tools-not-list"),
    pytest.param({"servers": {"a": {"command": ["x"], "cwd": "relative"}}}, id="relative-cwd"),
]


@pytest.mark.parametrize("data", BAD_CONFIGS)
def test_t_pro_2_config_rejects(data: Any) -> None:
    with pytest.raises(mcp_policy.McpConfigError):
        mcp_policy.parse_config(data)


def test_config_parses_both_transports(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": {
        "files": {"command": ["/usr/bin/python3", "srv.py"], "env": {"K": "V"}, "tools": ["echo"], "timeout_ms": 5000},
        "search": {"url": "http://127.0.0.1:9000/mcp", "tenants": ["acme"]},
        "v6": {"url": "https://[::1]/mcp"},
    }}))
    cfg = mcp.load_config(path)
    files, search, v6 = cfg.servers["files"], cfg.servers["search"], cfg.servers["v6"]
    assert (files.transport, files.command, files.env, files.tools, files.timeout_s) == (
        "stdio", ("/usr/bin/python3", "srv.py"), (("K", "V"),), frozenset({"echo"}), 5.0)
    assert (search.transport, search.host, search.port, search.path, search.tls) == ("http", "127.0.0.1", 9000, "/mcp", False)
    assert (v6.host, v6.port, v6.tls) == ("::1", 443, True)
    assert mcp.from_env({"SYNAPSE_MCP_SERVERS": str(path)}) is not None
    assert mcp.from_env({}) is None
    path.write_text('{"servers": {"a": {"command": ["x"]}, "a": {"command": ["y"]}}}')
    with pytest.raises(mcp_policy.McpConfigError):
        mcp.load_config(path)  # duplicate keys are refused, not "last one wins"


def test_policy_mcp_is_pure() -> None:
    forbidden = {"socket", "ssl", "subprocess", "select", "wasmtime", "sqlite3", "flask", "urllib.request"}
    code = "import sys, json; import appliance.policy.mcp; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                           cwd=REPO).stdout))
    assert not (loaded & forbidden), loaded & forbidden


def test_host_callbacks_survive_missing_context() -> None:
    # Called with no current run (a bug elsewhere): a code, never an exception into wasmtime.
    context.enter(None)
    assert profuncs.load_weights(None, 0, 0, 0, 0, 0) == -1  # type: ignore[arg-type]
    assert profuncs.host_mcp_call(None, 0, 0, 0, 0) == -1  # type: ignore[arg-type]
    ctx = context.RunContext(governor=None)  # type: ignore[arg-type]
    setattr(ctx, "weights", object())
    setattr(ctx, "mcp", object())
    context.enter(ctx)
    try:
        assert profuncs.load_weights(None, 0, 0, 0, 0, 0) == -4  # type: ignore[arg-type]
        assert profuncs.host_mcp_call(None, 0, 0, 0, 0) == -4  # type: ignore[arg-type]
    finally:
        context.enter(None)


