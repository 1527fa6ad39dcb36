"""The client SDK installs on its own: its wheel is built the way the offline
bundle builds it (no index, no build tools beyond the standard library),
installed alone into a fresh venv, and runs the migration guide's example
against a live server."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from installer.bundle import BundleOptions, build_sdk_wheel
from tests.liveserver import REPO, ServerProcess

pytestmark = pytest.mark.slow
GUIDE = REPO / "docs" / "migrating-from-e2b.md"


def _build(out: Path) -> Path:
    out.mkdir(parents=True)
    opts = BundleOptions(project=REPO, out=out, signing_key=out / "unused", no_index=True)
    name = build_sdk_wheel(opts, out, progress=lambda _line: None)
    assert name is not None
    return out / name


def _guide_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "the migration guide has no python example"
    return blocks[0]


def test_sdk_wheel_is_small_pure_and_reproducible(tmp_path: Path) -> None:
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    assert first.name == "cell_sdk-0.1.0-py3-none-any.whl"
    assert first.read_bytes() == second.read_bytes()  # same inputs, same bytes (the bundle is reproducible)
    with zipfile.ZipFile(first) as zf:
        names = zf.namelist()
        metadata = zf.read("cell_sdk-0.1.0.dist-info/METADATA").decode()
    assert {n.split("/")[0] for n in names} == {"cell_sdk", "cell_sdk-0.1.0.dist-info"}  # no appliance inside
    assert "Requires-Dist" not in metadata and "Name: cell-sdk" in metadata
    assert first.stat().st_size < 100_000


def test_clean_venv_with_only_the_sdk_wheel_runs_the_migration_example(live: ServerProcess, tmp_path: Path) -> None:
    wheel = _build(tmp_path / "wheels")
    venv = tmp_path / "agent-env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--disable-pip-version-check",
                    str(wheel)], check=True, timeout=300, env=env, capture_output=True)
    # Nothing of the appliance is importable there; the SDK is.
    probe = ("import importlib.util as u; "
             "print([m for m in ('cell_sdk', 'appliance', 'flask', 'wasmtime') if u.find_spec(m)])")
    found = subprocess.run([py, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True, env=env)
    assert found.stdout.strip() == "['cell_sdk']"
    example = tmp_path / "example.py"
    example.write_text(_guide_example())
    run_env = {**env, "CELL_API_URL": live.url, "CELL_API_KEY": live.api_key}
    out = subprocess.run([py, "-I", str(example)], cwd=tmp_path, capture_output=True, text=True, env=run_env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "np.int64(6)\nhello\n"
