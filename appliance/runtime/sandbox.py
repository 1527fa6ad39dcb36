"""The second wall: confine a worker process with Landlock and seccomp-bpf.

Wasmtime is the first wall. If a guest escaped it, it would be native code
in the worker process; this module makes that process unable to reach what
the supervisor keeps (threats T-ESCAPE-1..4 in SECURITY.md):

* Landlock (:mod:`appliance.runtime.landlock` describes the rules): read-only
  runtime artifacts, read-write only the volume set the worker serves; no
  db, keys, license, config, mirror; no TCP bind or connect (the supervisor
  makes host_fetch and MCP calls for it: :mod:`appliance.runtime.broker`, T-ESCAPE-3);
  no signals or abstract sockets outside its own sandbox.
* seccomp-bpf (:mod:`appliance.runtime.seccomp` builds the program): an
  allow-list, kill on execve/ptrace/mount/bpf/... (T-ESCAPE-2).
* Nothing secret inherited (T-ESCAPE-4): the environment is an allow-list,
  every descriptor but the channel is closed.

Both Landlock and seccomp apply to the calling thread and the threads it
starts afterwards, so :func:`confine` refuses to run while the process has
more than one thread; the worker confines itself before it starts any.

Tenant-bound workers (T-TENANT-1) confine in two layers. At start a worker
applies :func:`confine` (the whole volumes directory read-write, a filter
that still lets it narrow itself) and waits, single-threaded and running no
guest, as a spare. When the supervisor binds it to a tenant,
:func:`narrow_to_tenant` adds a second Landlock layer that admits read-write
only that tenant's volume and /tmp directories (layers intersect: the first
can never widen the second) and a second seccomp filter without the
narrowing calls. Only then does the worker start threads and run guests.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any, Mapping

import appliance
from appliance.runtime import landlock, protocol, scratch, seccomp

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38

MODES = ("required", "off-unsafe")
KEEP_FD_ENV = "CELL_WORKER_KEEP_FD"  # the spawn sentinel pipe (not a secret: a descriptor number)
# T-ESCAPE-4: the only variables a worker's environment may hold.
ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED",
               "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8")


class SandboxError(Exception):
    pass


# Kept from the first layer for the second (T-TENANT-1): once Landlock hides
# /proc the worker still counts its threads through a descriptor it opened
# before, and remembers whether it installed a filter.
_TASK_FD: int | None = None
_FILTERED = False


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                     ctypes.c_uint32(landlock.CREATE_RULESET_VERSION))
    return int(v) if v > 0 else 0


def seccomp_available() -> bool:
    """True when this kernel and architecture take a seccomp filter from us."""
    if machine() not in seccomp.ARCHES:
        return False
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def probe() -> dict[str, Any]:
    """What this kernel offers the second wall (for `cell doctor` and /v1/status)."""
    abi = landlock_abi()
    return {"landlock_abi": abi, "landlock_network": abi >= 4, "landlock_scopes": abi >= 6,
            "seccomp": seccomp_available(), "arch": machine()}


def process_status(pid: int) -> dict[str, int | None]:
    """``Seccomp`` and ``NoNewPrivs`` of a process, from /proc/<pid>/status."""
    out: dict[str, int | None] = {"seccomp": None, "no_new_privs": None}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Seccomp":
                    out["seccomp"] = int(value.strip())
                elif key == "NoNewPrivs":
                    out["no_new_privs"] = int(value.strip())
    except (OSError, ValueError):
        pass
    return out


def worker_environment(environ: Mapping[str, str], keep_fd: int | None = None) -> dict[str, str]:
    """T-ESCAPE-4: a worker's environment, from an allow-list (no SYNAPSE_*, no tokens, no paths to secrets)."""
    env = {k: v for k, v in environ.items() if k in ENV_ALLOWED}
    if keep_fd is not None:
        env[KEEP_FD_ENV] = str(keep_fd)
    return env


