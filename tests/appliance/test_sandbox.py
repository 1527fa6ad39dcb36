"""The second wall (T-ESCAPE-1..4): what a guest that escaped wasmtime can still do.

Unit tables decode the hand-assembled seccomp program and check the Landlock
rule set; the escaped-guest table starts a worker exactly as the pool does
(tests/escaped_guest.py) and, inside that confined process, tries what an
escaped guest would.
"""
from __future__ import annotations

import errno
import functools
import os
import platform
from pathlib import Path
from typing import Iterator

import pytest

from appliance.errors import ConfigError
from appliance.config import load_settings
from appliance.runtime import landlock, sandbox, seccomp
from appliance.runtime.pool import WorkerPool, sandbox_config
from tests import escaped_guest
from tests.liveserver import ServerProcess, shared_cache

X86, A64 = seccomp.AUDIT_ARCH_X86_64, seccomp.AUDIT_ARCH_AARCH64
KILL, ALLOW = seccomp.RET_KILL_PROCESS, seccomp.RET_ALLOW
EPERM, ENOSYS = seccomp.errno_ret(errno.EPERM), seccomp.errno_ret(errno.ENOSYS)
OFF = seccomp.FilterPolicy()
NET = seccomp.FilterPolicy(network=True)
SPAWN = seccomp.FilterPolicy(network=True, spawn=True)
CLONE_THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes
FORK_FLAGS = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD


def nr(name: str, arch: str) -> int:
    value = seccomp._nr(name, arch)
    assert value is not None
    return value


# -- seccomp: the program, decoded -----------------------------------------
# (syscall, args, policy, expected action)
FILTER_TABLE: list[tuple[str, tuple[int, ...], seccomp.FilterPolicy, int]] = [
    ("execve", (), OFF, KILL), ("execveat", (), OFF, KILL), ("ptrace", (), OFF, KILL),
    ("process_vm_readv", (), OFF, KILL), ("process_vm_writev", (), OFF, KILL), ("mount", (), OFF, KILL),
    ("umount2", (), OFF, KILL), ("bpf", (), OFF, KILL), ("keyctl", (), OFF, KILL), ("add_key", (), OFF, KILL),
    ("userfaultfd", (), OFF, KILL), ("perf_event_open", (), OFF, KILL), ("unshare", (), OFF, KILL),
    ("setns", (), OFF, KILL), ("io_uring_setup", (), OFF, KILL), ("io_uring_enter", (), OFF, KILL),
    ("pidfd_getfd", (), OFF, KILL), ("kcmp", (), OFF, KILL), ("init_module", (), OFF, KILL),
    ("execve", (), NET, KILL), ("ptrace", (), SPAWN, KILL), ("bpf", (), SPAWN, KILL),
    ("clone", (CLONE_THREAD_FLAGS,), OFF, ALLOW),
    ("clone", (FORK_FLAGS,), OFF, EPERM),  # a new process: refused without stdio MCP servers
    ("clone", (FORK_FLAGS,), SPAWN, ALLOW),
    ("clone", (CLONE_THREAD_FLAGS | 0x10000000,), OFF, KILL),  # CLONE_NEWUSER
    ("clone", (FORK_FLAGS | 0x40000000,), SPAWN, KILL),  # CLONE_NEWNET
    ("clone", (FORK_FLAGS | 0x00020000,), SPAWN, KILL),  # CLONE_NEWNS
    ("clone3", (), OFF, ENOSYS),  # libc falls back to clone, whose flags the filter reads
    ("socket", (2, 1), OFF, EPERM), ("socket", (10, 2), OFF, EPERM), ("socket", (1, 1), OFF, EPERM),
    ("socket", (16, 3), OFF, EPERM),  # AF_NETLINK
    ("socket", (2, 1), NET, ALLOW), ("socket", (10, 1), NET, ALLOW),
    ("socket", (1, 1), NET, EPERM), ("socket", (16, 3), NET, EPERM), ("socket", (17, 3), NET, EPERM),  # unix, netlink, packet
    ("connect", (), OFF, EPERM), ("connect", (), NET, ALLOW), ("bind", (), NET, EPERM), ("listen", (), NET, EPERM),
    ("socketpair", (), OFF, EPERM), ("accept4", (), NET, EPERM),
    ("execve", (), SPAWN, ALLOW),
    ("ioctl", (1, 0x5401), OFF, ALLOW), ("ioctl", (1, 0x5421), OFF, ALLOW),
    ("ioctl", (1, 0x5412), OFF, EPERM),  # TIOCSTI: typing into the operator's terminal
    ("ioctl", (1, 0x541C), OFF, EPERM),  # TIOCLINUX
    ("prctl", (15,), OFF, ALLOW), ("prctl", (4,), OFF, EPERM),  # PR_SET_NAME; PR_SET_DUMPABLE
    ("prctl", (35,), OFF, EPERM),  # PR_SET_MM
    ("read", (), OFF, ALLOW), ("futex", (), OFF, ALLOW), ("openat2", (), OFF, ALLOW), ("mmap", (), OFF, ALLOW),
    ("renameat2", (), OFF, ALLOW), ("mknodat", (), OFF, ALLOW), ("rt_sigreturn", (), OFF, ALLOW),
    ("seccomp", (), OFF, EPERM), ("landlock_create_ruleset", (), OFF, EPERM), ("setuid", (), OFF, EPERM),
    ("personality", (), OFF, EPERM), ("chroot", (), OFF, KILL),
]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@pytest.mark.parametrize("name,args,policy,expected", FILTER_TABLE,
                         ids=[f"{r[0]}-{'-'.join(map(hex, r[1]))}-{'spawn' if r[2].spawn else 'net' if r[2].network else 'off'}"
                              for r in FILTER_TABLE])
