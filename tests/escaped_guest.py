"""A guest that has escaped wasmtime (test-only).

:func:`escaped_worker` is a worker entry point for ``WorkerPool(settings,
target=...)``: it starts exactly as a pooled worker does (the same
``start_confined``: descriptors dropped, runtimes loaded, Landlock and
seccomp applied, threads started), then, instead of serving guests, runs
native Python that plays the escaped guest. Each exec request names one
attempt; the answer's stdout is a JSON verdict. An attempt the seccomp
filter kills never answers: the supervisor sees the worker die by SIGSYS.

Nothing here is reachable from the production code path: only tests pass
this function as the pool's target.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

from appliance.runtime import protocol
from appliance.runtime.sandbox import KEEP_FD_ENV
from appliance.runtime.worker import await_tenant, start_confined

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
SYS = {"landlock_create_ruleset": 444, "ptrace": 101, "process_vm_readv": 310, "unshare": 272, "bpf": 321, "io_uring_setup": 425, "keyctl": 250,
       "userfaultfd": 323, "perf_event_open": 298, "mount": 165}
PTRACE_ATTACH = 16
CLONE_NEWUSER = 0x10000000


def _syscall(name: str, *args: int) -> None:
    ret = _LIBC.syscall(ctypes.c_long(SYS[name]), *[ctypes.c_long(a) for a in args])
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _read(path: str) -> None:
    with open(path, "rb") as f:
        f.read(16)


def _open_for_append(path: str) -> None:
    # Never truncates or writes: if the open succeeded, the attempt is reported as such.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.close(fd)


def _create_and_remove(directory: str) -> None:
    path = os.path.join(directory, f"escape-probe-{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(path)


def _socket(family: int, kind: int) -> None:
    s = socket.socket(family, kind)
    try:
        s.settimeout(1)
        if family == socket.AF_INET:
            s.connect(("127.0.0.1", 9))
    finally:
        s.close()


def _udp_send() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", ("127.0.0.1", 9))
    finally:
        s.close()


def _tcp_bind() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
    finally:
        s.close()


def attempts(paths: dict[str, str]) -> dict[str, Callable[[], None]]:
    """Every attempt, by name; ``paths`` come from the test (the data root's files)."""
    sup = int(paths["supervisor_pid"])
    return {
        "read_node_key": lambda: _read(paths["node_key"]),
        "open_database": lambda: _read(paths["database"]),
        "read_license": lambda: _read(paths["license"]),
        "list_config_dir": lambda: os.listdir(paths["config_dir"]) and None,
        "list_mirror": lambda: os.listdir(paths["mirror_dir"]) and None,
        "list_keys_dir": lambda: os.listdir(paths["keys_dir"]) and None,
        "write_module_cache": lambda: _open_for_append(paths["cwasm"]),
        "rewrite_recorded_hash": lambda: _open_for_append(paths["cwasm_meta"]),
        "create_in_module_cache": lambda: _create_and_remove(paths["cache_dir"]),
        "create_in_tmp": lambda: _create_and_remove("/tmp"),
        "read_etc_passwd": lambda: _read("/etc/passwd"),
        "read_supervisor_environ": lambda: _read(f"/proc/{sup}/environ"),
        "tcp_socket_to_loopback": lambda: _socket(socket.AF_INET, socket.SOCK_STREAM),
        "udp_socket": lambda: _socket(socket.AF_INET, socket.SOCK_DGRAM),
        "udp_send_to_loopback": _udp_send,
        "tcp_bind_loopback": _tcp_bind,
        "tcp6_socket": lambda: _socket(socket.AF_INET6, socket.SOCK_STREAM),
        "unix_socket": lambda: _socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "signal_supervisor": lambda: os.kill(sup, 0),
        "fork": lambda: _fork(),
        "execve_bin_sh": lambda: os.execv("/bin/sh", ["/bin/sh", "-c", "true"]),
        # what starting a stdio MCP server takes (the supervisor starts them: T-ESCAPE-3)
        "execve_mcp_server": lambda: os.execv(sys.executable, [sys.executable, "-c", "pass"]),
        "ptrace_supervisor": lambda: _syscall("ptrace", PTRACE_ATTACH, sup, 0, 0),
        "process_vm_readv_supervisor": lambda: _syscall("process_vm_readv", sup, 0, 0, 0, 0, 0),
        "unshare_user_namespace": lambda: _syscall("unshare", CLONE_NEWUSER),
        "bpf": lambda: _syscall("bpf", 0, 0, 0),
        "io_uring_setup": lambda: _syscall("io_uring_setup", 1, 0),
        "keyctl": lambda: _syscall("keyctl", 0, 0, 0, 0, 0),
        "mount": lambda: _syscall("mount", 0, 0, 0, 0, 0),
        "close_sentinel_and_hang": _close_sentinel_and_hang,
        # T-TENANT-1: the worker is bound to tenant A; B's files are out of reach, A's are not.
        "list_volumes_root": lambda: os.listdir(paths["volumes_dir"]) and None,
        "list_other_tenant_volumes": lambda: os.listdir(paths["b_tenant"]) and None,
        "read_other_tenant_file": lambda: _read(paths["b_file"]),
        "write_other_tenant_file": lambda: _open_for_append(paths["b_file"]),
        "create_in_other_tenant_volume": lambda: _create_and_remove(paths["b_cell"]),
        "list_other_tenant_tmp": lambda: os.listdir(paths["b_tmp"]) and None,
        "read_other_tenant_tmp_file": lambda: _read(paths["b_tmp_file"]),
        "create_in_other_tenant_tmp": lambda: _create_and_remove(paths["b_tmp_cell"]),
        "list_tmp_root": lambda: os.listdir(paths["tmp_root"]) and None,
        "read_own_tenant_file": lambda: _read(paths["a_file"]),
        "create_in_own_tenant_volume": lambda: _create_and_remove(paths["a_cell"]),
        "list_own_tenant_volumes": lambda: os.listdir(paths["a_tenant"]) and None,
        "create_in_own_tenant_tmp": lambda: _create_and_remove(paths["a_tmp_cell"]),
        "narrow_again_landlock": lambda: _syscall("landlock_create_ruleset", 0, 0, 1),
    }


_HANG_ON_EOF: list[bool] = []


def _close_sentinel_and_hang() -> None:
    """Close the spawn sentinel and refuse to exit when the supervisor hangs up."""
    os.close(int(os.environ[KEEP_FD_ENV]))
    _HANG_ON_EOF.append(True)


def _fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def verdict(attempt: Callable[[], None]) -> dict[str, Any]:
    try:
        attempt()
    except OSError as e:
        return {"ok": False, "errno": errno.errorcode.get(e.errno or 0, str(e.errno))}
    return {"ok": True, "errno": None}


def escaped_worker(conn: Connection, config: dict[str, Any], *, paths: dict[str, str]) -> None:
    """Entry point: bind ``paths`` with functools.partial. Starts and is bound
    to its tenant exactly as a pooled worker (start_confined, await_tenant)."""
    worker = start_confined(conn, config)
    await_tenant(worker)
    table = attempts(paths)
    while True:
        try:
            request = protocol.decode(conn.recv_bytes(), protocol.TO_WORKER, 1 << 20)
        except (EOFError, OSError, protocol.ProtocolError):
            if _HANG_ON_EOF:
                threading.Event().wait()  # never returns: the supervisor must kill us
            os._exit(0)
        if not isinstance(request, protocol.ExecRequest):
            conn.send_bytes(protocol.encode(protocol.OkReply(request.req_id)))
            continue
        name = request.code.decode()
        result = verdict(table[name]) if name in table else {"ok": None, "errno": "unknown attempt"}
        outcome = protocol.RunOutcome(exit_code=0, status="ok", stdout=json.dumps(result), stderr="", truncated=False,
                                      session_alive=False, restarted=False, note=None, denials=[])
        conn.send_bytes(protocol.encode(protocol.RunReply(request.req_id, outcome=outcome, guest_ms=0.0,
                                                          volume_usage=None)))


# -- the table both the test suite and tests/red_team.py run -----------------
# attempt -> (how it fails, errno name or signal name). "errno" rows fail with
# that error; "signal" rows kill the worker (the seccomp filter's verdict).
EXPECTED: dict[str, tuple[str, str]] = {
    "read_node_key": ("errno", "EACCES"),
    "open_database": ("errno", "EACCES"),
    "read_license": ("errno", "EACCES"),
    "list_config_dir": ("errno", "EACCES"),
    "list_mirror": ("errno", "EACCES"),
    "list_keys_dir": ("errno", "EACCES"),
    "write_module_cache": ("errno", "EACCES"),
    "rewrite_recorded_hash": ("errno", "EACCES"),
    "create_in_module_cache": ("errno", "EACCES"),
    "create_in_tmp": ("errno", "EACCES"),
    "read_etc_passwd": ("errno", "EACCES"),
    "read_supervisor_environ": ("errno", "EACCES"),
    "tcp_socket_to_loopback": ("errno", "EPERM"),
    "udp_socket": ("errno", "EPERM"),
    "udp_send_to_loopback": ("errno", "EPERM"),
    "tcp_bind_loopback": ("errno", "EPERM"),
    "tcp6_socket": ("errno", "EPERM"),
    "unix_socket": ("errno", "EPERM"),
    "signal_supervisor": ("errno", "EPERM"),
    "fork": ("errno", "EPERM"),
    "execve_bin_sh": ("signal", "SIGSYS"),
    "execve_mcp_server": ("signal", "SIGSYS"),
    "ptrace_supervisor": ("signal", "SIGSYS"),
    "process_vm_readv_supervisor": ("signal", "SIGSYS"),
    "unshare_user_namespace": ("signal", "SIGSYS"),
    "bpf": ("signal", "SIGSYS"),
    "io_uring_setup": ("signal", "SIGSYS"),
    "keyctl": ("signal", "SIGSYS"),
    "mount": ("signal", "SIGSYS"),
    # T-TENANT-1 (a worker bound to tenant A)
    "list_volumes_root": ("errno", "EACCES"),
    "list_other_tenant_volumes": ("errno", "EACCES"),
    "read_other_tenant_file": ("errno", "EACCES"),
    "write_other_tenant_file": ("errno", "EACCES"),
    "create_in_other_tenant_volume": ("errno", "EACCES"),
    "list_other_tenant_tmp": ("errno", "EACCES"),
    "read_other_tenant_tmp_file": ("errno", "EACCES"),
    "create_in_other_tenant_tmp": ("errno", "EACCES"),
    "list_tmp_root": ("errno", "EACCES"),
    "read_own_tenant_file": ("succeeded", ""),
    "create_in_own_tenant_volume": ("succeeded", ""),
    "list_own_tenant_volumes": ("succeeded", ""),
    "create_in_own_tenant_tmp": ("succeeded", ""),
    "narrow_again_landlock": ("errno", "EPERM"),  # the bound worker's final filter: no more layers
}
TENANT_A, TENANT_B = "tenant-a", "tenant-b"


# T-ESCAPE-3: the rows a worker started with egress on and stdio MCP servers
# configured must fail exactly as above (the supervisor's broker makes those calls).
EGRESS_ON_ROWS = ["tcp_socket_to_loopback", "tcp_bind_loopback", "udp_socket", "udp_send_to_loopback", "tcp6_socket",
                  "unix_socket", "fork", "execve_bin_sh", "execve_mcp_server", "read_node_key", "write_module_cache"]
MCP_TABLE = '{"servers": {"fake": {"command": ["/bin/sh", "-c", "exit 0"], "tools": ["echo"]}}}'


def prepare_root(root: Any, cache_dir: Any, env: dict[str, str] | None = None) -> tuple[Any, dict[str, str]]:
    """A data root holding every secret a worker must not reach; returns (settings, paths)."""
    from pathlib import Path

    from appliance.config import load_settings
    from appliance.receipts.nodekey import NodeKey
    from appliance.storage import Store

    root = Path(root)
    root.mkdir(mode=0o700, exist_ok=True)
    settings = load_settings({"SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(cache_dir), "SYNAPSE_WORKERS": "1",
                              "SYNAPSE_WARM_PYTHON": "0", "SYNAPSE_WARM_JAVASCRIPT": "0",
                              "SYNAPSE_METRICS_TOKEN": "escape-test-metrics-token-0123456789abcdef", **(env or {})})
    for path in (settings.volumes_dir, settings.db_path.parent, settings.keys_dir, settings.config_dir,
                 settings.mirror_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    NodeKey.load_or_create(settings.keys_dir)
    Store(settings.db_path).close()
    settings.license_path.write_text("{}")
    (settings.mirror_dir / "root.json").write_text("{}")
    # Two tenants' volumes and /tmp directories, each with a file (T-TENANT-1).
    vols = settings.volumes_dir
    tenant_paths: dict[str, str] = {"volumes_dir": str(vols), "tmp_root": str(vols / ".tmp")}
    for key, tenant in (("a", TENANT_A), ("b", TENANT_B)):
        cell, tmp_cell = vols / tenant / f"c{key}", vols / ".tmp" / tenant / f"c{key}"
        for d in (cell, tmp_cell):
            d.mkdir(parents=True, mode=0o700)
            (d / "secret.txt").write_text(f"{tenant}'s data")
        tenant_paths.update({f"{key}_tenant": str(vols / tenant), f"{key}_cell": str(cell),
                             f"{key}_file": str(cell / "secret.txt"), f"{key}_tmp": str(vols / ".tmp" / tenant),
                             f"{key}_tmp_cell": str(tmp_cell), f"{key}_tmp_file": str(tmp_cell / "secret.txt")})
    cwasm = sorted(Path(cache_dir).glob("*.cwasm"))[0]
    paths = {"node_key": str(settings.keys_dir / "node_ed25519"), "database": str(settings.db_path),
             "license": str(settings.license_path), "config_dir": str(settings.config_dir),
             "mirror_dir": str(settings.mirror_dir), "keys_dir": str(settings.keys_dir), "cache_dir": str(cache_dir),
             "cwasm": str(cwasm), "cwasm_meta": str(cwasm.with_suffix(".json")), "supervisor_pid": str(os.getpid()),
             **tenant_paths}
    return settings, paths


def observe(pool: Any, name: str, tenant: str = TENANT_A) -> tuple[str, str]:
    """Run one attempt in the pool's (confined) worker bound to ``tenant``
    (binding one as the pool does for a tenant's first run); (kind, errno or signal name)."""
    import signal

    from appliance.runtime.pool import WorkerLost

    handle = pool.pick_for_run(tenant)
    try:
        reply = pool.call(handle, protocol.ExecRequest(0, template="python3", code=name.encode(), is_text=True,
                                                       timeout_ms=5000, memory_mb=64, tenant_id=tenant), deadline_s=5,
                          tenant=tenant)
    except WorkerLost:
        code = handle.process.exitcode
        return ("signal", signal.Signals(-code).name) if code is not None and code < 0 else ("exit", str(code))
    result = json.loads(reply.outcome.stdout)  # type: ignore[union-attr]
    return ("succeeded", "") if result["ok"] else ("errno", str(result["errno"]))
