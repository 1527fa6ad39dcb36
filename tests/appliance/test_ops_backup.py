"""`cell backup` / `cell restore`: online DB copy, 0600 archive, manifest hashes,
confined extraction, refusal while a server runs, and a chain that verifies
after the restore (T-BACKUP-1..3, T-RCPT-1)."""
from __future__ import annotations

import io
import json
import os
import socket
import stat
import tarfile
import uuid
from pathlib import Path

import pytest

from appliance.config import Settings, load_settings
from appliance.ops.backup import BackupError, create_backup, restore_backup
from appliance.ops.web import take_serve_lock
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.services import prepare_root
from appliance.storage import Store


def node(root: Path, port: int = 0) -> Settings:
    settings = load_settings({"SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                              "SYNAPSE_PORT": str(port)})
    prepare_root(settings)
    return settings


def populated(root: Path, receipts: int = 5) -> Settings:
    settings = node(root)
    store = Store(settings.db_path)
    store.add_tenant("default", 1, tenant_id="default")
    store.close()
    with ReceiptStore(settings.db_path, NodeKey.load_or_create(settings.keys_dir)) as rs:
        for i in range(receipts):
            rs.append(execution_id=str(uuid.uuid4()), tenant_id="default", cell_id=None, template="wasm",
                      code_hash=f"{i:064x}", result_hash="f" * 64, timestamp_ms=1_800_000_000_000 + i)
    settings.config_dir.mkdir(parents=True, exist_ok=True)
    (settings.config_dir / "config.toml").write_text("rate_limit_rps = 10\n")
    return settings


def chain_count(settings: Settings) -> dict[str, object]:
    with ReceiptStore(settings.db_path, NodeKey.load(settings.keys_dir)) as rs:
        return rs.verify()


def test_backup_then_restore_onto_a_fresh_node_keeps_a_verifying_chain(tmp_path: Path) -> None:
    src = populated(tmp_path / "a")
    archive = tmp_path / "node.tar.gz"
    manifest = create_backup(src, archive)
    assert stat.S_IMODE(os.stat(archive).st_mode) == 0o600  # the node signing key is inside
    assert set(manifest["files"]) == {"db/cell.sqlite", "keys/node_ed25519", "config/config.toml"}
    dst = node(tmp_path / "b")
    result = restore_backup(dst, archive)
    assert result["chain"]["ok"] and result["chain"]["count"] == 5
    report = chain_count(dst)
    assert report["ok"] is True and report["count"] == 5
    assert NodeKey.load(dst.keys_dir).public_key_hex == NodeKey.load(src.keys_dir).public_key_hex
    assert (dst.config_dir / "config.toml").read_text() == "rate_limit_rps = 10\n"
    assert stat.S_IMODE(os.stat(dst.keys_dir / "node_ed25519").st_mode) == 0o600


def test_backup_works_while_the_database_is_open_for_writing(tmp_path: Path) -> None:
    src = populated(tmp_path / "a")
    with ReceiptStore(src.db_path, NodeKey.load(src.keys_dir)) as rs:  # a "running" writer
        rs.append(execution_id=str(uuid.uuid4()), tenant_id="default", cell_id=None, template="wasm",
                  code_hash="a" * 64, result_hash="b" * 64, timestamp_ms=1_800_000_000_100)
        create_backup(src, tmp_path / "live.tar.gz")
    dst = node(tmp_path / "b")
    assert restore_backup(dst, tmp_path / "live.tar.gz")["chain"]["count"] == 6


def _rewrite(archive: Path, out: Path, change: dict[str, bytes | None], extra: list[tarfile.TarInfo] | None = None,
             extra_data: list[bytes | None] | None = None) -> None:
    with tarfile.open(archive, "r:gz") as tin, tarfile.open(out, "w:gz") as tout:
        for info in tin.getmembers():
            fh = tin.extractfile(info)
            assert fh is not None
            with fh:
                data = fh.read()
            if info.name in change:
                new = change[info.name]
                if new is None:
                    continue
                data = new
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
        for info, data in zip(extra or [], extra_data or []):
            tout.addfile(info, io.BytesIO(data) if data is not None else None)


def _tampered_db(archive: Path) -> bytes:
    with tarfile.open(archive, "r:gz") as tin:
        fh = tin.extractfile("db/cell.sqlite")
        assert fh is not None
        with fh:
            data = bytearray(fh.read())
    data[-1] ^= 0xFF
    return bytes(data)


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = link
    return info


@pytest.mark.parametrize("attack", ["changed_db", "changed_key", "missing_db", "traversal_member", "absolute_member",
                                    "symlink_key", "manifest_drops_key", "not_a_tarball"])
def test_t_backup_2_tampered_archive_is_refused_and_nothing_changes(tmp_path: Path, attack: str) -> None:
    src = populated(tmp_path / "a")
    archive = tmp_path / "good.tar.gz"
    create_backup(src, archive)
    bad = tmp_path / "bad.tar.gz"
    if attack == "changed_db":
        _rewrite(archive, bad, {"db/cell.sqlite": _tampered_db(archive)})
    elif attack == "changed_key":
        _rewrite(archive, bad, {"keys/node_ed25519": b"00" * 32 + b"\n"})
    elif attack == "missing_db":
        _rewrite(archive, bad, {"db/cell.sqlite": None})
    elif attack == "traversal_member":
        _rewrite(archive, bad, {}, [_member("../../evil", size=4)], [b"evil"])
    elif attack == "absolute_member":
        _rewrite(archive, bad, {}, [_member("/tmp/evil", size=4)], [b"evil"])
    elif attack == "symlink_key":
        _rewrite(archive, bad, {"keys/node_ed25519": None}, [_member("keys/node_ed25519", tarfile.SYMTYPE, link="/etc/passwd")], [None])
    elif attack == "manifest_drops_key":
        with tarfile.open(archive, "r:gz") as tin:
            fh = tin.extractfile("manifest.json")
            assert fh is not None
            with fh:
                manifest = json.loads(fh.read())
        del manifest["files"]["keys/node_ed25519"]
        _rewrite(archive, bad, {"manifest.json": json.dumps(manifest).encode()})
    else:
        bad.write_bytes(b"not a tarball at all")
    dst = populated(tmp_path / "b", receipts=2)
    before = dst.db_path.read_bytes()
    with pytest.raises(BackupError):
        restore_backup(dst, bad)
    assert dst.db_path.read_bytes() == before
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    assert chain_count(dst)["count"] == 2


def test_t_backup_3_restore_refuses_while_a_server_holds_the_data_dir(tmp_path: Path) -> None:
    src = populated(tmp_path / "a")
    archive = tmp_path / "node.tar.gz"
    create_backup(src, archive)
    dst = node(tmp_path / "b")
    fd = take_serve_lock(dst.root)
    assert fd >= 0
    try:
        with pytest.raises(BackupError, match="running appliance"):
            restore_backup(dst, archive)
    finally:
        os.close(fd)
    restore_backup(dst, archive)  # lock released: allowed


def test_t_backup_3_restore_refuses_while_the_port_answers(tmp_path: Path) -> None:
    src = populated(tmp_path / "a")
    archive = tmp_path / "node.tar.gz"
    create_backup(src, archive)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        dst = node(tmp_path / "b", port=listener.getsockname()[1])
        with pytest.raises(BackupError, match="answers"):
            restore_backup(dst, archive)


def test_backup_without_a_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackupError):
        create_backup(node(tmp_path / "empty"), tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()


# -- snapshots travel with their secret (T-IMAGE-2) ---------------------------

def _snapshot_node(root: Path) -> tuple[Settings, bytes]:
    """A node with two cell rows, a real snapshot of c1 under the node's secret,
    a link planted at c2's name, and an orphan snapshot of no cell."""
    from appliance.runtime import snapshot_file
    from appliance.runtime.guest_state import GuestState
    from appliance.storage import CellRecord

    settings = populated(root)
    store = Store(settings.db_path)
    for cell in ("c1", "c2"):
        store.add_cell(CellRecord(cell, "default", "python3", 1, 600000, 2**40, True, {}, {}, 256))
    store.close()
    secret = snapshot_file.node_secret(settings.keys_dir)
    memory = bytearray(65536)
    memory[100:104] = b"kept"
    snap_dir = settings.snapshots_dir / "default"
    snapshot_file.write(snap_dir / "c1", GuestState(bytes(memory), {0: 7}), "image-key", "default", "c1",
                        snapshot_file.tenant_key(secret, "default"))
    os.symlink("/etc/passwd", snap_dir / "c2")
    (snap_dir / "orphan").write_bytes(b"x")
    return settings, secret


def test_t_image_2_backup_carries_snapshots_with_their_secret_and_restore_replaces_both(tmp_path: Path) -> None:
    from appliance.runtime import snapshot_file

    src, secret = _snapshot_node(tmp_path / "a")
    archive = tmp_path / "node.tar.gz"
    manifest = create_backup(src, archive)
    assert manifest["format"] == "cell-backup/2"
    assert set(manifest["files"]) == {"db/cell.sqlite", "keys/node_ed25519", "config/config.toml",
                                      "keys/snapshot-secret", "snapshots/default/c1"}  # no link, no orphan
    dst = node(tmp_path / "b")
    snapshot_file.node_secret(dst.keys_dir)  # the new box made its own secret...
    (dst.snapshots_dir / "default").mkdir(mode=0o700)
    (dst.snapshots_dir / "default" / "stale").write_bytes(b"under the old secret")  # ...and a snapshot under it
    result = restore_backup(dst, archive)
    assert result["snapshots"] == 1 and "keys/snapshot-secret" in result["restored"]
    assert snapshot_file.node_secret(dst.keys_dir) == secret
    assert sorted(os.listdir(dst.snapshots_dir / "default")) == ["c1"]
    st = os.stat(dst.snapshots_dir / "default" / "c1")
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(os.stat(dst.snapshots_dir).st_mode) == 0o700
    image, state = snapshot_file.read(dst.snapshots_dir / "default" / "c1", "default", "c1",
                                      snapshot_file.tenant_key(snapshot_file.node_secret(dst.keys_dir), "default"),
                                      1 << 20)
    assert image == "image-key" and state.globals == {0: 7}
    assert not any(p.name.startswith(".cell-restore-") for p in dst.root.iterdir())


def test_t_image_2_a_node_without_a_snapshot_secret_backs_up_no_snapshots(tmp_path: Path) -> None:
    src = populated(tmp_path / "a")
    (src.snapshots_dir / "default").mkdir(mode=0o700)
    (src.snapshots_dir / "default" / "c1").write_bytes(b"no key verifies this")
    manifest = create_backup(src, tmp_path / "node.tar.gz")
    assert not [n for n in manifest["files"] if n.startswith(("snapshots/", "keys/snapshot"))]
    dst = node(tmp_path / "b")
    (dst.snapshots_dir / "default").mkdir(mode=0o700)
    (dst.snapshots_dir / "default" / "mine").write_bytes(b"left alone")
    assert restore_backup(dst, tmp_path / "node.tar.gz")["snapshots"] == 0
    assert (dst.snapshots_dir / "default" / "mine").read_bytes() == b"left alone"  # its secret is not replaced


def _manifest_of(archive: Path) -> dict[str, object]:
    with tarfile.open(archive, "r:gz") as tin:
        fh = tin.extractfile("manifest.json")
        assert fh is not None
        with fh:
            return json.loads(fh.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("attack", ["snapshots_without_secret", "snapshot_not_in_manifest", "snapshot_path_escape",
                                    "snapshot_symlink", "snapshot_changed", "snapshot_in_manifest_only"])
def test_t_backup_1_t_image_2_bad_snapshot_members_are_refused_and_nothing_changes(tmp_path: Path, attack: str) -> None:
    from appliance.runtime import snapshot_file

    src, _ = _snapshot_node(tmp_path / "a")
    archive = tmp_path / "good.tar.gz"
    create_backup(src, archive)
    bad = tmp_path / "bad.tar.gz"
    manifest = _manifest_of(archive)
    files = manifest["files"]
    assert isinstance(files, dict)
    if attack == "snapshots_without_secret":
        del files["keys/snapshot-secret"]
        _rewrite(archive, bad, {"keys/snapshot-secret": None, "manifest.json": json.dumps(manifest).encode()})
    elif attack == "snapshot_not_in_manifest":
        _rewrite(archive, bad, {}, [_member("snapshots/default/c9", size=4)], [b"evil"])
    elif attack == "snapshot_path_escape":
        _rewrite(archive, bad, {}, [_member("snapshots/default/../../../evil", size=4)], [b"evil"])
    elif attack == "snapshot_symlink":
        _rewrite(archive, bad, {"snapshots/default/c1": None},
                 [_member("snapshots/default/c1", tarfile.SYMTYPE, link="/etc/passwd")], [None])
    elif attack == "snapshot_changed":
        with tarfile.open(archive, "r:gz") as tin:
            fh = tin.extractfile("snapshots/default/c1")
            assert fh is not None
            with fh:
                data = bytearray(fh.read())
        data[20] ^= 1
        _rewrite(archive, bad, {"snapshots/default/c1": bytes(data)})
    else:
        files["snapshots/default/c8"] = dict(files["snapshots/default/c1"])
        _rewrite(archive, bad, {"manifest.json": json.dumps(manifest).encode()})
    dst = node(tmp_path / "b")
    secret = snapshot_file.node_secret(dst.keys_dir)
    (dst.snapshots_dir / "default").mkdir(mode=0o700)
    (dst.snapshots_dir / "default" / "mine").write_bytes(b"kept")
    with pytest.raises(BackupError):
        restore_backup(dst, bad)
    assert snapshot_file.node_secret(dst.keys_dir) == secret
    assert os.listdir(dst.snapshots_dir / "default") == ["mine"]
    assert not (tmp_path / "evil").exists()


def test_t_image_2_cells_restored_from_a_backup_on_another_node_keep_their_variables(module_cache: None,
                                                                                    tmp_path: Path) -> None:
    """The operator's case: back up a stopped node (SIGTERM captured its cells),
    restore on a new box, start it: the persistent cell answers with its variables."""
    import shutil

    from appliance.cli import DEV_KEY_FILE
    from tests.appliance.test_api_e2e import new_cell, run
    from tests.liveserver import start_server

    srv = start_server(tmp_path / "a")
    try:
        cell = new_cell(srv, timeout_ms=600000)
        run(srv, cell, "x = 41")
    finally:
        srv.stop()
    archive = tmp_path / "node.tar.gz"
    assert f"snapshots/default/{cell}" in create_backup(node(tmp_path / "a"), archive)["files"]
    dst = node(tmp_path / "b")
    assert restore_backup(dst, archive)["snapshots"] == 1
    shutil.copyfile(tmp_path / "a" / DEV_KEY_FILE, tmp_path / "b" / DEV_KEY_FILE)  # the tenant key is in the DB
    again = start_server(tmp_path / "b")
    try:
        out = run(again, cell, "print(x + 1)")
        assert out["stdout"] == "42\n" and out.get("restored") is True, out
    finally:
        again.stop()
