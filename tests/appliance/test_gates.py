"""The two release-gate scripts, run as a release runs them (SECURITY.md §7), in
their --quick form: they must exit 0. Each starts its own real server."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _gate(script: str, timeout: float) -> None:
    out = subprocess.run([sys.executable, str(REPO / "tests" / script), "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{script} --quick exited {out.returncode}\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"


def test_stress_quick_passes(module_cache: None) -> None:
    _gate("stress_test.py", timeout=240)


def test_benchmark_quick_passes(module_cache: None) -> None:
    _gate("benchmark_e2b.py", timeout=360)  # ~70-100 s alone; a bound for a loaded machine, not a figure
