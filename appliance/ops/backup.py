"""`cell backup` and `cell restore`.

A backup is a tar.gz (mode 0600: it holds the node's signing key) with a
fixed set of members and ``manifest.json`` listing each member's sha256:

    manifest.json  db/cell.sqlite  keys/node_ed25519  config/config.toml  config/license.json
    keys/snapshot-secret  snapshots/<tenant>/<cell>...

Persistent cells' snapshots travel with the secret their MACs are keyed by,
never one without the other (T-IMAGE-2): a restore replaces both, so every
snapshot on the node afterwards verifies under the node's secret, and a
restored cell continues with its variables (its volume is not in a backup).
``keys/verify-memo`` is not carried: it remembers this disk's inodes, and a
missing memo only costs one full hash of each runtime.

The database is copied with SQLite's online backup API, so a running node
can be backed up. Restore reads only the allowlisted member names and
writes them to paths chosen here, never to a path taken from the archive
(T-BACKUP-1: confined extraction); every byte is hashed and compared with
the manifest before anything is replaced (T-BACKUP-2: tampered archive);
the restored receipt chain is verified before the swap; and it refuses to
run while a server holds the data directory (T-BACKUP-3).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from appliance import __version__
from appliance.config import Settings
from appliance.fileio import sha256_file
from appliance.receipts import verify as rverify
from appliance.receipts.nodekey import NodeKey, NodeKeyError

FORMAT = "cell-backup/2"
FORMATS_READ = ("cell-backup/1", FORMAT)  # /1: the same members, without snapshots
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBER_BYTES = 64 << 30
LOCK_FILE = "serve.lock"
SECRET_MEMBER = "keys/snapshot-secret"
SNAPSHOT_MEMBER = re.compile(r"snapshots/([A-Za-z0-9_-]{1,64})/([A-Za-z0-9_-]{1,64})")  # tenant, cell
MAX_SNAPSHOTS = 100_000


class BackupError(Exception):
    """The backup or restore was refused; the message says why."""


@dataclass(frozen=True)
class Member:
    name: str
    mode: int
    optional: bool


MEMBERS = (
    Member("db/cell.sqlite", 0o600, False),
    Member("keys/node_ed25519", 0o600, False),
    Member("config/config.toml", 0o600, True),
    Member("config/license.json", 0o640, True),
    Member(SECRET_MEMBER, 0o600, True),
)


def _targets(s: Settings) -> dict[str, Path]:
    # Start-up: snapshot_file loads wasmtime, and light commands (`cell status`) import this module.
    from appliance.runtime import snapshot_file

    return {
        "db/cell.sqlite": s.db_path,
        "keys/node_ed25519": s.keys_dir / "node_ed25519",
        "config/config.toml": s.config_dir / "config.toml",
        "config/license.json": s.license_path,
        SECRET_MEMBER: s.keys_dir / snapshot_file.SECRET_FILE,
    }


def _online_copy(db: Path, dest: Path) -> None:
    src = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(str(dest))
        try:
            src.backup(dst)  # a consistent snapshot even while the service writes
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        finally:
            dst.close()
    finally:
        src.close()


def _cells(db_copy: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"{db_copy.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [(str(t), str(c)) for t, c in conn.execute("SELECT tenant_id, id FROM cells ORDER BY tenant_id, id")]
    finally:
        conn.close()


def _open_snapshot(s: Settings, tenant_id: str, cell_id: str) -> int | None:
    """A descriptor on the cell's snapshot when it is a private regular file of
    ours (no link followed, a FIFO never blocks); None otherwise: such a file
    would be refused at restore time anyway (T-IMAGE-2)."""
    # Start-up: snapshot_file loads wasmtime, and light commands (`cell status`) import this module.
    from appliance.runtime import snapshot_file

    name = f"snapshots/{tenant_id}/{cell_id}"
    if not SNAPSHOT_MEMBER.fullmatch(name):
        return None
    try:
        fd = os.open(snapshot_file.path_for(s.snapshots_dir, tenant_id, cell_id),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


class _HashingReader:
    """Reads a descriptor for tarfile while hashing what it hands over."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def create_backup(s: Settings, out: Path, *, now: float | None = None) -> dict[str, Any]:
    if not s.db_path.is_file():
        raise BackupError(f"no database at {s.db_path}: nothing to back up")
    targets = _targets(s)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".cell-backup-", dir=s.root) as tmp:
        staged: dict[str, Path] = {}
        db_copy = Path(tmp) / "cell.sqlite"
        _online_copy(s.db_path, db_copy)
        staged["db/cell.sqlite"] = db_copy
        for member in MEMBERS[1:]:
            src = targets[member.name]
            if src.is_file():
                staged[member.name] = src
            elif not member.optional:
                raise BackupError(f"{src} is missing: nothing to back up")
        files: dict[str, dict[str, Any]] = {
            name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in staged.items()}
        fd, tmp_out = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
        try:
            os.fchmod(fd, 0o600)  # the node's signing key is inside
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for name, path in staged.items():
                    info = tarfile.TarInfo(name)
                    info.size = path.stat().st_size
                    info.mode = 0o600
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                if SECRET_MEMBER in staged:
                    # T-IMAGE-2: snapshots only beside the secret they verify
                    # under. Each is read from one descriptor and hashed as it
                    # is written, so a capture replacing the file (a rename)
                    # meanwhile cannot make the manifest disagree with the bytes.
                    for tenant_id, cell_id in _cells(db_copy):
                        snap = _open_snapshot(s, tenant_id, cell_id)
                        if snap is None:
                            continue
                        name = f"snapshots/{tenant_id}/{cell_id}"
                        with os.fdopen(snap, "rb") as fh:
                            info = tarfile.TarInfo(name)
                            info.size = os.fstat(fh.fileno()).st_size
                            info.mode = 0o600
                            reader = _HashingReader(fh)
                            tar.addfile(info, reader)
                        files[name] = {"sha256": reader.sha.hexdigest(), "size": reader.size}
                manifest = {
                    "format": FORMAT, "version": __version__, "node_id": s.node_id,
                    "created_at": int((now if now is not None else time.time()) * 1000), "files": files,
                }
                # Last: restore finds it by name, and it lists the snapshots' hashes.
                _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
            os.replace(tmp_out, out)
        except BaseException:
            Path(tmp_out).unlink(missing_ok=True)
            raise
    return manifest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def server_running(s: Settings) -> str | None:
    """Why we think a server uses this data directory, or None."""
    lock = s.root / LOCK_FILE
    if lock.exists():
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = lock.read_text(errors="replace").strip()[:16]
                return f"a server (pid {pid or '?'}) holds {lock}"
            finally:
                os.close(fd)  # also releases the probe's own lock
    if s.port:
        host = "127.0.0.1" if s.host in ("0.0.0.0", "", "::") else s.host
        try:
            with socket.create_connection((host, s.port), timeout=0.5):
                return f"something answers on {host}:{s.port}"
        except OSError:
            pass
    return None


