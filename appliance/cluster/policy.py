"""Cluster policy. PURE: no I/O, no sockets.

What lives in etcd and how it is checked, how a node's local tenant copy
follows it, and the complete haproxy.cfg for the members. Everything read
from etcd is validated here before a node acts on it (T-CLUSTER-1): a record
that does not parse is skipped, never guessed at.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

PREFIX = "/cell/"
MEMBERS = PREFIX + "members/"   # leased: present while the node renews its lease
NODES = PREFIX + "nodes/"       # permanent: every node that ever joined, until removed
TENANTS = PREFIX + "tenants/"

LEASE_TTL_S = 6
RENEW_EVERY_S = 2.0
SYNC_EVERY_S = 0.5  # a key added on one node works everywhere well within 2 s

# Node ids end up in cell ids (c<node>-<hex>), HAProxy backend names and path
# rules: lowercase letters and digits only, so no id is a prefix of another's
# "c<node>-" and nothing needs quoting in haproxy.cfg.
NODE_ID = re.compile(r"[a-z0-9]{1,16}")
_TENANT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_HASH = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_PUBLIC_KEY = re.compile(r"[0-9a-f]{64}")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


class ClusterRecordError(ValueError):
    """A record from etcd (or an address from config) that does not pass its checks."""


def check_node_id(value: object) -> str:
    if not isinstance(value, str) or NODE_ID.fullmatch(value) is None:
        raise ClusterRecordError(f"node id {value!r} must be 1-16 lowercase letters or digits (set SYNAPSE_NODE_ID)")
    return value


def check_addr(value: object) -> str:
    """``host:port`` as peers and HAProxy reach a node (no scheme, no path)."""
    if not isinstance(value, str) or ":" not in value:
        raise ClusterRecordError(f"address {value!r} must be HOST:PORT")
    host, _, port = value.rpartition(":")
    if _HOST.fullmatch(host) is None or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ClusterRecordError(f"address {value!r} must be HOST:PORT")
    return value


def check_endpoint(value: object) -> str:
    """An etcd client URL: http(s)://HOST:PORT."""
    if not isinstance(value, str):
        raise ClusterRecordError(f"etcd endpoint {value!r} must be http://HOST:PORT")
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            check_addr(value[len(scheme):].rstrip("/"))
            return value.rstrip("/")
    raise ClusterRecordError(f"etcd endpoint {value!r} must be http://HOST:PORT or https://HOST:PORT")


@dataclass(frozen=True)
class Member:
    node_id: str
    addr: str
    key_id: str
    public_key: str
    state: str = "up"  # "up" or "draining"

    def to_json(self) -> bytes:
        return json.dumps({"node_id": self.node_id, "addr": self.addr, "key_id": self.key_id,
                           "public_key": self.public_key, "state": self.state}, sort_keys=True).encode("utf-8")


def parse_member(key: str, raw: bytes, prefix: str) -> Member:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ClusterRecordError(f"{key}: not JSON") from None
    if not isinstance(data, dict):
        raise ClusterRecordError(f"{key}: not an object")
    node_id = check_node_id(data.get("node_id"))
    if key != prefix + node_id:
        raise ClusterRecordError(f"{key}: names node {node_id!r}")
    key_id, public_key, state = data.get("key_id"), data.get("public_key"), data.get("state", "up")
    if not isinstance(key_id, str) or _KEY_ID.fullmatch(key_id) is None:
        raise ClusterRecordError(f"{key}: bad key_id")
    if not isinstance(public_key, str) or _PUBLIC_KEY.fullmatch(public_key) is None:
        raise ClusterRecordError(f"{key}: bad public_key")
    if state not in ("up", "draining"):
        raise ClusterRecordError(f"{key}: bad state")
    return Member(node_id, check_addr(data.get("addr")), key_id, public_key, str(state))


