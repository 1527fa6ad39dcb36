"""Find and read files on removable media without trusting the medium.

A USB stick is attacker-controlled input: it may hold symlinks to
``/etc/shadow``, FIFOs that block a read forever, a million files or a
50 GB "license". So the scan never follows symlinks, lists regular files
only, stops at a depth and an entry budget, and skips files over the size
cap; and :func:`read_confined` re-checks all of that on the open file
descriptor, because the stick can change between listing and reading.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from tui.services import MediaFile, ServiceError

DEFAULT_ROOTS: tuple[Path, ...] = (Path("/media"), Path("/mnt"), Path("/run/media"))
MAX_DEPTH = 4  # /run/media/<user>/<label>/<dir>/file
MAX_ENTRIES = 5000  # directory entries looked at per scan, in total

# Per kind: accepted name endings and a size cap the real files never reach.
KINDS: dict[str, tuple[tuple[str, ...], int]] = {
    "license": ((".json", ".lic"), 64 * 1024),
    "registry": ((".json", ".tar", ".tar.gz", ".tgz", ".zip"), 256 * 1024 * 1024),
    "bundle": ((".tar", ".tar.gz", ".tgz", ".cellbundle", ".bundle"), 4 * 1024 * 1024 * 1024),
}


def within(path: Path, roots: Sequence[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == Path(os.path.realpath(r)) or Path(os.path.realpath(r)) in real.parents for r in roots)


def scan(roots: Sequence[Path], kind: str) -> list[MediaFile]:
    suffixes, cap = KINDS[kind]
    found: list[MediaFile] = []
    budget = MAX_ENTRIES
    stack: list[tuple[Path, int]] = [(Path(r), 0) for r in roots]
    while stack and budget > 0:
        directory, depth = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue  # unreadable or vanished mount: not an error for the operator
        for entry in entries:
            budget -= 1
            if budget < 0:
                break
            if entry.name.startswith("."):
                continue  # hidden files and our own temp files
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            path = Path(entry.path)
            if stat.S_ISDIR(st.st_mode) and depth + 1 < MAX_DEPTH:
                stack.append((path, depth + 1))
            elif stat.S_ISREG(st.st_mode) and entry.name.lower().endswith(suffixes) and st.st_size <= cap:
                if within(path, roots):
                    found.append(MediaFile(path, st.st_size))
    return sorted(found, key=lambda f: str(f.path))


def mounted_dirs(roots: Sequence[Path]) -> list[Path]:
    """Writable directories one or two levels below the roots (a mounted stick)."""
    out: list[Path] = []
    for root in roots:
        for level in (root, *(p for p in _subdirs(root))):
            for sub in _subdirs(level):
                if os.access(sub, os.W_OK) and sub not in out:
                    out.append(sub)
    return sorted(out)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return []


def read_confined(path: Path, roots: Sequence[Path], kind: str) -> bytes:
    """Read a chosen file, refusing anything the scan would not have listed."""
    _, cap = KINDS[kind]
    if not within(path, roots):
        raise ServiceError(f"{path} is not on removable media under {', '.join(map(str, roots))}.")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ServiceError(f"{path} cannot be opened: {exc.strerror or exc}.") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ServiceError(f"{path} is not a regular file.")
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise ServiceError(f"{path} is larger than {cap} bytes; refusing to read it.")
    return data
