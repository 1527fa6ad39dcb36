"""register_ops on a real app (real worker processes): request ids, access and
run logs, /metrics access rule (T-OPS-1) and the counters a scrape shows."""
from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from appliance.config import load_settings
from appliance.ops.web import OpsState, register_ops
from appliance.services import Services, build_services, ensure_default_tenant
from appliance.web.app import create_app
from tests.liveserver import ServerProcess, shared_cache

pytestmark = pytest.mark.slow

TOKEN = "op-token-for-tests-0123456789"
DENIED_FETCH = """(module
  (import "cell" "host_fetch" (func $f (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $f (i32.const 0) (i32.const 4) (i32.const 0) (i32.const 0)))))"""


@dataclass
class OpsApp:
    app: Flask
    client: FlaskClient
    services: Services
    state: OpsState
    key: str
    log_file: Path

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log_file.read_text().splitlines()]


def build_ops_app(root: Path, *, metrics_token: str, log_file: Path | None = None, log_stderr: bool = False) -> tuple[Flask, Services, OpsState, str]:
    # create_app registers the ops layer from the settings, as `cell serve` does.
    settings = load_settings({
        "SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
        "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_WORKERS": "1",
        "SYNAPSE_WARM_PYTHON": "1", "SYNAPSE_WARM_JAVASCRIPT": "0",
        "SYNAPSE_RATE_LIMIT_RPS": "100000", "SYNAPSE_RATE_LIMIT_BURST": "100000",
        "SYNAPSE_METRICS_TOKEN": metrics_token, **({"SYNAPSE_LOG_FILE": str(log_file)} if log_file else {}),
    })
    services = build_services(settings)
    key = ensure_default_tenant(services)
    assert key is not None
    app = create_app(services)
    state = app.extensions["cell_ops"]
    return app, services, state, key


@pytest.fixture(scope="module")
def ops_app(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsApp]:
    root = tmp_path_factory.mktemp("ops-app")
    log_file = root / "log" / "cell.log"
    app, services, state, key = build_ops_app(root, metrics_token=TOKEN, log_file=log_file, log_stderr=False)
    try:
        yield OpsApp(app, app.test_client(), services, state, key, log_file)
    finally:
        state.close()
        services.close()


def test_register_ops_is_idempotent(ops_app: OpsApp) -> None:
    assert register_ops(ops_app.app, ops_app.services) is ops_app.state


