"""Attacks on registry updates (T-SUPPLY-1), each against a real TUF repository built here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from mirror.importer import ImportRefused, import_path
from mirror.registry import Mirror
from tests.mirror import JS_BLOB, PY_BLOB, Vendor, key, past

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def vendor(tmp_path: Path) -> Vendor:
    return Vendor(tmp_path)


def _snapshot(m: Mirror) -> tuple[str | None, dict[str, set[str]], bool]:
    return m.current_generation(), m.trusted_template_hashes(), m.is_license_revoked("lic-old")


def test_T_SUPPLY_1_valid_update_applied(vendor: Vendor) -> None:
    m = vendor.mirror()
    assert m.trusted_template_hashes() == {}
    report = m.import_path(vendor.publish(licenses=("lic-1",), revoked_keys=("a" * 16,)))
    assert report.applied and report.targets_version == 1
    assert report.changes.templates_added == ("python3.wasm",)
    assert report.changes.licenses_revoked == ("lic-1",)
    assert report.changes.keys_revoked == ("a" * 16,)
    import hashlib

    assert m.trusted_template_hashes() == {"python3": {hashlib.sha256(PY_BLOB).hexdigest()}}
    assert m.is_license_revoked("lic-1") and not m.is_license_revoked("lic-2")
    assert m.is_key_revoked("a" * 16)
    blob = m.template_blob("python3.wasm")
    assert blob is not None and blob.read_bytes() == PY_BLOB
    s = m.status()
    assert (s["root_version"], s["targets_version"], s["expiry_state"]) == (1, 1, "ok")
    assert s["last_import"] and s["revoked_licenses"] == ["lic-1"]
    assert (m.root_dir / "metadata" / "root.json").is_file()  # stable path for operators


def test_T_SUPPLY_1_second_update_reports_added_replaced_removed(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish({"python3.wasm": ("python3", PY_BLOB), "old.wasm": ("wasm", b"old")}))
    report = m.import_path(vendor.publish({"python3.wasm": ("python3", PY_BLOB + b"v2"),
                                           "javascript.wasm": ("javascript", JS_BLOB)}, licenses=("lic-9",)))
    c = report.changes
    assert (c.templates_added, c.templates_replaced, c.templates_removed) == (
        ("javascript.wasm",), ("python3.wasm",), ("old.wasm",))
    assert c.licenses_revoked == ("lic-9",)
    assert set(m.trusted_template_hashes()) == {"python3", "javascript"}


def test_T_SUPPLY_1_same_update_twice_changes_nothing(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    gen = m.current_generation()
    report = m.import_path(vendor.repo.dir)
    assert not report.applied and report.changes.empty and m.current_generation() == gen


def test_T_SUPPLY_1_rollback_to_older_version_rejected(vendor: Vendor) -> None:
    m = vendor.mirror()
    vendor.publish(licenses=("lic-old",))
    old_stick = vendor.copy("stick-v1")
    m.import_path(vendor.publish())  # v2 un-revokes nothing relevant; the point is the version
    before = _snapshot(m)
    with pytest.raises(ImportRefused, match="(?i)version"):
        m.import_path(old_stick)
    assert _snapshot(m) == before


def test_T_SUPPLY_1_rollback_with_freshly_signed_lower_version_rejected(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish(versions={"timestamp": 5, "snapshot": 5, "targets": 5}))
    before = _snapshot(m)
    with pytest.raises(ImportRefused):
        m.import_path(vendor.publish(versions={"timestamp": 6, "snapshot": 4, "targets": 4}))
    assert _snapshot(m) == before


def test_T_SUPPLY_1_expired_timestamp_rejected_freeze(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    before = _snapshot(m)
    with pytest.raises(ImportRefused, match="(?i)expired"):
        m.import_path(vendor.publish({"python3.wasm": ("python3", b"evil")}, expires={"timestamp": past(1)}))
    assert _snapshot(m) == before


def test_T_SUPPLY_1_expired_targets_rejected_freeze(vendor: Vendor) -> None:
    m = vendor.mirror()
    with pytest.raises(ImportRefused, match="(?i)expired"):
        m.import_path(vendor.publish(expires={"targets": past(1)}))
    assert m.trusted_template_hashes() == {}


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_T_SUPPLY_1_metadata_signed_by_wrong_key_rejected(vendor: Vendor, role: str) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    before = _snapshot(m)
    with pytest.raises(ImportRefused, match="(?i)signature|threshold|unsigned"):
        m.import_path(vendor.publish({"python3.wasm": ("python3", b"evil")}, signers={role: key("attacker")}))
    assert _snapshot(m) == before


def test_T_SUPPLY_1_target_bytes_differ_from_hash_rejected(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    before = _snapshot(m)
    repo = vendor.publish({"python3.wasm": ("python3", PY_BLOB + b"-v2")})
    blob = next((repo / "targets").glob("*.python3.wasm"))
    for p in (repo / "targets").glob("*.python3.wasm"):
        if p.read_bytes() == PY_BLOB + b"-v2":
            blob = p
    blob.write_bytes(b"X" * len(PY_BLOB + b"-v2"))  # same length, different bytes
    with pytest.raises(ImportRefused, match="(?i)hash"):
        m.import_path(repo)
    assert _snapshot(m) == before


def test_T_SUPPLY_1_target_longer_than_signed_length_rejected(vendor: Vendor) -> None:
    m = vendor.mirror()
    repo = vendor.publish()
    blob = next((repo / "targets").glob("*.python3.wasm"))
    blob.write_bytes(PY_BLOB + b"trailing payload")
    with pytest.raises(ImportRefused):
        m.import_path(repo)
    assert m.trusted_template_hashes() == {}


def test_T_SUPPLY_1_root_rotation_signed_by_old_and_new_keys_accepted(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    old_root, new_root, new_targets = vendor.keys["root"], key("root-2"), key("targets-2")
    vendor.repo.rotate_root({"root": new_root, "targets": new_targets}, sign_with=[old_root, new_root])
    vendor.keys.update(root=new_root, targets=new_targets)
    report = m.import_path(vendor.publish({"python3.wasm": ("python3", PY_BLOB + b"-v2")}))
    assert report.applied and report.root_version == 2
    assert m.status()["root_version"] == 2
    # The rotated-out targets key is no longer trusted afterwards.
    with pytest.raises(ImportRefused):
        m.import_path(vendor.publish(signers={"targets": key("targets")}))


def test_T_SUPPLY_1_root_rotation_signed_only_by_new_key_rejected(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    before = _snapshot(m)
    new_root = key("root-2")
    vendor.repo.rotate_root({"root": new_root, "targets": key("targets-2")}, sign_with=[new_root])
    vendor.keys.update(root=new_root, targets=key("targets-2"))
    with pytest.raises(ImportRefused, match="(?i)root|signature|threshold"):
        m.import_path(vendor.publish({"python3.wasm": ("python3", b"evil")}))
    assert _snapshot(m) == before and m.status()["root_version"] == 1


def test_T_SUPPLY_1_update_not_chaining_to_trust_root_rejected(tmp_path: Path) -> None:
    victim = Vendor(tmp_path / "a")
    attacker = Vendor(tmp_path / "b", keys={r: key("attacker-" + r) for r in ("root", "timestamp", "snapshot", "targets")})
    m = victim.mirror()
    with pytest.raises(ImportRefused):
        m.import_path(attacker.publish())
    assert m.trusted_template_hashes() == {}


def test_T_SUPPLY_1_import_interrupted_in_swap_keeps_old_registry(vendor: Vendor, monkeypatch: pytest.MonkeyPatch) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish(licenses=("lic-old",)))
    before = _snapshot(m)
    gens_before = sorted(p.name for p in m.generations_dir.iterdir())

    def crash(self: Mirror, name: str) -> None:
        raise KeyboardInterrupt("power cut during the swap")

    monkeypatch.setattr(Mirror, "_activate", crash)
    with pytest.raises(KeyboardInterrupt):
        m.import_path(vendor.publish({"python3.wasm": ("python3", b"new")}))
    assert _snapshot(m) == before and m.is_license_revoked("lic-old")
    assert sorted(p.name for p in m.generations_dir.iterdir()) == gens_before  # nothing half-built left
    monkeypatch.undo()
    assert m.import_path(vendor.repo.dir).applied  # and the next import works


_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mirror.registry import Mirror
    import mirror.fetcher as fetcher
    mirror_dir, root_file, bundle, marker, where = sys.argv[1:6]
    m = Mirror(Path(mirror_dir), trusted_root=Path(root_file).read_bytes())
    def hang(*a, **k):
        Path(marker).write_text("ready")
        time.sleep(600)
    if where == "swap":
        Mirror._activate = hang
    else:
        real = fetcher.BundleFetcher._fetch
        def slow(self, url):
            if "/targets/" in url:
                hang()
            return real(self, url)
        fetcher.BundleFetcher._fetch = slow
    m.import_path(Path(bundle))
""")


