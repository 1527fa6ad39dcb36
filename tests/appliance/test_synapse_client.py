"""The original system's Python client (``synapserun`` 0.5.2 from PyPI, module
``synapse``, pinned in the test extra), unmodified, against a live Cell server:
create, runs with state, files, JavaScript, receipts, ``Cell.connect``, kill,
errors; then what Cell does with each create field and route of that client
that it does not offer (docs/migrating-from-e2b.md lists them all)."""
from __future__ import annotations

import gc
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from appliance.config import load_settings
from appliance.services import build_services, ensure_default_tenant
from appliance.web.app import create_app
from tests import guests
from tests.appliance.test_api_e2e import second_tenant
from tests.liveserver import ServerProcess, shared_cache

synapse_cell = pytest.importorskip("synapse.cell", reason="the test extra pins synapserun==0.5.2")
Cell, CellError, SandboxState = synapse_cell.Cell, synapse_cell.CellError, synapse_cell.SandboxState

# The client opens a keep-alive socket in its constructor and in connect(), and
# drops it unclosed when that call raises (a refused create, an unknown cell):
# its own leak, left as is because the client is tested unmodified.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::ResourceWarning")]


@pytest.fixture(autouse=True)
def _collect_the_clients_leaked_sockets() -> Iterator[None]:
    """The original client leaves its socket open when its constructor or
    connect() raises (its own bug, and it is used unmodified). Collect those
    sockets here, where that warning is expected, instead of letting a later
    test's garbage collection report them."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_the_pinned_client_is_the_one_tested() -> None:
    import importlib.metadata

    assert importlib.metadata.version("synapserun") == "0.5.2"


@pytest.fixture()
def cell(live: ServerProcess) -> Iterator[Any]:
    with Cell(api_url=live.url, api_key=live.api_key) as c:  # sends secure=true, as it always does
        yield c


# -- what the client was built for -------------------------------------------
def test_create_and_state_survives_between_runs(cell: Any) -> None:
    assert cell.cell_id and cell.template == "python3"
    assert cell.run("x = 41\nimport math").exit_code == 0
    result = cell.run("print(x + 1, math.floor(2.5))")
    assert result.ok and result.stdout == "42 2\n" and result.stderr == ""
    assert cell.executions == 2


def test_receipt_of_each_run_matches_the_stored_one(cell: Any, live: ServerProcess) -> None:
    code = "print('receipt me')"
    result = cell.run(code)
    receipt = result.receipt
    assert receipt is not None and receipt.template == "python3" and receipt.timestamp > 0
    assert receipt.code_hash == hashlib.sha256(code.encode()).hexdigest()
    status, stored, _ = live.request("GET", f"/v1/receipts/{receipt.execution_id}")
    assert status == 200
    assert (stored["code_hash"], stored["result_hash"]) == (receipt.code_hash, receipt.result_hash)


def test_streamed_run_fires_callbacks(cell: Any) -> None:
    seen: list[str] = []
    results: list[dict[str, Any]] = []
    result = cell.run("for i in range(3):\n    print(i)", on_stdout=seen.append, on_result=results.append)
    assert "".join(seen) == "0\n1\n2\n" and result.exit_code == 0
    assert results and results[0]["status"] == "ok" and results[0]["receipt"]["execution_id"]


def test_files_round_trip_and_the_guest_sees_them(cell: Any) -> None:
    cell.write_file("notes.txt", "hello from the client")
    assert cell.read_file("notes.txt") == "hello from the client"
    assert cell.run("print(open('/data/notes.txt').read())").stdout == "hello from the client\n"
    cell.make_dir("sub")
    moved = cell.rename_file("notes.txt", "sub/moved.txt")
    assert moved.name == "moved.txt" and moved.type == "file"
    assert cell.file_exists("sub/moved.txt") and not cell.file_exists("notes.txt")
    info = cell.file_info("sub/moved.txt")
    assert info.size == len("hello from the client") and info.modified_time is not None
    assert [e.name for e in cell.list_files("sub")] == ["moved.txt"]
    cell.remove_file("sub/moved.txt")
    assert not cell.file_exists("sub/moved.txt")


def test_javascript_cell_keeps_state(live: ServerProcess) -> None:
    with Cell(api_url=live.url, api_key=live.api_key, template="javascript") as js:
        assert js.run("var n = 20;").exit_code == 0
        result = js.run("console.log(n * 2 + 2)")
        assert result.stdout == "42\n" and result.receipt is not None and result.receipt.template == "javascript"


def test_connect_attaches_to_the_same_cell(live: ServerProcess) -> None:
    with Cell(api_url=live.url, api_key=live.api_key, metadata={"team": "agents"}, envs={"GREETING": "hi"}) as first:
        first.run("kept = 'state'")
        again = Cell.connect(first.cell_id, api_url=live.url, api_key=live.api_key)
        try:
            assert again.cell_id == first.cell_id and again.template == "python3"
            assert again.run("import os\nprint(kept, os.environ['GREETING'])").stdout == "state hi\n"
            info = again.get_info()
            assert info.sandbox_id == first.cell_id and info.state == SandboxState.RUNNING
            assert info.metadata == {"team": "agents"} and info.end_at > info.started_at
            assert info.allow_internet_access is True
            assert again.get_envs() == {"GREETING": "hi"}
        finally:
            again._reset_conn()  # the client's own clean-up of its keep-alive socket (kill() would end the cell)


def test_lifecycle_is_running_refresh_set_timeout_kill(live: ServerProcess) -> None:
    c = Cell(api_url=live.url, api_key=live.api_key, timeout_ms=60_000)
    assert c.is_running()
    c.set_timeout(120)  # the client sends {"timeout": seconds}
    assert c.info["timeout_ms"] == 120_000
    before = c.info["expires_at"]
    c.refresh()
    assert c.info["expires_at"] >= before
    c.kill()
    assert not c.is_running()
    with pytest.raises(CellError, match="no such cell"):
        Cell.connect(c.cell_id, api_url=live.url, api_key=live.api_key)


def test_errors_reach_the_client(live: ServerProcess, cell: Any) -> None:
    failed = cell.run("1 / 0")
    assert not failed.ok and "ZeroDivisionError" in failed.stderr and failed.receipt is not None
    with pytest.raises(CellError, match="unknown or revoked API key"):
        Cell(api_url=live.url, api_key="cell_not-a-key")
    with pytest.raises(CellError, match="template must be one of"):
        Cell(api_url=live.url, api_key=live.api_key, template="ruby")
    with pytest.raises(CellError, match="not 'javascript'"):
        cell.run("1", language="javascript")


def test_t_tenant_1_another_tenants_cell_is_not_found(live: ServerProcess, cell: Any) -> None:
    other = second_tenant(live)
    with pytest.raises(CellError, match="no such cell"):
        Cell.connect(cell.cell_id, api_url=live.url, api_key=other)
    intruder = Cell(api_url=live.url, api_key=other)
    try:
        intruder.cell_id = cell.cell_id  # aim the other tenant's client at this cell
        assert not intruder.is_running()
        with pytest.raises(CellError, match="no such cell"):
            intruder.run("print('x')")
        with pytest.raises(CellError, match="no such cell"):
            intruder.read_file("notes.txt")
    finally:
        intruder.cell_id = intruder._info["cell_id"]
        intruder.kill()
    assert cell.is_running()


# -- create fields the client sends: each honest, or refused by name ------------
def test_secure_true_accepted_false_refused(live: ServerProcess) -> None:
    with pytest.raises(CellError, match="secure=false is not offered"):
        Cell(api_url=live.url, api_key=live.api_key, secure=False)
    status, body, _ = live.request("POST", "/v1/cells", {"secure": False})
    assert (status, body["code"]) == (400, "secure_required")
    status, body, _ = live.request("POST", "/v1/cells", {"secure": "yes"})
    assert (status, body["code"]) == (400, "invalid_field")


def test_t_ssrf_1_allow_internet_access_cannot_widen_egress(live: ServerProcess) -> None:
    # This node has egress off: asking for it is refused, asking for none is honoured.
    with pytest.raises(CellError, match="egress off"):
        Cell(api_url=live.url, api_key=live.api_key, allow_internet_access=True)
    status, body, _ = live.request("POST", "/v1/cells", {"allow_internet_access": True})
    assert (status, body["code"]) == (403, "egress_disabled")
    with Cell(api_url=live.url, api_key=live.api_key, allow_internet_access=False) as c:
        assert c.get_info().allow_internet_access is False


ACCEPTED = [
    {"network": {}},
    {"network": {"deny_out": ["0.0.0.0/0"]}},
    {"network": {"deny_out": ["0.0.0.0/0", "::/0"], "allow_public_traffic": False}},
    {"volume_mounts": []},
    {"lifecycle": {"on_timeout": "kill"}},
    {"lifecycle": {"on_timeout": "kill", "auto_resume": False}},
    {"volume_id": None},
]


@pytest.mark.parametrize("fields", ACCEPTED, ids=json.dumps)
def test_compat_fields_that_map_onto_cell_are_accepted(live: ServerProcess, fields: dict[str, Any]) -> None:
    status, body, _ = live.request("POST", "/v1/cells", {"template": "wasm", **fields})
    assert status == 201, body
    live.request("DELETE", f"/v1/cells/{body['cell_id']}")
    denies = fields.get("network", {}).get("deny_out")
    assert body["allow_internet_access"] is (not denies)


REFUSED = [
    ({"volume_id": "vol-1"}, 400, "not_offered", "volume_id"),
    ({"volume_mounts": [{"path": "/mnt", "name": "shared"}]}, 400, "not_offered", "volume_mounts"),
    ({"volume_mounts": "x"}, 400, "invalid_field", "volume_mounts"),
    ({"lifecycle": {"on_timeout": "pause"}}, 400, "not_offered", "lifecycle.on_timeout"),
    ({"lifecycle": {"auto_resume": True}}, 400, "not_offered", "lifecycle.auto_resume"),
    ({"lifecycle": {"keep": 1}}, 400, "unknown_field", "lifecycle"),
    ({"lifecycle": []}, 400, "invalid_field", "lifecycle"),
    ({"network": {"allow_out": ["example.com"]}}, 400, "not_offered", "network.allow_out"),
    ({"network": {"deny_out": ["10.0.0.0/8"]}}, 400, "not_offered", "network.deny_out"),
    ({"network": {"deny_out": ["::/0"]}}, 400, "not_offered", "network.deny_out"),
    ({"network": {"deny_out": "0.0.0.0/0"}}, 400, "invalid_field", "network.deny_out"),
    ({"network": {"allow_public_traffic": True}}, 400, "not_offered", "network.allow_public_traffic"),
    ({"network": {"mask_request_host": "x"}}, 400, "not_offered", "network.mask_request_host"),
    ({"network": {"ports": [22]}}, 400, "unknown_field", "network"),
    ({"network": ["0.0.0.0/0"]}, 400, "invalid_field", "network"),
    ({"network": {"deny_out": ["0.0.0.0/0"]}, "allow_internet_access": True}, 400, "invalid_field", "contradicts"),
    ({"allow_internet_access": "no"}, 400, "invalid_field", "allow_internet_access"),
    ({"gpu": True}, 400, "unknown_field", "gpu"),
]


@pytest.mark.parametrize(("fields", "status", "code", "named"), REFUSED, ids=[json.dumps(r[0]) for r in REFUSED])
def test_compat_fields_that_do_not_map_are_refused_by_name(live: ServerProcess, fields: dict[str, Any], status: int,
                                                          code: str, named: str) -> None:
    got, body, _ = live.request("POST", "/v1/cells", {"template": "wasm", **fields})
    assert (got, body["code"]) == (status, code), body
    assert named in body["error"]


# -- routes of the original gateway that Cell does not offer -------------------
def test_client_calls_cell_does_not_offer_fail_with_the_reason(cell: Any) -> None:
    for call, reason in [
        (lambda: cell.command("ls /data"), "no shell"),
        (lambda: cell.start_process("sleep 1"), "no shell"),
        (lambda: cell.list_processes(), "no shell"),
        (lambda: cell.fetch("https://example.com/"), "host_fetch"),
        (lambda: cell.pause(), "no pause"),
        (lambda: cell.resume(), "no pause"),
        (lambda: cell.list_snapshots(), "no pause"),
        (lambda: cell.patch_metadata({"a": "b"}), "metadata is set when the cell is created"),
        (lambda: cell.patch_envs({"A": "b"}), "fixed when it is created"),
        (lambda: cell.volumes.list_all(), "no named volumes"),
        (lambda: cell.volumes.read("v1", "x.txt"), "no named volumes"),
    ]:
        with pytest.raises(CellError, match=reason):
            call()
    assert cell.run("print('still fine')").stdout == "still fine\n"


NOT_OFFERED = [
    ("POST", "/v1/cells/{cell}/cmd", 404), ("GET", "/v1/cells/{cell}/commands/c1", 404),
    ("DELETE", "/v1/cells/{cell}/commands/c1", 404), ("GET", "/v1/cells/{cell}/processes", 404),
    ("GET", "/v1/cells/{cell}/processes/p1", 404), ("POST", "/v1/cells/{cell}/processes/p1/kill", 404),
    ("POST", "/v1/cells/{cell}/processes/p1/stdin", 404), ("GET", "/v1/cells/{cell}/pty", 404),
    ("POST", "/v1/cells/{cell}/fetch", 404), ("PATCH", "/v1/cells/{cell}/metadata", 404),
    ("PATCH", "/v1/cells/{cell}/envs", 405), ("POST", "/v1/cells/{cell}/pause", 404),
    ("POST", "/v1/cells/{cell}/resume", 404), ("GET", "/v1/cells/{cell}/snapshots", 404),
    ("GET", "/v1/volumes", 404), ("POST", "/v1/volumes", 404), ("GET", "/v1/volumes/v1/files", 404),
    ("POST", "/v1/volumes/v1/files", 404), ("DELETE", "/v1/volumes/v1", 404), ("POST", "/v1/templates", 405),
    ("GET", "/v1/templates/python3", 404), ("DELETE", "/v1/templates/python3", 404),
    ("POST", "/v1/execute/python", 404),
]


@pytest.mark.parametrize(("method", "path", "status"), NOT_OFFERED, ids=[f"{m} {p}" for m, p, _ in NOT_OFFERED])
def test_t_tenant_1_not_offered_routes_answer_the_same_for_any_cell(live: ServerProcess, method: str, path: str,
                                                                     status: int) -> None:
    _, made, _ = live.request("POST", "/v1/cells", {"template": "wasm"})
    answers = []
    for cell_id in (made["cell_id"], "c0-no-such-cell"):
        got, body, _ = live.request(method, path.format(cell=cell_id), {})
        answers.append((got, body["code"], body["error"]))
    live.request("DELETE", f"/v1/cells/{made['cell_id']}")
    # The reason, never a hint of whether the cell exists (no lookup is made).
    assert answers[0] == answers[1] and answers[0][:2] == (status, "not_offered")
    got, body, _ = live.request(method, path.format(cell=made["cell_id"]), {}, key="cell_wrong")
    assert (got, body["code"]) == (401, "bad_key")


def test_unknown_route_is_still_a_plain_404(live: ServerProcess) -> None:
    got, body, _ = live.request("GET", "/v1/nothing-here")
    assert (got, body["code"]) == (404, "not_found")


def test_timeout_in_seconds_or_ms_exactly_one(live: ServerProcess, cell: Any) -> None:
    for body, code in [({}, "invalid_field"), ({"timeout": 5, "timeout_ms": 5000}, "invalid_field"),
                       ({"timeout": 0}, "out_of_range"), ({"timeout": True}, "invalid_field")]:
        got, answer, _ = live.request("PUT", f"/v1/cells/{cell.cell_id}/timeout", body)
        assert (got, answer["code"]) == (400, code), body
    got, answer, _ = live.request("PUT", f"/v1/cells/{cell.cell_id}/timeout", {"timeout": 90})
    assert got == 200 and answer["timeout_ms"] == 90_000


# -- allow_internet_access=false on a node with egress on (T-SSRF-1) -----------------
@pytest.fixture(scope="module")
def egress_node(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FlaskClient, str]]:
    root = tmp_path_factory.mktemp("egress-node")
    hosts = root / "hosts.json"
    hosts.write_text(json.dumps({"metadata.test.example": ["169.254.169.254"]}))
    settings = load_settings({
        "SYNAPSE_ROOT": str(root / "root"), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
        "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_WORKERS": "1",
        "SYNAPSE_WARM_PYTHON": "0", "SYNAPSE_WARM_JAVASCRIPT": "0",
        "SYNAPSE_EGRESS": "on", "SYNAPSE_EGRESS_HOSTS": str(hosts),
    })
    services = build_services(settings)
    try:
        key = ensure_default_tenant(services)
        assert key is not None
        yield create_app(services).test_client(), key
    finally:
        services.close()


def _fetch_denial(client: FlaskClient, key: str, fields: dict[str, Any]) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    made = client.post("/v1/cells", json={"template": "wasm", **fields}, headers=auth)
    assert made.status_code == 201, made.get_json()
    cell_id = made.get_json()["cell_id"]
    ran = client.post(f"/v1/cells/{cell_id}/exec", json={"code": guests.fetch_probe("http://metadata.test.example/")},
                      headers=auth)
    client.delete(f"/v1/cells/{cell_id}", headers=auth)
    assert ran.status_code == 200, ran.get_json()
    return str(ran.get_json()["denials"][0]["reason"])


@pytest.mark.parametrize(("fields", "reason"), [
    ({}, "denied_address"),                                         # the node's policy applies (and still denies this)
    ({"allow_internet_access": True}, "denied_address"),            # asks for the node's policy: no wider
    ({"allow_internet_access": False}, "egress_off"),               # this cell: no egress at all
    ({"network": {"deny_out": ["0.0.0.0/0"]}}, "egress_off"),       # the E2B way of saying the same
])
def test_t_ssrf_1_cell_without_internet_gets_no_egress_on_an_egress_node(
        egress_node: tuple[FlaskClient, str], fields: dict[str, Any], reason: str) -> None:
    client, key = egress_node
    assert _fetch_denial(client, key, fields) == reason


def test_internet_flag_survives_a_restart_of_the_store(tmp_path: Path) -> None:
    # The flag is a column: a reopened store (and a database from before the column) reads it back.
    import sqlite3

    from appliance.storage import CellRecord, Store

    db = tmp_path / "cell.db"
    old = sqlite3.connect(db)
    old.execute("CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,"
                " created_at INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)")
    old.execute("CREATE TABLE cells (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id),"
                " template TEXT NOT NULL, created_at INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, expires_at INTEGER NOT NULL,"
                " persistent INTEGER NOT NULL, metadata TEXT NOT NULL, envs TEXT NOT NULL, memory_mb INTEGER NOT NULL)")
    old.execute("INSERT INTO tenants VALUES ('t', 't', 'h', 0, 0)")
    old.execute("INSERT INTO cells VALUES ('c-old', 't', 'wasm', 0, 1000, 1000, 1, '{}', '{}', 64)")
    old.commit()
    old.close()
    store = Store(db)
    try:
        store.add_cell(CellRecord("c-off", "t", "wasm", 0, 1000, 1000, True, {}, {}, 64, internet=False))
        assert [(c.id, c.internet) for c in store.list_cells("t")] == [("c-old", True), ("c-off", False)]
    finally:
        store.close()
    again = Store(db)
    try:
        got = again.get_cell("c-off", "t")
        assert got is not None and got.internet is False
    finally:
        again.close()
