"""`cell doctor`: read-only checks of a node, each with the fix.

Each check is a function of (settings, context) returning a ``Check``; none
writes to the data directory (the license check reads the clock high-water
mark read-only, the registry is only opened if it already exists).
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from appliance.fileio import sha256_file

from appliance.config import Settings
from appliance.confine import Volume
from appliance.license.machine import machine_fingerprint
from appliance.license.manager import embedded_license_keys, read_clock_problem, read_high_water
from appliance.license.verify import MAX_FILE_BYTES, LicenseRejected, days_left, verify_license
from appliance.runtime import sandbox
from mirror.registry import Mirror, RegistryStale

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_DISK = 512 * 1024 * 1024
LOW_FREE_DISK = 2 * 1024 * 1024 * 1024
WORKER_BASE_MB = 200  # an idle worker with its warm interpreters, measured roughly
EARLIEST_SANE = datetime(2025, 1, 1, tzinfo=timezone.utc)  # older than this build: the clock is wrong


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    message: str
    fix: str = ""

    def line(self) -> str:
        tag = {OK: "[ OK ]", WARN: "[WARN]", FAIL: "[FAIL]"}[self.level]
        return f"{tag} {self.name}: {self.message}" + (f" -- fix: {self.fix}" if self.fix else "")


@dataclass
class Context:
    now: datetime
    license_keys: dict[str, bytes] | None = None  # None: the embedded vendor keys
    registry_root: bytes | None = None  # None: the embedded registry trust root
    machine_id: str | None = None
    meminfo: Callable[[], int | None] = lambda: _mem_available()
    extra: dict[str, Any] = field(default_factory=dict)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _private(path: Path, want_dir: bool) -> str | None:
    """Why ``path`` is not private to this user, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if want_dir != stat.S_ISDIR(st.st_mode):
        return "is not a directory" if want_dir else "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not {os.geteuid()}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"has mode {mode:04o} (group/others have access)"
    return None


def check_permissions(s: Settings, ctx: Context) -> Check:
    # T-TENANT-1 / T-RCPT-1: others must not read volumes or swap the node key.
    if not s.root.exists():
        return Check("data dir", FAIL, f"{s.root} does not exist", "start the service once (cell serve) or set SYNAPSE_ROOT")
    problems: list[str] = []
    fixes: list[str] = []
    for path, is_dir in ((s.root, True), (s.volumes_dir, True), (s.db_path.parent, True), (s.keys_dir, True),
                         (s.keys_dir / "node_ed25519", False)):
        why = _private(path, is_dir)
        if why == "missing" and path != s.root:
            continue  # created at first start
        if why is not None:
            problems.append(f"{path} {why}")
            fixes.append(f"chmod {'700' if is_dir else '600'} {path}")
    if problems:
        return Check("data dir", FAIL, "; ".join(problems), "; ".join(fixes))
    return Check("data dir", OK, f"{s.root} and its key, database and volume directories are private (0700/0600)")


def check_module_cache(s: Settings, ctx: Context) -> Check:
    # T-CACHE-1: a .cwasm is native code; a tampered one would run in the host.
    d = s.cache_dir
    if not d.exists():
        return Check("module cache", WARN, f"{d} is empty: the first start compiles the runtimes (~2 min, 2.5 GB)",
                     "run `cell warm` before taking traffic")
    why = _private(d, True)
    if why is not None and "mode" in why:
        st_mode = stat.S_IMODE(os.stat(d).st_mode)
        if st_mode & 0o022:
            return Check("module cache", FAIL, f"{d} {why}: others could plant compiled code", f"chmod 700 {d}")
    bad: list[str] = []
    count = 0
    for cwasm in sorted(d.glob("*.cwasm")):
        count += 1
        meta = cwasm.with_suffix(".json")
        try:
            st = os.lstat(cwasm)
            recorded = json.loads(meta.read_text())
        except (OSError, ValueError):
            bad.append(f"{cwasm.name} (no readable hash record)")
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            bad.append(f"{cwasm.name} (not a private regular file of ours)")
        elif not isinstance(recorded, dict) or recorded.get("size") != st.st_size or sha256_file(cwasm) != recorded.get("sha256"):
            bad.append(f"{cwasm.name} (hash differs from its record: tampered or corrupt)")
    if bad:
        return Check("module cache", FAIL, f"{len(bad)} of {count} compiled modules fail: " + ", ".join(bad),
                     f"delete them (they are recompiled and re-checked at the next start): rm {d}/<name>.cwasm {d}/<name>.json")
    if count == 0:
        return Check("module cache", WARN, f"{d} holds no compiled modules: the first start compiles them (~2 min)",
                     "run `cell warm` before taking traffic")
    return Check("module cache", OK, f"{count} compiled modules match their recorded sha256")


