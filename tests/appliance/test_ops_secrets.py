"""T-LOG-1: a full run on a real server process never logs the API key, a
Bearer credential, a receipt or license signature, or the node key seed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.liveserver import REPO, ServerProcess, shared_cache

pytestmark = pytest.mark.slow

# The same wiring as `cell serve`: create_app registers the ops layer from the
# settings (SYNAPSE_LOG_FILE, SYNAPSE_METRICS_TOKEN), logging to a file and stderr.
SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from waitress.server import create_server
    from appliance.config import load_settings
    from appliance.services import build_services, ensure_default_tenant
    from appliance.web.app import create_app

    def main() -> None:
        settings = load_settings()
        services = build_services(settings)
        key = ensure_default_tenant(services)
        app = create_app(services)
        state = app.extensions["cell_ops"]
        server = create_server(app, host="127.0.0.1", port=0, threads=4)
        print(f"cell: serving on http://127.0.0.1:{server.effective_port}", flush=True)
        print(f"cell: API key of tenant 'default': {key}", flush=True)
        try:
            server.run()
        finally:
            state.close()
            services.close()

    if __name__ == "__main__":
        main()
""")


def test_t_log_1_no_secret_in_the_logs_of_a_full_run(module_cache: None, tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    log_file = tmp_path / "log" / "cell.log"
    env = dict(os.environ, SYNAPSE_ROOT=str(tmp_path / "root"), SYNAPSE_CONFIG_DIR=str(tmp_path / "root" / "etc"),
               SYNAPSE_MODULE_CACHE=str(shared_cache()), SYNAPSE_WORKERS="1", SYNAPSE_WARM_JAVASCRIPT="0",
               SYNAPSE_LOG_FILE=str(log_file), SYNAPSE_METRICS_TOKEN="metrics-secret-token-1234",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), str(log_file)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    url = key = ""
    for line in proc.stdout:
        if "serving on " in line:
            url = line.split("serving on ", 1)[1].strip()
        if "API key of tenant" in line:
            key = line.rsplit(" ", 1)[1].strip()
            break
    server = ServerProcess(url=url, api_key=key, root=tmp_path / "root", proc=proc)  # type: ignore[arg-type]
    signatures: list[str] = []
    try:
        assert url and key
        status, cell, _ = server.request("POST", "/v1/cells", {"template": "python3"})
        assert status == 201
        cid = cell["cell_id"]
        for code in ("x = 41", "print(x + 1)", "import sys; print('Bearer ' + 'leak', file=sys.stderr)", "raise SystemExit(3)"):
            status, run, _ = server.request("POST", f"/v1/cells/{cid}/exec", {"code": code})
            assert status == 200
            signatures.append(run["receipt"]["signature"])
        server.request("POST", "/v1/execute", {"template": "wasm", "code": "(module (func (export \"_start\")))"})
        server.request("POST", f"/v1/cells/{cid}/files", {"path": "a.txt", "content": "hello"})
        server.request("GET", f"/v1/cells/{cid}/files?path=a.txt")
        server.request("GET", "/v1/receipts?limit=5")
        server.request("GET", "/v1/status")
        server.request("GET", "/v1/cells", key="sk-wrong-key-" + "9" * 20)
        server.request("GET", "/v1/cells", key=key + "x")
        req = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer metrics-secret-token-1234"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        server.request("DELETE", f"/v1/cells/{cid}")
    finally:
        server.stop()
        stderr = proc.stderr.read()
        proc.stderr.close()
    seed = (tmp_path / "root" / "keys" / "node_ed25519").read_text().strip()
    file_log = log_file.read_text()
    lines = [json.loads(x) for x in file_log.splitlines()]
    assert {"request", "run"} <= {x["event"] for x in lines}
    everything = file_log + stderr
    for secret in (key, key + "x", "sk-wrong-key-", "metrics-secret-token-1234", seed, *signatures):
        assert secret not in everything
    assert "bearer" not in everything.lower()
