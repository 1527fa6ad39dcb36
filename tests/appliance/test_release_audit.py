"""The release-gate scripts run in `make test` too: each starts its own live
server on loopback and must exit 0 (correctness only, never timing)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.liveserver import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", [["run_test.py", "--quick"], ["tests/red_team.py", "--quick"]])
def test_release_gate_passes(module_cache: None, script: list[str]) -> None:
    proc = subprocess.run([sys.executable, *script], cwd=REPO, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
