"""`cell license show | verify | install | issue` (T-LIC-1 at the operator's console)."""
from __future__ import annotations

import argparse
import io
import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Settings
from appliance.license.cli import register
from appliance.license.machine import fingerprint_from_machine_id
from appliance.license.manager import HighWaterStore, LicenseManager
from appliance.receipts.nodekey import NodeKey
from tests.factories import NOW, make_keypair, make_license, stamp

KP = make_keypair("license-primary")
ATTACKER = make_keypair("license-attacker")
MACHINE = fingerprint_from_machine_id("0123456789abcdef0123456789abcdef")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path / "root", config_dir=tmp_path / "etc", license_path=tmp_path / "etc" / "license.json")


def run(settings: Settings, *argv: str, **deps: Any) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="cell")
    commands = parser.add_subparsers(dest="command", required=True)
    out = io.StringIO()
    wiring: dict[str, Any] = {"settings": settings, "keys": KP.keys, "clock": lambda: NOW, "machine_id": MACHINE, "out": out,
                              "revocations": lambda _license_id: False}  # the registry's own tests: test_license_freshness
    wiring.update(deps)
    register(commands, **wiring)
    args = parser.parse_args(list(argv))
    return args.func(args), out.getvalue()


def license_file(tmp_path: Path, name: str = "new.json", **overrides: Any) -> Path:
    path = tmp_path / name
    path.write_bytes(make_license(KP.signing_key, KP.key_id, **overrides))
    return path


# -- verify ---------------------------------------------------------------------


def test_verify_valid_license_exit_0_prints_every_field(settings: Settings, tmp_path: Path) -> None:
    code, out = run(settings, "license", "verify", str(license_file(tmp_path, machine_id=MACHINE)))
    assert code == 0
    assert "verdict: VALID (pro tier)" in out and "signature verified" in out
    for field in ("schema", "license_id", "licensee", "tier", "features", "limits", "issued_at",
                  "not_before", "expires_at", "machine_id", "key_id", "days_left"):
        assert f"  {field}: " in out, field
    assert '"max_memory_mb": 1024' in out and "Example Labs GmbH" in out