def parse_members(items: Iterable[tuple[str, bytes]], prefix: str) -> tuple[dict[str, Member], list[str]]:
    """Valid members by node id, and a line for each record skipped."""
    out: dict[str, Member] = {}
    skipped: list[str] = []
    for key, raw in items:
        try:
            m = parse_member(key, raw, prefix)
        except ClusterRecordError as exc:
            skipped.append(str(exc))
            continue
        out[m.node_id] = m
    return out, skipped


def registration_conflict(existing: Member | None, me: Member) -> str | None:
    """Why this node may not take ``me.node_id`` (T-CLUSTER-2), or None.

    A node id belongs to one node key: another key under the same id would
    take over that node's cells in HAProxy and its receipts in
    ``verify --cluster``.
    """
    if existing is None or existing.public_key == me.public_key:
        return None
    return (f"node id {me.node_id!r} is registered in etcd with another node key ({existing.key_id}); "
            f"choose another SYNAPSE_NODE_ID, or remove the old node with `cell cluster remove-node {me.node_id}`")


@dataclass(frozen=True)
class TenantRecord:
    id: str
    name: str
    key_hash: str
    created_at: int
    revoked: bool

    def to_json(self) -> bytes:
        return json.dumps({"id": self.id, "name": self.name, "key_hash": self.key_hash, "created_at": self.created_at,
                           "revoked": self.revoked}, sort_keys=True).encode("utf-8")


def parse_tenant(key: str, raw: bytes) -> TenantRecord:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ClusterRecordError(f"{key}: not JSON") from None
    if not isinstance(data, dict):
        raise ClusterRecordError(f"{key}: not an object")
    tid, name, key_hash = data.get("id"), data.get("name"), data.get("key_hash")
    created, revoked = data.get("created_at"), data.get("revoked")
    if not isinstance(tid, str) or _TENANT_ID.fullmatch(tid) is None or key != TENANTS + tid:
        raise ClusterRecordError(f"{key}: bad tenant id")
    if not isinstance(name, str) or not 0 < len(name) <= 200 or not name.isprintable():
        raise ClusterRecordError(f"{key}: bad name")
    if not isinstance(key_hash, str) or _KEY_HASH.fullmatch(key_hash) is None:
        raise ClusterRecordError(f"{key}: bad key_hash")
    if isinstance(created, bool) or not isinstance(created, int) or created < 0:
        raise ClusterRecordError(f"{key}: bad created_at")
    if not isinstance(revoked, bool):
        raise ClusterRecordError(f"{key}: bad revoked")
    return TenantRecord(tid, name, key_hash, created, revoked)


def merge_tenant(local: TenantRecord | None, shared: TenantRecord) -> TenantRecord | None:
    """The local row after seeing ``shared`` from etcd; None when nothing changes.

    Revocation is sticky (T-CLUSTER-1): a tenant revoked on this node stays
    revoked even if etcd (restored from an old backup, or written before the
    revocation reached it) says otherwise. Unknown means denied.
    """
    merged = TenantRecord(shared.id, shared.name, shared.key_hash, shared.created_at,
                          shared.revoked or (local is not None and local.revoked))
    return None if merged == local else merged


def to_publish(local: Iterable[TenantRecord], shared_ids: Iterable[str]) -> list[TenantRecord]:
    """Local tenants etcd does not have yet (a standalone node joining keeps its tenants)."""
    have = set(shared_ids)
    return [t for t in local if t.id not in have]


# -- haproxy.cfg ---------------------------------------------------------------

HEALTH_INTER_MS = 1000
HEALTH_FALL = 2
HEALTH_RISE = 2


def _json_error(message: str, code: str) -> str:
    # A one-line JSON body in a haproxy.cfg double-quoted string.
    return json.dumps({"error": message, "code": code}).replace("\\", "\\\\").replace('"', '\\"')


