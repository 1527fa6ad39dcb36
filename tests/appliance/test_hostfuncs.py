"""Attack tests of the ``cell`` host functions through real WAT guests.

Threats: T-MEM-1 (guest pointers), T-PATH-1/2 (confinement), T-SSRF-1
(egress), T-DOS-1 (limits), T-IMPORT-1 (imports). Every guest here runs in a
real wasmtime Store through the same ModuleRunner the workers use.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.confine import Volume
from appliance.policy.egress import EgressPolicy
from appliance.runtime import context
from appliance.runtime.loader import Runtimes
from appliance.runtime.modules import ModuleRefused, ModuleRunner
from tests import broker_loop, guests

WASM_DIR = guests.WASM_DIR
PAGE = 65536


@pytest.fixture(scope="module")
def runner() -> Iterator[ModuleRunner]:
    rt = Runtimes(Path(tempfile.mkdtemp(prefix="cell-hf-cache-")))
    yield ModuleRunner(rt.engine, rt.base_linker)
    rt.close()


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[tuple[Path, Volume]]:
    root = tmp_path / "vol"
    root.mkdir(mode=0o700)
    vol = Volume(str(root))
    yield root, vol
    vol.close()


def probe(op: int, a: int, b: int, c: int, d: int, payload: bytes = b"") -> bytes:
    return guests.probe(op, a, b, c, d, payload).encode()


VIA = ["in_process", "broker"]  # T-ESCAPE-3: host_fetch here, and through the supervisor's broker as a worker makes it


SENT: list[broker_loop.LoopbackCalls] = []  # the brokers of the runs above, newest last


def broker() -> Any:
    from appliance.runtime.broker import Broker

    return Broker(SimpleNamespace(lanes_per_worker=2, mcp_servers=None))


def run(runner: ModuleRunner, wat: bytes, vol_root: Path, vol: Volume | None, *, egress: EgressPolicy | None = None,
        timeout: float = 5.0, memory: int = 64 << 20, pro: bool = False,
        via: str = "in_process") -> tuple[int, str, list[dict[str, str]]]:
    module = runner.compile(wat, True, 8 << 20, pro)
    ctx = context.RunContext(governor=None, volume=vol, egress=egress)  # type: ignore[arg-type]
    if via == "broker":
        ctx.broker = broker_loop.LoopbackCalls(broker(), broker_loop.run_message(broker_loop.spec_of(egress)))
        SENT.append(ctx.broker)
    out = runner.run(module, str(vol_root), ctx, timeout, memory, 1 << 20, None)
    return out.exit_code, out.status, out.denials


# -- T-MEM-1: every pointer and length is checked before use ------------------
BAD_SPANS = [
    pytest.param(0, -16, 4, 2048, 16, id="negative-path-pointer"),
    pytest.param(0, 0xFFFFFFF0, 32, 2048, 16, id="path-pointer-near-4GiB"),
    pytest.param(0, PAGE - 4, 100, 2048, 16, id="path-runs-past-end"),
    pytest.param(0, 1024, 0x7FFFFFFF, 2048, 16, id="huge-path-length"),
    pytest.param(0, 1024, 8, -1, 16, id="negative-buffer-pointer"),
    pytest.param(0, 1024, 8, PAGE - 8, 64, id="buffer-past-end"),
    pytest.param(0, 1024, 8, 2048, -1, id="max-len-4GiB-capped-still-past-end"),
    pytest.param(1, 1024, 8, PAGE - 2, 64, id="write-source-past-end"),
    pytest.param(1, 1024, 8, 2048, 0x7FFFFFFF, id="write-length-huge"),
    pytest.param(1, -1, 8, 2048, 4, id="write-negative-path-pointer"),
    pytest.param(2, 0xFFFFFFFF, 8, 2048, 16, id="fetch-pointer-wraps"),
]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("op,a,b,c,d", BAD_SPANS)
def test_t_mem_1_out_of_bounds_arguments_refused(runner: ModuleRunner, volume: tuple[Path, Volume], op: int, a: int, b: int,
                                                 c: int, d: int, via: str) -> None:
    root, vol = volume
    egress = EgressPolicy(enabled=True)
    code, status, _ = run(runner, probe(op, a, b, c, d, b"file.txt"), root, vol, egress=egress, via=via)
    assert status in ("ok", "error")
    assert code in (-3, -5) or (op == 2 and code == -1), code


# -- T-PATH-1 / T-PATH-2: confinement through the host functions ---------------
TRAVERSALS = [
    "../../../../../../etc/passwd", "/etc/passwd", "..", "a/../../etc/passwd", "/data/../etc/passwd",
    "\x00etc/passwd", "./../x", "//etc/passwd", "dir/\x7f", "\u2025/etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_t_path_1_host_fs_read_traversal_denied(runner: ModuleRunner, volume: tuple[Path, Volume], path: str) -> None:
    root, vol = volume
    p = path.encode()
    code, _, denials = run(runner, probe(0, 1024, len(p), 4096, 4096, p), root, vol)
    assert code < 0
    if code == -1:
        assert denials and denials[0]["threat"] == "T-PATH-1"


def test_t_path_2_symlink_out_denied_for_read(runner: ModuleRunner, volume: tuple[Path, Volume], tmp_path: Path) -> None:
    root, vol = volume
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    os.symlink(secret, root / "link.txt")
    code, _, _ = run(runner, probe(0, 1024, 8, 4096, 4096, b"link.txt"), root, vol)
    assert code == -1


def test_t_path_2_write_through_symlinked_dir_denied(runner: ModuleRunner, volume: tuple[Path, Volume], tmp_path: Path) -> None:
    root, vol = volume
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "d")
    data = b"d/new.txt" + b"PWNED"
    code, _, _ = run(runner, probe(1, 1024, 9, 1033, 5, data), root, vol)
    assert code == -1
    assert not (outside / "new.txt").exists()


def test_t_path_2_write_through_dangling_symlink_denied(runner: ModuleRunner, volume: tuple[Path, Volume], tmp_path: Path) -> None:
    root, vol = volume
    target = tmp_path / "created-by-guest.txt"
    os.symlink(target, root / "dangling.txt")
    data = b"dangling.txt" + b"PWNED"
    code, _, _ = run(runner, probe(1, 1024, 12, 1036, 5, data), root, vol)
    assert code == -1
    assert not target.exists()


# T-PATH-1: "notes.txt/" names a directory or nothing; the file is never read
# or replaced through it. Both resolvers: openat2 and the no-follow walker.
TRAILING_FILE_FORMS = ["notes.txt/", "notes.txt//", "notes.txt/.", "notes.txt/./", "/data/notes.txt/",
                       "dir/notes.txt/", "dir/notes.txt/.", "new.txt/"]


@pytest.fixture(params=["openat2", "walk"])
def notes_volume(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Volume]]:
    root = tmp_path / "vol"
    (root / "dir").mkdir(mode=0o700, parents=True)
    (root / "notes.txt").write_bytes(b"public-notes")
    (root / "dir" / "notes.txt").write_bytes(b"public-notes")
    with Volume(str(root), resolver=request.param) as vol:
        assert vol.resolver == request.param
        yield root, vol


@pytest.mark.parametrize("path", TRAILING_FILE_FORMS)
def test_t_path_1_host_fs_trailing_slash_on_file_refused(runner: ModuleRunner, notes_volume: tuple[Path, Volume],
                                                         path: str) -> None:
    root, vol = notes_volume
    p = path.encode()
    code, _, _ = run(runner, probe(0, 1024, len(p), 4096, 4096, p), root, vol)
    assert code == (-2 if path.startswith("new") else -3)  # ENOTDIR, as POSIX; a missing name is -2
    code, _, _ = run(runner, probe(1, 1024, len(p), 1024 + len(p), 5, p + b"PWNED"), root, vol)
    assert code == -3
    assert (root / "notes.txt").read_bytes() == b"public-notes"
    assert (root / "dir" / "notes.txt").read_bytes() == b"public-notes"
    assert sorted(os.listdir(root)) == ["dir", "notes.txt"] and os.listdir(root / "dir") == ["notes.txt"]


@pytest.mark.parametrize("path", ["dir/", "dir//", "dir/.", "/data/dir/"])
def test_t_path_1_host_fs_trailing_slash_on_directory_is_a_directory(runner: ModuleRunner,
                                                                     notes_volume: tuple[Path, Volume], path: str) -> None:
    root, vol = notes_volume
    p = path.encode()
    assert run(runner, probe(0, 1024, len(p), 4096, 4096, p), root, vol)[0] == -6
    assert run(runner, probe(1, 1024, len(p), 1024 + len(p), 5, p + b"PWNED"), root, vol)[0] == -6
    assert os.listdir(root / "dir") == ["notes.txt"]


def test_host_fs_write_then_read_roundtrip(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    data = b"notes.txt" + b"hello host"
    code, status, _ = run(runner, probe(1, 1024, 9, 1033, 10, data), root, vol)
    assert code == 10  # run() returns the host function's byte count
    assert (root / "notes.txt").read_bytes() == b"hello host"
    code, _, _ = run(runner, probe(0, 1024, 9, 4096, 4096, b"notes.txt"), root, vol)
    assert code == 10


def test_host_fs_read_missing_file_is_not_found(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    code, _, _ = run(runner, probe(0, 1024, 7, 4096, 16, b"nothere"), root, vol)
    assert code == -2


# -- T-SSRF-1: egress -----------------------------------------------------------
SSRF_URLS = [
    "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:8080/", "http://localhost/", "http://10.0.0.1/",
    "http://192.168.1.1/", "http://172.16.0.1/", "http://[::1]/", "http://2130706433/", "http://0x7f.1/",
    "http://printer.local/", "file:///etc/passwd", "http://user@169.254.169.254/",
]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("url", SSRF_URLS)
def test_t_ssrf_1_host_fetch_denied_with_egress_on(runner: ModuleRunner, volume: tuple[Path, Volume], url: str,
                                                   via: str) -> None:
    root, vol = volume
    u = url.encode()
    code, _, denials = run(runner, probe(2, 1024, len(u), 4096, 4096, u), root, vol, egress=EgressPolicy(enabled=True),
                           via=via)
    assert code == -1
    assert denials[0]["threat"] == "T-SSRF-1"
    if via == "broker":  # the supervisor decided, on the frame the worker sent
        assert [type(f).__name__ for f in SENT[-1].frames] == ["FetchCall"] and SENT[-1].frames[0].url == url


@pytest.mark.parametrize("via", VIA)
def test_t_ssrf_1_host_fetch_denied_when_air_gapped(runner: ModuleRunner, volume: tuple[Path, Volume], via: str) -> None:
    root, vol = volume
    u = b"https://example.com/"
    code, _, denials = run(runner, probe(2, 1024, len(u), 4096, 4096, u), root, vol, egress=None, via=via)
    assert code == -1
    assert denials[0]["reason"] == "egress_off"


# -- T-DOS-1: limits ---------------------------------------------------------------
def test_t_dos_1_spin_stopped_at_deadline(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    import time

    t = time.monotonic()
    _, status, _ = run(runner, (WASM_DIR / "spin.wat").read_bytes(), root, vol, timeout=0.3)
    assert status == "timeout"
    assert time.monotonic() - t < 1.3


def test_t_dos_1_memory_growth_capped(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    code, _, _ = run(runner, (WASM_DIR / "grow.wat").read_bytes(), root, vol, memory=8 << 20)
    assert 0 <= code <= (8 << 20) // PAGE


def test_t_dos_1_deep_recursion_traps(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    _, status, _ = run(runner, (WASM_DIR / "recurse.wat").read_bytes(), root, vol)
    assert status == "error"


# A trap's text lists the guest's own function names (its name section) before
# wasmtime's reason: the run status and the "trap:" line come from the reason only.
NAMED_TRAPS = [
    pytest.param('$"out of memory"', id="named-out-of-memory"),
    pytest.param('$"memory limit Caused by: resource limit"', id="named-fake-cause"),
]


@pytest.mark.parametrize("name", NAMED_TRAPS)
def test_t_dos_1_trap_status_ignores_guest_function_names(runner: ModuleRunner, volume: tuple[Path, Volume], name: str) -> None:
    root, vol = volume
    wat = f'(module (memory (export "memory") 1) (func {name} (export "run") (result i32) unreachable))'.encode()
    module = runner.compile(wat, True, 8 << 20, frozenset())
    ctx = context.RunContext(governor=None, volume=vol)  # type: ignore[arg-type]
    out = runner.run(module, str(root), ctx, 5.0, 64 << 20, 1 << 20, None)
    assert out.status == "error"
    # The words and the detail both come from wasmtime's trap code and reason, never the guest's names.
    assert out.stderr.startswith("trap: unreachable code reached:")
    assert out.stderr.endswith("(wasm trap: wasm `unreachable` instruction executed)\n")
    assert "out of memory" not in out.stderr and "resource limit" not in out.stderr


def test_t_dos_1_ten_thousand_host_calls(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    code, _, denials = run(runner, (WASM_DIR / "many_calls.wat").read_bytes(), root, vol)
    assert code == 10000
    assert len(denials) <= 100  # the denial log is bounded


# -- T-IMPORT-1: what a module may import ------------------------------------------
BAD_MODULES = [
    pytest.param('(module (import "env" "system" (func)) (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))', 400, "unknown_import", id="foreign-module"),
    pytest.param('(module (import "cell" "host_exec" (func)) (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))', 400, "unknown_import", id="unknown-cell-function"),
    pytest.param('(module (import "cell" "load_weights" (func)) (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))', 403, "license_required", id="pro-without-license"),
    pytest.param('(module (import "cell" "host_mcp_call" (func)) (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))', 403, "license_required", id="mcp-without-license"),
    pytest.param('(module (func (export "run") (result i32) i32.const 0))', 400, "invalid_module", id="no-memory-export"),
    pytest.param('(module (memory (export "memory") 1))', 400, "invalid_module", id="no-entry-point"),
    pytest.param("(module (this is not wat", 400, "invalid_module", id="garbage"),
]


@pytest.mark.parametrize("wat,status,code", BAD_MODULES)
def test_t_import_1_module_refused_before_instantiation(runner: ModuleRunner, wat: str, status: int, code: str) -> None:
    with pytest.raises(ModuleRefused) as info:
        runner.compile(wat.encode(), True, 8 << 20, False)
    assert (info.value.status, info.value.code) == (status, code)


def test_t_dos_1_module_size_cap(runner: ModuleRunner) -> None:
    with pytest.raises(ModuleRefused) as info:
        runner.compile(b"\0asm" + b"\0" * 2048, False, 1024, False)
    assert info.value.status == 413


def test_wasi_command_output_captured(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    module = runner.compile((WASM_DIR / "hello_wasi.wat").read_bytes(), True, 8 << 20, False)
    ctx = context.RunContext(governor=None, volume=vol)  # type: ignore[arg-type]
    out = runner.run(module, str(root), ctx, 5.0, 64 << 20, 1 << 20, None)
    assert (out.status, out.stdout, out.exit_code) == ("ok", "hello from wasm\n", 0)


def test_t_disk_1_host_fs_write_over_quota_returns_minus_8(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    module = runner.compile(probe(1, 1024, 5, 2048, 4096, b"q.bin"), True, 8 << 20, False)
    ctx = context.RunContext(governor=None, volume=vol, quota_left=100)  # type: ignore[arg-type]
    out = runner.run(module, str(root), ctx, 5.0, 64 << 20, 1 << 20, None)
    assert out.exit_code == -8 and out.denials[0] == {"threat": "T-DISK-1", "function": "host_fs_write", "reason": "quota_exceeded"}
    assert not (root / "q.bin").exists()


# -- T-SSRF-1: the operator deny-list, from config to the guest's host_fetch --------
DENIED_SITE = [
    ("lan6.attacker.example", "2a00:1450:4001::1"),          # the site's own global IPv6 prefix
    ("lan4.attacker.example", "34.64.0.1"),                  # a global IPv4 range the site uses inside
    ("nat64.attacker.example", "64:ff9b::2240:1"),           # the same IPv4 through the NAT64 prefix
]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("host,address", DENIED_SITE, ids=[h for h, _ in DENIED_SITE])
def test_t_ssrf_1_host_fetch_operator_deny_list(runner: ModuleRunner, volume: tuple[Path, Volume], host: str, address: str,
                                                via: str) -> None:
    from appliance.config import load_settings
    from appliance.services import egress_message
    from appliance.runtime.protocol import EgressSpec
    from appliance.runtime.worker import egress_policy, static_resolver

    root, vol = volume
    settings = load_settings({"SYNAPSE_EGRESS": "on", "SYNAPSE_EGRESS_DENY": "2a00:1450:4001::/48,34.64.0.0/10"})
    message = EgressSpec(**egress_message(settings, {host: [address]}))  # what the web process sends a worker
    ctx = context.RunContext(governor=None, volume=vol, egress=egress_policy(message))  # type: ignore[arg-type]
    ctx.resolver = static_resolver(message.hosts or {})
    if via == "broker":  # the supervisor uses the run message it sent, host map included
        ctx.broker = broker_loop.LoopbackCalls(broker(), broker_loop.run_message(message))
    u = f"http://{host}/".encode()
    out = runner.run(runner.compile(probe(2, 1024, len(u), 4096, 4096, u), True, 8 << 20, frozenset()), str(root), ctx, 5.0, 64 << 20, 1 << 20, None)
    # -1 and a T-SSRF-1 denial; a connect attempt would have tripped the test network guard (-4 instead).
    assert out.exit_code == -1
    assert out.denials[0]["threat"] == "T-SSRF-1" and out.denials[0]["reason"] == "denied_address"


def test_t_ssrf_1_worker_refuses_a_run_message_without_the_deny_list() -> None:
    import json

    from appliance.runtime import protocol

    frame = json.dumps({"type": "exec", "req_id": 1, "template": "wasm", "code": "", "is_text": True, "timeout_ms": 10,
                        "memory_mb": 16, "tenant_id": "t",
                        "egress": {"enabled": True, "allow_hosts": [], "hosts": None}}).encode()
    with pytest.raises(protocol.ProtocolError, match="deny"):
        protocol.decode(frame, protocol.TO_WORKER, 1 << 20)


@pytest.mark.parametrize("exists", [False, True])
def test_t_disk_1_host_fs_write_new_file_past_file_limit_returns_minus_8(runner: ModuleRunner, volume: tuple[Path, Volume],
                                                                        exists: bool) -> None:
    root, vol = volume
    if exists:
        (root / "n.bin").write_bytes(b"old")
    module = runner.compile(probe(1, 1024, 5, 2048, 2, b"n.bin"), True, 8 << 20, frozenset())
    ctx = context.RunContext(governor=None, volume=vol, files_left=0)  # type: ignore[arg-type]
    out = runner.run(module, str(root), ctx, 5.0, 64 << 20, 1 << 20, None)
    if exists:  # replacing a file adds no name
        assert out.exit_code == 2 and out.denials == [] and ctx.files_left == 0
    else:
        assert out.exit_code == -8 and out.denials[0] == {"threat": "T-DISK-1", "function": "host_fs_write",
                                                          "reason": "file_limit_exceeded"}
        assert not (root / "n.bin").exists()


def test_t_disk_1_host_fs_write_counts_new_files(runner: ModuleRunner, volume: tuple[Path, Volume]) -> None:
    root, vol = volume
    module = runner.compile(probe(1, 1024, 5, 2048, 2, b"c.bin"), True, 8 << 20, frozenset())
    ctx = context.RunContext(governor=None, volume=vol, files_left=1)  # type: ignore[arg-type]
    assert runner.run(module, str(root), ctx, 5.0, 64 << 20, 1 << 20, None).exit_code == 2
    assert ctx.files_left == 0