def test_t_escape_2_filter_decides(arch: str, name: str, args: tuple[int, ...], policy: seccomp.FilterPolicy,
                                   expected: int) -> None:
    number = seccomp._nr(name, arch)
    if number is None:
        pytest.skip(f"{name} does not exist on {arch}")
    program = seccomp.build(policy, arch)
    got = seccomp.evaluate(program, seccomp.ARCHES[arch], number, args)
    assert seccomp.action_name(got) == seccomp.action_name(expected)


@pytest.mark.parametrize("arch,foreign", [("x86_64", A64), ("x86_64", 0x40000003), ("aarch64", X86),
                                          ("aarch64", 0x40000028)])  # i386, arm
def test_t_escape_2_foreign_architecture_is_killed(arch: str, foreign: int) -> None:
    program = seccomp.build(OFF, arch)
    assert seccomp.evaluate(program, foreign, nr("read", arch)) == KILL
    assert seccomp.evaluate(program, foreign, 0) == KILL


@pytest.mark.parametrize("name", ["read", "write", "execve", "openat"])
def test_t_escape_2_x32_syscalls_are_killed(name: str) -> None:
    program = seccomp.build(SPAWN, "x86_64")
    assert seccomp.evaluate(program, X86, nr(name, "x86_64") | seccomp.X32_SYSCALL_BIT) == KILL


def test_t_escape_2_unknown_syscalls_are_denied_not_allowed() -> None:
    program = seccomp.build(SPAWN, "x86_64")
    listed = {v[0] for v in seccomp.SYSCALLS.values()}
    for number in range(0, 600):
        action = seccomp.evaluate(program, X86, number, (0, 0))
        if number not in listed:
            assert action == EPERM, number


def test_t_escape_2_program_shape_decodes() -> None:
    for arch in ("x86_64", "aarch64"):
        for policy in (OFF, NET, SPAWN):
            program = seccomp.build(policy, arch)
            assert len(program) < 4096
            text = seccomp.disassemble(program)
            assert text[0].endswith("ld [4]")  # the architecture first
            assert text[2].endswith("ret kill")
            assert text[-1].endswith("ret errno EPERM")
            assert len(seccomp.encode(program)) == 8 * len(program)
            for code, jt, jf, _ in program:  # every jump lands inside the program
                assert code in (seccomp.LD_W_ABS, seccomp.JEQ_K, seccomp.JSET_K, seccomp.RET_K)
            for pc, (code, jt, jf, _) in enumerate(program):
                if code in (seccomp.JEQ_K, seccomp.JSET_K):
                    assert pc + 1 + max(jt, jf) < len(program)


