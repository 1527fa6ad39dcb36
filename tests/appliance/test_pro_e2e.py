"""Pro tier end to end on a live server (T-LIC-1, T-IMPORT-1, T-PRO-1, T-PRO-2).

The server is the real app and worker pool; the only difference from
production is that the license manager is built with this test's own
Ed25519 key, injected through the service factory (never by weakening
verification). Free tier refuses Pro imports before instantiation; a valid
Pro license installed on disk is picked up without a restart and unlocks
load_weights and host_mcp_call through a WAT guest; removing it locks them
again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.appliance.test_profuncs import mcp_probe, weights_probe
from tests.factories import make_keypair, make_license, stamp
from tests.liveserver import REPO, ServerProcess, shared_cache

pytestmark = pytest.mark.slow

SERVER = textwrap.dedent("""
    import sys
    from waitress.server import create_server
    from appliance.config import load_settings
    from appliance.license.manager import LicenseManager
    from appliance.services import build_services, ensure_default_tenant
    from appliance.web.app import create_app

    def main() -> None:
        keys = {sys.argv[1]: bytes.fromhex(sys.argv[2])}
        settings = load_settings()
        services = build_services(settings, license_factory=lambda s: LicenseManager(
            s, keys=keys, revocations=lambda _l: False, revoked_keys=lambda _k: False, poll_interval=0.2))
        key = ensure_default_tenant(services)
        app = create_app(services)
        services.start_background()
        server = create_server(app, host="127.0.0.1", port=0, threads=4)
        print(f"cell: serving on http://127.0.0.1:{server.effective_port}", flush=True)
        print(f"cell: API key of tenant 'default': {key}", flush=True)
        try:
            server.run()
        finally:
            app.extensions["cell_ops"].close()
            services.close()

    if __name__ == "__main__":
        main()
""")


def _wait_tier(srv: ServerProcess, tier: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.request("GET", "/v1/status")[1]["tier"] == tier:
            return
        time.sleep(0.2)
    raise AssertionError(f"tier never became {tier}")


def test_t_lic_1_pro_license_unlocks_pro_host_functions_without_restart(module_cache: None, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)  # the data root is private (start-up refuses anything looser)
    weights = root / "weights"
    weights.mkdir(mode=0o755)
    (weights / "model.bin").write_bytes(b"WEIGHTS-0123456789")
    mcp_table = tmp_path / "mcp.json"
    mcp_table.write_text(json.dumps({"servers": {"fake": {"command": [sys.executable, str(REPO / "tests" / "mcp_fake_server.py")],
                                                           "timeout_ms": 3000}}}))
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    kp = make_keypair("pro-e2e")
    env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"), SYNAPSE_MODULE_CACHE=str(shared_cache()),
               SYNAPSE_WORKERS="1", SYNAPSE_WARM_PYTHON="0", SYNAPSE_WARM_JAVASCRIPT="0", SYNAPSE_MCP_SERVERS=str(mcp_table),
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), kp.key_id, kp.public_key.hex()], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    url = key = ""
    for line in proc.stdout:
        if "serving on " in line:
            url = line.split("serving on ", 1)[1].strip()
        if "API key of tenant" in line:
            key = line.rsplit(" ", 1)[1].strip()
            break
    srv = ServerProcess(url=url, api_key=key, root=root, proc=proc)  # type: ignore[arg-type]
    try:
        assert url and key
        # Free tier: refused before instantiation, naming the function.
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": weights_probe("model.bin").decode()})
        assert (status, body["code"]) == (403, "license_required") and "load_weights" in body["error"]

        now = datetime.now(timezone.utc)
        lic = make_license(kp.signing_key, kp.key_id, limits={"rate_limit_rps": 500, "max_cells": 2, "max_memory_mb": 1024},
                           issued_at=stamp(now - timedelta(hours=1)),
                           not_before=stamp(now - timedelta(hours=1)), expires_at=stamp(now + timedelta(days=90)))
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "license.json").write_bytes(lic)
        _wait_tier(srv, "pro")

        status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": weights_probe("model.bin", offset=8).decode()})
        assert status == 200 and body["exit_code"] == 10 and body["stdout"] == "0123456789", body
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": weights_probe("../db/cell.sqlite").decode()})
        assert status == 200 and body["exit_code"] == -1
        request = {"server": "fake", "tool": "echo", "arguments": {"hello": "pro"}}
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": mcp_probe(request).decode()})
        assert status == 200 and body["exit_code"] > 0 and "pro" in body["stdout"], body
        bad = {"server": "fake", "tool": "echo", "arguments": {}, "url": "http://169.254.169.254/"}
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": mcp_probe(bad).decode()})
        assert status == 200 and body["exit_code"] == -1
        t = time.monotonic()
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": mcp_probe({"server": "fake", "tool": "hang", "arguments": {}}).decode(),
                                                              "timeout_ms": 2000})
        assert status == 200 and body["exit_code"] == -4 and time.monotonic() - t < 2 + 1.5

        # The license's limits apply on top of the configuration.
        status, body, _ = srv.request("POST", "/v1/cells", {"template": "wasm", "memory_mb": 1500})
        assert (status, body["code"]) == (400, "out_of_range") and "1024" in body["error"]
        assert srv.request("POST", "/v1/cells", {"template": "wasm"})[0] == 201
        assert srv.request("POST", "/v1/cells", {"template": "wasm"})[0] == 201
        status, body, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
        assert (status, body["code"]) == (403, "cell_limit")
        _, st, _ = srv.request("GET", "/v1/status")
        assert st["license"]["effective_limits"]["max_cells"] == 2

        # Removing the license locks the Pro functions again, without a restart.
        (root / "etc" / "license.json").unlink()
        _wait_tier(srv, "free")
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": weights_probe("model.bin").decode()})
        assert (status, body["code"]) == (403, "license_required")
    finally:
        srv.stop()


def _start(tmp_path: Path, kp: Any) -> ServerProcess:
    """The same server as above: weights, the fake MCP server, and a license key of the test's own."""
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    (root / "weights").mkdir(mode=0o755)
    (root / "weights" / "model.bin").write_bytes(b"WEIGHTS-0123456789")
    mcp_table = tmp_path / "mcp.json"
    mcp_table.write_text(json.dumps({"servers": {"fake": {"command": [sys.executable, str(REPO / "tests" / "mcp_fake_server.py")],
                                                           "timeout_ms": 3000}}}))
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"), SYNAPSE_MODULE_CACHE=str(shared_cache()),
               SYNAPSE_WORKERS="1", SYNAPSE_WARM_PYTHON="0", SYNAPSE_WARM_JAVASCRIPT="0", SYNAPSE_MCP_SERVERS=str(mcp_table),
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), kp.key_id, kp.public_key.hex()], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    url = key = ""
    for line in proc.stdout:
        if "serving on " in line:
            url = line.split("serving on ", 1)[1].strip()
        if "API key of tenant" in line:
            key = line.rsplit(" ", 1)[1].strip()
            break
    return ServerProcess(url=url, api_key=key, root=root, proc=proc)  # type: ignore[arg-type]


