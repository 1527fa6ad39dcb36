"""Telemetry: aggregated counters only, consent off by default, local spool, no sockets."""
from __future__ import annotations

import json
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance.telemetry import COLLECTED, TelemetryStore, aggregate

SECRET_BITS = ("print('top secret')", "hunter2-output", "/data/payroll.csv", "10.1.2.3", "acme-corp", "tenant-7")


def _report(samples: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"version": "0.1.0", "tier": "pro", "period_start_ms": 1000, "period_end_ms": 2000, **kw}
    return aggregate(samples, **args)


def test_aggregate_counts_runs_errors_and_latency() -> None:
    samples = [
        {"template": "python3", "status": "ok", "latency_ms": 10},
        {"template": "python3", "status": "timeout", "latency_ms": 30},
        {"template": "javascript", "status": "error", "latency_ms": 20},
        {"template": "wasm", "status": "ok", "latency_ms": 40},
    ]
    report = _report(samples)
    assert report["runs_per_template"] == {"javascript": 1, "python3": 2, "wasm": 1}
    assert report["errors_by_code"] == {"error": 1, "timeout": 1}
    assert report["latency_ms"] == {"count": 4, "p50": 20.0, "p90": 40.0, "p99": 40.0}
    assert report["tier"] == "pro" and report["version"] == "0.1.0"


def test_aggregate_empty_has_no_percentiles() -> None:
    report = _report([])
    assert report["runs_per_template"] == {} and report["latency_ms"]["p50"] is None


def test_aggregate_never_carries_code_output_names_or_ips() -> None:
    # A careless caller hands in whole run records: none of it may leak.
    samples = [{
        "template": "acme-corp", "status": "hunter2-output", "latency_ms": "10.1.2.3",
        "code": SECRET_BITS[0], "stdout": SECRET_BITS[1], "path": SECRET_BITS[2],
        "client_ip": SECRET_BITS[3], "tenant": SECRET_BITS[4], "tenant_id": SECRET_BITS[5],
    }]
    text = json.dumps(_report(samples, version="x y z; rm -rf /", tier="acme-corp"))
    for secret in SECRET_BITS:
        assert secret not in text
    report = json.loads(text)
    assert report["runs_per_template"] == {"other": 1}
    assert report["errors_by_code"] == {"other": 1}
    assert report["version"] == "other" and report["tier"] == "other"


def test_every_report_key_is_described_to_the_operator() -> None:
    described = " ".join(name for name, _ in COLLECTED)
    for key in _report([]):
        assert key in described


def test_consent_is_off_by_default_and_damaged_file_means_off(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    assert store.consent() is False
    store.consent_path.parent.mkdir(parents=True)
    store.consent_path.write_text('{"consent": "yes"}')
    assert store.consent() is False
    store.consent_path.write_text("not json")
    assert store.consent() is False


def test_consent_file_is_0600_json(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path, clock=lambda: 1234.5)
    store.set_consent(True)
    assert store.consent() is True
    assert stat.S_IMODE(store.consent_path.stat().st_mode) == 0o600
    assert json.loads(store.consent_path.read_text()) == {"consent": True, "changed_at_ms": 1234500}


def test_with_consent_reports_go_to_spool_and_export(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path, clock=lambda: 5.0)
    store.set_consent(True)
    path = store.record(_report([{"template": "wasm", "status": "ok", "latency_ms": 1}]))
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    usb = tmp_path / "usb"
    usb.mkdir()
    exported = store.export(usb)
    assert [p.name for p in exported] == ["cell-report-5000.json"]
    assert json.loads(exported[0].read_text())["runs_per_template"] == {"wasm": 1}


def test_withdrawing_consent_drops_the_unexported_spool(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.set_consent(True)
    store.record(_report([]))
    store.set_consent(False)
    assert store.spooled() == []


def test_consent_off_records_nothing_and_opens_no_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: Any, **kwargs: Any) -> socket.socket:
        raise AssertionError("telemetry opened a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    store = TelemetryStore(tmp_path)
    report = _report([{"template": "python3", "status": "ok", "latency_ms": 3}])
    assert store.record(report) is None
    usb = tmp_path / "usb"
    usb.mkdir()
    assert store.export(usb) == []
    assert list(usb.iterdir()) == []
    assert not (tmp_path / "telemetry").exists()