def test_t_escape_2_every_listed_call_has_a_number_here() -> None:
    for name in (*seccomp.KILL, *seccomp.ALLOW, *seccomp.SOCKET_MAKING, *seccomp.SPAWNING):
        assert name in seccomp.SYSCALLS, name
    assert not set(seccomp.KILL) & set(seccomp.ALLOW)


# -- Landlock: the rule set ---------------------------------------------------
@pytest.mark.parametrize("abi,has", [(0, 0), (1, landlock.FS_MAKE_SYM), (2, landlock.FS_REFER), (3, landlock.FS_TRUNCATE),
                                     (5, landlock.FS_IOCTL_DEV), (7, landlock.FS_IOCTL_DEV)])
def test_t_escape_1_rights_per_abi(abi: int, has: int) -> None:
    rights = landlock.fs_rights(abi)
    assert (rights & has) == has
    assert landlock.net_rights(abi) == (3 if abi >= 4 else 0)
    assert landlock.scopes(abi) == (3 if abi >= 6 else 0)


@pytest.mark.parametrize("grant,secret", [("/srv/root", "/srv/root/keys"), ("/srv/root/keys/sub", "/srv/root/keys"),
                                          ("/srv", "/srv/root/db"), ("/etc", "/etc/synapse/license.json")])
def test_t_escape_1_rules_exposing_a_secret_are_refused(grant: str, secret: str) -> None:
    rules = landlock.Rules(read_only=(grant,), read_write=(), forbidden=(secret,))
    with pytest.raises(landlock.RulesError):
        landlock.check(rules)


def test_t_escape_1_relative_or_symlinked_grants_are_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for grant in ("relative/dir", str(tmp_path / "link")):
        with pytest.raises(landlock.RulesError):
            landlock.check(landlock.Rules(read_only=(grant,), read_write=()))


def test_t_escape_1_worker_rules_grant_only_artifacts_and_the_volume_set(tmp_path: Path) -> None:
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache())})
    config = {"cache_dir": str(shared_cache()), "volumes_dir": str(settings.volumes_dir),
              "weights_dir": str(settings.weights_dir), "sandbox": sandbox_config(settings)}
    settings.volumes_dir.mkdir(parents=True)
    rules = sandbox.worker_rules(config, (str(tmp_path / "fifo"),))
    landlock.check(rules)
    # The fifo dir does not exist: skipped. A spare may write all volumes and
    # all snapshots (T-IMAGE-2); binding narrows both to one tenant.
    assert rules.read_write == (str(settings.volumes_dir.resolve()), str(settings.snapshots_dir.resolve()))
    assert os.path.realpath(shared_cache()) in rules.read_only
    for secret in (settings.db_path, settings.keys_dir, settings.config_dir, settings.mirror_dir, settings.root):
        assert str(secret) not in (*rules.read_only, *rules.read_write)
    assert not rules.network and rules.execute == ()
    # The volume set is a parameter: one tenant's directory (tenant-bound workers).
    one = settings.volumes_dir / "tenant-a"
    one.mkdir()
    config["sandbox"] = dict(config["sandbox"], volume_set=[str(one)])
    assert sandbox.worker_rules(config, ()).read_write == (str(one.resolve()),)


def test_t_escape_1_a_cache_dir_holding_the_data_root_is_refused(tmp_path: Path) -> None:
    # An operator pointing SYNAPSE_MODULE_CACHE at the data root would hand workers the keys: refused.
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(tmp_path)})
    settings.volumes_dir.mkdir(parents=True)
    config = {"cache_dir": str(tmp_path), "volumes_dir": str(settings.volumes_dir), "weights_dir": None,
              "sandbox": sandbox_config(settings)}
    with pytest.raises(landlock.RulesError, match="would expose"):
        landlock.check(sandbox.worker_rules(config, ()))