def _read_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        info = tar.getmember(MANIFEST)
    except KeyError:
        raise BackupError("not a Cell backup: no manifest.json") from None
    if not info.isfile() or info.size > MAX_MANIFEST_BYTES:
        raise BackupError("manifest.json is not a small regular file")
    fh = tar.extractfile(info)
    assert fh is not None
    with fh:
        try:
            manifest = json.loads(fh.read())
        except ValueError:
            raise BackupError("manifest.json is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS_READ or not isinstance(manifest.get("files"), dict):
        raise BackupError(f"manifest.json is not a {' or '.join(FORMATS_READ)} manifest")
    return manifest


def _copy_hashed(src: IO[bytes], dest: Path, limit: int) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            size += len(chunk)
            if size > limit:
                raise BackupError(f"{dest.name}: larger than the manifest says")
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def _stage(tar: tarfile.TarFile, info: tarfile.TarInfo, name: str, expected: Any, dest: Path) -> None:
    if not info.isfile():
        raise BackupError(f"{name} is not a regular file (links and devices are refused)")
    if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str) or not isinstance(expected.get("size"), int):
        raise BackupError(f"manifest entry for {name} is malformed")
    fh = tar.extractfile(info)
    assert fh is not None
    with fh:
        digest, size = _copy_hashed(fh, dest, min(expected["size"], MAX_MEMBER_BYTES))
    if digest != expected["sha256"] or size != expected["size"]:
        raise BackupError(f"{name}: sha256 does not match the manifest (tampered or corrupt archive)")


