"""The data root: made if missing and refused when others could tamper with it.

Light on purpose: ``cell serve`` checks the data root before it spawns the
first workers, and spawns them before it loads the rest of the service, so
their start-up overlaps its imports (docs/operations.md, start-up).
"""
from __future__ import annotations

import os
import stat

from appliance.config import Settings


class UnsafeDataDir(Exception):
    """Start-up refuses a data directory others could tamper with."""


def check_data_dir(settings: Settings) -> None:
    """The data root and its private subdirectories must be ours and closed to
    others: guests' volumes, receipts, keys and native code live there."""
    uid = os.getuid()
    for path in (settings.root, settings.volumes_dir, settings.db_path.parent, settings.keys_dir, settings.snapshots_dir):
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeDataDir(f"{path} is not a directory (a symlink?); fix: replace it with a real directory owned by uid {uid}")
        if st.st_uid != uid:
            raise UnsafeDataDir(f"{path} is owned by uid {st.st_uid}, not by the service (uid {uid}); "
                                f"fix: chown -R {uid} {settings.root}")
        if st.st_mode & 0o077:
            raise UnsafeDataDir(f"{path} has mode {oct(st.st_mode & 0o777)}, open to other users; fix: chmod 700 {path}")


def prepare_root(settings: Settings) -> None:
    for path in (settings.root, settings.volumes_dir, settings.db_path.parent, settings.keys_dir, settings.snapshots_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_data_dir(settings)
