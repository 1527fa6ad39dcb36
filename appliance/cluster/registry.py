"""Reading the node registry from etcd (light: no storage, no web)."""
from __future__ import annotations

import logging

from appliance.cluster import policy
from appliance.cluster.etcd import Etcd

log = logging.getLogger("cell.cluster")


def read_members(etcd: Etcd, prefix: str = policy.MEMBERS) -> dict[str, policy.Member]:
    """Valid records under ``prefix`` (live members, or every registered node
    with ``policy.NODES``) by node id; a record that does not parse is logged
    and left out, never guessed at (T-CLUSTER-1)."""
    _rev, kvs = etcd.get_prefix(prefix)
    members, skipped = policy.parse_members(((kv.key, kv.value) for kv in kvs), prefix)
    for line in skipped:
        log.warning("cluster: skipped a record: %s", line)
    return members
