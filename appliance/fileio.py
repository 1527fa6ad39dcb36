"""Two file helpers several modules need: hashing a file in chunks, and an
atomic write whose mode is set on the descriptor (so the umask never widens
it) before the bytes land, then fsynced and renamed into place."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, dir_mode: int | None = 0o700) -> None:
    write_atomic_parts(path, [data], mode, dir_mode=dir_mode)


def write_atomic_parts(path: Path, parts: Iterable[bytes | bytearray | memoryview], mode: int = 0o600, *,
                       dir_mode: int | None = 0o700,
                       after_part: Callable[[int, int, int], None] | None = None) -> None:
    """``write_atomic`` of the bytes of ``parts`` in order, each written as it
    comes (no joined copy of them all). ``after_part(fd, offset, length)`` is
    called once each part is written (e.g. to start its disk write early)."""
    if dir_mode is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            at = 0
            for part in parts:
                view = memoryview(part).cast("B")
                start = at
                while view:
                    n = os.write(fd, view)
                    view, at = view[n:], at + n
                if after_part is not None:
                    after_part(fd, start, at - start)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