def verify_archive(archive: Path, staging: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Check every member against the manifest and stage the allowed ones.
    Snapshots are staged below ``staging/snapshots/<tenant>/<cell>``."""
    allowed = {m.name: m for m in MEMBERS}
    staged: dict[str, Path] = {}
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{archive} is not a readable tar.gz: {exc}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise BackupError(f"{archive} is truncated or corrupt: {exc}") from None
        manifest = _read_manifest(tar)
        files = manifest["files"]
        names = [m.name for m in members]
        if len(names) != len(set(names)):
            raise BackupError("the archive has duplicate members")
        snapshots = [m for m in members if SNAPSHOT_MEMBER.fullmatch(m.name)]
        listed_snapshots = {n for n in files if SNAPSHOT_MEMBER.fullmatch(n)}
        known = set(allowed) | {m.name for m in snapshots}
        unknown = sorted(set(names) - known - {MANIFEST})
        if unknown or set(files) - set(allowed) - listed_snapshots:
            # T-BACKUP-1: only fixed names (and snapshot names of a fixed
            # shape) are ever read; anything else means the archive was made
            # by something else or altered.
            raise BackupError(f"unexpected members: {', '.join(unknown or sorted(set(files) - set(allowed) - listed_snapshots))}")
        if len(snapshots) > MAX_SNAPSHOTS:
            raise BackupError(f"more than {MAX_SNAPSHOTS} snapshots")
        if {m.name for m in snapshots} != listed_snapshots:
            raise BackupError("the snapshots in the archive and in the manifest differ")
        if snapshots and SECRET_MEMBER not in files:
            # T-IMAGE-2: snapshots without their key would only ever be refused.
            raise BackupError(f"the archive holds snapshots but not {SECRET_MEMBER}")
        for name, member in allowed.items():
            if name not in files:
                if member.optional and name not in names:
                    continue
                raise BackupError(f"{name} is {'missing from the manifest' if name in names else 'missing'}")
            info = tar.getmember(name) if name in names else None
            if info is None:
                raise BackupError(f"{name} is listed in the manifest but missing from the archive")
            dest = staging / name.replace("/", "__")
            _stage(tar, info, name, files[name], dest)
            staged[name] = dest
        for info in snapshots:  # archive order: the gzip stream is read forward once
            match = SNAPSHOT_MEMBER.fullmatch(info.name)
            assert match is not None
            tenant_dir = staging / "snapshots" / match.group(1)
            tenant_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest = tenant_dir / match.group(2)
            _stage(tar, info, info.name, files[info.name], dest)
            staged[info.name] = dest
    return manifest, staged


def _verify_chain(db: Path, key_file: Path) -> dict[str, Any]:
    key = NodeKey.load(key_file.parent) if key_file.name == "node_ed25519" else None
    if key is None:
        raise BackupError("internal: key file name")
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        # Only the archived node key is trusted, not keys the log declares:
        # a log must verify under the key that is restored with it.
        report = rverify.verify_connection(conn, [key.public_key_hex])
    finally:
        conn.close()
    return {"ok": report.ok, "count": report.count, "public_key": key.public_key_hex,
            "problem": report.first_problem.as_dict() if report.first_problem else None}


def restore_backup(s: Settings, archive: Path) -> dict[str, Any]:
    busy = server_running(s)
    if busy is not None:
        raise BackupError(f"refusing to restore onto a running appliance: {busy}; stop it first (systemctl stop cell)")
    for d in (s.root, s.db_path.parent, s.keys_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix=".cell-restore-", dir=s.root) as tmp:
        staging = Path(tmp)
        manifest, staged = verify_archive(Path(archive), staging)
        # Check the chain with the restored key before touching anything.
        keydir = staging / "keys"
        keydir.mkdir(mode=0o700)
        os.link(staged["keys/node_ed25519"], keydir / "node_ed25519")
        chain = _verify_chain(staged["db/cell.sqlite"], keydir / "node_ed25519")
        if not chain["ok"]:
            raise BackupError(f"the archived receipt chain does not verify: {chain['problem']}")
        targets = _targets(s)
        previous = _public_key_or_none(targets["keys/node_ed25519"])
        if SECRET_MEMBER in staged:
            _swap_snapshots(s, staging)
        for member in MEMBERS:
            if member.name not in staged:
                continue
            dest = targets[member.name]
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp_dest = dest.parent / f".{dest.name}.restore"
            shutil.copyfile(staged[member.name], tmp_dest, follow_symlinks=False)
            os.chmod(tmp_dest, member.mode)
            if member.name == "db/cell.sqlite":
                # The old WAL belongs to the old database: left beside the new
                # one it would be replayed into it.
                for suffix in ("-wal", "-shm"):
                    Path(str(dest) + suffix).unlink(missing_ok=True)
            os.replace(tmp_dest, dest)
    return {"manifest": manifest, "chain": chain,
            "restored": sorted(n for n in staged if not SNAPSHOT_MEMBER.fullmatch(n)),
            "snapshots": sum(1 for n in staged if SNAPSHOT_MEMBER.fullmatch(n)),
            "replaced_key": previous is not None and previous != chain["public_key"]}


def _swap_snapshots(s: Settings, staging: Path) -> None:
    """Replace the whole snapshot directory with the archived one (T-IMAGE-2):
    the secret is replaced with it, so a snapshot left from before would only
    be refused. The old directory is moved into the staging directory, which
    is removed on the way out."""
    new = staging / "snapshots"
    new.mkdir(mode=0o700, exist_ok=True)
    os.chmod(new, 0o700)
    old = staging / "snapshots.old"
    try:
        os.rename(s.snapshots_dir, old)
    except FileNotFoundError:
        pass
    os.rename(new, s.snapshots_dir)


def _public_key_or_none(key_file: Path) -> str | None:
    try:
        return NodeKey.load(key_file.parent).public_key_hex
    except (NodeKeyError, OSError):
        return None