def test_t_escape_1_workers_get_registry_hashes_never_the_mirror(tmp_path: Path) -> None:
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc")})
    config = WorkerPool(settings)._config(0)
    assert "mirror_dir" not in config and config["registry_hashes"] == {}
    assert str(settings.mirror_dir) in config["sandbox"]["forbidden"]


MCP_TABLE = escaped_guest.MCP_TABLE


@pytest.mark.parametrize("env", [{}, {"SYNAPSE_EGRESS": "on"}, {"SYNAPSE_EGRESS": "on", "SYNAPSE_MCP_SERVERS": "mcp"}],
                         ids=["default", "egress-on", "egress-and-mcp"])
def test_t_escape_3_no_network_or_process_rule_whatever_the_config(tmp_path: Path, env: dict[str, str]) -> None:
    # T-ESCAPE-3: host_fetch and MCP go through the supervisor's broker, so a
    # worker's Landlock rules never admit TCP or execution, with egress and MCP on too.
    if "SYNAPSE_MCP_SERVERS" in env:
        (tmp_path / "mcp.json").write_text(MCP_TABLE)
        env = dict(env, SYNAPSE_MCP_SERVERS=str(tmp_path / "mcp.json"))
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache()), **env})
    box = sandbox_config(settings)
    assert "network" not in box and "mcp_commands" not in box
    config = {"cache_dir": str(shared_cache()), "volumes_dir": str(settings.volumes_dir),
              "weights_dir": str(settings.weights_dir), "mcp_servers": str(settings.mcp_servers), "sandbox": box}
    rules = sandbox.worker_rules(config, ())
    assert not rules.network and rules.execute == ()
    assert "/dev/null" not in rules.read_write


# -- the environment and descriptors a worker starts with -------------------
def test_t_escape_4_worker_environment_is_an_allow_list() -> None:
    env = sandbox.worker_environment({"PATH": "/usr/bin", "SYNAPSE_METRICS_TOKEN": "s3cret", "SYNAPSE_LICENSE": "/x",
                                      "SYNAPSE_ROOT": "/r", "AWS_SECRET_ACCESS_KEY": "k", "LANG": "C.UTF-8"}, keep_fd=7)
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", sandbox.KEEP_FD_ENV: "7"}


def test_t_escape_1_sandbox_setting_parses_and_refuses_unknown_values() -> None:
    assert load_settings({}).worker_sandbox == "required"
    assert load_settings({"SYNAPSE_WORKER_SANDBOX": "off-unsafe"}).worker_sandbox == "off-unsafe"
    with pytest.raises(ConfigError, match="SYNAPSE_WORKER_SANDBOX"):
        load_settings({"SYNAPSE_WORKER_SANDBOX": "off"})


def test_t_escape_1_pool_refuses_to_start_without_the_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc")})
    with pytest.raises(RuntimeError, match="SYNAPSE_WORKER_SANDBOX=off-unsafe"):
        WorkerPool(settings).check_sandbox()
    override = settings.with_overrides(worker_sandbox="off-unsafe")
    assert WorkerPool(override).check_sandbox()["landlock_abi"] == 0  # starts, and says so in the log


# -- the escaped guest: a real confined worker --------------------------------
needs_kernel = pytest.mark.skipif(platform.machine() != "x86_64" or sandbox.landlock_abi() < 6
                                  or not sandbox.seccomp_available(),
                                  reason="the escaped-guest table needs x86_64, Landlock ABI >= 6 and seccomp")


