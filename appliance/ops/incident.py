"""`cell incident snapshot`: the incident procedure of SECURITY.md §8 in one step.

1. Take the node out of rotation: write ``SYNAPSE_ROOT/incident.lock``. A
   running service sees it within a second: new `/v1` requests get 503
   ``incident`` and `/healthz` answers 503, so a proxy drops the node.
2. Write a tarball (mode 0600) for the investigators: the database (SQLite
   online backup), the configuration and license, the log files if any, the
   compiled-module cache manifest (hashes, never the native code), and the
   list of cell volumes with every file's size and sha256 — contents only when
   asked — plus a manifest hashing every member.

A guest may still be running while the snapshot is taken, so every name under
``sandbox_volumes/`` is guest-controlled and may be swapped for a symlink (to
the node key, say) between any two system calls (T-PATH-2). Nothing there is
opened by path: tenants and cells are opened with ``confine.open_volume``
(no-follow, fd-relative), and each volume is walked with the same confined
opener as the host functions (``Volume.open_dir_fd``/``open_file_fd``: beneath
the volume root, no symlink anywhere, same mount, a regular file with one
link, checked on the fd). A file is hashed — and, when asked, copied into the
snapshot's private directory — from that one fd, so the bytes hashed are the
bytes archived. The walk is iterative (an explicit stack, no recursion) and
holds at most a few descriptors at any depth. What cannot be read is listed
with an ``error`` or a ``type``, never silently left out or counted as empty.

`cell incident clear` puts the node back into rotation.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance import __version__
from appliance.config import Settings
from appliance.confine import ConfinementError, Volume, open_volume
from appliance.fileio import write_atomic
from appliance.ops.backup import _online_copy

LOCK_NAME = "incident.lock"
MAX_LISTED_FILES = 200_000
MAX_WALK_DEPTH = 2048  # deeper directories are listed as errors ("too_deep"), not walked
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Why a volume file was not hashed: the confinement refusal, as a listing type.
_REFUSED_TYPES = {"symlink": "symlink", "special_file": "special", "hard_link": "hard_link"}


def lock_path(s: Settings) -> Path:
    return s.root / LOCK_NAME


def in_incident(s: Settings) -> bool:
    return lock_path(s).is_file()


@dataclass
class VolumeListing:
    """What ``list_volumes`` found: one entry per file, link, special file or error."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    copies: dict[str, Path] = field(default_factory=dict)  # tarball member -> private copy
    errors: int = 0
    truncated: bool = False

    def full(self) -> bool:
        self.truncated = self.truncated or len(self.entries) >= MAX_LISTED_FILES
        return self.truncated

    def error(self, path: str, reason: str) -> None:
        # A walk error is never "nothing there": it is listed and counted.
        self.errors += 1
        self.entries.append({"path": path, "error": reason})


def list_volumes(s: Settings, *, copy_to: Path | None = None,
                 resolver: Literal["auto", "openat2", "walk"] = "auto") -> VolumeListing:
    """Every file under the volumes with size and sha256 (T-PATH-2: nothing followed).

    With ``copy_to`` (a private directory of ours), each hashed file is also
    copied there from the same fd, and ``copies`` maps its tarball member name
    to the copy.
    """
    out = VolumeListing()
    try:
        root = os.open(s.volumes_dir, _DIR_FLAGS)
    except FileNotFoundError:
        return out
    try:
        for tenant, tst in _scan(root):
            if out.full():
                break
            if not stat.S_ISDIR(tst.st_mode):
                _other(out, tenant, tst)
                continue
            try:
                tfd = os.open(tenant, _DIR_FLAGS, dir_fd=root)  # no-follow: a swapped-in link fails
                try:
                    cells = _scan(tfd)
                finally:
                    os.close(tfd)
            except OSError as exc:
                out.error(tenant, exc.strerror or "io")
                continue
            for cell, cst in cells:
                if out.full():
                    break
                where = f"{tenant}/{cell}"
                if not stat.S_ISDIR(cst.st_mode):
                    _other(out, where, cst)
                    continue
                try:
                    vol = open_volume(s.volumes_dir, tenant, cell, resolver=resolver)
                except ConfinementError as exc:
                    out.error(where, exc.reason)
                    continue
                with vol:
                    _walk_volume(vol, where, out, copy_to)
    finally:
        os.close(root)
    return out


