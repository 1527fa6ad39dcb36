"""`mypy --strict` over the appliance package (STYLE: typed defs; strict on
the pure modules, and here on the whole service package)."""
from __future__ import annotations

import subprocess
import sys

from tests.liveserver import REPO


def test_appliance_package_passes_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental", "appliance"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