@pytest.mark.parametrize(
    "overrides, signer, code",
    [
        ({}, ATTACKER, "bad_signature"),
        ({"expires_at": stamp(NOW)}, KP, "expired"),
        ({"machine_id": fingerprint_from_machine_id("e" * 32)}, KP, "wrong_machine"),
        ({"schema": "cell-license/9"}, KP, "unknown_schema"),
    ],
    ids=["forged", "expired", "wrong-machine", "schema"],
)
def test_T_LIC_1_verify_rejected_exit_1_with_reason(
    settings: Settings, tmp_path: Path, overrides: dict[str, Any], signer: Any, code: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(make_license(signer.signing_key, KP.key_id, **overrides))
    rc, out = run(settings, "license", "verify", str(path))
    assert rc == 1 and f"verdict: REJECTED ({code})" in out and "reason: " in out


def test_T_LIC_1_verify_forged_marks_fields_unverified(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "forged.json"
    path.write_bytes(make_license(ATTACKER.signing_key, KP.key_id, tier="hub"))
    _, out = run(settings, "license", "verify", str(path))
    assert "NOT verified" in out and "signature verified" not in out


def test_verify_missing_file_exit_1(settings: Settings, tmp_path: Path) -> None:
    rc, out = run(settings, "license", "verify", str(tmp_path / "absent.json"))
    assert rc == 1 and "REJECTED (unreadable)" in out


def test_T_LIC_1_verify_honours_clock_high_water(settings: Settings, tmp_path: Path) -> None:
    HighWaterStore(settings.db_path, NodeKey.load_or_create(settings.keys_dir)).raise_to(NOW + timedelta(days=2))
    rc, out = run(settings, "license", "verify", str(license_file(tmp_path)))
    assert rc == 1 and "clock_rollback" in out


def test_verify_and_show_do_not_create_the_database(settings: Settings, tmp_path: Path) -> None:
    run(settings, "license", "verify", str(license_file(tmp_path)))
    run(settings, "license", "show")
    assert not settings.db_path.exists()


def test_T_LIC_1_no_flag_can_add_a_trusted_key(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run(settings, "license", "verify", "--keys", "k.json", str(license_file(tmp_path)))


# -- install --------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_install_valid_license_mode_0640_atomically(settings: Settings, tmp_path: Path, umask: int) -> None:
    source = license_file(tmp_path)
    old = os.umask(umask)
    try:
        rc, out = run(settings, "license", "install", str(source))
    finally:
        os.umask(old)
    assert rc == 0 and "installed" in out
    assert stat.S_IMODE(settings.license_path.stat().st_mode) == 0o640
    assert settings.license_path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in settings.license_path.parent.iterdir()) == ["license.json"], "no temp file left"


def test_install_replaces_existing_license_by_rename(settings: Settings, tmp_path: Path) -> None:
    run(settings, "license", "install", str(license_file(tmp_path, "a.json")))
    inode = settings.license_path.stat().st_ino
    rc, _ = run(settings, "license", "install", str(license_file(tmp_path, "b.json", tier="hub")))
    assert rc == 0 and settings.license_path.stat().st_ino != inode
    assert b'"hub"' in settings.license_path.read_bytes()


def test_T_LIC_1_install_refuses_rejected_license_and_keeps_old(settings: Settings, tmp_path: Path) -> None:
    good = license_file(tmp_path, "good.json")
    run(settings, "license", "install", str(good))
    forged = tmp_path / "forged.json"
    forged.write_bytes(make_license(ATTACKER.signing_key, KP.key_id, tier="hub"))
    rc, out = run(settings, "license", "install", str(forged))
    assert rc == 1 and "not installed" in out
    assert settings.license_path.read_bytes() == good.read_bytes()


# -- show -----------------------------------------------------------------------


def test_show_without_license_prints_fingerprint(settings: Settings) -> None:
    rc, out = run(settings, "license", "show")
    assert rc == 0 and "NO LICENSE (free tier)" in out and f"machine fingerprint: {MACHINE}" in out


def test_show_installed_license(settings: Settings, tmp_path: Path) -> None:
    run(settings, "license", "install", str(license_file(tmp_path)))
    rc, out = run(settings, "license", "show")
    assert rc == 0 and "verdict: VALID (pro tier)" in out and str(settings.license_path) in out


# -- issue (vendor side) --------------------------------------------------------


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "vendor.key"
    path.write_text(bytes(KP.signing_key).hex() + "\n")
    path.chmod(0o600)
    return path


def test_issue_then_install_then_manager_honours_it(settings: Settings, tmp_path: Path) -> None:
    out_file = tmp_path / "issued.json"
    rc, out = run(
        settings, "license", "issue",
        "--signing-key", str(_key_file(tmp_path)), "--key-id", KP.key_id,
        "--licensee", "Initech", "--tier", "hub", "--features", "multi_tenant, load_weights",
        "--expires", stamp(NOW + timedelta(days=90)), "--machine-id", MACHINE,
        "--license-id", "lic-initech-1", "--max-memory-mb", "512",
        "--out", str(out_file),
    )
    assert rc == 0 and "lic-initech-1" in out
    rc, out = run(settings, "license", "install", str(out_file))
    assert rc == 0
    m = LicenseManager(settings, keys=KP.keys, clock=lambda: NOW, machine_id=MACHINE)
    state = m.current()
    assert state.tier == "hub" and state.license and state.license.licensee == "Initech"
    assert m.allows("multi_tenant") and m.effective_limits().max_memory_mb == 512
    assert state.license.issued_at == NOW and state.license.not_before == NOW


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--key-id": "0000000000000000"}, "does not belong"),
        ({"--expires": "2028-01-01"}, "RFC 3339"),
        ({"--machine-id": "not-a-fingerprint"}, "machine_id"),
        ({"--features": "Bad Feature"}, "features"),
        ({"--expires": stamp(NOW - timedelta(days=1))}, "expires_at"),
    ],
    ids=["key-id-mismatch", "date-only", "bad-machine-id", "bad-feature", "expires-before-issue"],
)
def test_issue_refuses_bad_input(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], message: str
) -> None:
    options = {
        "--signing-key": str(_key_file(tmp_path)), "--key-id": KP.key_id, "--licensee": "Initech",
        "--tier": "pro", "--expires": stamp(NOW + timedelta(days=90)), "--out": str(tmp_path / "x.json"),
    }
    options.update(change)
    rc, _ = run(settings, "license", "issue", *[part for pair in options.items() for part in pair])
    assert rc == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_issue_unknown_tier_is_a_usage_error(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        run(settings, "license", "issue", "--signing-key", "k", "--key-id", "k", "--licensee", "x",
            "--tier", "enterprise", "--expires", "2028-01-01T00:00:00Z", "--out", str(tmp_path / "x"))
    assert info.value.code == 2
