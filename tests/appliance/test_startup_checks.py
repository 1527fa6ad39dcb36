"""Start-up refuses a data directory with wrong ownership or permissions and
says how to fix it (nothing is served, nothing is created inside)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.liveserver import REPO


@pytest.mark.parametrize("target,mode", [("", 0o777), ("", 0o755), ("keys", 0o750), ("db", 0o707)])
def test_serve_refuses_a_data_dir_open_to_others(tmp_path: Path, target: str, mode: int) -> None:
    root = tmp_path / "root"
    for sub in ("", "sandbox_volumes", "db", "keys"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root / sub, 0o700)
    os.chmod(root / target, mode)
    env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"), SYNAPSE_PORT="0")
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "serve"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "chmod 700" in proc.stderr and "serving on" not in proc.stdout
    assert not (root / "db" / "cell.sqlite").exists()


def test_serve_refuses_a_symlinked_data_subdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, root / "keys")
    env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"), SYNAPSE_PORT="0")
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "serve"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
