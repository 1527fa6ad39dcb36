"""Tampered bundles are refused before anything is installed (T-SUPPLY-2).

Two layers are attacked separately. "Unsigned" cases change the tarball or
its signature after signing: the signature/tarball-hash check stops them
before a tar header is parsed. "Re-signed" cases assume the attacker got a
malicious tarball signed (a fooled build pipeline): the confined extractor
must still refuse every shape, so each case is signed with the trusted key.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from installer.__main__ import main
from installer.bundle import DEFAULT_EPOCH, _tarinfo, pack
from installer.errors import BundleRejected
from installer.extract import verify_bundle
from installer.manifest import Limits, build_manifest, FileEntry, sign_statement
from tests.installer.conftest import ReleaseKey

VERSION = "9.9.9"
WHEEL = f"wheels/cell_appliance-{VERSION}-py3-none-any.whl"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
FILES = {
    WHEEL: os.urandom(3000),
    "wheels/dep-1.0-py3-none-any.whl": os.urandom(1500),
    "docs/README.md": b"# Cell\n",
    "registry/metadata/1.root.json": b"{}\n",
}


def _tree(tmp: Path) -> Path:
    tree = tmp / "tree"
    for rel, data in FILES.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    return tree


def small_bundle(tmp: Path, key: ReleaseKey) -> Path:
    built = pack(_tree(tmp), tmp / "out", name="cell-appliance", version=VERSION, python=PY,
                 requires_python=">=3.11", platforms=["any"], epoch=DEFAULT_EPOCH, project_wheel=WHEEL,
                 seed=key.seed, key_id=key.key_id)
    return built.tarball


def _manifest(files: dict[str, bytes]) -> bytes:
    entries = [FileEntry(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()]
    return build_manifest(name="cell-appliance", version=VERSION, python=PY, requires_python=">=3.11",
                          platforms=["any"], source_date_epoch=DEFAULT_EPOCH, project_wheel=WHEEL, files=entries)


Member = tuple[tarfile.TarInfo, bytes]


def _members(manifest: bytes, files: dict[str, bytes]) -> list[Member]:
    out = [(_tarinfo("manifest.json", len(manifest), DEFAULT_EPOCH), manifest)]
    out += [(_tarinfo(p, len(d), DEFAULT_EPOCH), d) for p, d in sorted(files.items())]
    return out


def _special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def signed_tar(tmp: Path, key: ReleaseKey, members: list[Member], manifest: bytes) -> Path:
    """Write these exact members and sign the result with the trusted key."""
    out = tmp / "crafted"
    out.mkdir(exist_ok=True)
    tar = out / f"cell-appliance-{VERSION}.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = tar.read_bytes()
    statement = {"name": "cell-appliance", "version": VERSION, "tarball": tar.name, "tarball_size": len(raw),
                 "tarball_sha256": hashlib.sha256(raw).hexdigest(),
                 "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    (out / f"{tar.name}.sig").write_bytes(sign_statement(statement, key.seed, key.key_id))
    return tar


def run_install(tar: Path, root: Path, key: ReleaseKey) -> int:
    return main(["install", str(tar), "--root", str(root), "--trusted-keys", str(key.trusted_file),
                 "--skip-precompile"])


def assert_refused_before_install(tar: Path, tmp: Path, key: ReleaseKey, code: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp / "root"
    assert run_install(tar, root, key) == 3
    assert not root.exists(), "nothing may be written under --root for a rejected bundle"
    assert f"T-SUPPLY-2, {code}" in capsys.readouterr().err


def test_untampered_small_bundle_verifies(tmp_path: Path, release_key: ReleaseKey) -> None:
    tar = small_bundle(tmp_path, release_key)
    result = verify_bundle(tar, release_key.trusted, tmp_path / "w", extract=True)
    assert result.tree is not None
    assert {f.path for f in result.manifest.files} == set(FILES)
    for rel, data in FILES.items():
        assert (result.tree / rel).read_bytes() == data


@pytest.mark.parametrize("target", ["manifest.json", *sorted(FILES)])
def test_t_supply_2_changed_byte_in_any_file_refused(target: str, tmp_path: Path, release_key: ReleaseKey,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    tar = small_bundle(tmp_path, release_key)
    with tarfile.open(tar) as tf:
        member = tf.getmember(target)
    raw = bytearray(tar.read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0x01
    tar.write_bytes(bytes(raw))
    assert_refused_before_install(tar, tmp_path, release_key, "tarball_mismatch", capsys)


def test_t_supply_2_appended_file_refused(tmp_path: Path, release_key: ReleaseKey,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    tar = small_bundle(tmp_path, release_key)
    with tarfile.open(tar, "a") as tf:
        tf.addfile(_tarinfo("wheels/evil-1.0-py3-none-any.whl", 4, DEFAULT_EPOCH), io.BytesIO(b"evil"))
    assert_refused_before_install(tar, tmp_path, release_key, "tarball_mismatch", capsys)


SIG_ATTACKS: dict[str, tuple[Callable[[dict, ReleaseKey, ReleaseKey], None], str]] = {
    "flipped signature": (lambda d, k, o: d.update(signature=base64.b64encode(
        bytes([base64.b64decode(d["signature"])[0] ^ 1]) + base64.b64decode(d["signature"])[1:]).decode()),
        "bad_signature"),
    "statement edited": (lambda d, k, o: d["signed"].update(version="10.0.0"), "bad_signature"),
    "signed by an untrusted key": (lambda d, k, o: d.update(json.loads(sign_statement(d["signed"], o.seed, o.key_id))),
                                   "unknown_key"),
    "untrusted key claiming a trusted id": (lambda d, k, o: d.update(
        signature=json.loads(sign_statement(d["signed"], o.seed, k.key_id))["signature"]), "bad_signature"),
    "duplicate json key": (lambda d, k, o: None, "bad_json"),
}


@pytest.mark.parametrize("attack", sorted(SIG_ATTACKS))
def test_t_supply_2_bad_signature_refused(attack: str, tmp_path: Path, release_key: ReleaseKey,
                                          other_key: ReleaseKey, capsys: pytest.CaptureFixture[str]) -> None:
    tar = small_bundle(tmp_path, release_key)
    sig = tar.with_name(tar.name + ".sig")
    doc = json.loads(sig.read_text())
    mutate, code = SIG_ATTACKS[attack]
    mutate(doc, release_key, other_key)
    text = json.dumps(doc)
    if attack == "duplicate json key":
        text = text[:-1] + ', "key_id": "' + release_key.key_id + '"}'
    sig.write_text(text)
    assert_refused_before_install(tar, tmp_path, release_key, code, capsys)


def test_t_supply_2_missing_signature_refused(tmp_path: Path, release_key: ReleaseKey,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    tar = small_bundle(tmp_path, release_key)
    tar.with_name(tar.name + ".sig").unlink()
    assert_refused_before_install(tar, tmp_path, release_key, "missing_signature", capsys)


def test_t_supply_2_production_key_refuses_test_signed_bundle(tmp_path: Path, release_key: ReleaseKey,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    tar = small_bundle(tmp_path, release_key)
    root = tmp_path / "root"
    env_before = os.environ.pop("CELL_INSTALLER_TRUSTED_KEYS", None)
    try:
        assert main(["install", str(tar), "--root", str(root), "--skip-precompile"]) == 3
    finally:
        if env_before is not None:
            os.environ["CELL_INSTALLER_TRUSTED_KEYS"] = env_before
    assert not root.exists()
    assert "unknown_key" in capsys.readouterr().err


def _files_with(change: Callable[[dict[str, bytes]], None]) -> dict[str, bytes]:
    files = dict(FILES)
    change(files)
    return files


# name -> (members builder from (manifest, files), expected code); every tarball here is validly signed.
RESIGNED: dict[str, tuple[Callable[[], tuple[bytes, list[Member]]], str]] = {
    "changed byte, manifest unchanged": (lambda: (_manifest(FILES), _members(_manifest(FILES), _files_with(
        lambda f: f.update({WHEEL: bytes([f[WHEEL][0] ^ 1]) + f[WHEEL][1:]})))), "hash_mismatch"),
    "missing file": (lambda: (_manifest(FILES), _members(_manifest(FILES), _files_with(
        lambda f: f.pop("docs/README.md")))), "missing_file"),
    "extra file": (lambda: (_manifest(FILES), _members(_manifest(FILES), _files_with(
        lambda f: f.update({"wheels/evil-1.0-py3-none-any.whl": b"x"})))), "unlisted_file"),
    "path traversal entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                                      + [(_tarinfo("../../etc/cron.d/evil", 1, 0), b"x")]), "bad_path"),
    "nested traversal entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                                        + [(_tarinfo("wheels/../../evil", 1, 0), b"x")]), "bad_path"),
    "absolute path entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                                     + [(_tarinfo("/etc/passwd", 1, 0), b"x")]), "bad_path"),
    "symlink entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                               + [_special("wheels/link", tarfile.SYMTYPE, "/etc/passwd")]), "bad_entry_type"),
    "hard link entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                                 + [_special("wheels/hard", tarfile.LNKTYPE, "/etc/shadow")]), "bad_entry_type"),
    "device entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                              + [_special("wheels/dev", tarfile.CHRTYPE)]), "bad_entry_type"),
    "fifo entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                            + [_special("wheels/fifo", tarfile.FIFOTYPE)]), "bad_entry_type"),
    "directory entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                                 + [_special("wheels/sub", tarfile.DIRTYPE)]), "bad_entry_type"),
    "duplicate entry": (lambda: (_manifest(FILES), _members(_manifest(FILES), FILES)
                                 + [(_tarinfo(WHEEL, len(FILES[WHEEL]), 0), FILES[WHEEL])]), "duplicate_entry"),
    "manifest not first": (lambda: (_manifest(FILES), list(reversed(_members(_manifest(FILES), FILES)))),
                           "bad_manifest"),
    "manifest lists a traversal path": (lambda: (_bad_manifest(), _members(_bad_manifest(), FILES)), "bad_path"),
}


def _bad_manifest() -> bytes:
    doc = json.loads(_manifest(FILES))
    doc["files"].append({"path": "../outside", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()})
    return json.dumps(doc).encode()


@pytest.mark.parametrize("attack", sorted(RESIGNED))
def test_t_supply_2_resigned_malicious_tarball_refused(attack: str, tmp_path: Path, release_key: ReleaseKey,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    builder, code = RESIGNED[attack]
    manifest, members = builder()
    tar = signed_tar(tmp_path, release_key, members, manifest)
    assert_refused_before_install(tar, tmp_path, release_key, code, capsys)


def test_t_supply_2_resigned_extraction_leaves_nothing_behind(tmp_path: Path, release_key: ReleaseKey) -> None:
    manifest = _manifest(FILES)
    tar = signed_tar(tmp_path, release_key, _members(manifest, FILES)
                     + [_special("wheels/link", tarfile.SYMTYPE, "/etc/passwd")], manifest)
    work = tmp_path / "work"
    with pytest.raises(BundleRejected):
        verify_bundle(tar, release_key.trusted, work, extract=True)
    assert sorted(p.name for p in work.iterdir()) == []


@pytest.mark.parametrize("limits,code", [
    (Limits(max_file_bytes=2000), "file_too_large"),
    (Limits(max_total_bytes=4000), "bundle_too_large"),
    (Limits(max_files=2), "bad_manifest"),
])
def test_t_supply_2_size_limits(limits: Limits, code: str, tmp_path: Path, release_key: ReleaseKey) -> None:
    tar = small_bundle(tmp_path, release_key)
    with pytest.raises(BundleRejected) as err:
        verify_bundle(tar, release_key.trusted, tmp_path / "w", extract=True, limits=limits)
    assert err.value.code == code