@pytest.mark.parametrize("where", ["download", "swap"])
def test_T_SUPPLY_1_import_killed_midway_keeps_old_registry(vendor: Vendor, tmp_path: Path, where: str) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish(licenses=("lic-old",)))
    before = _snapshot(m)
    repo = vendor.publish({"python3.wasm": ("python3", b"new runtime")})
    root_file, marker = tmp_path / "root.json", tmp_path / "marker"
    root_file.write_bytes(vendor.trusted_root)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(m.root_dir), str(root_file), str(repo), str(marker), where],
                             cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "child import ended before the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    fresh = Mirror(m.root_dir, trusted_root=vendor.trusted_root)  # as after a reboot
    assert _snapshot(fresh) == before and _snapshot(m) == before
    report = fresh.import_path(repo)  # the lock died with the child; leftovers are swept
    assert report.applied and not any(p.name.startswith(".tmp-") for p in fresh.generations_dir.iterdir())


def test_T_SUPPLY_1_revoked_license_reported_after_import_without_restart(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    is_revoked = m.is_license_revoked  # what the license manager holds, bound once at start-up
    assert not is_revoked("lic-test-0001")
    other = Mirror(m.root_dir, trusted_root=vendor.trusted_root)  # e.g. the `cell mirror import` process
    other.import_path(vendor.publish(licenses=("lic-test-0001",), revoked_keys=("0123456789abcdef",)))
    assert is_revoked("lic-test-0001") and m.is_key_revoked("0123456789abcdef")


def test_T_SUPPLY_1_revocations_edited_on_disk_not_believed(vendor: Vendor) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish(licenses=("lic-old",)))
    assert m.is_license_revoked("lic-old")
    blob = next((m.current_dir / "targets").glob("*.revocations.json"))
    blob.write_bytes(b'{"schema":"cell-revocations/1","licenses":[],"keys":[]}')
    os.utime(m.current_dir / "metadata" / "targets.json")  # force a reload, as any later change would
    with pytest.raises(Exception, match="(?i)hash"):
        m.is_license_revoked("lic-old")  # fail closed: the license check refuses to honour