def check_openat2(s: Settings, ctx: Context) -> Check:
    probe_dir = s.volumes_dir if s.volumes_dir.is_dir() else (s.root if s.root.is_dir() else Path("/tmp"))
    try:
        with Volume(str(probe_dir.absolute())) as vol:
            resolver = vol.resolver
    except Exception as exc:
        return Check("openat2", WARN, f"could not probe ({type(exc).__name__})", "check that the data dir is ours and readable")
    if resolver == "openat2":
        return Check("openat2", OK, "kernel path resolution with RESOLVE_BENEATH is available (T-PATH-1)")
    return Check("openat2", WARN, "openat2 is unavailable (old kernel or seccomp): paths use the slower step-by-step walker",
                 "run on Linux 5.6+ and allow the openat2 syscall in the service's seccomp profile")


def check_worker_sandbox(s: Settings, ctx: Context) -> Check:
    """T-ESCAPE-1/2: the second wall around workers (Landlock, seccomp, network)."""
    offered = sandbox.probe()
    abi, has_seccomp = offered["landlock_abi"], offered["seccomp"]
    # T-ESCAPE-3: host_fetch and MCP go through the supervisor's broker, whatever the config
    network = "denied (host_fetch and MCP go through the supervisor)"
    summary = (f"Landlock ABI {abi}{' (TCP rules)' if abi >= 4 else ''}{' (signal/socket scopes)' if abi >= 6 else ''}, "
               f"seccomp {'filter' if has_seccomp else 'unavailable'} ({offered['arch']}), worker network {network}, "
               f"mode {s.worker_sandbox}; tenant binding: one tenant per worker"
               f"{' (its volume and /tmp only, by Landlock)' if abi >= 1 else ' (placement only: no Landlock)'}, "
               f"budget {s.workers}, max {s.worker_ceiling}, spares {s.worker_spares}, idle reclaim {s.worker_idle_s}s")
    missing = [n for n, ok in (("Landlock", abi >= 1), ("seccomp", has_seccomp)) if not ok]
    if missing and s.worker_sandbox == "required":
        return Check("worker sandbox", FAIL, f"{summary}: {' and '.join(missing)} missing, the service will refuse to start",
                     "run on Linux 5.13+ with Landlock enabled (lsm=landlock,...) on x86_64/aarch64, "
                     "or set SYNAPSE_WORKER_SANDBOX=off-unsafe knowingly")
    if s.worker_sandbox != "required":
        return Check("worker sandbox", WARN, f"{summary}: the override is set; "
                     + (f"{' and '.join(missing)} missing, workers run without them" if missing else "all parts are applied anyway"),
                     "set SYNAPSE_WORKER_SANDBOX=required")
    return Check("worker sandbox", OK, summary)


def _revocations(s: Settings, ctx: Context) -> Callable[[str], bool]:
    """The lookup the service uses; it raises (and the license is refused) when the
    registry is absent, stale or broken, exactly as in the service (T-LIC-3)."""
    if not s.mirror_dir.is_dir():
        def missing(_license_id: str) -> bool:
            raise RegistryStale("registry_missing", "No trust registry is installed yet, so license revocations are unknown.")

        return missing
    try:
        return Mirror(s.mirror_dir, trusted_root=ctx.registry_root, clock=lambda: ctx.now).is_license_revoked
    except Exception as exc:  # an unusable registry: the license check says revocation_unavailable
        error = exc

        def unusable(_license_id: str) -> bool:
            raise error

        return unusable


