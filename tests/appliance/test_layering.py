"""Pure policy modules import no I/O adapters; nothing imports tui (STYLE)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = [
    "appliance.policy.paths", "appliance.policy.egress", "appliance.policy.bounds", "appliance.policy.ratelimit",
    "appliance.receipts.v1", "appliance.receipts.merkle", "appliance.license.verify", "appliance.errors",
    "appliance.runtime.seccomp", "appliance.runtime.landlock",
]
FORBIDDEN = {"flask", "werkzeug", "wasmtime", "textual", "sqlite3", "sqlite_utils", "socket", "ssl", "urllib.request", "tui"}


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_adapters(module: str) -> None:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout))
    assert not (loaded & FORBIDDEN), loaded & FORBIDDEN


def test_appliance_never_imports_tui() -> None:
    offenders = [str(p) for p in (REPO / "appliance").rglob("*.py") if "import tui" in p.read_text() or "from tui" in p.read_text()]
    assert offenders == []