def haproxy_config(bind: str, nodes: Sequence[Member], *, run_timeout_s: int = 300) -> str:
    """A complete haproxy.cfg for ``nodes`` (docs/cluster.md).

    - ``/v1/cells/c<node>-...`` goes to the node that owns the cell; when that
      node is out of rotation the front answers 503 ``node_unavailable`` at
      once instead of queueing the request.
    - everything else (``POST /v1/cells``, ``/v1/execute``, ...) is balanced
      ``leastconn`` over the nodes whose ``/healthz`` answers 200 (a draining
      or incident node answers 503 and leaves rotation).
    - node-to-node routes (``/cluster/...``) are never served through the front.
    - responses are forwarded as they arrive, so Server-Sent Events stream.
    """
    check_addr(bind)
    if not nodes:
        raise ClusterRecordError("no nodes: start at least one node with SYNAPSE_CLUSTER_ETCD set")
    ordered = sorted(nodes, key=lambda m: m.node_id)
    for m in ordered:
        check_node_id(m.node_id)
        check_addr(m.addr)
    check = f"check inter {HEALTH_INTER_MS} fall {HEALTH_FALL} rise {HEALTH_RISE}"
    timeout = max(30, run_timeout_s + 30)
    lines = [
        f"# Generated by `cell cluster haproxy-config --bind {bind}` for {len(ordered)} node(s).",
        "# Regenerate and reload HAProxy after adding or removing a node (docs/cluster.md).",
        "global",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 60s",
        f"    timeout server {timeout}s",
        "    timeout http-request 10s",
        "    timeout queue 5s",
        "    # The client's address for each node's rate limit; list this HAProxy's",
        "    # address in every node's SYNAPSE_TRUSTED_PROXIES.",
        "    option forwardfor",
        "    # No compression and no response buffering: SSE events pass as they come.",
        f"    http-error status 502 content-type application/json string \"{_json_error('the node did not answer properly', 'bad_gateway')}\"",
        f"    http-error status 503 content-type application/json string \"{_json_error('no node could take this request; retry later', 'node_unavailable')}\"",
        f"    http-error status 504 content-type application/json string \"{_json_error('the node did not answer in time', 'gateway_timeout')}\"",
        "",
        "frontend cell",
        f"    bind {bind}",
        "    # Node-to-node routes (receipt exports) are for the LAN only.",
        "    http-request deny deny_status 404 if { path_beg /cluster/ }",
    ]
    for m in ordered:
        lines.append(f"    use_backend node_{m.node_id} if {{ path_beg /v1/cells/c{m.node_id}- }}")
    lines += ["    default_backend cell_pool", "",
              "backend cell_pool",
              "    # New cells and one-off runs: the least busy healthy node.",
              "    balance leastconn",
              "    option httpchk GET /healthz",
              "    http-check expect status 200",
              "    # A node that refuses a connection or answers 503 (draining, queue full)",
              "    # has not started the request: try another one.",
              "    retries 2",
              "    option redispatch 1",
              "    retry-on conn-failure 503"]
    for m in ordered:
        lines.append(f"    server {m.node_id} {m.addr} {check}")
    for m in ordered:
        lines += ["",
                  f"backend node_{m.node_id}",
                  f"    # Cells of node {m.node_id} live only there.",
                  "    option httpchk GET /healthz",
                  "    http-check expect status 200",
                  "    http-request return status 503 content-type application/json string "
                  f"\"{_json_error(f'node {m.node_id} that holds this cell is out of rotation; retry when it is back', 'node_unavailable')}\""
                  " if { nbsrv() eq 0 }",
                  f"    server {m.node_id} {m.addr} {check}"]
    return "\n".join(lines) + "\n"


def summary(*, node_id: str, addr: str, etcd_ok: bool, error: str | None, last_sync_age_s: float | None,
            members: Mapping[str, Member], tenants: int) -> dict[str, Any]:
    """The ``cluster`` part of /v1/status."""
    return {
        "node_id": node_id, "addr": addr,
        "etcd": "ok" if etcd_ok else "unreachable",
        "error": error,
        "last_sync_age_s": None if last_sync_age_s is None else round(last_sync_age_s, 1),
        # T-CLUSTER-1: without etcd this node serves the tenants it knows and refuses changes.
        "changes": "accepted" if etcd_ok else "refused",
        "members": sorted(members),
        "tenants": tenants,
    }
