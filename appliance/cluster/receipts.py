"""`cell receipts verify --cluster`: fetch every node's receipt export over the LAN and verify each.

Receipts stay per node (each node's chain, key and checkpoints are its own).
The trust anchor for a node's export is the public key that node registered
in etcd under ``nodes/<id>``; the export must be signed by that key, so the
receipts are named by node even though the envelope carries only the key id.
Any problem (a node down, a wrong key, a broken chain) fails the whole
check and names the node.
"""
from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.cluster import policy
from appliance.cluster.etcd import Etcd, EtcdUnavailable
from appliance.cluster.registry import read_members
from appliance.config import Settings
from appliance.receipts import verify as _verify

EXPORT_PATH = "/cluster/receipts/export"
MAX_EXPORT_BYTES = 8 * 1024 * 1024 * 1024  # far above a node's log; a peer cannot fill the disk without end
FETCH_TIMEOUT_S = 60.0


@dataclass
class NodeResult:
    node_id: str
    addr: str
    live: bool
    report: _verify.Report

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "addr": self.addr, "live": self.live, **self.report.as_dict()}


def _fetch(addr: str, token: str, dest: Path) -> str:
    """Download a node's export into ``dest``; returns the node id it says it is."""
    req = urllib.request.Request(f"http://{addr}{EXPORT_PATH}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp, dest.open("wb") as out:
        total = 0
        while chunk := resp.read(256 * 1024):
            total += len(chunk)
            if total > MAX_EXPORT_BYTES:
                raise OSError(f"export over {MAX_EXPORT_BYTES} bytes")
            out.write(chunk)
        return str(resp.headers.get("X-Cell-Node-Id", ""))


def verify_node(node: policy.Member, live: bool, token: str, workdir: Path) -> NodeResult:
    dest = workdir / f"{node.node_id}.jsonl"
    try:
        said = _fetch(node.addr, token, dest)
    except urllib.error.HTTPError as exc:
        exc.close()
        problem = _verify.Problem("unreachable", f"node {node.node_id} at {node.addr} answered HTTP {exc.code}")
        return NodeResult(node.node_id, node.addr, live, _verify.Report(False, 0, problem))
    except (OSError, ValueError) as exc:
        state = "" if live else " (not a live member: its lease has expired)"
        problem = _verify.Problem("unreachable", f"node {node.node_id} at {node.addr}{state}: {exc}")
        return NodeResult(node.node_id, node.addr, live, _verify.Report(False, 0, problem))
    if said != node.node_id:
        problem = _verify.Problem("wrong_node", f"{node.addr} says it is node {said!r}, etcd says {node.node_id!r}")
        return NodeResult(node.node_id, node.addr, live, _verify.Report(False, 0, problem))
    # The export must be signed by the key this node registered (T-RCPT-2, T-CLUSTER-2).
    report = _verify.verify_export(dest, public_keys=[node.public_key])
    return NodeResult(node.node_id, node.addr, live, report)


def verify_cluster(settings: Settings, etcd: Etcd | None = None) -> list[NodeResult]:
    etcd = etcd or Etcd(settings.cluster_etcd)
    nodes = read_members(etcd, policy.NODES)
    live = read_members(etcd, policy.MEMBERS)
    with tempfile.TemporaryDirectory(prefix="cell-cluster-verify-") as tmp:
        return [verify_node(nodes[n], n in live, settings.cluster_token, Path(tmp)) for n in sorted(nodes)]


def run(settings: Settings, *, as_json: bool) -> int:
    """Print one line per node (or JSON); exit 0 only when every node verified."""
    if not settings.clustered:
        print("error: this node is not in a cluster (SYNAPSE_CLUSTER_ETCD is not set)")
        return 1
    if not settings.cluster_token:
        print("error: SYNAPSE_CLUSTER_TOKEN is not set; nodes give their exports only to a caller with the token")
        return 1
    try:
        results = verify_cluster(settings)
    except EtcdUnavailable as exc:
        print(f"error: cannot list the cluster's nodes: {exc}")
        return 1
    ok = bool(results) and all(r.report.ok for r in results)
    if as_json:
        print(json.dumps({"ok": ok, "nodes": [r.as_dict() for r in results]}, indent=2))
    else:
        for r in results:
            if r.report.ok:
                print(f"node {r.node_id} ({r.addr}): OK: {r.report.count} receipts, chain head {r.report.head}")
            else:
                print(f"node {r.node_id} ({r.addr}): PROBLEM: {r.report.first_problem}")
        print("cluster: OK" if ok else ("cluster: no nodes registered" if not results else "cluster: PROBLEM"))
    return 0 if ok else 1
