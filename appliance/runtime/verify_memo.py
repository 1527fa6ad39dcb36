"""Remembered file hashes, so a worker does not re-hash the 100+ MB runtime
and the 250+ MB compiled module on every start (T-CACHE-1, T-SUPPLY-1).

A record says "the file with this identity hashed to this digest": the
identity is the open descriptor's ``fstat`` (device, inode, size, mtime_ns,
ctime_ns), and the record carries an HMAC-SHA256 under a key kept in the
data root's ``keys/`` directory, never in the module cache. Any change to the
file changes its identity (a rename gives another inode; a write in place
moves mtime and ctime, and ctime cannot be set back from user space), and a
record without the right MAC is ignored, so a miss only ever costs a full
hash. Workers read the key and the records before they confine themselves;
after that ``keys/`` is outside their Landlock rules (T-ESCAPE-1).

Callers check the descriptor they will load, not a path, and check its
identity again after loading (``same_identity``), so no file can be swapped
in between the check and the load.

A tree (matplotlib's data extracted from the pinned stdlib zip, T-SUPPLY-1)
is remembered the same way: its fingerprint lists every entry's relative
name, type and identity (the root's own included), so a changed, added,
removed or replaced file or directory gives another fingerprint; a record
says "the tree with this fingerprint was checked in full against ``label``".
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from appliance.fileio import write_atomic

KEY_FILE = "key"
KEY_BYTES = 32
RACY_NS = 2_000_000_000  # only files unchanged for this long are remembered
_MAX_RECORD = 4096
MAX_TREE_ENTRIES = 10_000  # a larger tree is never fingerprinted (checked in full instead)

Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def same_identity(fd: int, before: Identity) -> bool:
    """True when the descriptor's file is still exactly the one checked."""
    try:
        return identity(os.fstat(fd)) == before
    except OSError:
        return False


def sha256_fd(fd: int, size: int) -> str | None:
    """SHA-256 of exactly ``size`` bytes of the open file; None if it is shorter or longer."""
    digest = hashlib.sha256()
    left, offset = size, 0
    while left > 0:
        chunk = os.pread(fd, min(left, 1 << 20), offset)
        if not chunk:
            return None
        digest.update(chunk)
        offset += len(chunk)
        left -= len(chunk)
    if os.pread(fd, 1, offset):
        return None  # grew meanwhile
    return digest.hexdigest()


def tree_fingerprint(root: Path) -> tuple[str, int] | None:
    """The fingerprint of the tree at ``root`` and the newest mtime/ctime in
    it; None when it holds anything but directories and regular files (a
    symlink, say), cannot be read, or is larger than MAX_TREE_ENTRIES.
    The walk is iterative and holds one directory descriptor at a time."""
    lines: list[str] = []
    newest = 0
    pending = [""]
    try:
        while pending:
            rel = pending.pop()
            st = os.lstat(os.path.join(root, rel) if rel else root)
            if not stat.S_ISDIR(st.st_mode):
                return None
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                entries = list(it)
            lines.append(f"d {rel!r} " + " ".join(str(v) for v in identity(st)))
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if len(lines) + len(pending) > MAX_TREE_ENTRIES:
                    return None
                est = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode):
                    pending.append(name)  # its own line is written when it is walked
                elif stat.S_ISREG(est.st_mode):
                    lines.append(f"f {name!r} " + " ".join(str(v) for v in identity(est)))
                    newest = max(newest, est.st_mtime_ns, est.st_ctime_ns)
                else:
                    return None
    except OSError:
        return None
    lines.sort()
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest(), newest


