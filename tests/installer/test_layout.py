"""Versions, the atomic `current` switch, rollback preconditions, the unit, dry runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from installer.__main__ import main
from installer.errors import InstallError
from installer.install import rollback
from installer.layout import COMPLETE_MARKER, Layout, linked_version, switch_link, version_key
from installer.systemd import render_unit
from tests.installer.conftest import ReleaseKey
from tests.installer.test_tamper import small_bundle


@pytest.mark.parametrize("older,newer", [
    ("0.1.0", "0.2.0"), ("0.9.9", "0.10.0"), ("1.0.0rc1", "1.0.0"), ("1.0.0a1", "1.0.0b1"),
    ("1.0.0", "1.0.0.post1"), ("1.0.0.dev1", "1.0.0"), ("1.0", "1.0.1"),
])
def test_version_order(older: str, newer: str) -> None:
    assert version_key(older) < version_key(newer)


def test_version_equal_with_trailing_zero() -> None:
    assert version_key("1.0") == version_key("1.0.0")


def _fake_version(lay: Layout, version: str) -> None:
    vdir = lay.version_dir(version)
    vdir.mkdir(parents=True)
    (vdir / COMPLETE_MARKER).write_text("{}")


def test_switch_and_rollback_swap_current_and_previous(tmp_path: Path) -> None:
    lay = Layout(root=tmp_path)
    for v in ("1.0.0", "1.1.0"):
        _fake_version(lay, v)
    switch_link(lay.current, "1.1.0")
    switch_link(lay.previous, "1.0.0")
    assert rollback(lay, out=lambda _: None) == ("1.0.0", "1.1.0")
    assert (linked_version(lay.current), linked_version(lay.previous)) == ("1.0.0", "1.1.0")
    assert not [p for p in lay.prefix_dir.iterdir() if p.name.endswith(".tmp")]


def test_rollback_without_previous_is_refused(tmp_path: Path) -> None:
    lay = Layout(root=tmp_path)
    _fake_version(lay, "1.0.0")
    switch_link(lay.current, "1.0.0")
    with pytest.raises(InstallError) as err:
        rollback(lay, out=lambda _: None)
    assert err.value.code == "no_previous"


def test_incomplete_version_is_never_current(tmp_path: Path) -> None:
    lay = Layout(root=tmp_path)
    lay.version_dir("2.0.0").mkdir(parents=True)  # interrupted install: no marker
    os.symlink("versions/2.0.0", lay.current)
    assert linked_version(lay.current) is None


def test_unit_is_hardened_and_uses_target_paths(tmp_path: Path) -> None:
    unit = render_unit(Layout(root=tmp_path))
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/synapse", "PrivateTmp=yes",
                 "ProtectHome=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "MemoryMax=6G",
                 "ExecStart=/opt/synapse/current/venv/bin/cell serve", "User=synapse"):
        assert line in unit.splitlines()
    assert str(tmp_path) not in unit
    rw = [ln for ln in unit.splitlines() if ln.startswith("ReadWritePaths=")]
    assert rw == ["ReadWritePaths=/var/lib/synapse"]


def test_unit_stop_timeout_covers_the_drain_and_the_captures(tmp_path: Path) -> None:
    """systemd SIGKILLs a service still stopping after TimeoutStopSec: the stop
    must have room for the longest drain (a run at the ceiling plus the largest
    kill grace) and then for the captures of hundreds of idle cells (T-IMAGE-2;
    500 cells: tests/bench_restart_cells.py)."""
    from appliance.config import HARD_RUN_TIMEOUT_MS
    unit = render_unit(Layout(root=tmp_path)).splitlines()
    [timeout] = [int(ln.split("=", 1)[1]) for ln in unit if ln.startswith("TimeoutStopSec=")]
    drain_s = HARD_RUN_TIMEOUT_MS / 1000 + 10 + 1  # SYNAPSE_KILL_GRACE_MS is at most 10 s
    assert timeout >= drain_s + 60


def test_dry_run_verifies_and_changes_nothing(tmp_path: Path, release_key: ReleaseKey,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    tar = small_bundle(tmp_path, release_key)
    root = tmp_path / "root"
    assert main(["install", str(tar), "--root", str(root), "--trusted-keys", str(release_key.trusted_file),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "dry run, nothing changed" in out and "2.5 GB" in out
    assert not root.exists()


def test_verify_command_ok_and_env_override_warns(tmp_path: Path, release_key: ReleaseKey,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    tar = small_bundle(tmp_path, release_key)
    monkeypatch.setenv("CELL_INSTALLER_TRUSTED_KEYS", str(release_key.trusted_file))
    assert main(["verify", str(tar)]) == 0
    captured = capsys.readouterr()
    assert "verify: OK cell-appliance 9.9.9" in captured.out
    assert "OVERRIDE trust root" in captured.err