def test_every_answer_carries_a_request_id_even_a_401(ops_app: OpsApp) -> None:
    ok = ops_app.client.get("/healthz")
    denied = ops_app.client.get("/v1/cells", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401
    assert len(ok.headers["X-Request-Id"]) == 32 and len(denied.headers["X-Request-Id"]) == 32
    assert ok.headers["X-Request-Id"] != denied.headers["X-Request-Id"]


@pytest.mark.parametrize("incoming, kept", [("trace-42.a_b", True), ("x" * 65, False), ("a b", False), ("a\nb", False)])
def test_t_log_2_client_request_id_only_kept_when_plain(ops_app: OpsApp, incoming: str, kept: bool) -> None:
    try:
        r = ops_app.client.get("/healthz", headers={"X-Request-Id": incoming})
    except ValueError:  # werkzeug itself refuses a newline in a header
        assert not kept
        return
    assert (r.headers["X-Request-Id"] == incoming) is kept


def test_run_writes_request_run_and_denial_lines_and_counts(ops_app: OpsApp) -> None:
    r = ops_app.client.post("/v1/execute", json={"template": "wasm", "code": DENIED_FETCH}, headers=ops_app.auth())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    rid = r.headers["X-Request-Id"]
    lines = [x for x in ops_app.log_lines() if x.get("request_id") == rid]
    events = {x["event"]: x for x in lines}
    assert set(events) == {"request", "run", "policy_denial"}
    run = events["run"]
    assert run["execution_id"] == body["execution_id"] and run["receipt_seq"] == body["receipt"]["seq"]
    assert run["tenant_id"] == "default" and run["template"] == "wasm" and run["status"] == body["status"]
    assert events["policy_denial"] == {**events["policy_denial"], "threat": "T-SSRF-1", "function": "host_fetch",
                                       "reason": "egress_off", "level": "warning"}
    req = events["request"]
    assert req["route"] == "/v1/execute" and req["status"] == 200 and req["bytes_in"] > 0 and req["bytes_out"] > 0
    assert req["execution_id"] == body["execution_id"]
    text = ops_app.client.get("/metrics").get_data(as_text=True)
    assert 'cell_runs_total{status="%s",template="wasm"}' % body["status"] in text
    assert 'cell_policy_denials_total{function="host_fetch",threat="T-SSRF-1"}' in text
    assert "cell_receipts_written_total" in text and "cell_run_guest_duration_seconds_bucket" in text


def test_metrics_show_the_live_gauges(ops_app: OpsApp) -> None:
    ops_app.client.post("/v1/cells", json={"template": "wasm"}, headers=ops_app.auth())
    text = ops_app.client.get("/metrics").get_data(as_text=True)
    for name in ("cell_workers ", "cell_workers_busy ", "cell_queue_depth ", "cell_live_cells ",
                 "cell_receipt_chain_length ", "cell_registry_days_left ", "cell_license_tier{",
                 "cell_http_request_duration_seconds_bucket", "cell_build_info{"):
        assert name in text, name
    assert "cell_live_cells 0.0" not in text


def _metrics_series(text: str, name: str) -> dict[str, float]:
    """The series of ``name`` (its labels) and their values."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{")}


# T-DOS-2 (metrics): methods a client may make up (waitress takes any upper-case
# token), each sent with ten variants; none may add a series of its own.
MADE_UP_METHODS = [
    pytest.param("ZZ", id="made-up-token"),
    pytest.param("PROPFIND", id="webdav-method"),
    pytest.param("TRACE", id="trace"),
    pytest.param("X" * 300, id="long-token"),
    pytest.param("GET_", id="near-a-real-method"),
]


@pytest.mark.parametrize("method", MADE_UP_METHODS)
def test_t_dos_2_made_up_http_methods_add_no_metric_series(ops_app: OpsApp, method: str) -> None:
    before = ops_app.client.get("/metrics").get_data(as_text=True)
    for i in range(10):
        answer = ops_app.client.open(f"/v1/cells/nope{i}", method=f"{method}{i}")  # unauthenticated
        assert answer.status_code in (401, 405), answer.status_code
    text = ops_app.client.get("/metrics").get_data(as_text=True)
    assert method not in text
    for name in ("cell_http_requests_total", "cell_http_request_duration_seconds_count"):
        new = set(_metrics_series(text, name)) - set(_metrics_series(before, name))
        assert all('method="other"' in series for series in new), new
    counted = {k: v for k, v in _metrics_series(text, "cell_http_requests_total").items() if 'method="other"' in k}
    assert sum(counted.values()) >= 10


def test_t_dos_2_made_up_methods_over_http_add_no_metric_series(live: ServerProcess) -> None:
    """The same through waitress: it hands the app any upper-case method."""
    for i in range(5):
        status, _, _ = live.request(f"MADEUP{i}", "/v1/cells", key="not-a-key")
        assert status in (401, 405), status
    status, _, _ = live.request("GET", "/metrics")
    assert status == 200
    with urllib.request.urlopen(live.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    assert "MADEUP" not in text and 'method="other"' in text


@pytest.mark.parametrize("remote, headers, status", [
    ("127.0.0.1", {}, 200),
    ("::1", {}, 200),
    ("10.1.2.3", {}, 403),
    ("10.1.2.3", {"Authorization": f"Bearer {TOKEN}"}, 200),
    ("10.1.2.3", {"Authorization": f"Bearer {TOKEN}x"}, 403),
    ("10.1.2.3", {"Authorization": "Bearer "}, 403),
    # A local reverse proxy relays remote clients from loopback: not local.
    ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, 403),
])
def test_t_ops_1_metrics_only_from_loopback_or_with_the_operator_token(
        ops_app: OpsApp, remote: str, headers: dict[str, str], status: int) -> None:
    r = ops_app.client.get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": remote})
    assert r.status_code == status
    if status == 403:
        assert r.get_json() == {"error": r.get_json()["error"], "code": "metrics_forbidden"}
    else:
        assert r.headers["Content-Type"].startswith("text/plain")


def test_t_ops_1_no_token_configured_means_loopback_only(module_cache: None, tmp_path: Path) -> None:
    app, services, state, _ = build_ops_app(tmp_path, metrics_token="", log_stderr=False)
    try:
        r = app.test_client().get("/metrics", headers={"Authorization": "Bearer "},
                                  environ_base={"REMOTE_ADDR": "10.0.0.1"})
        assert r.status_code == 403
    finally:
        state.close()
        services.close()


def test_rate_limited_requests_are_counted(ops_app: OpsApp) -> None:
    state = ops_app.state
    state.metrics.observe_request("GET", "/v1/cells", 429, 0.001)
    assert 'cell_rate_limit_rejections_total 1.0' in ops_app.client.get("/metrics").get_data(as_text=True)


def test_openapi_is_served_behind_the_api_key(ops_app: OpsApp) -> None:
    assert ops_app.client.get("/v1/openapi.json").status_code == 401
    r = ops_app.client.get("/v1/openapi.json", headers=ops_app.auth())
    assert r.status_code == 200 and r.get_json()["openapi"] == "3.1.0"


def test_each_app_has_its_own_registry(ops_app: OpsApp, tmp_path: Path) -> None:
    from types import SimpleNamespace

    other = Flask("other")
    fake = SimpleNamespace(settings=ops_app.services.settings.with_overrides(root=tmp_path),
                           cells=SimpleNamespace(observers=[]), pool=None, store=None, receipts=None)
    state = register_ops(other, fake, log_stderr=False)
    try:
        assert state.metrics.registry is not ops_app.state.metrics.registry
        text = other.test_client().get("/metrics").get_data(as_text=True)
        assert "cell_runs_total{" not in text  # no runs here, whatever the other app did
    finally:
        state.close()


def test_request_ids_are_32_hex_digits_unique_within_and_across_processes() -> None:
    from appliance.ops.web import RequestIds

    one, two = RequestIds(), RequestIds()  # two processes (or restarts) draw their own random half
    ids = [one() for _ in range(1000)] + [two() for _ in range(1000)]
    assert all(len(i) == 32 and all(c in "0123456789abcdef" for c in i) for i in ids)
    assert len(set(ids)) == len(ids)


def _app_with_a_run_route(tmp_path: Path, ops_app: OpsApp, level: str = "info") -> tuple[Flask, OpsState, Path]:
    """A bare app with the ops layer: /run reports one run to the observers (with a
    denial), /run-then-fail too, and another after_request hook then raises."""
    from types import SimpleNamespace

    other = Flask("other")
    fake = SimpleNamespace(settings=ops_app.services.settings.with_overrides(root=tmp_path),
                           cells=SimpleNamespace(observers=[]), pool=None, store=None, receipts=None)
    log_file = tmp_path / "cell.log"
    state = register_ops(other, fake, log_stderr=False, log_file=log_file, log_level=level)
    summary = {"execution_id": "e1", "receipt_seq": 4, "tenant_id": "t", "cell_id": None, "template": "wasm",
               "status": "ok", "exit_code": 0, "latency_ms": 1.0, "guest_ms": 0.5, "code_bytes": 3,
               "stdout_bytes": 0, "stderr_bytes": 0, "truncated": False,
               "denials": [{"threat": "T-SSRF-1", "function": "host_fetch", "reason": "egress_off"}]}

    @other.post("/run")
    @other.post("/run-then-fail")
    def run() -> str:
        for observe in fake.cells.observers:
            observe(dict(summary))
        return "ok"

    @other.after_request  # registered after the ops layer's hook: Flask runs it first
    def fail(response: Any) -> Any:
        from flask import request

        if request.path == "/run-then-fail":
            raise RuntimeError("a later hook failed")
        return response

    return other, state, log_file


def test_run_lines_are_written_with_the_access_line_in_order(ops_app: OpsApp, tmp_path: Path) -> None:
    app, state, log_file = _app_with_a_run_route(tmp_path, ops_app)
    try:
        r = app.test_client().post("/run", headers={"X-Request-Id": "rid-1"})
        assert r.status_code == 200
    finally:
        state.close()
    lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert [(x["event"], x["request_id"]) for x in lines] == [
        ("run", "rid-1"), ("policy_denial", "rid-1"), ("request", "rid-1")]
    assert lines[2]["execution_id"] == "e1" and lines[2]["receipt_seq"] == 4


def test_run_lines_are_not_lost_when_the_access_line_is_never_written(ops_app: OpsApp, tmp_path: Path) -> None:
    app, state, log_file = _app_with_a_run_route(tmp_path, ops_app)
    app.logger.disabled = True  # Flask's own report of the failing hook is not what this test reads
    try:
        r = app.test_client().post("/run-then-fail", headers={"X-Request-Id": "rid-2"})
        assert r.status_code == 500
    finally:
        state.close()
    lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert [(x["event"], x["request_id"]) for x in lines] == [("run", "rid-2"), ("policy_denial", "rid-2")]


def test_at_warning_level_a_runs_denials_are_written_alone(ops_app: OpsApp, tmp_path: Path) -> None:
    app, state, log_file = _app_with_a_run_route(tmp_path, ops_app, level="warning")
    try:
        assert app.test_client().post("/run", headers={"X-Request-Id": "rid-3"}).status_code == 200
    finally:
        state.close()
    lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert [(x["event"], x["request_id"], x["level"]) for x in lines] == [("policy_denial", "rid-3", "warning")]
