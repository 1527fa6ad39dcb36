"""`cell mirror ...` and `python -m mirror.vendor ...` end to end."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import mirror.cli as cli
from mirror.registry import Mirror
from mirror.vendor import main as vendor_main
from tests.mirror import Vendor


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cell")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def synapse_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SYNAPSE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("SYNAPSE_CONFIG_DIR", str(tmp_path / "etc"))
    return tmp_path / "root"


def test_status_on_first_start_installs_production_root(synapse_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["mirror", "status", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["root_version"] == 1 and s["targets_version"] is None and s["templates"] == []
    embedded = (Path(__file__).resolve().parents[2] / "appliance" / "data" / "registry-root.json").read_bytes()
    assert (synapse_root / "mirror" / "metadata" / "root.json").read_bytes() == embedded


def test_T_SUPPLY_1_cli_import_of_bundle_not_signed_by_production_root_refused(
        synapse_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = Vendor(tmp_path / "v").publish()
    assert run(["mirror", "import", str(repo)]) == 1
    assert "refused" in capsys.readouterr().err
    assert run(["mirror", "status"]) == 0


def test_cli_import_and_status_report_changes(synapse_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    v = Vendor(tmp_path / "v")
    monkeypatch.setattr(cli, "_mirror", lambda args: Mirror(synapse_root / "mirror", trusted_root=v.trusted_root))
    assert run(["mirror", "import", str(v.publish(licenses=("lic-7",)))]) == 0
    out = capsys.readouterr().out
    assert "template added: python3.wasm" in out and "license revoked: lic-7" in out
    assert run(["mirror", "status"]) == 0
    out = capsys.readouterr().out
    assert "targets:    v1" in out and "license lic-7" in out and "python3" in out


def test_vendor_cli_builds_an_importable_tarball(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = {}
    for role in ("root", "timestamp", "snapshot", "targets"):
        keys[role] = tmp_path / f"{role}.key"
        assert vendor_main(["keygen", str(keys[role])]) == 0
        assert keys[role].stat().st_mode & 0o077 == 0  # private key files are 0600
    repo = tmp_path / "repo"
    key_args = [a for r, p in keys.items() for a in ("--key", f"{r}={p}")]
    assert vendor_main(["init", str(repo), *key_args]) == 0
    tpl = tmp_path / "templates"
    tpl.mkdir()
    (tpl / "python3.wasm").write_bytes(b"\x00asm runtime")
    (tpl / "manifest.json").write_text(json.dumps({"python3.wasm": {"template": "python3", "version": "3.12", "abi": "wasi-p1"}}))
    rev = tmp_path / "revoked.json"
    rev.write_text(json.dumps({"licenses": ["lic-x"], "keys": []}))
    pub_keys = [a for r in ("timestamp", "snapshot", "targets") for a in ("--key", f"{r}={keys[r]}")]
    assert vendor_main(["publish", str(repo), "--templates", str(tpl), "--revocations", str(rev), *pub_keys]) == 0
    assert vendor_main(["pack", str(repo), str(tmp_path / "update.tar.gz")]) == 0
    m = Mirror(tmp_path / "mirror", trusted_root=(repo / "metadata" / "1.root.json").read_bytes())
    report = m.import_path(tmp_path / "update.tar.gz")
    assert report.applied and m.is_license_revoked("lic-x") and "python3" in m.trusted_template_hashes()
