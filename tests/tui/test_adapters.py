"""The real adapter over real appliance objects, and the removable-media guards."""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Settings
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.storage import Store
from tests.factories import NOW, make_keypair, make_license
from tui import media
from tui.adapters import ApplianceConsoleServices
from tui.services import ConsoleServices, PlanStep, ServiceError, Unavailable

KP = make_keypair("console-license")
ATTACKER = make_keypair("console-attacker")
NOW_MS = int(NOW.timestamp() * 1000)


class FakeMirror:
    def status(self) -> dict[str, Any]:
        return {"version": 3, "templates": [{"name": "python3", "version": "3.12", "sha256": "ab" * 32}],
                "revocations": ["lic-bad"]}

    def is_license_revoked(self, license_id: str) -> bool:
        return license_id == "lic-bad"

    def is_key_revoked(self, key_id: str) -> bool:
        return False

    def preview_import(self, path: Path) -> dict[str, Any]:
        return {"summary": "version 3 → 4", "changes": ["add template javascript"]}

    def apply_import(self, path: Path) -> dict[str, Any]:
        return {"summary": "version 4 in force"}


class FakeInstaller:
    def __init__(self) -> None:
        self.undone: list[str] = []

    def verify_bundle(self, path: Path) -> dict[str, Any]:
        if b"tampered" in path.read_bytes():
            raise ValueError("manifest signature does not verify")
        return {"summary": "Cell 0.2.0", "details": {"version": "0.2.0"}}

    def plan(self, path: Path) -> list[dict[str, str]]:
        return [{"id": "a", "title": "A"}, {"id": "b", "title": "B"}]

    def run_step(self, path: Path, step_id: str) -> str:
        if step_id == "b":
            raise OSError("disk full")
        return "ok"

    def rollback(self, path: Path, step_ids: list[str]) -> list[str]:
        self.undone = list(step_ids)
        return [f"undid {s}" for s in reversed(step_ids)]


@pytest.fixture
def usb(tmp_path: Path) -> Path:
    stick = tmp_path / "media" / "op" / "STICK"
    stick.mkdir(parents=True)
    return stick


@pytest.fixture
def console(tmp_path: Path, usb: Path) -> Iterator[ApplianceConsoleServices]:
    settings = Settings(root=tmp_path / "root", config_dir=tmp_path / "etc",
                        license_path=tmp_path / "etc" / "license.json", node_id="n1", workers=3)
    store = Store(settings.db_path)
    receipts = ReceiptStore(settings.db_path, NodeKey.generate())
    adapter = ApplianceConsoleServices(
        settings, store, receipts, None, mirror=FakeMirror(), installer=FakeInstaller(),
        media_roots=(tmp_path / "media",), license_keys=KP.keys, clock=lambda: NOW, machine_id=None,
        now_ms=lambda: NOW_MS,
    )
    yield adapter
    adapter.close()


def _append(adapter: ApplianceConsoleServices, tenant: str, ts: int) -> None:
    adapter._receipts.append(execution_id=str(uuid.uuid4()), tenant_id=tenant, cell_id=None, template="python3",
                             code_hash="a" * 64, result_hash="b" * 64, timestamp_ms=ts)


def test_adapter_conforms_to_protocol(console: ApplianceConsoleServices) -> None:
    services: ConsoleServices = console  # mypy: structural check
    assert services.status()["version"]


def test_status_without_pool_reads_db_license_and_mirror(console: ApplianceConsoleServices) -> None:
    tenant, _ = console.add_tenant("acme")
    _append(console, tenant.id, NOW_MS - 10_000)
    _append(console, tenant.id, NOW_MS - 120_000)
    status = console.status()
    assert status["tier"] == "free" and status["workers"] == {"configured": 3}
    assert status["runs_per_minute"] == 1
    assert [r.tenant_id for r in status["recent_receipts"]] == [tenant.id, tenant.id]
    assert status["mirror"] == "registry version 3, 1 template(s)"
    assert status["telemetry"] == "off"


