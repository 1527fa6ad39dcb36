"""The one object graph: built once from Settings, handed to the app and CLI."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable

from appliance import __version__
from appliance.cells import CellService, now_ms
from appliance.config import Settings, load_egress_hosts
# re-exported: callers import them from here
from appliance.datadir import UnsafeDataDir as UnsafeDataDir, check_data_dir as check_data_dir, prepare_root as prepare_root
from appliance.license.manager import LicenseManager
from appliance.license.verify import HOST_FUNCTION_FEATURES, Limits, config_limits
from appliance.mcp import load_config
from appliance.ops.incident import in_incident
from appliance.policy.ratelimit import TokenBucketLimiter
from appliance.receipts.audit import VERIFY_BURST, VERIFY_RATE_PER_S, ReceiptAuditor
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.runtime import templates
from appliance.runtime.pool import WorkerPool
from appliance.storage import Store
from mirror.registry import Mirror

if TYPE_CHECKING:
    from appliance.cluster.node import ClusterNode

log = logging.getLogger("cell")

def egress_message(settings: Settings, hosts: dict[str, list[str]] | None) -> dict[str, Any]:
    """The egress part of a run message to a worker (see ``runtime.worker.egress_policy``)."""
    return {"enabled": settings.egress == "on", "allow_hosts": list(settings.egress_allow),
            "deny": list(settings.egress_deny), "hosts": hosts}


# Settings a running node may change on SIGHUP; the rest need a restart.
LIVE_SETTINGS = frozenset({
    "rate_limit_rps", "rate_limit_burst", "egress", "egress_allow", "egress_deny", "egress_hosts", "telemetry",
    "run_timeout_ms", "memory_mb", "cell_timeout_ms", "tenant_quota_mb", "tenant_file_limit", "checkpoint_interval_s",
    "tenant_max_cells",
})


@dataclass
class Services:
    settings: Settings
    store: Store
    receipts: ReceiptStore
    node_key: NodeKey
    pool: WorkerPool
    cells: CellService
    license: Any = None
    mirror: Any = None
    draining: threading.Event = field(default_factory=threading.Event)
    incident: threading.Event = field(default_factory=threading.Event)
    _inflight: list[int] = field(default_factory=lambda: [0])
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock)
    _rate: float | None = None
    _ip_limiter: TokenBucketLimiter | None = None
    _tenant_limiter: TokenBucketLimiter | None = None
    reload_requested: threading.Event = field(default_factory=threading.Event)
    settings_loader: Callable[[], Settings] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    receipt_audit: ReceiptAuditor | None = None
    # T-DOS-2: GET /v1/receipts/verify has its own per-tenant budget.
    verify_limiter: TokenBucketLimiter = field(
        default_factory=lambda: TokenBucketLimiter(VERIFY_RATE_PER_S, VERIFY_BURST, max_keys=10_000))
    # This node's membership and tenant copy when SYNAPSE_CLUSTER_ETCD is set (appliance/cluster/node.py).
    cluster: ClusterNode | None = None

    def auditor(self) -> ReceiptAuditor:
        """The live receipt auditor (its thread starts on first use)."""
        with self._inflight_lock:
            if self.receipt_audit is None:
                self.receipt_audit = ReceiptAuditor(self.receipts)
            return self.receipt_audit

    def status(self) -> dict[str, Any]:
        lic = self.license.summary() if self.license is not None else None
        registry: dict[str, Any] | None = None
        if self.mirror is not None:
            try:
                registry = self.mirror.status()
            except Exception as e:  # an unverifiable registry is reported, never trusted
                registry = {"error": str(e)[:200]}
        return {
            "version": __version__,
            "node_id": self.settings.node_id,
            "tier": lic["tier"] if lic else "free",
            "license": lic,
            "egress": self.settings.egress,
            "telemetry": self.settings.telemetry,
            "node_public_key": self.node_key.public_key_hex,
            "node_key_id": self.node_key.key_id,
            "templates": [t["name"] for t in self.templates()],
            "workers": self.pool.stats(),
            "worker_sandbox": self.pool.sandbox_status(),
            "receipts": self.receipts.count(),
            "registry": registry,
            **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
        }

    def reload_config(self) -> list[str]:
        """SIGHUP: re-read config.toml and the environment. Settings that are
        safe to change live take effect now; the others are reported as
        needing a restart. A bad file keeps the running configuration."""
        if self.settings_loader is None:
            return []
        try:
            new = self.settings_loader()
            egress_hosts = load_egress_hosts(new.egress_hosts)
        except Exception as e:
            log.error("config reload refused, keeping the running configuration: %s", e)
            return [f"refused: {e}"]
        old = self.settings
        changed_live = {k: getattr(new, k) for k in LIVE_SETTINGS if getattr(new, k) != getattr(old, k)}
        needs_restart = sorted(f.name for f in fields(old)
                               if f.name not in LIVE_SETTINGS and getattr(new, f.name) != getattr(old, f.name))
        if changed_live:
            updated = replace(old, **changed_live)
            self.settings = updated
            self.cells.settings = updated
            self.pool.settings = updated
            egress = egress_message(updated, egress_hosts)
            self.cells.egress = egress if egress["enabled"] else None
            with self._inflight_lock:
                self._rate = None  # buckets are rebuilt at the new rate on the next request
        for name in needs_restart:
            log.warning("config reload: %s changed but takes effect only after a restart", name)
        log.info("config reloaded: %s", ", ".join(sorted(changed_live)) or "nothing changed live")
        return sorted(changed_live) + [f"restart needed: {n}" for n in needs_restart]

    def limits(self) -> Limits:
        """The limits in force: min(config, license, hard ceilings) — a license
        can lower or raise within the appliance's ceilings, never past them."""
        if self.license is not None:
            try:
                lim: Limits = self.license.effective_limits()
                return lim
            except Exception:
                log.exception("license limits unavailable; using the configuration")
        return config_limits(self.settings)

    def tier(self) -> str:
        if self.license is None:
            return "free"
        try:
            return str(self.license.current().tier)
        except Exception:
            return "free"

    def allows(self, feature: str) -> bool:
        """True when the license in force grants ``feature``; any failure is "no" (T-LIC-2)."""
        if self.license is None:
            return False
        try:
            return bool(self.license.allows(feature))
        except Exception:
            return False

    def limiter_for(self, rate: float) -> TokenBucketLimiter:
        """The per-client bucket set at the rate in force (rebuilt when a new
        license changes it)."""
        with self._inflight_lock:
            if self._rate != rate or self._ip_limiter is None or self._tenant_limiter is None:
                self._rate = rate
                self._ip_limiter = TokenBucketLimiter(rate, self.settings.rate_limit_burst)
                self._tenant_limiter = TokenBucketLimiter(rate, self.settings.rate_limit_burst)
            return self._ip_limiter

    def tenant_limiter(self) -> TokenBucketLimiter:
        limiter = self.limiter_for(self.limits().rate_limit_rps)  # makes sure both exist at the current rate
        with self._inflight_lock:
            return self._tenant_limiter or limiter

    def begin_request(self) -> None:
        with self._inflight_lock:
            self._inflight[0] += 1

    def end_request(self) -> None:
        with self._inflight_lock:
            self._inflight[0] -= 1

    def inflight(self) -> int:
        with self._inflight_lock:
            return self._inflight[0]

    def templates(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for t in templates.all_templates():
            if t.runtime is None:
                out.append({"name": t.name, "version": t.description, "sha256": None, "size": None, "license": None})
                continue
            rt = t.runtime()
            out.append({"name": t.name, "version": rt.version, "sha256": rt.sha256, "size": rt.wasm.stat().st_size,
                        "license": rt.license})
        return out

    def start_background(self) -> None:
        def loop() -> None:
            last_checkpoint = time.monotonic()
            while not self._stop.wait(1.0):
                try:
                    if self.reload_requested.is_set():
                        self.reload_requested.clear()
                        self.reload_config()
                    (self.incident.set if in_incident(self.settings) else self.incident.clear)()
                    self.cells.reap_expired()
                    self.cells.pause_idle()
                    self.cells.capture_idle()  # T-IMAGE-2: what a crash rolls back to
                    self.pool.check_alive()
                    self.receipts.maintain()  # WAL checkpoint, a tree head owed since a crash (off the run path)
                    if time.monotonic() - last_checkpoint >= self.settings.checkpoint_interval_s:
                        last_checkpoint = time.monotonic()
                        self._checkpoint_if_grown()
                except Exception:
                    log.exception("background maintenance failed")

        t = threading.Thread(target=loop, name="cell-maintenance", daemon=True)
        t.start()
        self._threads.append(t)
        if self.cluster is not None:
            self.cluster.start()

    def _checkpoint_if_grown(self) -> None:
        """A signed tree head at each interval, when the log grew (T-RCPT-1)."""
        latest = self.receipts.latest_checkpoint()
        if latest is None or latest.get("count", 0) < self.receipts.count():
            self.receipts.checkpoint()

    def close(self) -> None:
        self._stop.set()
        if self.cluster is not None:
            self.cluster.close()  # leave the cluster first: HAProxy and peers stop counting on this node
        for t in self._threads:
            t.join(timeout=3)
        self.pool.close()
        if self.receipt_audit is not None:
            self.receipt_audit.close()
        try:
            self.receipts.checkpoint()
        except Exception:
            log.exception("final receipt checkpoint failed")
        self.receipts.close()
        self.store.close()


def build_services(settings: Settings, *, license_factory: Callable[[Settings], Any] | None = None,
                   progress: Callable[[str], None] | None = None, pool: WorkerPool | None = None) -> Services:
    """The service graph. Without ``pool`` the worker pool is started here and
    waited for; ``cell serve`` passes one it started earlier in the background
    (``WorkerPool.start_in_background``), which is closed if this fails."""
    try:
        return _build_services(settings, license_factory=license_factory, progress=progress, pool=pool)
    except BaseException:
        if pool is not None:
            pool.close()
        raise


def _build_services(settings: Settings, *, license_factory: Callable[[Settings], Any] | None,
                    progress: Callable[[str], None] | None, pool: WorkerPool | None) -> Services:
    prepare_root(settings)
    store = Store(settings.db_path)
    node_key = NodeKey.load_or_create(settings.keys_dir)
    receipts = ReceiptStore(settings.db_path, node_key)
    mirror = None
    try:
        mirror = Mirror(settings.mirror_dir)
    except Exception as e:  # an unusable registry: no revocation list, so Pro licenses are not honoured
        log.warning("trust registry unavailable: %s", e)
    lic = None
    try:
        if license_factory is not None:
            lic = license_factory(settings)
        else:
            if mirror is not None:
                lic = LicenseManager(settings, revocations=mirror.is_license_revoked, revoked_keys=mirror.is_key_revoked,
                                     node_key=node_key)
            else:
                lic = LicenseManager(settings, revocations=_registry_unavailable, revoked_keys=_registry_unavailable,
                                     node_key=node_key)
    except Exception as e:  # no license subsystem means the free tier, never a crash
        log.warning("license subsystem unavailable, running free tier: %s", e)
    if settings.mcp_servers is not None:
        load_config(settings.mcp_servers)  # a bad MCP table stops start-up here, not in a worker
    if pool is None:
        pool = WorkerPool(settings, progress=progress)
        pool.start()
    egress = egress_message(settings, load_egress_hosts(settings.egress_hosts))

    def pro_features() -> frozenset[str]:
        # T-LIC-2: each Pro host function only when the license lists its feature.
        return lic.granted(HOST_FUNCTION_FEATURES) if lic is not None else frozenset()

    cells = CellService(settings, store, pool, receipts, egress=egress if egress["enabled"] else None,
                        pro_features=pro_features)
    services = Services(settings, store, receipts, node_key, pool, cells, license=lic, mirror=mirror)
    cells.limits = services.limits
    if settings.clustered:
        from appliance.cluster.node import ClusterNode  # start-up: the etcd client (http.client, ssl) only when clustered

        services.cluster = ClusterNode(settings, store, node_key.key_id, node_key.public_key_hex,
                                       draining=lambda: services.draining.is_set() or services.incident.is_set())
        try:
            services.cluster.join()  # refuses an id another node key holds (T-CLUSTER-2)
        except BaseException:
            services.close()
            raise
    return services


def _registry_unavailable(_id: str) -> bool:
    """Fail closed: without a verified registry, revocation cannot be ruled out."""
    raise RuntimeError("trust registry unavailable")


def ensure_default_tenant(services: Services) -> str | None:
    """Create a 'default' tenant on first start; return its key once, else None.
    A cluster node never does: tenants are the cluster's (`cell tenant add`)."""
    if services.cluster is not None or services.store.list_tenants():
        return None
    _, key = services.store.add_tenant("default", now_ms(), tenant_id="default")
    return key


def pid_and_time() -> str:
    return f"pid {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
