"""The console's installer bridge verifies with the given trust root and
refuses tampered or foreign bundles before anything runs (T-SUPPLY-2)."""
from __future__ import annotations

from pathlib import Path

import pytest

from installer.console import ConsoleInstaller
from installer.errors import BundleRejected
from installer.layout import Layout
from tests.installer.conftest import ReleaseKey
from tests.installer.test_tamper import small_bundle


def test_verify_and_plan_with_the_trusted_key(tmp_path: Path, release_key: ReleaseKey) -> None:
    bundle = small_bundle(tmp_path, release_key)
    bridge = ConsoleInstaller(layout=Layout(root=tmp_path / "root"), trusted=release_key.trusted)
    checked = bridge.verify_bundle(bundle)
    assert checked["details"]["version"] == "9.9.9" and checked["details"]["installed now"] == "nothing"
    assert [s["id"] for s in bridge.plan(bundle)] == ["verify", "install"]
    assert "verified" in bridge.run_step(bundle, "verify")
    assert bridge.rollback(bundle, ["verify"]) == ["nothing was installed; the current version is untouched"]


def test_t_supply_2_bundle_signed_by_another_key_is_refused(tmp_path: Path, release_key: ReleaseKey, other_key: ReleaseKey) -> None:
    bundle = small_bundle(tmp_path, other_key)
    bridge = ConsoleInstaller(layout=Layout(root=tmp_path / "root"), trusted=release_key.trusted)
    with pytest.raises(BundleRejected):
        bridge.verify_bundle(bundle)


def test_t_supply_2_console_defaults_to_the_embedded_production_key(tmp_path: Path, release_key: ReleaseKey) -> None:
    bundle = small_bundle(tmp_path, release_key)  # a test key is not the vendor's release key
    with pytest.raises(BundleRejected):
        ConsoleInstaller(None).verify_bundle(bundle)