def _install(srv: ServerProcess, kp: Any, license_id: str, tier: str, features: list[str]) -> None:
    now = datetime.now(timezone.utc)
    lic = make_license(kp.signing_key, kp.key_id, license_id=license_id, tier=tier, features=features,
                       issued_at=stamp(now - timedelta(hours=1)), not_before=stamp(now - timedelta(hours=1)),
                       expires_at=stamp(now + timedelta(days=90)))
    (srv.root / "etc").mkdir(parents=True, exist_ok=True)
    tmp = srv.root / "etc" / ".license.tmp"
    tmp.write_bytes(lic)
    tmp.rename(srv.root / "etc" / "license.json")  # atomic, as `cell license install` does
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if srv.request("GET", "/v1/status")[1]["license"]["license_id"] == license_id:
            return
        time.sleep(0.2)
    raise AssertionError(f"license {license_id} never took over")


_IMPORTS = {
    "load_weights": ('  (import "cell" "load_weights" (func $lw (param i32 i32 i64 i32 i32) (result i32)))\n',
                     "  (func $lw (param i32 i32 i64 i32 i32) (result i32) i32.const -99)\n"),
    "host_mcp_call": ('  (import "cell" "host_mcp_call" (func $mcp (param i32 i32 i32 i32) (result i32)))\n',
                      "  (func $mcp (param i32 i32 i32 i32) (result i32) i32.const -99)\n"),
}


def only(probe: bytes, keep: str) -> str:
    """The Pro probe importing just ``keep``; the other function becomes a local stub (never called)."""
    text = probe.decode()
    (drop,) = [name for name in _IMPORTS if name != keep]
    line, stub = _IMPORTS[drop]
    assert line in text
    text = text.replace(line, "")
    return text.replace('  (memory (export "memory")', stub + '  (memory (export "memory")', 1)


# (license id, tier, listed features, load_weights allowed, host_mcp_call allowed), applied in turn to one
# running server by hot reload: each function works only while the license lists its own feature.
LIVE_ROWS = [
    ("lic-live-weights", "pro", ["load_weights"], True, False),
    ("lic-live-mcp", "pro", ["host_mcp_call"], False, True),
    ("lic-live-none", "pro", [], False, False),
    ("lic-live-hub", "hub", ["load_weights", "host_mcp_call"], True, True),  # hub without multi_tenant
]


def test_t_lic_2_each_pro_function_needs_its_own_feature_on_a_live_server(module_cache: None, tmp_path: Path) -> None:
    kp = make_keypair("pro-e2e-features")
    srv = _start(tmp_path, kp)
    try:
        assert srv.url and srv.api_key
        weights = {"template": "wasm", "code": only(weights_probe("model.bin", offset=8), "load_weights")}
        mcp = {"template": "wasm", "code": only(mcp_probe({"server": "fake", "tool": "echo", "arguments": {"hello": "pro"}}),
                                                "host_mcp_call")}
        for license_id, tier, features, weights_ok, mcp_ok in LIVE_ROWS:
            _install(srv, kp, license_id, tier, features)
            _, st, _ = srv.request("GET", "/v1/status")
            assert (st["tier"], st["license"]["features"]) == (tier, features)
            status, body, _ = srv.request("POST", "/v1/execute", weights)
            if weights_ok:
                assert status == 200 and body["stdout"] == "0123456789", (license_id, body)
            else:
                assert (status, body["code"]) == (403, "license_required") and "load_weights" in body["error"], (license_id, body)
            status, body, _ = srv.request("POST", "/v1/execute", mcp)
            if mcp_ok:
                assert status == 200 and body["exit_code"] > 0 and "pro" in body["stdout"], (license_id, body)
            else:
                assert (status, body["code"]) == (403, "license_required") and "host_mcp_call" in body["error"], (license_id, body)
    finally:
        srv.stop()