def test_tenants_add_list_revoke(console: ApplianceConsoleServices) -> None:
    tenant, key = console.add_tenant("acme")
    assert key.startswith("cell_") and tenant.name == "acme"
    with pytest.raises(ServiceError, match="already exists"):
        console.add_tenant("acme")
    assert console.revoke_tenant(tenant.id) is True
    assert [t.revoked for t in console.list_tenants()] == [True]


def test_receipts_filter_verify_export(console: ApplianceConsoleServices, usb: Path) -> None:
    for i in range(5):
        _append(console, "t-a" if i % 2 else "t-b", NOW_MS + i)
    rows = console.receipts_page(tenant_id="t-a", status=None, after=None, limit=10)
    assert [r.seq for r in rows] == [2, 4] and {r.tenant_id for r in rows} == {"t-a"}
    assert console.verify_receipts().ok
    out = console.export_receipts(usb)
    assert out.parent == usb and json.loads(out.read_text().splitlines()[0])["type"] == "header"
    with pytest.raises(ServiceError):
        console.export_receipts(Path("/tmp"))


def test_valid_license_verifies_and_installs_0640(console: ApplianceConsoleServices, usb: Path) -> None:
    (usb / "license.json").write_bytes(make_license(KP.signing_key, KP.key_id))
    check = console.verify_license_file(usb / "license.json")
    assert check.ok and "pro tier for Example Labs GmbH" in check.verdict
    assert dict(check.fields)["licensee"] == "Example Labs GmbH"
    assert console.install_license(usb / "license.json").ok
    installed = console.settings.license_path
    assert installed.read_bytes() == (usb / "license.json").read_bytes()
    assert oct(installed.stat().st_mode & 0o777) == "0o640"


@pytest.mark.parametrize("name, data, code", [
    ("forged", lambda: make_license(ATTACKER.signing_key, KP.key_id), "bad_signature"),
    ("expired", lambda: make_license(KP.signing_key, KP.key_id, expires_at="2027-01-01T00:00:00Z",
                                     not_before="2026-01-01T00:00:00Z", issued_at="2026-01-01T00:00:00Z"), "expired"),
    ("revoked", lambda: make_license(KP.signing_key, KP.key_id, license_id="lic-bad"), "revoked"),
])
def test_T_LIC_1_bad_license_rejected_with_reason_and_not_installed(
        console: ApplianceConsoleServices, usb: Path, name: str, data: Any, code: str) -> None:
    (usb / f"{name}.json").write_bytes(data())
    check = console.install_license(usb / f"{name}.json")
    assert not check.ok and check.code is not None and code in check.code
    assert check.reason and check.verdict == f"REJECTED: {check.reason}"
    assert not console.settings.license_path.exists()


def test_bundle_verify_plan_run_and_rollback(console: ApplianceConsoleServices, usb: Path) -> None:
    (usb / "good.tar").write_bytes(b"bundle")
    (usb / "bad.tar").write_bytes(b"tampered")
    assert console.verify_bundle(usb / "good.tar").ok
    refused = console.verify_bundle(usb / "bad.tar")
    assert not refused.ok and "manifest signature" in refused.summary
    plan = console.plan_install(usb / "good.tar")
    assert console.run_install_step(usb / "good.tar", plan[0]).ok
    failed = console.run_install_step(usb / "good.tar", plan[1])
    assert not failed.ok and "disk full" in failed.message
    assert console.rollback_install(usb / "good.tar", [plan[0]]) == ["undid a"]


