"""`cell incident snapshot` takes a live node out of rotation, then writes a
private tarball an investigator can trust (SECURITY.md §8)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.liveserver import REPO, start_server

pytestmark = pytest.mark.slow


def test_incident_snapshot_stops_new_runs_and_captures_the_node(module_cache: None, tmp_path: Path) -> None:
    root = tmp_path / "node"
    srv = start_server(root)
    try:
        _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
        srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": "open('evidence.txt', 'w').write('guest wrote this')"})
        env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"))
        out = tmp_path / "incident.tar.gz"
        proc = subprocess.run([sys.executable, "-m", "appliance.cli", "incident", "snapshot", "--out", str(out),
                               "--reason", "suspected escape"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 5
        status, body = 200, {}
        while time.monotonic() < deadline:
            status, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"})
            if status == 503:
                break
            time.sleep(0.2)
        assert (status, body["code"]) == (503, "incident")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(srv.url + "/healthz", timeout=10)
        assert info.value.code == 503
        info.value.close()
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        with tarfile.open(out) as tar:
            names = set(tar.getnames())
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            volumes = json.load(tar.extractfile("volumes.json"))  # type: ignore[arg-type]
        assert {"manifest.json", "db/cell.sqlite", "volumes.json", "cache-manifest.json"} <= names
        assert manifest["reason"] == "suspected escape" and "volumes/" not in " ".join(names)
        evidence = [v for v in volumes if v["path"].endswith("evidence.txt")]
        assert evidence and len(evidence[0]["sha256"]) == 64
        proc = subprocess.run([sys.executable, "-m", "appliance.cli", "incident", "clear"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0
        time.sleep(1.5)
        assert srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"})[0] == 200
    finally:
        srv.stop()
