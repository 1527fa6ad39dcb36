"""`cell status` reads a node's data directory without starting anything."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.liveserver import REPO


def test_status_of_a_fresh_node(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"), SYNAPSE_PORT="1")
    subprocess.run([sys.executable, "-m", "appliance.cli", "tenant", "add", "acme"], env=env, cwd=REPO, check=True,
                   capture_output=True, text=True)
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "status", "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["service"] == "not running" and status["tenants"] == 1 and status["cells"] == 0
    assert status["license"]["tier"] == "free" and status["registry"]["root_version"] == 1
    text = subprocess.run([sys.executable, "-m", "appliance.cli", "status"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout
    assert "tier: free" in text and "service: not running" in text
