"""Cluster policy (pure) and a node whose etcd does not answer (docs/cluster.md).

The live cluster (etcd, three nodes, HAProxy) is tests/appliance/test_cluster_e2e.py.
"""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from appliance.cluster import policy
from appliance.cluster.node import ClusterNode, ClusterUnavailable, add_tenant, revoke_tenant
from appliance.cluster.web import token_matches
from appliance.config import load_settings
from appliance.errors import ConfigError
from appliance.storage import Store, hash_key

KEY_ID = "0123456789abcdef"
PUB = "ab" * 32


def member(node_id: str = "n1", addr: str = "10.0.0.1:8080", public_key: str = PUB, state: str = "up") -> policy.Member:
    return policy.Member(node_id, addr, KEY_ID, public_key, state)


def tenant_json(**changes: object) -> bytes:
    data: dict[str, object] = {"id": "t1", "name": "acme", "key_hash": "a" * 64, "created_at": 1, "revoked": False}
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize("node_id,ok", [
    ("n1", True), ("0a1b2c3d", True), ("a" * 16, True),
    ("", False), ("a" * 17, False), ("N1", False), ("n-1", False), ("n_1", False), ("n1 ", False), ("n1\n", False),
    ("n1/x", False), ("n1;", False), ("ｎ1", False),
])
def test_t_cluster_2_node_ids_are_plain(node_id: str, ok: bool) -> None:
    # A node id lands in cell ids, HAProxy backend names and path rules.
    if ok:
        assert policy.check_node_id(node_id) == node_id
    else:
        with pytest.raises(policy.ClusterRecordError):
            policy.check_node_id(node_id)


