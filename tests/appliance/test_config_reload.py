"""SIGHUP reloads config.toml on a running node: live-safe settings apply
at once, a bad file keeps the running configuration (docs/operations.md)."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests import guests
from tests.liveserver import ServerProcess, start_server

pytestmark = pytest.mark.slow


def _fetch_denial(srv: ServerProcess) -> str:
    _, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": guests.fetch_probe("http://metadata.test.example/")})
    return str(body["denials"][0]["reason"])


def _wait_reason(srv: ServerProcess, reason: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _fetch_denial(srv) == reason:
            return
        time.sleep(0.3)
    raise AssertionError(f"denial reason never became {reason}")


def test_sighup_reloads_egress_and_refuses_a_bad_file(module_cache: None, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    etc = root / "etc"
    etc.mkdir()
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"metadata.test.example": ["169.254.169.254"]}))
    (etc / "config.toml").write_text('egress = "off"\n')
    srv = start_server(root)
    try:
        assert _fetch_denial(srv) == "egress_off"
        (etc / "config.toml").write_text(f'egress = "on"\negress_hosts = "{hosts}"\n')
        srv.proc.send_signal(signal.SIGHUP)
        _wait_reason(srv, "denied_address")  # egress on now; the metadata address is still denied (T-SSRF-1)
        (etc / "config.toml").write_text('egress = "sideways"\n')  # invalid: must not be applied
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert _fetch_denial(srv) == "denied_address"
        assert any("config reload refused" in line for line in srv.log)
        (etc / "config.toml").write_text('egress = "off"\n')
        srv.proc.send_signal(signal.SIGHUP)
        _wait_reason(srv, "egress_off")
    finally:
        srv.stop()