def clock_mark_problem(s: Settings) -> str | None:
    """Why the signed clock high-water mark cannot be believed, or None (read-only, T-LIC-3)."""
    return read_clock_problem(s.db_path, s.keys_dir)


def check_license(s: Settings, ctx: Context) -> Check:
    path = s.license_path
    if not path.exists():
        return Check("license", OK, f"no license at {path}: free tier", "")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return Check("license", FAIL, f"{path} cannot be read ({exc.strerror})", f"chmod 640 {path} and give the service user read access")
    try:
        problem = clock_mark_problem(s)
    except Exception as exc:  # no key or database to check against: say so, do not guess
        problem = None
        note = f"clock mark not checked ({type(exc).__name__})"
    else:
        note = ""
    if problem is not None:
        return Check("license", FAIL, f"refused (clock_tampered): {problem}. The node runs the free tier.",
                     "restore the node database from a backup (cell restore), or ask vendor support")
    revoked = _revocations(s, ctx)
    try:
        lic = verify_license(data, keys=embedded_license_keys() if ctx.license_keys is None else ctx.license_keys,
                             now=ctx.now, machine_id=ctx.machine_id if ctx.machine_id is not None else machine_fingerprint(),
                             is_revoked=revoked, high_water=read_high_water(s.db_path))
    except LicenseRejected as exc:
        return Check("license", FAIL, f"{path} is refused ({exc.code}): {exc.reason} The node runs the free tier.",
                     "install a valid license: cell license verify FILE, then cell license install FILE")
    left = days_left(lic, ctx.now)
    msg = f"{lic.tier} tier for {lic.licensee}, {left} days left" + (f" ({note})" if note else "")
    if left < 30:
        return Check("license", WARN, msg, "ask the vendor for a renewal and install it with cell license install FILE")
    return Check("license", OK, msg)


def check_registry(s: Settings, ctx: Context) -> Check:
    if not s.mirror_dir.is_dir():
        return Check("registry", WARN, "no trust registry yet (installed at first start)", "start the service once")
    try:
        status = Mirror(s.mirror_dir, trusted_root=ctx.registry_root).status(now=ctx.now)
    except Exception as exc:
        return Check("registry", FAIL, f"cannot be opened ({type(exc).__name__}: {str(exc)[:120]})",
                     "re-import a registry update from the vendor (cell mirror import)")
    if not status.get("ok"):
        return Check("registry", FAIL, f"does not verify: {str(status.get('error'))[:160]}",
                     "re-import a registry update from the vendor (cell mirror import)")
    days = status.get("days_until_expiry")
    state = status.get("expiry_state")
    msg = f"{status.get('expires_role')} metadata expires {status.get('expires')} ({days} days)"
    if state == "expired":
        # T-LIC-3: the service refuses licenses (registry_expired) until a fresh update is imported.
        return Check("registry", FAIL, msg + ": expired, Pro licenses are not honoured (registry_expired)",
                     "import a fresh registry update (cell mirror import)")
    if status.get("targets_version") is None:
        return Check("registry", WARN, "only the trust root is installed: Pro licenses are not honoured (registry_missing)",
                     "import the registry update shipped with the license (cell mirror import)")
    if state != "ok":
        return Check("registry", WARN, msg, "import a fresh registry update soon (cell mirror import)")
    return Check("registry", OK, msg)


def check_resources(s: Settings, ctx: Context) -> Check:
    target = s.root if s.root.exists() else s.root.absolute().parent
    free = shutil.disk_usage(target).free
    need_mb = s.workers * (WORKER_BASE_MB + s.memory_mb)
    avail = ctx.meminfo()
    parts = [f"{free / 2**30:.1f} GiB free disk"]
    if avail is not None:
        parts.append(f"{avail / 2**20:.0f} MiB memory available for {s.workers} workers x ({WORKER_BASE_MB} + {s.memory_mb}) MiB = {need_mb} MiB")
    msg = ", ".join(parts)
    if free < MIN_FREE_DISK:
        return Check("resources", FAIL, msg + ": receipts cannot be written safely", f"free disk space under {target}")
    if (avail is not None and avail < need_mb * 2**20) or free < LOW_FREE_DISK:
        return Check("resources", WARN, msg, "lower SYNAPSE_WORKERS or SYNAPSE_MEMORY_MB, or add memory/disk")
    return Check("resources", OK, msg)


