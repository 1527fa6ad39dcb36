"""Fixtures for the installer tests: a throw-away release key, small synthetic
bundles (fast, no pip), and — once per session — real bundles built from a
wheelhouse cached under ``.cache/wheelhouse`` (the only step that may need the
network; it is skipped with a reason when PyPI is unreachable).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from installer import ed25519
from installer.bundle import read_project
from installer.keys import key_id_for

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
# setuptools for the isolated wheel build of the project, fetched once with the deps.
BUILD_REQUIREMENT = "setuptools>=70.1"


@dataclass(frozen=True)
class ReleaseKey:
    seed: bytes
    key_id: str
    key_file: Path
    trusted_file: Path

    @property
    def trusted(self) -> dict[str, bytes]:
        return {self.key_id: ed25519.public_key(self.seed)}


def make_release_key(directory: Path, label: str) -> ReleaseKey:
    seed = hashlib.sha256(f"cell-installer-test-{label}".encode()).digest()  # public, test-only seed
    public = ed25519.public_key(seed)
    kid = key_id_for(public)
    directory.mkdir(parents=True, exist_ok=True)
    key_file = directory / f"{label}.key.json"
    key_file.write_text(json.dumps({"ed25519_seed": seed.hex()}))
    trusted = directory / f"{label}.trusted.json"
    trusted.write_text(json.dumps({"release": [{"key_id": kid, "ed25519_public_key": public.hex()}]}))
    return ReleaseKey(seed, kid, key_file, trusted)


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> ReleaseKey:
    return make_release_key(tmp_path_factory.mktemp("keys"), "release")


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> ReleaseKey:
    return make_release_key(tmp_path_factory.mktemp("keys-other"), "attacker")


def _constraints() -> str:
    """Pin transitive deps to what this venv runs, so bundles are reproducible."""
    lines = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        # Build tools are not runtime deps: setuptools comes from BUILD_REQUIREMENT.
        if name and re.sub(r"[-_.]+", "-", name).lower() not in ("cell-appliance", "setuptools", "pip"):
            lines.add(f"{name}=={dist.version}")
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


@pytest.fixture(scope="session")
def wheelhouse() -> tuple[Path, Path]:
    """(wheel dir, constraints file), downloaded once and reused between runs."""
    meta = read_project(REPO)
    constraints = _constraints()
    wanted = json.dumps([sorted(meta["dependencies"]), BUILD_REQUIREMENT, constraints])  # type: ignore[arg-type]
    stamp = hashlib.sha256(wanted.encode()).hexdigest()
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    cfile = WHEELHOUSE / "constraints.txt"
    if (WHEELHOUSE / ".stamp").is_file() and (WHEELHOUSE / ".stamp").read_text() == stamp:
        return WHEELHOUSE, cfile
    cfile.write_text(constraints)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(WHEELHOUSE),
           "--constraint", str(cfile), BUILD_REQUIREMENT, *meta["dependencies"]]  # type: ignore[misc]
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"cannot build the wheelhouse (PyPI unreachable?): {proc.stderr.strip()[-400:]}")
    (WHEELHOUSE / ".stamp").write_text(stamp)
    return WHEELHOUSE, cfile


def snapshot_project(dest: Path, version: str | None = None) -> Path:
    """A frozen copy of the checkout (others may edit it while tests run), optionally re-versioned."""
    meta = read_project(REPO)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "SECURITY.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    for pkg in [*meta["packages"], *meta["roots"]]:  # type: ignore[misc]
        if (REPO / str(pkg)).is_dir():  # cell_sdk lives under the sdk/ root, copied whole
            shutil.copytree(REPO / str(pkg), dest / str(pkg), ignore=ignore)
    if version:
        py = dest / "pyproject.toml"
        py.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', py.read_text(), count=1))
    return dest


def build_bundle_cli(project: Path, out: Path, key: ReleaseKey, wheelhouse: tuple[Path, Path],
                     extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "installer", "bundle", "--out", str(out), "--signing-key", str(key.key_file),
           "--project", str(project), "--find-links", str(wheelhouse[0]), "--no-index",
           "--constraints", str(wheelhouse[1]), *(extra or [])]
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    proc = subprocess.run(cmd, text=True, capture_output=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@dataclass(frozen=True)
class RealBundles:
    v1: Path
    v2: Path
    v1_project: Path
    registry: Path


@pytest.fixture(scope="session")
def real_bundles(wheelhouse: tuple[Path, Path], release_key: ReleaseKey,
                 tmp_path_factory: pytest.TempPathFactory) -> RealBundles:
    base = tmp_path_factory.mktemp("real-bundles")
    p1 = snapshot_project(base / "src-1")
    version = str(read_project(p1)["version"])
    parts = version.split(".")
    newer = ".".join([parts[0], str(int(parts[1]) + 1), "0"])
    p2 = snapshot_project(base / "src-2", version=newer)
    registry = base / "registry"
    (registry / "metadata").mkdir(parents=True)
    (registry / "metadata" / "1.root.json").write_text('{"signed": {}, "signatures": []}\n')
    build_bundle_cli(p1, base / "out-1", release_key, wheelhouse, ["--registry", str(registry)])
    build_bundle_cli(p2, base / "out-2", release_key, wheelhouse, ["--registry", str(registry)])
    return RealBundles(base / "out-1" / f"cell-appliance-{version}.tar",
                       base / "out-2" / f"cell-appliance-{newer}.tar", p1, registry)