def test_T_LIC_1_without_registry_license_check_fails_closed_like_the_service(tmp_path: Path) -> None:
    (tmp_path / "lic.json").write_bytes(make_license(KP.signing_key, KP.key_id))
    settings = Settings(root=tmp_path / "root", config_dir=tmp_path / "etc", node_id="n1")
    adapter = ApplianceConsoleServices(settings, Store(settings.db_path), ReceiptStore(settings.db_path, NodeKey.generate()),
                                       media_roots=(tmp_path,), license_keys=KP.keys, clock=lambda: NOW, machine_id=None)
    try:
        assert not adapter.verify_license_file(tmp_path / "lic.json").ok
    finally:
        adapter.close()


def test_real_registry_bridge_status_and_preview_leave_registry_untouched(tmp_path: Path) -> None:
    registry = pytest.importorskip("mirror.registry")
    from tui.adapters import RegistryBridge

    bridge = RegistryBridge(registry.Mirror(tmp_path / "mirror"))
    status = bridge.status()
    assert set(status) == {"version", "templates", "revocations"}
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mirror").rglob("*"))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(Exception):
        bridge.preview_import(junk)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "mirror").rglob("*")) == before


def test_mirror_and_installer_missing_degrade_to_not_available(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path / "root", config_dir=tmp_path / "etc", node_id="n1")
    store = Store(settings.db_path)
    receipts = ReceiptStore(settings.db_path, NodeKey.generate())
    adapter = ApplianceConsoleServices(settings, store, receipts, media_roots=(tmp_path,))
    try:
        assert adapter.mirror_status().available is False
        assert adapter.status()["mirror"] == "not available"
        with pytest.raises(Unavailable):
            adapter.preview_mirror_import(tmp_path / "x.tar")
        with pytest.raises(Unavailable):
            adapter.verify_bundle(tmp_path / "x.tar")
        with pytest.raises(Unavailable):
            adapter.run_install_step(tmp_path / "x.tar", PlanStep("a", "A"))
    finally:
        adapter.close()


def test_telemetry_through_adapter(console: ApplianceConsoleServices, usb: Path) -> None:
    _append(console, "secret-tenant", NOW_MS - 1000)
    preview = console.telemetry_preview()
    assert preview["runs_per_template"] == {"python3": 1} and "secret-tenant" not in json.dumps(preview)
    assert console.telemetry_state().consent is False
    assert console.export_telemetry(usb) == []
    state = console.set_telemetry_consent(True)
    assert state.consent and state.spooled == 1
    assert len(console.export_telemetry(usb)) == 1


# -- removable media (T-PATH: the stick is attacker-controlled) ----------------

def test_scan_lists_regular_files_and_skips_symlinks_fifos_big_hidden(tmp_path: Path, usb: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (usb / "ok.json").write_text("{}")
    (usb / ".hidden.json").write_text("{}")
    (usb / "big.json").write_bytes(b"x" * (64 * 1024 + 1))
    (usb / "link.json").symlink_to(secret)
    (usb / "linkdir").symlink_to(tmp_path)
    os.mkfifo(usb / "fifo.json")
    (usb / "sub").mkdir()
    (usb / "sub" / "deep.lic").write_text("{}")
    found = [f.path.relative_to(usb) for f in media.scan((tmp_path / "media",), "license")]
    assert found == [Path("ok.json"), Path("sub/deep.lic")]


def test_read_confined_refuses_symlink_outside_and_oversize(tmp_path: Path, usb: Path) -> None:
    roots = (tmp_path / "media",)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (usb / "link.json").symlink_to(secret)
    (usb / "big.json").write_bytes(b"x" * (64 * 1024 + 1))
    (usb / "ok.json").write_text("{}")
    assert media.read_confined(usb / "ok.json", roots, "license") == b"{}"
    for bad in (usb / "link.json", secret, usb / "big.json", usb / ".." / ".." / ".." / "secret.json"):
        with pytest.raises(ServiceError):
            media.read_confined(bad, roots, "license")


def test_mounted_dirs_are_writable_dirs_under_roots(tmp_path: Path, usb: Path) -> None:
    dirs = media.mounted_dirs((tmp_path / "media",))
    assert usb in dirs