def close_inherited_fds(keep: set[int]) -> None:
    """T-ESCAPE-4: close every descriptor above stderr except ``keep``; stdin becomes /dev/null."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    except OSError:
        pass
    fds = sorted(int(n) for n in os.listdir("/proc/self/fd") if n.isdigit())
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def thread_count() -> int:
    try:
        if _TASK_FD is not None:
            return len(os.listdir(_TASK_FD))
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


# -- the rules of one worker ------------------------------------------------
def _real_dirs(paths: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for p in paths:
        if p and os.path.exists(p):
            real = os.path.realpath(p)
            if real not in out:
                out.append(real)
    return tuple(out)


def system_dirs() -> tuple[str, ...]:
    """Read-only code a worker may still load after confinement (lazy imports, shared libraries)."""
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(appliance.__file__).resolve().parent),
                  "/usr/lib", "/usr/lib64", "/lib", "/lib64"]
    return _real_dirs(candidates)


def worker_rules(config: Mapping[str, Any], scratch_dirs: tuple[str, ...]) -> landlock.Rules:
    """The Landlock rules for a worker started with ``config`` (the pool's _config)."""
    sb = config.get("sandbox") or {}
    cache_dir = os.path.realpath(config["cache_dir"])
    stdlib = os.path.join(os.path.dirname(cache_dir), "python-stdlib")
    mpl_data = os.path.join(os.path.dirname(cache_dir), "python-mpl-data")  # read-only matplotlib data (templates.py)
    volume_set = tuple(os.path.realpath(p) for p in (sb.get("volume_set") or [config["volumes_dir"]]))
    weights = config.get("weights_dir")
    forbidden = tuple(os.path.abspath(p) for p in sb.get("forbidden", []))
    return landlock.worker_rules(
        cache_dir=cache_dir, stdlib_dir=stdlib if os.path.isdir(stdlib) else None,
        code_dirs=(mpl_data,) if os.path.isdir(mpl_data) else (),
        system_dirs=system_dirs(), weights_dir=os.path.realpath(weights) if weights and os.path.isdir(weights) else None,
        volume_set=volume_set, forbidden=forbidden,
        scratch_dirs=_real_dirs(list(scratch_dirs)),
        # T-ESCAPE-3: no TCP connect or bind and nothing executable, whatever the
        # config: host_fetch and MCP go through the supervisor's broker.
        network=False, spawn_paths=())


# -- applying it ------------------------------------------------------------
class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _syscall(*args: Any) -> int:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    ret = int(libc.syscall(*args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def apply_landlock(rules: landlock.Rules, abi: int) -> dict[str, Any]:
    """Restrict this process (all its future threads) to ``rules`` (T-ESCAPE-1)."""
    landlock.check(rules)
    fs = landlock.fs_rights(abi)
    net = landlock.net_rights(abi)
    if rules.network:
        net &= ~landlock.NET_CONNECT_TCP  # never for a pooled worker (worker_rules): the policy keeps the switch
    attr = _RulesetAttr(fs, net, landlock.scopes(abi))
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    try:
        for path, rights in rules.grants():
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                allowed = rights & fs
                if not os.path.isdir(path):
                    allowed &= landlock.FILE_RIGHTS
                beneath = _PathBeneathAttr(allowed, fd)
                _syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                         ctypes.c_int(landlock.RULE_PATH_BENEATH), ctypes.byref(beneath), ctypes.c_uint32(0))
            finally:
                os.close(fd)
        _syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return {"abi": abi, "read_only": list(rules.read_only), "read_write": list(rules.read_write),
            "execute": list(rules.execute), "tcp": ("connect" if rules.network else "none") if net or rules.network
            else "not restricted (ABI < 4)", "scoped": abi >= 6}


def _apply_or_refuse(rules: landlock.Rules, abi: int, mode: str) -> Any:
    """Landlock's report; in mode ``required`` a kernel without it is refused (fail closed)."""
    if abi >= 1:
        return apply_landlock(rules, abi)
    if mode == "required":
        raise SandboxError("Landlock is not available in this kernel (ABI 0)")
    return "unavailable"


def set_no_new_privs() -> None:
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def install_seccomp(program: list[seccomp.Instruction]) -> None:
    """Install ``program`` for every thread of this process (TSYNC) (T-ESCAPE-2)."""
    arch = machine()
    raw = seccomp.encode(program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _SockFprog(len(program), ctypes.cast(buf, ctypes.c_void_p))
    set_no_new_privs()  # required for an unprivileged filter
    _syscall(ctypes.c_long(SYS_SECCOMP[arch]), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
             ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))


def confine(config: Mapping[str, Any], scratch_dirs: tuple[str, ...]) -> dict[str, Any]:
    """Apply the second wall to this worker process; return what was applied.

    In mode ``required`` any missing part raises SandboxError (the worker
    exits and the service does not start). In ``off-unsafe`` what the kernel
    offers is still applied and the rest is reported, never silently.
    """
    sb = config.get("sandbox") or {}
    mode = sb.get("mode", "required")
    if mode not in MODES:
        raise SandboxError(f"unknown worker sandbox mode {mode!r}")
    report: dict[str, Any] = {"mode": mode}
    threads = thread_count()
    if threads != 1:
        # Landlock has no thread sync here: a thread started before this point would stay unconfined.
        raise SandboxError(f"cannot confine a worker with {threads} threads")
    rules = worker_rules(config, scratch_dirs)
    abi = landlock_abi()
    has_seccomp = seccomp_available()  # read before Landlock hides /proc
    global _TASK_FD, _FILTERED
    if _TASK_FD is None:
        try:
            _TASK_FD = os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            _TASK_FD = None  # thread_count() then reads -1 and the tenant bind refuses (fail closed)
    report["landlock"] = _apply_or_refuse(rules, abi, mode)
    if has_seccomp:
        # T-ESCAPE-3: no new sockets, no process creation, for every worker;
        # T-TENANT-1: a spare may narrow itself once more at its tenant bind.
        policy = seccomp.FilterPolicy(narrowing=True)
        install_seccomp(seccomp.build(policy, machine()))
        _FILTERED = True
        report["seccomp"] = {"mode": "filter", "network": policy.network, "spawn": policy.spawn}
    elif mode == "required":
        raise SandboxError(f"seccomp filters are not available here ({machine()})")
    else:
        report["seccomp"] = "unavailable"
    return report



# -- the second layer: one tenant (T-TENANT-1) --------------------------------
def tenant_dirs(volumes_dir: str, tenant_id: str) -> tuple[str, str]:
    """The directories a worker bound to ``tenant_id`` may write: the tenant's
    volumes (``<volumes>/<tenant>``) and its cells' /tmp roots
    (``<volumes>/.tmp/<tenant>``, scratch.py). The id is checked before it
    becomes a path (fail closed)."""
    if not isinstance(tenant_id, str) or not protocol.TENANT_ID.fullmatch(tenant_id):
        raise SandboxError("malformed tenant id")
    root = os.path.realpath(volumes_dir)
    return os.path.join(root, tenant_id), os.path.join(root, scratch.TMP_ROOT, tenant_id)


def tenant_snapshot_dir(config: Mapping[str, Any], tenant_id: str) -> str | None:
    """The tenant's cell snapshots (``<snapshots>/<tenant>``, T-IMAGE-2), which
    a worker bound to it reads and writes; None when the node keeps none."""
    root = config.get("snapshots_dir")
    if not root:
        return None
    if not isinstance(tenant_id, str) or not protocol.TENANT_ID.fullmatch(tenant_id):
        raise SandboxError("malformed tenant id")
    return os.path.join(os.path.realpath(str(root)), tenant_id)


def narrow_to_tenant(config: Mapping[str, Any], scratch_dirs: tuple[str, ...], tenant_id: str) -> dict[str, Any]:
    """Confine this (already confined, still single-threaded) spare to one
    tenant: a second Landlock layer whose read-write set is only that tenant's
    directories and the worker's own scratch, then the final seccomp filter
    (no more narrowing calls). The directories must exist (the caller makes
    them). Raises SandboxError in mode ``required`` when a part is missing."""
    sb = dict(config.get("sandbox") or {})
    mode = sb.get("mode", "required")
    if mode not in MODES:
        raise SandboxError(f"unknown worker sandbox mode {mode!r}")
    threads = thread_count()
    if threads != 1:
        raise SandboxError(f"cannot bind a worker with {threads} threads to a tenant")
    sb["volume_set"] = list(tenant_dirs(str(config["volumes_dir"]), tenant_id))
    snapshots = tenant_snapshot_dir(config, tenant_id)
    if snapshots is not None:
        sb["volume_set"].append(snapshots)  # T-IMAGE-2: this tenant's snapshots, no other's
    rules = worker_rules({**config, "sandbox": sb}, scratch_dirs)
    report: dict[str, Any] = {"mode": mode, "tenant": tenant_id}
    abi = landlock_abi()
    report["landlock"] = _apply_or_refuse(rules, abi, mode)
    if _FILTERED:
        policy = seccomp.FilterPolicy()  # T-ESCAPE-3: no sockets or processes; no more narrowing either
        install_seccomp(seccomp.build(policy, machine()))
        report["seccomp"] = {"mode": "filter", "network": policy.network, "spawn": policy.spawn}
    elif mode == "required":
        raise SandboxError("the first seccomp filter is missing; refusing to bind")
    else:
        report["seccomp"] = "unavailable"
    return report