def check_clock(s: Settings, ctx: Context) -> Check:
    now = ctx.now
    if now < EARLIEST_SANE:
        return Check("clock", FAIL, f"system time {now:%Y-%m-%d} is before this release", "set the clock (timedatectl set-time, or an NTP source on the LAN)")
    try:
        problem = clock_mark_problem(s)
    except Exception as exc:
        return Check("clock", WARN, f"cannot check the signed clock mark ({type(exc).__name__}: {str(exc)[:120]})",
                     "run cell doctor as the service user")
    if problem is not None:
        # T-LIC-3: a deleted or edited mark could hide a clock wound back.
        return Check("clock", FAIL, f"{problem}; licenses are refused (clock_tampered)",
                     "restore the node database from a backup (cell restore), or ask vendor support")
    high = read_high_water(s.db_path)
    if high is not None and now < high:
        return Check("clock", FAIL, f"time went backwards: {now:%Y-%m-%dT%H:%M:%SZ} is before the last time seen {high:%Y-%m-%dT%H:%M:%SZ}",
                     "set the clock forward; licenses are refused until it passes the last time seen")
    last = _last_receipt_ms(s.db_path)
    if last is not None and last > now.timestamp() * 1000 + 300_000:
        return Check("clock", FAIL, "the newest receipt is more than 5 minutes in the future", "set the clock (timedatectl set-time)")
    return Check("clock", OK, f"{now:%Y-%m-%dT%H:%M:%SZ}, not behind the last time seen or the newest receipt")


def _last_receipt_ms(db: Path) -> int | None:
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT MAX(timestamp) FROM receipts").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return int(row[0]) if row and row[0] is not None else None


def check_cluster(s: Settings, ctx: Context) -> Check:
    """A cluster node: etcd answers, this node is registered and live (docs/cluster.md)."""
    if not s.clustered:
        return Check("cluster", OK, "standalone (SYNAPSE_CLUSTER_ETCD not set)")
    # start-up: the etcd client is needed only on a cluster node
    from appliance.cluster import policy
    from appliance.cluster.etcd import Etcd, EtcdUnavailable
    from appliance.cluster.registry import read_members

    etcd = ctx.extra.get("etcd") or Etcd(s.cluster_etcd)
    try:
        nodes = read_members(etcd, policy.NODES)
        live = read_members(etcd, policy.MEMBERS)
    except EtcdUnavailable as exc:
        return Check("cluster", FAIL, f"etcd unreachable ({str(exc)[:160]}): this node serves the tenants it knows "
                     "and refuses changes (new tenants) until etcd answers",
                     f"start etcd or fix SYNAPSE_CLUSTER_ETCD ({', '.join(s.cluster_etcd)})")
    if not s.trusted_proxies:
        return Check("cluster", WARN, "SYNAPSE_TRUSTED_PROXIES is empty: behind HAProxy every client shares one rate limit",
                     "list HAProxy's address in SYNAPSE_TRUSTED_PROXIES")
    members = ", ".join(f"{n}{'' if n in live else ' (down)'}" for n in sorted(nodes)) or "none"
    if s.node_id not in live:
        return Check("cluster", WARN, f"etcd answers; node {s.node_id} is not a live member (is `cell serve` running?); "
                     f"nodes: {members}", "start the service (cell serve)")
    return Check("cluster", OK, f"etcd answers; node {s.node_id} is live at {s.node_addr}; nodes: {members}")


CHECKS: tuple[Callable[[Settings, Context], Check], ...] = (
    check_permissions, check_module_cache, check_openat2, check_worker_sandbox, check_license, check_registry, check_resources, check_clock,
    check_cluster,
)


def run_checks(settings: Settings, ctx: Context) -> list[Check]:
    out: list[Check] = []
    for check in CHECKS:
        try:
            out.append(check(settings, ctx))
        except Exception as exc:  # a broken check is reported, never a traceback
            out.append(Check(check.__name__.removeprefix("check_"), FAIL, f"check failed: {type(exc).__name__}: {str(exc)[:160]}"))
    return out


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.level == FAIL for c in checks) else 0