def _scan(dir_fd: int) -> list[tuple[str, os.stat_result]]:
    """Names and lstat results of one directory, sorted; the fd stays the caller's."""
    found: list[tuple[str, os.stat_result]] = []
    with os.scandir(dir_fd) as it:
        for item in it:
            try:
                found.append((item.name, item.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue  # removed since it was read: there is nothing left to list
    return sorted(found, key=lambda pair: pair[0])


def _describe(path: str, st: os.stat_result) -> dict[str, Any]:
    return {"path": path, "size": st.st_size, "mtime": int(st.st_mtime), "mode": oct(stat.S_IMODE(st.st_mode))}


def _other(out: VolumeListing, path: str, st: os.stat_result) -> None:
    """A symlink or special file: listed as such from its lstat, never opened."""
    out.entries.append(_describe(path, st) | {"type": "symlink" if stat.S_ISLNK(st.st_mode) else "special"})


def _walk_volume(vol: Volume, prefix: str, out: VolumeListing, copy_to: Path | None) -> None:
    """Iterative walk of one volume: an explicit stack of name tuples, one directory fd at a time."""
    stack: list[tuple[str, ...]] = [()]
    while stack and not out.full():
        names = stack.pop()
        here = "/".join((prefix, *names))
        if len(names) > MAX_WALK_DEPTH:
            out.error(here, "too_deep")
            continue
        try:
            fd = vol.open_dir_fd(names)  # T-PATH-2: beneath the volume, no symlink, same mount
        except ConfinementError as exc:
            out.error(here, exc.reason)  # e.g. swapped for a symlink since it was listed
            continue
        try:
            items = _scan(fd)
        except OSError as exc:
            out.error(here, exc.strerror or "io")
            continue
        finally:
            os.close(fd)
        for name, st in reversed(items):  # pushed in reverse, walked in name order
            if stat.S_ISDIR(st.st_mode):
                stack.append((*names, name))
        for name, st in items:
            if stat.S_ISDIR(st.st_mode):
                continue
            if out.full():
                return
            path = f"{here}/{name}"
            if stat.S_ISREG(st.st_mode):
                _hash_file(vol, (*names, name), path, st, out, copy_to)
            else:
                _other(out, path, st)


def _hash_file(vol: Volume, names: tuple[str, ...], path: str, listed: os.stat_result,
               out: VolumeListing, copy_to: Path | None) -> None:
    try:
        fd, st = vol.open_file_fd(names)  # T-PATH-2: regular, one link, no symlink — checked on the fd
    except ConfinementError as exc:
        kind = _REFUSED_TYPES.get(exc.reason)
        if kind is None:
            out.error(path, exc.reason)
        elif kind == "hard_link":
            # Not read: the other name may be outside every volume. The inode
            # lets an investigator pair up the names.
            out.entries.append(_describe(path, listed) | {"type": kind, "nlink": listed.st_nlink, "inode": listed.st_ino})
        else:
            out.entries.append(_describe(path, listed) | {"type": kind})
        return
    copy_fd = -1
    try:
        if copy_to is not None:
            copy_to.mkdir(mode=0o700, exist_ok=True)
            copy = copy_to / f"{len(out.copies):08d}"
            copy_fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        digest, size = hashlib.sha256(), 0
        left = st.st_size  # a guest still appending cannot make the read endless
        while left > 0:
            chunk = os.read(fd, min(left, _CHUNK))
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            left -= len(chunk)
            if copy_fd >= 0:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(copy_fd, view):]
    except OSError as exc:
        out.error(path, exc.strerror or "io")
        return
    finally:
        os.close(fd)
        if copy_fd >= 0:
            os.close(copy_fd)
    out.entries.append(_describe(path, st) | {"size": size, "sha256": digest.hexdigest()})
    if copy_to is not None:
        out.copies[f"volumes/{path}"] = copy


def snapshot(s: Settings, out: Path, *, with_contents: bool = False, reason: str = "") -> dict[str, Any]:
    started = time.time()
    write_atomic(lock_path(s), json.dumps({"since": int(started), "reason": reason[:500]}).encode(), 0o600)
    members: dict[str, bytes | Path] = {}
    with tempfile.TemporaryDirectory(prefix=".cell-incident-", dir=s.root) as tmp:
        if s.db_path.is_file():
            copy = Path(tmp) / "cell.sqlite"
            _online_copy(s.db_path, copy)
            members["db/cell.sqlite"] = copy
        for name in ("config.toml", "license.json"):
            if (s.config_dir / name).is_file():
                members[f"config/{name}"] = s.config_dir / name
        if s.license_path.is_file():
            members["config/license.json"] = s.license_path
        if s.log_file is not None:
            for log in sorted(Path(s.log_file).parent.glob(Path(s.log_file).name + "*")):
                if log.is_file() and not log.is_symlink():
                    members[f"logs/{log.name}"] = log
        cache = [json.loads(p.read_text()) | {"name": p.stem} for p in sorted(s.cache_dir.glob("*.json"))] if s.cache_dir.is_dir() else []
        members["cache-manifest.json"] = json.dumps(cache, indent=1).encode()
        # T-PATH-2: volume files are read once, through the confined opener, into our private dir.
        listing = list_volumes(s, copy_to=Path(tmp) / "volumes" if with_contents else None)
        volumes = listing.entries
        members["volumes.json"] = json.dumps(volumes, indent=1).encode()
        members.update(listing.copies)
        manifest: dict[str, Any] = {"kind": "cell-incident-snapshot", "version": __version__, "node_id": s.node_id,
                    "created_at": int(started), "reason": reason[:500], "with_volume_contents": with_contents,
                    "volume_errors": listing.errors, "volumes_truncated": listing.truncated, "files": {}}
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for name, src in members.items():
                data = src if isinstance(src, bytes) else Path(src).read_bytes()
                manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o600, int(started)
                tar.addfile(info, io.BytesIO(data))
            body = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size, info.mode, info.mtime = len(body), 0o600, int(started)
            tar.addfile(info, io.BytesIO(body))
    return {"out": str(out), "files": len(manifest["files"]), "volumes_listed": len(volumes),
            "volume_errors": listing.errors, "volumes_truncated": listing.truncated, "out_of_rotation": True, "seconds": round(time.time() - started, 2)}


def clear(s: Settings) -> bool:
    try:
        lock_path(s).unlink()
        return True
    except FileNotFoundError:
        return False