class VerifyMemo:
    """Records in ``directory`` (the key file and one small JSON file per inode)."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self.directory = directory
        self._key = key

    @classmethod
    def open(cls, directory: Path | str | None) -> VerifyMemo | None:
        """The memo of ``directory``, creating its key on first use; None when
        the key cannot be had safely (then every file is hashed in full)."""
        if not directory:
            return None
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                return None
            key = _read_key(path / KEY_FILE)
            if key is None:
                _create_key(path / KEY_FILE)
                key = _read_key(path / KEY_FILE)
        except OSError:
            return None
        return cls(path, key) if key is not None else None

    def _mac(self, ident: Identity, digest: str) -> str:
        msg = "cell-verify-memo/1|" + "|".join(str(v) for v in ident) + "|" + digest
        return hmac.new(self._key, msg.encode("ascii"), hashlib.sha256).hexdigest()

    def _record_path(self, ident: Identity) -> Path:
        return self.directory / f"{ident[0]:x}-{ident[1]:x}.json"

    def lookup(self, ident: Identity) -> str | None:
        """The digest remembered for exactly this identity, or None."""
        record = _read_record(self._record_path(ident))
        if record is None:
            return None
        digest, mac, ident_seen = record.get("sha256"), record.get("mac"), record.get("identity")
        if not isinstance(digest, str) or not isinstance(mac, str) or ident_seen != list(ident):
            return None
        if not hmac.compare_digest(mac, self._mac(ident, digest)):
            return None
        return digest

    def remember(self, ident: Identity, digest: str) -> None:
        record = {"identity": list(ident), "sha256": digest, "mac": self._mac(ident, digest)}
        try:
            write_atomic(self._record_path(ident), json.dumps(record).encode(), 0o600)
        except OSError:
            pass  # only a later start pays the full hash again

    def _tree_mac(self, label: str, fingerprint: str) -> str:
        msg = "cell-verify-memo-tree/1|" + label + "|" + fingerprint
        return hmac.new(self._key, msg.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()

    def _tree_record_path(self, label: str) -> Path:
        return self.directory / f"tree-{hashlib.sha256(label.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"

    def knows_tree(self, label: str, fingerprint: str) -> bool:
        """True when a record with a valid MAC says the tree with exactly this
        fingerprint was checked in full against ``label``."""
        record = _read_record(self._tree_record_path(label))
        if record is None or record.get("label") != label or record.get("fingerprint") != fingerprint:
            return False
        mac = record.get("mac")
        return isinstance(mac, str) and hmac.compare_digest(mac, self._tree_mac(label, fingerprint))

    def remember_tree(self, label: str, fingerprint: str, newest_ns: int) -> None:
        """Record that the tree with this fingerprint was just checked in full;
        not when any of it changed moments ago (racy timestamps, see digest_of)."""
        if time.time_ns() - newest_ns <= RACY_NS:
            return
        record = {"label": label, "fingerprint": fingerprint, "mac": self._tree_mac(label, fingerprint)}
        try:
            write_atomic(self._tree_record_path(label), json.dumps(record).encode(), 0o600)
        except OSError:
            pass  # only a later start pays the full check again

    def digest_of(self, fd: int) -> tuple[str | None, Identity]:
        """The SHA-256 of the open file (remembered or computed now) and the identity it is valid for."""
        ident = identity(os.fstat(fd))
        known = self.lookup(ident)
        if known is not None:
            return known, ident
        digest = sha256_fd(fd, ident[2])
        # A file changed moments ago is hashed but not remembered: file times
        # are kept at the kernel's coarse clock, so a second write within the
        # same tick could leave them as they were ("racy" timestamps, as git has).
        settled = time.time_ns() - max(ident[3], ident[4]) > RACY_NS
        if digest is not None and settled and same_identity(fd, ident):
            self.remember(ident, digest)
        return digest, ident


def _read_record(path: Path) -> dict[str, Any] | None:
    """A memo record: a small JSON object in a file that is not a link; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, _MAX_RECORD + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > _MAX_RECORD:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_key(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        # Only a private regular file of ours; anything else means no memo at all.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077 or st.st_size != KEY_BYTES:
            raise PermissionError(f"{path} is not a private {KEY_BYTES}-byte key file")
        key = os.pread(fd, KEY_BYTES, 0)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise PermissionError(f"{path} is short")
    return key


def _create_key(path: Path) -> None:
    """Write a new key under a temporary name and link it into place, so
    workers starting together all end up with the same, whole key."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
