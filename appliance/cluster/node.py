"""This node in the cluster: its membership lease and its copy of the shared tenants.

A node registers twice in etcd: once for good under ``nodes/<id>`` (address
and node key, so HAProxy keeps routing its cells and ``verify --cluster``
keeps checking its receipts while it is down), and once under ``members/<id>``
with a lease it renews; when the node dies the lease runs out and it is no
longer a member. Tenants and key hashes live under ``tenants/``; each node
copies them into its own SQLite every ``SYNC_EVERY_S``, so it keeps serving
the tenants it knows when etcd is unreachable, and changes (new tenants) are
refused until etcd answers again (T-CLUSTER-1).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable

from appliance.cluster import policy
from appliance.cluster.etcd import Etcd, EtcdUnavailable
from appliance.cluster.registry import read_members
from appliance.config import Settings
from appliance.errors import ConfigError
from appliance.storage import KEY_PREFIX, Store, Tenant, hash_key

log = logging.getLogger("cell.cluster")


class ClusterUnavailable(Exception):
    """etcd did not answer: the cluster takes no change now (fail closed)."""


def etcd_for(settings: Settings) -> Etcd:
    return Etcd(settings.cluster_etcd)


def me(settings: Settings, key_id: str, public_key: str, state: str = "up") -> policy.Member:
    return policy.Member(settings.node_id, settings.node_addr, key_id, public_key, state)


def _local_tenants(store: Store) -> dict[str, policy.TenantRecord]:
    return {row[0]: policy.TenantRecord(*row) for row in store.tenant_rows()}


def add_tenant(settings: Settings, store: Store, name: str, now_ms: int) -> tuple[Tenant, str]:
    """Create a tenant for the whole cluster: etcd first, then this node's copy.

    Refused when etcd does not answer (T-CLUSTER-1): a tenant that exists on
    one node only would work or not depending on where HAProxy sends it.
    """
    tid = "t" + secrets.token_hex(6)
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = policy.TenantRecord(tid, name, hash_key(api_key), now_ms, False)
    policy.parse_tenant(policy.TENANTS + tid, record.to_json())  # the name passes the checks every node applies
    try:
        created = etcd_for(settings).create(policy.TENANTS + tid, record.to_json())
    except EtcdUnavailable as exc:
        raise ClusterUnavailable(f"etcd did not answer, so the cluster takes no new tenant now: {exc}") from None
    if not created:
        raise ClusterUnavailable(f"tenant id {tid} already exists in etcd; try again")
    store.put_tenant_row(tid, name, record.key_hash, now_ms, False)
    return Tenant(tid, name, now_ms, False), api_key


def revoke_tenant(settings: Settings, store: Store, tenant_id: str) -> bool:
    """Revoke on this node at once, then in etcd (every node follows within a sync).

    Returns whether the tenant existed. Raises :class:`ClusterUnavailable`
    when etcd did not take it: the tenant is then revoked on this node only.
    """
    known = store.revoke_tenant(tenant_id)  # denying more never waits for etcd
    etcd = etcd_for(settings)
    key = policy.TENANTS + tenant_id
    try:
        for _attempt in range(5):
            kv = etcd.get(key)
            if kv is None:
                return known
            record = policy.parse_tenant(key, kv.value)
            revoked = policy.TenantRecord(record.id, record.name, record.key_hash, record.created_at, True)
            if etcd.replace(key, revoked.to_json(), kv.mod_revision):
                return True
    except EtcdUnavailable as exc:
        raise ClusterUnavailable(f"revoked on this node only; etcd did not answer: {exc}") from None
    raise ClusterUnavailable("revoked on this node only; the etcd record kept changing, run the command again")


class ClusterNode:
    """Membership lease, tenant sync, and what /v1/status and `cell doctor` report."""

    def __init__(self, settings: Settings, store: Store, key_id: str, public_key: str,
                 draining: Callable[[], bool] = lambda: False, etcd: Etcd | None = None) -> None:
        self.settings = settings
        self.store = store
        self.key_id = key_id
        self.public_key = public_key
        self.draining = draining
        self.etcd = etcd or etcd_for(settings)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease = 0
        self._state = "up"
        self._registered = False
        self._published = False
        self._etcd_ok = False
        self._error: str | None = "not yet in touch with etcd"
        self._last_sync: float | None = None
        self._revision = -1
        self._members: dict[str, policy.Member] = {}

    # -- joining ------------------------------------------------------------
    def join(self) -> None:
        """Register this node (refusing an id that belongs to another node key,
        T-CLUSTER-2), publish local tenants etcd lacks, take the shared ones.
        An unreachable etcd is not fatal: the loop keeps trying."""
        try:
            self._register()
            self._sync_tenants(publish=True)
            self._published = True
            self._ok()
        except EtcdUnavailable as exc:
            self._failed(exc)

    def _check_record(self, prefix: str, mine: policy.Member) -> bool:
        """Whether etcd has a record for this id under ``prefix``; refuses one of another key."""
        kv = self.etcd.get(prefix + mine.node_id)
        if kv is None:
            return False
        try:
            existing = policy.parse_member(kv.key, kv.value, prefix)
        except policy.ClusterRecordError as exc:
            raise ConfigError("SYNAPSE_NODE_ID", f"etcd holds an unreadable record for this node: {exc}") from None
        conflict = policy.registration_conflict(existing, mine)
        if conflict:
            raise ConfigError("SYNAPSE_NODE_ID", conflict)
        return True

    def _register(self) -> None:
        mine = me(self.settings, self.key_id, self.public_key, self._state)
        known = self._check_record(policy.NODES, mine)
        self._check_record(policy.MEMBERS, mine)
        if known:
            self.etcd.put(policy.NODES + mine.node_id, mine.to_json())  # the address may have changed
        elif not self.etcd.create(policy.NODES + mine.node_id, mine.to_json()):
            self._check_record(policy.NODES, mine)  # two nodes started with one id at once: one key wins
        lease = self.etcd.grant(policy.LEASE_TTL_S)
        self.etcd.put(policy.MEMBERS + mine.node_id, mine.to_json(), lease=lease)
        with self._lock:
            self._lease = lease
            self._registered = True
        log.info("cluster: node %s registered at %s (lease %ss)", mine.node_id, mine.addr, policy.LEASE_TTL_S)

    def _renew(self) -> None:
        state = "draining" if self.draining() else "up"
        with self._lock:
            lease, registered = self._lease, self._registered
        if not registered or lease == 0:
            self._register()
            return
        ttl = self.etcd.keepalive(lease)
        if ttl <= 0:  # etcd lost the lease (it was down longer than the TTL): register again
            log.warning("cluster: membership lease expired; registering again")
            with self._lock:
                self._registered = False
            self._register()
            return
        if state != self._state:
            self._state = state
            self.etcd.put(policy.MEMBERS + self.settings.node_id,
                          me(self.settings, self.key_id, self.public_key, state).to_json(), lease=lease)

    # -- tenants ------------------------------------------------------------
    def _sync_tenants(self, publish: bool = False) -> None:
        revision, kvs = self.etcd.get_prefix(policy.TENANTS)
        if revision == self._revision and not publish:
            return
        shared: dict[str, policy.TenantRecord] = {}
        for kv in kvs:
            try:
                record = policy.parse_tenant(kv.key, kv.value)
            except policy.ClusterRecordError as exc:
                log.warning("cluster: skipped a tenant record: %s", exc)  # never guessed at (T-CLUSTER-1)
                continue
            shared[record.id] = record
        local = _local_tenants(self.store)
        if publish:
            for record in policy.to_publish(local.values(), shared):
                if self.etcd.create(policy.TENANTS + record.id, record.to_json()):
                    log.info("cluster: published local tenant %s", record.id)
                    shared[record.id] = record
        for record in shared.values():
            merged = policy.merge_tenant(local.get(record.id), record)
            if merged is not None:
                try:
                    self.store.put_tenant_row(merged.id, merged.name, merged.key_hash, merged.created_at, merged.revoked)
                except Exception as exc:  # e.g. a key hash another local tenant holds: skip, never overwrite it
                    log.warning("cluster: tenant %s not copied: %s", record.id, exc)
        self._revision = revision
        with self._lock:
            self._last_sync = time.monotonic()

    # -- loop ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cell-cluster", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_renew = time.monotonic()
        while not self._stop.wait(policy.SYNC_EVERY_S):
            try:
                if time.monotonic() - last_renew >= policy.RENEW_EVERY_S or not self._registered:
                    last_renew = time.monotonic()
                    self._renew()
                    self._members = read_members(self.etcd)
                self._sync_tenants(publish=not self._published)  # joined while etcd was down: publish now
                self._published = True
                self._ok()
            except EtcdUnavailable as exc:
                self._failed(exc)
            except ConfigError as exc:  # another node took this id meanwhile: stay out (T-CLUSTER-2)
                with self._lock:
                    self._registered = False
                self._failed(exc)
            except Exception:
                log.exception("cluster: maintenance failed")

    def _ok(self) -> None:
        with self._lock:
            if not self._etcd_ok:
                log.info("cluster: etcd reachable")
            self._etcd_ok, self._error = True, None

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if self._etcd_ok or self._error != str(exc):
                log.warning("cluster: %s (serving known tenants; changes refused)", exc)
            self._etcd_ok, self._error = False, str(exc)[:300]

    def status(self) -> dict[str, Any]:
        with self._lock:
            age = None if self._last_sync is None else time.monotonic() - self._last_sync
            return policy.summary(node_id=self.settings.node_id, addr=self.settings.node_addr, etcd_ok=self._etcd_ok,
                                  error=self._error, last_sync_age_s=age, members=dict(self._members),
                                  tenants=len(self.store.list_tenants()))

    def close(self) -> None:
        """Leave: stop renewing and give the lease back, so the node is no member at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            lease, self._lease, self._registered = self._lease, 0, False
        if lease:
            try:
                self.etcd.revoke(lease)
            except EtcdUnavailable as exc:
                log.warning("cluster: lease not revoked (it expires in %ss): %s", policy.LEASE_TTL_S, exc)