@pytest.fixture(scope="module")
def escaped_pool(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    settings, paths = escaped_guest.prepare_root(tmp_path_factory.mktemp("escape") / "root", shared_cache())
    pool = WorkerPool(settings, target=functools.partial(escaped_guest.escaped_worker, paths=paths))
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


@needs_kernel
@pytest.mark.parametrize("attempt", list(escaped_guest.EXPECTED))
def test_t_escape_escaped_guest_is_contained(escaped_pool: WorkerPool, attempt: str) -> None:
    assert escaped_guest.observe(escaped_pool, attempt) == escaped_guest.EXPECTED[attempt]


@needs_kernel
def test_t_escape_escaped_worker_runs_confined(escaped_pool: WorkerPool) -> None:
    pid = escaped_pool.stats()["pids"][0]
    assert sandbox.process_status(pid) == {"seccomp": 2, "no_new_privs": 1}
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"SYNAPSE_" not in environ and b"escape-test-metrics-token" not in environ
    fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    assert len(fds) <= 3 + 2 + 8, fds  # stdio, channel, sentinel, and what it opened itself (few)


@needs_kernel
def test_t_escape_1_a_worker_that_closes_its_sentinel_cannot_hang_shutdown(module_cache: None, tmp_path: Path) -> None:
    import threading
    import time

    settings, paths = escaped_guest.prepare_root(tmp_path / "root", shared_cache())
    pool = WorkerPool(settings, target=functools.partial(escaped_guest.escaped_worker, paths=paths))
    pool.start()
    handle = pool.worker(0)
    assert escaped_guest.observe(pool, "close_sentinel_and_hang") == ("succeeded", "")
    closer = threading.Thread(target=pool.close, daemon=True)
    started = time.monotonic()
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "pool.close() hung on a worker that closed its sentinel"
    assert time.monotonic() - started < 3 + 2 + 1.5
    assert not handle.process.is_alive() and handle.process.exitcode == -9


# T-ESCAPE-3: with egress on and stdio MCP servers configured the worker is as
# closed as without them (the supervisor's broker makes those calls): the
# network and process rows of the escaped-guest table, in such a worker.


@pytest.fixture(scope="module")
def egress_pool(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    base = tmp_path_factory.mktemp("escape-egress")
    (base / "mcp.json").write_text(MCP_TABLE)
    settings, paths = escaped_guest.prepare_root(base / "root", shared_cache(),
                                                 env={"SYNAPSE_EGRESS": "on", "SYNAPSE_MCP_SERVERS": str(base / "mcp.json")})
    pool = WorkerPool(settings, target=functools.partial(escaped_guest.escaped_worker, paths=paths))
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


@needs_kernel
@pytest.mark.parametrize("attempt", escaped_guest.EGRESS_ON_ROWS)
def test_t_escape_3_egress_and_mcp_on_worker_has_no_socket_or_process(egress_pool: WorkerPool, attempt: str) -> None:
    assert escaped_guest.observe(egress_pool, attempt) == escaped_guest.EXPECTED[attempt]


# -- a running live server ------------------------------------------------------
def _worker_pids(live: ServerProcess) -> list[int]:
    _, status, _ = live.request("GET", "/v1/status")
    pids = status["workers"]["pids"]
    assert pids
    return [int(p) for p in pids]


def test_t_escape_2_every_live_worker_is_filtered(live: ServerProcess) -> None:
    for pid in _worker_pids(live):
        assert sandbox.process_status(pid) == {"seccomp": 2, "no_new_privs": 1}, pid


def test_t_escape_4_live_worker_environment_holds_no_secret(live: ServerProcess) -> None:
    server_env = Path(f"/proc/{live.proc.pid}/environ").read_bytes().split(b"\0")
    secrets = [e.split(b"=", 1)[1] for e in server_env if e.startswith(b"SYNAPSE_") and b"=" in e]
    for pid in _worker_pids(live):
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"SYNAPSE_" not in environ
        for value in secrets:
            if len(value) >= 8:
                assert value not in environ


def test_t_escape_status_reports_the_worker_sandbox(live: ServerProcess) -> None:
    _, status, _ = live.request("GET", "/v1/status")
    box = status["worker_sandbox"]
    assert box["mode"] == "required" and box["landlock_abi"] >= 1 and box["seccomp"] is True
    assert box["network"] in ("denied", "allowed")
    assert all(w["seccomp"] == 2 and w["no_new_privs"] == 1 for w in box["workers"])

