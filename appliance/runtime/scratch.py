"""A Python cell's writable /tmp: a private scratch directory beside its volume.

Published code writes to /tmp (``plt.savefig('/tmp/plot.png')``, temporary
CSVs), and matplotlib needs a writable config/cache directory, so each
Python session gets a /tmp of its own. It lives *outside* the cell's /data
volume, so the files API (which only ever opens ``<volumes>/<tenant>/<cell>``)
cannot reach it, and it mirrors the volume's place under a separate root::

    volume  <volumes>/<tenant>/<cell>           -> /data
    tmp     <volumes>/.tmp/<tenant>/<cell>      -> /tmp
    pool    <volumes>/.pool/<worker>/<id>       -> /data of a warm or one-shot session
            <volumes>/.pool/.tmp/<worker>/<id>  -> its /tmp (renamed with it into a cell)

It is confined like /data (a WASI preopen; the host makes, measures and
removes it with the same no-follow, fd-relative steps as a volume: T-PATH-2),
counted in the tenant's disk quota (T-DOS-1), kept across the runs of a cell
and removed with the cell.
"""
from __future__ import annotations

import os
from pathlib import Path

from appliance.confine import ConfinementError, Usage, Volume, create_volume_in, open_volume_in, remove_volume_in

TMP_ROOT = ".tmp"


def tmp_dir_for(volume: str) -> Path:
    """The /tmp directory that belongs to the volume at ``volume``."""
    p = Path(volume)
    return p.parent.parent / TMP_ROOT / p.parent.name / p.name


def make_tmp_dir(volume: str) -> str:
    """Create (0700, no symlink followed) the /tmp of ``volume``; its path."""
    t = tmp_dir_for(volume)
    # From the tenant level down: a tenant-bound worker cannot open the /tmp root (T-TENANT-1).
    return str(create_volume_in(t.parent, t.name))


def remove_tmp_dir(volume: str) -> bool:
    """Delete the /tmp of ``volume`` without following links; False if it was
    not there or could not be removed."""
    t = tmp_dir_for(volume)
    try:
        return remove_volume_in(t.parent, t.name)
    except (ConfinementError, OSError):
        return False


def move_tmp_dir(src_volume: str, dst_volume: str) -> None:
    """Hand the /tmp of a warm session to the cell that takes it (same inode,
    so the session's preopen keeps pointing at it)."""
    src, dst = tmp_dir_for(src_volume), tmp_dir_for(dst_volume)
    if not os.path.isdir(src):
        return
    os.makedirs(dst.parent, mode=0o700, exist_ok=True)
    os.rename(src, dst)


def tmp_usage(volume: str, max_entries: int | None = None) -> Usage:
    """Bytes and entries in the /tmp of ``volume`` (nothing when it does not
    exist), walked like a volume (T-DISK-1). A walk error raises: it is never
    taken for "empty"."""
    t = tmp_dir_for(volume)
    try:
        vol = open_volume_in(t.parent, t.name)
    except FileNotFoundError:
        return Usage(0, 0)  # no /tmp root yet: no cell has one
    except ConfinementError as exc:
        if exc.code == "not_found":
            return Usage(0, 0)
        raise
    with vol:
        return vol.usage(max_entries=max_entries)


def tmp_path_for(volume: str) -> str:
    """``str(tmp_dir_for(volume))`` without pathlib (~14 us) for a plain absolute
    path, the only kind a worker is sent; any other goes through pathlib."""
    if volume.startswith("/") and not volume.startswith("//") and volume == os.path.normpath(volume):
        parent, cell = volume.rsplit("/", 1)
        volumes, tenant = parent.rsplit("/", 1)
        if volumes and tenant and cell:
            return f"{volumes}/{TMP_ROOT}/{tenant}/{cell}"
    return str(tmp_dir_for(volume))


def tmp_usage_after_run(volume: str, max_entries: int | None = None) -> Usage:
    """:func:`tmp_usage` as the worker measures it after each run: the /tmp
    directory opened by its own path the way the volume beside it is
    (``Volume(path, resolver="walk")``: its last step not followed, a
    directory of our uid, walked by fds), not from the tenant level down
    with an openat2 probe (~40 us of every run, measured). Both paths are the
    host's own; a guest only ever sees inside them. A walk error raises
    (T-DISK-1: never taken for "empty"); no /tmp at all is nothing."""
    try:
        vol = Volume(tmp_path_for(volume), resolver="walk")
    except FileNotFoundError:
        return Usage(0, 0)
    with vol:
        return vol.usage(max_entries=max_entries)


def with_tmp(data: Usage, tmp: Usage) -> Usage:
    """A cell's usage: its /data and its /tmp together."""
    return Usage(data.bytes + tmp.bytes, data.entries + tmp.entries, data.complete and tmp.complete)