@pytest.mark.parametrize("env,key", [
    ({"SYNAPSE_CLUSTER_ETCD": "http://127.0.0.1:2379"}, "SYNAPSE_NODE_ADDR"),
    ({"SYNAPSE_CLUSTER_ETCD": "ftp://127.0.0.1:2379", "SYNAPSE_NODE_ADDR": "127.0.0.1:8001"}, "SYNAPSE_CLUSTER_ETCD"),
    ({"SYNAPSE_CLUSTER_ETCD": "http://127.0.0.1", "SYNAPSE_NODE_ADDR": "127.0.0.1:8001"}, "SYNAPSE_CLUSTER_ETCD"),
    ({"SYNAPSE_CLUSTER_ETCD": "http://127.0.0.1:2379/x", "SYNAPSE_NODE_ADDR": "127.0.0.1:8001"}, "SYNAPSE_CLUSTER_ETCD"),
    ({"SYNAPSE_CLUSTER_ETCD": "http://127.0.0.1:2379", "SYNAPSE_NODE_ADDR": "http://h:1"}, "SYNAPSE_NODE_ADDR"),
    ({"SYNAPSE_CLUSTER_ETCD": "http://127.0.0.1:2379", "SYNAPSE_NODE_ADDR": "h:99999"}, "SYNAPSE_NODE_ADDR"),
    ({"SYNAPSE_CLUSTER_ETCD": "http://127.0.0.1:2379", "SYNAPSE_NODE_ADDR": "h:1", "SYNAPSE_NODE_ID": "Node-1"},
     "SYNAPSE_NODE_ID"),
    ({"SYNAPSE_CLUSTER_TOKEN": "short"}, "SYNAPSE_CLUSTER_TOKEN"),
])
def test_bad_cluster_config_stops_start_up_naming_the_key(env: dict[str, str], key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({**env, "SYNAPSE_CONFIG_DIR": str(tmp_path)})
    assert err.value.key == key


def test_without_cluster_settings_a_node_is_standalone(tmp_path: Path) -> None:
    s = load_settings({"SYNAPSE_CONFIG_DIR": str(tmp_path), "SYNAPSE_ROOT": str(tmp_path / "root")})
    assert not s.clustered and s.node_addr == "" and s.cluster_etcd == ()
    assert re.fullmatch(r"[0-9a-f]{8}", s.node_id)  # cell ids c<node>-<hex> as before
    s = load_settings({"SYNAPSE_CONFIG_DIR": str(tmp_path), "SYNAPSE_CLUSTER_ETCD": "http://10.0.0.5:2379,https://e2:2379",
                       "SYNAPSE_NODE_ADDR": "10.0.0.1:8080", "SYNAPSE_NODE_ID": "n1"})
    assert s.clustered and s.cluster_etcd == ("http://10.0.0.5:2379", "https://e2:2379")


@pytest.mark.parametrize("key,raw", [
    ("/cell/tenants/t1", b"not json"),
    ("/cell/tenants/t1", b"[]"),
    ("/cell/tenants/t2", tenant_json()),  # the record names another tenant than its key
    ("/cell/tenants/t1", tenant_json(key_hash="A" * 64)),
    ("/cell/tenants/t1", tenant_json(key_hash="a" * 63)),
    ("/cell/tenants/t1", tenant_json(key_hash=None)),
    ("/cell/tenants/t1", tenant_json(revoked="false")),  # a string is not a boolean: never read as "not revoked"
    ("/cell/tenants/t1", tenant_json(revoked=0)),
    ("/cell/tenants/t1", tenant_json(name="")),
    ("/cell/tenants/t1", tenant_json(name="a\nb")),
    ("/cell/tenants/t1", tenant_json(created_at=True)),
    ("/cell/tenants/../x", tenant_json(id="../x")),
])
def test_t_cluster_1_bad_tenant_records_are_refused(key: str, raw: bytes) -> None:
    with pytest.raises(policy.ClusterRecordError):
        policy.parse_tenant(key, raw)


@pytest.mark.parametrize("raw", [
    b"{",
    member().to_json().replace(b'"n1"', b'"n2"'),  # under members/n1 but naming n2
    member(addr="no-port").to_json(),
    member(public_key="zz" * 32).to_json(),
    member(state="leader").to_json(),
    json.dumps({"node_id": "n1", "addr": "h:1", "key_id": "x", "public_key": PUB}).encode(),
])
def test_t_cluster_1_bad_member_records_are_skipped(raw: bytes) -> None:
    members, skipped = policy.parse_members([("/cell/members/n1", raw), ("/cell/members/n3", member("n3").to_json())],
                                            policy.MEMBERS)
    assert list(members) == ["n3"] and len(skipped) == 1


def test_t_cluster_1_revocation_is_sticky() -> None:
    active = policy.TenantRecord("t1", "acme", "a" * 64, 1, False)
    revoked = policy.TenantRecord("t1", "acme", "a" * 64, 1, True)
    assert policy.merge_tenant(None, active) == active
    assert policy.merge_tenant(active, active) is None
    assert policy.merge_tenant(active, revoked) == revoked
    # etcd saying "active" (an old backup, a lost write) never revives a tenant revoked here
    assert policy.merge_tenant(revoked, active) is None
    rotated = policy.TenantRecord("t1", "acme", "b" * 64, 1, False)
    assert policy.merge_tenant(active, rotated) == rotated
    assert policy.to_publish([active, policy.TenantRecord("t2", "b", "c" * 64, 2, False)], ["t1"])[0].id == "t2"


def test_t_cluster_2_a_node_id_belongs_to_one_node_key() -> None:
    mine = member()
    assert policy.registration_conflict(None, mine) is None
    assert policy.registration_conflict(member(addr="10.0.0.9:1"), mine) is None  # same key, new address
    why = policy.registration_conflict(member(public_key="cd" * 32), mine)
    assert why is not None and "remove-node n1" in why


@pytest.mark.parametrize("configured,header,ok", [
    ("", "Bearer ", False), ("", "", False),
    ("cluster-token-0123456789", "", False),
    ("cluster-token-0123456789", "cluster-token-0123456789", False),
    ("cluster-token-0123456789", "Bearer cluster-token-012345678", False),
    ("cluster-token-0123456789", "Bearer cluster-token-01234567890", False),
    ("cluster-token-0123456789", "Basic cluster-token-0123456789", False),
    ("cluster-token-0123456789", "Bearer cluster-token-0123456789", True),
])
def test_t_cluster_3_export_route_needs_the_configured_token(configured: str, header: str, ok: bool) -> None:
    assert token_matches(configured, header) is ok


def test_haproxy_config_routes_each_cell_to_its_owner_only() -> None:
    nodes = [member("n1", "10.0.0.1:8080"), member("n10", "10.0.0.10:8080"), member("n2", "10.0.0.2:8080")]
    cfg = policy.haproxy_config("0.0.0.0:80", nodes)
    rules = dict(re.findall(r"use_backend (node_\w+) if \{ path_beg (\S+) \}", cfg))
    assert set(rules) == {"node_n1", "node_n10", "node_n2"}
    for node in ("n1", "n10", "n2"):
        path = f"/v1/cells/c{node}-0123456789abcdef0123/exec"
        assert [b for b, prefix in rules.items() if path.startswith(prefix)] == [f"node_{node}"]
    assert "balance leastconn" in cfg and "option httpchk GET /healthz" in cfg and "option forwardfor" in cfg
    assert "http-request deny deny_status 404 if { path_beg /cluster/ }" in cfg
    assert cfg.count("server n10 10.0.0.10:8080 check") == 2  # in the pool and in its own backend
    with pytest.raises(policy.ClusterRecordError):
        policy.haproxy_config("0.0.0.0:80", [])
    with pytest.raises(policy.ClusterRecordError):
        policy.haproxy_config("0.0.0.0:80", [member("n1", "10.0.0.1:80\n    server evil 1.2.3.4:80")])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_t_cluster_1_without_etcd_known_tenants_stay_and_changes_are_refused(tmp_path: Path) -> None:
    settings = load_settings({"SYNAPSE_CONFIG_DIR": str(tmp_path), "SYNAPSE_ROOT": str(tmp_path / "root"),
                              "SYNAPSE_CLUSTER_ETCD": f"http://127.0.0.1:{closed_port()}",
                              "SYNAPSE_NODE_ADDR": "127.0.0.1:8001", "SYNAPSE_NODE_ID": "n1"})
    store = Store(tmp_path / "cell.sqlite")
    try:
        store.put_tenant_row("t1", "acme", hash_key("cell_known"), 1, False)
        node = ClusterNode(settings, store, KEY_ID, PUB)
        node.join()  # not fatal: the node serves what it knows
        status = node.status()
        assert status["etcd"] == "unreachable" and status["changes"] == "refused" and status["tenants"] == 1
        assert store.tenant_for_key("cell_known") is not None
        with pytest.raises(ClusterUnavailable):
            add_tenant(settings, store, "late", 2)
        assert [t.id for t in store.list_tenants()] == ["t1"]
        # A revocation is not refused: it applies here at once, and says etcd did not take it.
        with pytest.raises(ClusterUnavailable, match="this node only"):
            revoke_tenant(settings, store, "t1")
        assert store.tenant_for_key("cell_known") is None
        store.put_tenant_row("t1", "acme", hash_key("cell_known"), 1, False)  # a sync from a stale etcd
        assert store.tenant_for_key("cell_known") is None
        node.close()
    finally:
        store.close()
