"""``cell cluster haproxy-config|members|remove-node`` (docs/cluster.md)."""
from __future__ import annotations

import argparse
import json
import sys

from appliance.cluster import policy
from appliance.cluster.etcd import Etcd, EtcdUnavailable
from appliance.cluster.registry import read_members
from appliance.config import Settings, load_settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cluster = subparsers.add_parser("cluster", help="several nodes behind HAProxy, sharing tenants through etcd")
    sub = cluster.add_subparsers(dest="cluster_command", required=True)
    cfg = sub.add_parser("haproxy-config", help="print a complete haproxy.cfg for the registered nodes")
    cfg.add_argument("--bind", required=True, metavar="HOST:PORT", help="where HAProxy listens for clients")
    cfg.set_defaults(func=cmd_haproxy_config)
    members = sub.add_parser("members", help="list registered nodes and whether each is a live member")
    members.add_argument("--json", action="store_true")
    members.set_defaults(func=cmd_members)
    remove = sub.add_parser("remove-node", help="forget a node that will not come back (it must be down)")
    remove.add_argument("node_id")
    remove.set_defaults(func=cmd_remove_node)


def _settings() -> Settings:
    settings = load_settings()
    if not settings.clustered:
        raise SystemExit("cell cluster: SYNAPSE_CLUSTER_ETCD is not set (this node is standalone)")
    return settings


def cmd_haproxy_config(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        policy.check_addr(args.bind)
        nodes = read_members(Etcd(settings.cluster_etcd), policy.NODES)
        text = policy.haproxy_config(args.bind, list(nodes.values()),
                                     run_timeout_s=settings.run_timeout_ceiling_ms // 1000)
    except (EtcdUnavailable, policy.ClusterRecordError) as exc:
        print(f"cell cluster haproxy-config: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    settings = _settings()
    etcd = Etcd(settings.cluster_etcd)
    try:
        nodes = read_members(etcd, policy.NODES)
        live = read_members(etcd, policy.MEMBERS)
    except EtcdUnavailable as exc:
        print(f"cell cluster members: {exc}", file=sys.stderr)
        return 1
    rows = [{"node_id": n.node_id, "addr": n.addr, "key_id": n.key_id,
             "state": live[n.node_id].state if n.node_id in live else "down"} for n in nodes.values()]
    rows.sort(key=lambda r: r["node_id"])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['node_id']}\t{r['addr']}\t{r['state']}\tkey {r['key_id']}")
    return 0


def cmd_remove_node(args: argparse.Namespace) -> int:
    settings = _settings()
    etcd = Etcd(settings.cluster_etcd)
    try:
        node_id = policy.check_node_id(args.node_id)
        if etcd.get(policy.MEMBERS + node_id) is not None:
            # Its cells would lose their route while it still serves them.
            print(f"cell cluster remove-node: node {node_id} is still a live member; stop it first", file=sys.stderr)
            return 1
        if not etcd.delete(policy.NODES + node_id):
            print(f"cell cluster remove-node: no node {node_id}", file=sys.stderr)
            return 1
    except (EtcdUnavailable, policy.ClusterRecordError) as exc:
        print(f"cell cluster remove-node: {exc}", file=sys.stderr)
        return 1
    print(f"node {node_id} removed; regenerate haproxy.cfg (cell cluster haproxy-config) and reload HAProxy")
    return 0
