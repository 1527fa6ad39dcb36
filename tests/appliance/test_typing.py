"""`mypy --strict` over all four packages (typed defs everywhere; strict on
everything we ship)."""
from __future__ import annotations

import subprocess
import sys

from tests.liveserver import REPO


def test_packages_pass_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental", "appliance", "mirror", "installer", "tui", "sdk/cell_sdk"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
