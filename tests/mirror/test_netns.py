"""Import and sync work inside a network namespace with only loopback (T-SUPPLY-1)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.liveserver import REPO


def test_import_and_sync_inside_a_loopback_only_network_namespace(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("`unshare -n` is not permitted on this machine")
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.mirror.netns_driver", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"isolated": True, "imported": True, "synced": True, "revoked_seen": True}
