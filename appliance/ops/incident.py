"""`cell incident snapshot`: the incident procedure of SECURITY.md §8 in one step.

1. Take the node out of rotation: write ``SYNAPSE_ROOT/incident.lock``. A
   running service sees it within a second: new `/v1` requests get 503
   ``incident`` and `/healthz` answers 503, so a proxy drops the node.
2. Write a tarball (mode 0600) for the investigators: the database (SQLite
   online backup), the configuration and license, the log files if any, the
   compiled-module cache manifest (hashes, never the native code), and the
   list of cell volumes with every file's size and sha256 — contents only when
   asked — plus a manifest hashing every member.

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
from typing import Any

from appliance import __version__
from appliance.config import Settings
from appliance.fileio import sha256_file, write_atomic
from appliance.ops.backup import _online_copy

LOCK_NAME = "incident.lock"
MAX_LISTED_FILES = 200_000


def lock_path(s: Settings) -> Path:
    return s.root / LOCK_NAME


def in_incident(s: Settings) -> bool:
    return lock_path(s).is_file()


def _volumes(s: Settings) -> list[dict[str, Any]]:
    """Every regular file under the volumes with size and hash; links and
    special files are listed as such, never followed."""
    out: list[dict[str, Any]] = []
    root = s.volumes_dir
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = Path(dirpath) / name
            st = os.lstat(full)
            entry: dict[str, Any] = {"path": str(full.relative_to(root)), "size": st.st_size,
                                     "mtime": int(st.st_mtime), "mode": oct(stat.S_IMODE(st.st_mode))}
            if stat.S_ISREG(st.st_mode):
                entry["sha256"] = sha256_file(full)
            else:
                entry["type"] = "symlink" if stat.S_ISLNK(st.st_mode) else "special"
            out.append(entry)
            if len(out) >= MAX_LISTED_FILES:
                return out
    return out


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
        volumes = _volumes(s)
        members["volumes.json"] = json.dumps(volumes, indent=1).encode()
        if with_contents:
            for entry in volumes:
                if "sha256" in entry:
                    members[f"volumes/{entry['path']}"] = s.volumes_dir / entry["path"]
        manifest: dict[str, Any] = {"kind": "cell-incident-snapshot", "version": __version__, "node_id": s.node_id,
                    "created_at": int(started), "reason": reason[:500], "with_volume_contents": with_contents,
                    "files": {}}
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
            "out_of_rotation": True, "seconds": round(time.time() - started, 2)}


def clear(s: Settings) -> bool:
    try:
        lock_path(s).unlink()
        return True
    except FileNotFoundError:
        return False