def test_T_SUPPLY_1_installed_state_must_chain_to_injected_root(vendor: Vendor, tmp_path: Path) -> None:
    m = vendor.mirror()
    m.import_path(vendor.publish())
    stranger = Vendor(tmp_path / "other", keys={r: key("other-" + r) for r in ("root", "timestamp", "snapshot", "targets")})
    with pytest.raises(Exception, match="(?i)root|signature|threshold"):
        Mirror(m.root_dir, trusted_root=stranger.trusted_root).trusted_template_hashes()


def _tar(path: Path, repo: Path, extra: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        tar.add(repo / "metadata", arcname="metadata")
        tar.add(repo / "targets", arcname="targets")
        for info in extra:
            tar.addfile(info, None if info.size == 0 else __import__("io").BytesIO(b"x" * info.size))
    return path


def test_T_SUPPLY_1_tarball_import_applied(vendor: Vendor, tmp_path: Path) -> None:
    m = vendor.mirror()
    vendor.publish(licenses=("lic-1",))
    out = vendor.repo.pack(tmp_path / "update.tar.gz")
    assert m.import_path(out).applied and m.is_license_revoked("lic-1")


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize("member", [
    _member("../evil", size=1),
    _member("targets/../../evil", size=1),
    _member("/etc/cron.d/evil", size=1),
    _member("targets/link", tarfile.SYMTYPE, link="/etc/passwd"),
    _member("targets/inside-link", tarfile.SYMTYPE, link="x"),
    _member("targets/hard", tarfile.LNKTYPE, link="metadata/root.json"),
    _member("targets/dev", tarfile.CHRTYPE),
    _member("elsewhere/file", size=1),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-in", "hardlink", "device", "outside-layout"])
def test_T_SUPPLY_1_tarball_with_unsafe_member_rejected(vendor: Vendor, tmp_path: Path, member: tarfile.TarInfo) -> None:
    m = vendor.mirror()
    bad = _tar(tmp_path / "bad.tar", vendor.publish(), [member])
    with pytest.raises(ImportRefused):
        m.import_path(bad)
    assert m.trusted_template_hashes() == {}
    assert not (tmp_path / "evil").exists()


def test_T_SUPPLY_1_bundle_with_symlink_out_rejected(vendor: Vendor, tmp_path: Path) -> None:
    m = vendor.mirror()
    repo = vendor.publish()
    outside = tmp_path / "outside"
    (repo / "targets").rename(outside)
    (repo / "targets").symlink_to(outside)  # the files are genuine; the link is the problem
    with pytest.raises(ImportRefused, match="(?i)plain|symlink|regular"):
        import_path(m, repo)
    assert m.trusted_template_hashes() == {}


def test_T_SUPPLY_1_bundle_metadata_symlink_rejected(vendor: Vendor, tmp_path: Path) -> None:
    m = vendor.mirror()
    repo = vendor.publish()
    ts = repo / "metadata" / "timestamp.json"
    (tmp_path / "ts.json").write_bytes(ts.read_bytes())
    ts.unlink()
    ts.symlink_to(tmp_path / "ts.json")
    with pytest.raises(ImportRefused):
        m.import_path(repo)


def test_T_SUPPLY_1_missing_bundle_rejected(vendor: Vendor, tmp_path: Path) -> None:
    m = vendor.mirror()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportRefused):
        m.import_path(tmp_path / "empty")
    with pytest.raises(ImportRefused):
        m.import_path(tmp_path / "nope")
