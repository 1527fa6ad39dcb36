"""Confined file access to one cell volume: the adapter under host_fs_* and the files API.

Every operation starts from a directory fd of the volume root and resolves the
guest's components (from ``appliance.policy.paths.split_guest_path``) beneath
it, never through a host path string, so no check-then-use gap exists.

* Resolution uses ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)``. Where openat2 is missing (ENOSYS,
  EPERM from seccomp, another OS) a walker opens one component at a time with
  ``O_NOFOLLOW`` and checks each step stays on the volume's device. Both refuse
  a symlink anywhere in the path (T-PATH-2).
* Every open carries ``O_CLOEXEC | O_NOCTTY | O_NONBLOCK | O_NOFOLLOW`` (FIFOs
  cannot hang a worker), and ``fstat`` must show a regular file with
  ``st_nlink == 1`` or a directory; anything else is "denied" (T-PATH-1).
* Creation opens the *parent* confined and creates the leaf with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to it, so a dangling symlink or a
  symlinked parent cannot redirect a write (the original canonicalize bug).
* Writes go to a fresh temp file (``.cell-tmp-<random>``, 0600) in the target's
  directory, are fsynced and ``renameat`` into place: atomic, and a leaf swapped
  for a symlink meanwhile is replaced, never followed. Temps are removed on failure.
* Paths are strings, parsed here with ``allow_data_prefix=True`` ("a/b", "/data/a/b").
  ``Entry.path`` is relative to the volume with no leading slash ("" is the root).
* ``read_bytes`` returns at most ``max_bytes`` (the size is in ``stat``).
* A path in directory form (``notes.txt/``, ``notes.txt/.``; see
  ``GuestPath.dir_only``) answers only with a directory: a regular file there
  is ``not_a_directory`` (reason ``trailing_slash``, ABI -3), as POSIX ENOTDIR,
  with either resolver and for every operation (T-PATH-1).
* ``open_dir_fd``/``open_file_fd`` give trusted host walkers (the incident
  snapshot) the same confined opener for names read from the volume itself.
* ``list_dir`` skips symlinks, special files, hard-linked files, names the path
  policy refuses and other mounts; ``exists`` is False for them.
* Walks of a whole tree (``remove(recursive=True)``, ``remove_volume``,
  ``remove_tree``, ``usage``) are iterative and hold at most three descriptors
  whatever the depth or width (T-DOS-1); ``usage`` counts every name (inodes,
  T-DISK-1) and raises on any walk error instead of skipping a subtree.
* The root fd is ``O_CLOEXEC``: an exec'd child never inherits it; a forked
  worker shares it and may keep using it (each process calls ``close``).

``ConfinementError.code`` and the guest ABI return codes (``errno_code``):

======================  ====  =============================================
code                    ABI   meaning
======================  ====  =============================================
denied                  -1    policy: bad syntax, symlink, escape, special
                              file, hard link, other mount, permission
not_found               -2    no such file or directory
invalid                 -3    bad argument (negative length, bad id, ...)
not_a_directory         -3    a component that must be a directory is not
io                      -4    any other failure
not_empty               -4    directory not empty (remove without recursive)
too_large               -5    over ``max_file_bytes``, quota, EFBIG
is_a_directory          -6    a file operation named a directory
exists                  -7    target exists (mkdir without parents, rename)
======================  ====  =============================================
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import stat as st
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from appliance.policy.paths import GuestPath, PathRejected, join_components, parse_guest_path, split_guest_path

ERRNO_CODES: dict[str, int] = {
    "denied": -1, "not_found": -2, "invalid": -3, "not_a_directory": -3, "io": -4,
    "not_empty": -4, "too_large": -5, "is_a_directory": -6, "exists": -7,
}
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
# openat2 refuses anything but these next to O_PATH.
_PATH_FLAGS = _O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR_PATH_FLAGS = _PATH_FLAGS | os.O_DIRECTORY
_SAFE = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | _O_NOCTTY
_DIR_READ_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _SAFE
_RESOLVE = 0x08 | 0x04 | 0x02 | 0x01  # BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV
_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64
_RENAME_NOREPLACE = 1
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TMP_PREFIX = ".cell-tmp-"
_CHUNK = 1 << 20
_OPENAT2_MAX_PATH = 4095  # PATH_MAX less the NUL; a longer relative path goes to the walker


class ConfinementError(Exception):
    """An operation on a volume failed; ``code`` is a key of ``ERRNO_CODES``."""

    def __init__(self, code: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code

    @property
    def errno_code(self) -> int:
        return ERRNO_CODES.get(self.code, -4)


class BadPath(ConfinementError):
    """The path's syntax was refused (HTTP 400); ``reason`` is the policy's reason."""

    def __init__(self, rejected: PathRejected) -> None:
        super().__init__("denied", rejected.message, reason=rejected.reason)


_ERRNO_MAP: dict[int, tuple[str, str]] = {
    errno.ELOOP: ("denied", "symlink"),  # T-PATH-2: a symlink in the path
    errno.EXDEV: ("denied", "escape"),  # T-PATH-1: resolution left the volume or its mount
    errno.ENXIO: ("denied", "special_file"), errno.ENODEV: ("denied", "special_file"),
    errno.EACCES: ("denied", "permission"), errno.EPERM: ("denied", "permission"),
    errno.ENOENT: ("not_found", "not_found"), errno.ENOTDIR: ("not_a_directory", "not_a_directory"),
    errno.EISDIR: ("is_a_directory", "is_a_directory"), errno.EEXIST: ("exists", "exists"),
    errno.ENOTEMPTY: ("not_empty", "not_empty"), errno.EINVAL: ("invalid", "invalid"),
    errno.ENAMETOOLONG: ("invalid", "too_long"), errno.EFBIG: ("too_large", "too_large"),
    errno.EDQUOT: ("too_large", "quota"),
}


def _mapped(exc: OSError) -> ConfinementError:
    code, reason = _ERRNO_MAP.get(exc.errno or 0, ("io", "io"))
    return ConfinementError(code, f"{reason.replace('_', ' ')}", reason=reason)


def _denied(reason: str) -> ConfinementError:
    return ConfinementError("denied", f"denied: {reason.replace('_', ' ')}", reason=reason)


def _trailing_slash() -> ConfinementError:
    # T-PATH-1: "notes.txt/" names a directory or nothing; POSIX answers ENOTDIR.
    return ConfinementError("not_a_directory", "path ends with '/' but names a file", reason="trailing_slash")


def _enc(name: str) -> bytes:
    return os.fsencode(name)


def _kind(s: os.stat_result) -> Literal["file", "dir"]:
    """Only plain files and directories exist for a guest (T-PATH-1)."""
    if st.S_ISDIR(s.st_mode):
        return "dir"
    if st.S_ISREG(s.st_mode):
        # T-PATH-1: a second name may be a hard link to a file outside.
        if s.st_nlink != 1:
            raise _denied("hard_link")
        return "file"
    raise _denied("symlink" if st.S_ISLNK(s.st_mode) else "special_file")


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    type: Literal["file", "dir"]
    size: int
    modified_time: str

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path, "type": self.type,
                "size": self.size, "modified_time": self.modified_time}


def _entry(comps: tuple[str, ...], s: os.stat_result) -> Entry:
    kind = _kind(s)
    when = datetime.fromtimestamp(s.st_mtime, tz=timezone.utc).isoformat(timespec="milliseconds")
    return Entry(comps[-1] if comps else "", join_components(comps), kind,
                 s.st_size if kind == "file" else 0, when.replace("+00:00", "Z"))


_SYSCALL: Any = None  # libc's syscall(), looked up once: a CDLL costs a class build per lookup


def _libc_syscall() -> Any:
    global _SYSCALL
    if _SYSCALL is None:
        fn = ctypes.CDLL(None, use_errno=True).syscall
        fn.restype = ctypes.c_long
        _SYSCALL = fn
    return _SYSCALL


class _Openat2:
    def __init__(self) -> None:
        self._syscall = _libc_syscall()

    def __call__(self, dirfd: int, path: bytes, flags: int) -> int:
        how = (ctypes.c_uint64 * 3)(flags, 0, _RESOLVE)
        for _ in range(16):
            fd = self._syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(path),
                               ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
            if fd >= 0:
                return int(fd)
            err = ctypes.get_errno()
            # EAGAIN: the kernel saw a concurrent rename and refuses to guess; retry.
            if err not in (errno.EINTR, errno.EAGAIN):
                break
        raise OSError(err, os.strerror(err))


def _renameat2_noreplace(src_fd: int, src: bytes, dst_fd: int, dst: bytes) -> bool:
    """True when done; False when renameat2 is unavailable here."""
    func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if func is None:
        return False
    if func(src_fd, ctypes.c_char_p(src), dst_fd, ctypes.c_char_p(dst), ctypes.c_uint(_RENAME_NOREPLACE)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False  # EINVAL: the file system may not support the flag; the caller re-checks
    raise OSError(err, os.strerror(err))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


_RMTREE_BATCH = 256  # subdirectory names remembered per level while removing; the rest are found by a rescan


class _Tree:
    """A depth-first position in a guest-made tree holding one directory fd (T-DOS-1).

    Only the current directory is open; the way back is a list of the
    ancestors' (st_dev, st_ino). Going up opens ``..`` and checks it is the
    directory we came down from, so a tree of any depth or width costs no
    Python stack and at most two descriptors (three while a scandir runs).
    A directory moved elsewhere meanwhile fails the check: the walk stops
    with ESTALE rather than continue somewhere it did not mean to be.
    """

    def __init__(self, fd: int, dev: int) -> None:
        self.fd = fd  # owned
        self.dev = dev
        self._up: list[tuple[bytes, tuple[int, int]]] = []  # (name of the level below, identity of its parent)

    def down(self, name: bytes) -> bool:
        """Enter subdirectory ``name``; False if it is gone or is no longer a directory."""
        here = os.fstat(self.fd)
        try:
            fd = os.open(name, _DIR_READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False  # removed or swapped for a symlink meanwhile: nothing to follow
            raise
        try:
            if os.fstat(fd).st_dev != self.dev:
                raise OSError(errno.EXDEV, "crosses a mount point")  # T-PATH-2: never walk another mount
        except OSError:
            os.close(fd)
            raise
        self._up.append((name, (here.st_dev, here.st_ino)))
        os.close(self.fd)
        self.fd = fd
        return True

    def up(self) -> bytes:
        """Return to the parent; the name of the directory just left."""
        name, parent_id = self._up[-1]
        fd = os.open(b"..", _DIR_READ_FLAGS, dir_fd=self.fd)
        s = os.fstat(fd)
        if (s.st_dev, s.st_ino) != parent_id:
            os.close(fd)
            raise OSError(errno.ESTALE, "the tree changed during the walk")
        os.close(self.fd)
        self.fd = fd
        self._up.pop()
        return name

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _clear_files(fd: int) -> list[bytes]:
    """Unlink every non-directory in ``fd``; up to _RMTREE_BATCH subdirectory names."""
    subdirs: list[bytes] = []
    with os.scandir(fd) as it:
        for item in it:
            raw = _enc(item.name)
            if item.is_dir(follow_symlinks=False):
                if len(subdirs) < _RMTREE_BATCH:
                    subdirs.append(raw)
                continue
            try:
                os.unlink(raw, dir_fd=fd)  # a symlink is unlinked, never followed (T-PATH-2)
            except FileNotFoundError:
                pass
    return subdirs


def _rmtree_at(parent_fd: int, name: bytes, dev: int) -> None:
    """Remove directory ``name`` under ``parent_fd`` without following any symlink (T-PATH-2).

    Iterative with bounded descriptors (``_Tree``): a 1,200-deep or
    100,000-wide guest tree is removed like any other (T-DOS-1). Memory is at
    most _RMTREE_BATCH names per level; a level is rescanned until empty. A
    mount inside is refused rather than emptied.
    """
    tree = _Tree(os.dup(parent_fd), dev)
    try:
        if not tree.down(name):
            raise OSError(errno.ENOENT, "no such directory")
        pending = [_clear_files(tree.fd)]
        while pending:
            if pending[-1]:
                if tree.down(pending[-1].pop()):
                    pending.append(_clear_files(tree.fd))
                continue
            pending[-1] = _clear_files(tree.fd)  # more than a batch, or made meanwhile
            if pending[-1]:
                continue
            pending.pop()
            os.rmdir(tree.up(), dir_fd=tree.fd)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise _denied("escape") from None
        raise _mapped(exc) from None
    finally:
        tree.close()


def remove_tree(path: str | os.PathLike[str]) -> bool:
    """Remove a host-side directory the guest could fill (a run's scratch volume,
    a worker's pool directory): iterative, bounded, no symlink followed
    (T-DOS-1, T-PATH-2). False if it did not exist; ConfinementError otherwise."""
    full = os.path.abspath(os.fspath(path))
    parent, leaf = os.path.split(full)
    if not leaf:
        raise ConfinementError("invalid", "refusing to remove a root directory")
    try:
        pfd = os.open(parent, _DIR_READ_FLAGS)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _mapped(exc) from None
    try:
        s = os.stat(_enc(leaf), dir_fd=pfd, follow_symlinks=False)
        if not st.S_ISDIR(s.st_mode):
            os.unlink(_enc(leaf), dir_fd=pfd)
            return True
        _rmtree_at(pfd, _enc(leaf), s.st_dev)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _mapped(exc) from None
    finally:
        os.close(pfd)


@dataclass(frozen=True)
class Usage:
    """What a volume holds: bytes of regular files (each inode once) and
    entries (every name: files, directories, links; each costs an inode).
    ``complete`` is False when the walk stopped at its entry bound: the true
    figures are higher, and the caller must treat the volume as over its
    file limit (T-DISK-1)."""

    bytes: int
    entries: int
    complete: bool = True


class Volume:
    """One cell volume, reached only through a directory fd of its root.

    ``Volume(path)`` opens ``path`` with O_NOFOLLOW on its last component only;
    callers holding ids should prefer ``open_volume``, which walks
    ``volumes_root/tenant/cell`` one no-follow step at a time.
    """

    def __init__(self, root: str | os.PathLike[str], *, resolver: Literal["auto", "openat2", "walk"] = "auto",
                 max_file_bytes: int | None = None) -> None:
        path = os.fspath(root)
        if not os.path.isabs(path):
            raise ValueError("volume root must be an absolute path")
        self._setup(os.open(path, _DIR_READ_FLAGS), resolver, max_file_bytes)

    @classmethod
    def from_fd(cls, fd: int, *, resolver: Literal["auto", "openat2", "walk"] = "auto",
                max_file_bytes: int | None = None) -> Volume:
        """Adopt (and later close) an open directory fd of a volume root."""
        self = cls.__new__(cls)
        self._setup(fd, resolver, max_file_bytes)
        return self

    def _setup(self, fd: int, resolver: str, max_file_bytes: int | None) -> None:
        self._fd = fd
        s = os.fstat(fd)
        # T-TENANT-1: a volume owned by another uid is not one we created.
        if not st.S_ISDIR(s.st_mode) or (hasattr(os, "geteuid") and s.st_uid != os.geteuid()):
            self.close()
            raise _denied("not_owned")
        self._dev = s.st_dev
        self.max_file_bytes = max_file_bytes
        self._openat2: _Openat2 | None = None
        if resolver != "walk" and sys.platform == "linux":
            try:
                probe = _Openat2()
                os.close(probe(fd, b".", _DIR_PATH_FLAGS))
                self._openat2 = probe
            except (OSError, AttributeError):
                pass  # ENOSYS, seccomp EPERM, old kernel: use the walker
        if resolver == "openat2" and self._openat2 is None:
            self.close()
            raise OSError(errno.ENOSYS, "openat2 is not available")
        self.resolver = "openat2" if self._openat2 is not None else "walk"

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- resolution ---------------------------------------------------------

    def _parse(self, path: str, *, allow_root: bool = False) -> GuestPath:
        try:
            return parse_guest_path(path, allow_data_prefix=True, allow_root=allow_root)
        except PathRejected as exc:
            raise BadPath(exc) from None

    def _root(self) -> int:
        if self._fd < 0:
            raise ConfinementError("io", "volume is closed")
        return self._fd

    def _open(self, comps: tuple[str, ...], flags: int) -> int:
        """Open ``comps`` beneath the root; raises OSError."""
        root = self._root()
        rel = _enc("/".join(comps) or ".")
        if self._openat2 is not None and len(rel) <= _OPENAT2_MAX_PATH:
            return self._openat2(root, rel, flags)
        # No openat2, or a tree deeper than PATH_MAX (only host walkers get
        # there: guest strings stop at 4096 bytes): the no-follow walk.
        return self._walk(comps, flags)

    def _walk(self, comps: tuple[str, ...], flags: int) -> int:
        """Fallback resolver: one O_NOFOLLOW openat per component (T-PATH-2).

        Holds at most two descriptors whatever the depth: each step closes the
        directory it came from (a 1,200-deep guest tree must not exhaust fds).
        """
        cur = -1  # -1: still at the root fd, which is not ours to close
        try:
            for name in comps[:-1]:
                nxt = os.open(_enc(name), _DIR_PATH_FLAGS, dir_fd=self._root() if cur < 0 else cur)
                if cur >= 0:
                    os.close(cur)
                cur = nxt
                self._same_dev(cur)
            fd = os.open(_enc(comps[-1]) if comps else b".", flags | os.O_NOFOLLOW,
                         dir_fd=self._root() if cur < 0 else cur)
            try:
                self._same_dev(fd)
            except OSError:
                os.close(fd)
                raise
            return fd
        finally:
            if cur >= 0:
                os.close(cur)

    def _same_dev(self, fd: int) -> None:
        if os.fstat(fd).st_dev != self._dev:  # T-PATH-2: a mount inside the volume
            raise OSError(errno.EXDEV, "crosses a mount point")

    def _open_checked(self, comps: tuple[str, ...], flags: int, *,
                      dir_only: bool = False) -> tuple[int, os.stat_result]:
        """Open and fstat; only a single-link regular file or a directory survives (T-PATH-1).

        ``dir_only`` (the path ended in "/" or "/."): only a directory survives.
        The check is on the opened fd, so it holds for both resolvers and no
        rename between lookup and check can slip a file through.
        """
        try:
            fd = self._open(comps, flags)
        except OSError as exc:
            raise self._explain(comps, exc) from None
        try:
            s = os.fstat(fd)
            if _kind(s) != "dir" and dir_only:
                raise _trailing_slash()  # T-PATH-1: "notes.txt/" is never the file
            return fd, s
        except BaseException:
            os.close(fd)
            raise

    def _explain(self, comps: tuple[str, ...], exc: OSError) -> ConfinementError:
        # O_NOFOLLOW|O_DIRECTORY on a symlink reports ENOTDIR; say "denied" instead.
        if exc.errno == errno.ENOTDIR:
            for i in range(1, len(comps) + 1):
                try:
                    if st.S_ISLNK(self._lstat(comps[:i]).st_mode):
                        return _denied("symlink")
                except (OSError, ConfinementError):
                    break
        return _mapped(exc)

    def _lstat(self, comps: tuple[str, ...]) -> os.stat_result:
        parent = self._open_parent(comps)
        try:
            return os.stat(_enc(comps[-1]), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    def _open_parent(self, comps: tuple[str, ...], *, create: bool = False) -> int:
        """An O_PATH fd of the leaf's directory, resolved (or made) confined."""
        if not create:
            fd, _ = self._open_checked(comps[:-1], _DIR_PATH_FLAGS)
            return fd
        cur = os.dup(self._root())
        try:
            for name in comps[:-1]:
                try:
                    os.mkdir(_enc(name), 0o700, dir_fd=cur)
                except FileExistsError:
                    pass  # whatever is there is checked by the O_NOFOLLOW open below
                nxt = os.open(_enc(name), _DIR_PATH_FLAGS, dir_fd=cur)
                os.close(cur)
                cur = nxt
                self._same_dev(cur)
            return cur
        except OSError as exc:
            os.close(cur)
            raise self._explain(comps[:-1], exc) from None

    # -- the same opener for trusted host walkers (incident snapshot) ----------

    def open_dir_fd(self, names: tuple[str, ...]) -> int:
        """A read fd of the directory ``names`` (entries read from this volume, not a guest string).

        Resolved like every guest path: beneath the root, no symlink anywhere,
        same mount (T-PATH-1/2). The caller closes it.
        """
        fd, s = self._open_checked(_host_names(names), _DIR_READ_FLAGS)
        if not st.S_ISDIR(s.st_mode):
            os.close(fd)
            raise ConfinementError("not_a_directory", "not a directory")
        return fd

    def open_file_fd(self, names: tuple[str, ...]) -> tuple[int, os.stat_result]:
        """A read-only fd and its fstat for the single-link regular file ``names``.

        The guest may swap the name for a symlink, FIFO or hard link at any
        moment; whatever the fd ends up naming was checked on the fd itself
        (T-PATH-2). The caller closes it.
        """
        fd, s = self._open_checked(_host_names(names), os.O_RDONLY | _SAFE)
        if st.S_ISDIR(s.st_mode):
            os.close(fd)
            raise ConfinementError("is_a_directory", "is a directory")
        return fd, s

    # -- operations ---------------------------------------------------------

    def read_at(self, path: str, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of a regular file from ``offset`` (b"" past EOF), read-only."""
        if offset < 0 or max_bytes < 0:
            raise ConfinementError("invalid", "negative offset or length")
        guest = self._parse(path)  # T-PRO-1 / T-PATH-1: "model.bin/" is not_a_directory, never the file
        fd, s = self._open_checked(guest.components, os.O_RDONLY | _SAFE, dir_only=guest.dir_only)  # never a write flag
        try:
            if st.S_ISDIR(s.st_mode):
                raise ConfinementError("is_a_directory", "is a directory")
            if offset >= s.st_size or max_bytes == 0:
                return b""  # also keeps absurd offsets (up to 2**63-1) away from pread
            want = min(max_bytes, s.st_size - offset)
            chunks: list[bytes] = []
            while want > 0:
                chunk = os.pread(fd, min(want, _CHUNK), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                want -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise _mapped(exc) from None
        finally:
            os.close(fd)

    def read_bytes(self, path: str, max_bytes: int) -> bytes:
        """The first ``max_bytes`` bytes of a regular file (less at EOF)."""
        guest = self._parse(path)
        if max_bytes < 0:
            raise ConfinementError("invalid", "max_bytes must not be negative")
        fd, s = self._open_checked(guest.components, os.O_RDONLY | _SAFE, dir_only=guest.dir_only)
        try:
            if st.S_ISDIR(s.st_mode):
                raise ConfinementError("is_a_directory", "is a directory")
            chunks: list[bytes] = []
            left = max_bytes
            while left > 0:
                chunk = os.read(fd, min(left, _CHUNK))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise _mapped(exc) from None
        finally:
            os.close(fd)

    def write_bytes(self, path: str, data: bytes, *, make_parents: bool = False) -> int:
        """Replace (or create) a file atomically; returns ``len(data)``."""
        guest = self._parse(path)
        comps = guest.components
        if guest.dir_only:
            self._refuse_dir_form_write(comps)
        if self.max_file_bytes is not None and len(data) > self.max_file_bytes:
            raise ConfinementError("too_large", "file is larger than the limit")
        parent = self._open_parent(comps, create=make_parents)
        leaf, tmp = _enc(comps[-1]), b""
        try:
            try:
                old = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if st.S_ISDIR(old.st_mode):
                    raise ConfinementError("is_a_directory", "is a directory")
                _kind(old)  # T-PATH-1/2: never write "through" a symlink, FIFO or hard link
            for _ in range(8):
                tmp = _enc(_TMP_PREFIX + secrets.token_hex(8))
                try:
                    # O_EXCL|O_NOFOLLOW: a planted name (even a dangling symlink) fails, never redirects.
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE, 0o600, dir_fd=parent)
                    break
                except FileExistsError:
                    tmp = b""
            else:
                raise ConfinementError("io", "could not create a temporary file")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            # rename replaces a name, never follows it: a leaf swapped for a symlink meanwhile is replaced.
            os.rename(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
            tmp = b""
            return len(data)
        except OSError as exc:
            raise _mapped(exc) from None
        finally:
            if tmp:
                try:
                    os.unlink(tmp, dir_fd=parent)
                except OSError:
                    pass
            os.close(parent)

    def _refuse_dir_form_write(self, comps: tuple[str, ...]) -> None:
        """A write names a file, so "x/" is always refused, before anything is created (T-PATH-1).

        An existing directory answers ``is_a_directory`` (as without the slash);
        a file or nothing answers ``trailing_slash``; a symlink stays ``denied``.
        """
        try:
            fd, _ = self._open_checked(comps, _PATH_FLAGS, dir_only=True)
        except ConfinementError as exc:
            if exc.code != "not_found":
                raise
            raise _trailing_slash() from None
        os.close(fd)
        raise ConfinementError("is_a_directory", "is a directory")

    def stat(self, path: str) -> Entry:
        guest = self._parse(path, allow_root=True)
        fd, s = self._open_checked(guest.components, _PATH_FLAGS, dir_only=guest.dir_only)
        os.close(fd)
        return _entry(guest.components, s)

    def exists(self, path: str) -> bool:
        """False for missing names and for what the guest may not see; bad syntax raises BadPath."""
        try:
            self.stat(path)
            return True
        except BadPath:
            raise
        except ConfinementError as exc:
            if exc.code == "io":
                raise
            return False

    def list_dir(self, path: str = "") -> list[Entry]:
        guest = self._parse(path, allow_root=True)
        comps = guest.components
        fd, s = self._open_checked(comps, _DIR_READ_FLAGS, dir_only=guest.dir_only)
        try:
            if not st.S_ISDIR(s.st_mode):
                raise ConfinementError("not_a_directory", "not a directory")
            out: list[Entry] = []
            with os.scandir(fd) as it:
                for item in it:
                    try:
                        if split_guest_path(item.name) != (item.name,) or item.name.startswith(_TMP_PREFIX):
                            continue
                        es = item.stat(follow_symlinks=False)
                        if es.st_dev == self._dev:
                            out.append(_entry((*comps, item.name), es))
                    except (PathRejected, ConfinementError, OSError):
                        continue  # T-PATH-1: symlinks, specials, odd names stay invisible
            return sorted(out, key=lambda e: e.name)
        except OSError as exc:
            raise _mapped(exc) from None
        finally:
            os.close(fd)

    def make_dir(self, path: str, parents: bool = True) -> Entry:
        comps = self._parse(path).components  # "dir/" is the ordinary form here
        if parents:
            os.close(self._open_parent((*comps, "x"), create=True))
        else:
            parent = self._open_parent(comps)
            try:
                os.mkdir(_enc(comps[-1]), 0o700, dir_fd=parent)
            except OSError as exc:
                raise _mapped(exc) from None
            finally:
                os.close(parent)
        return self.stat(path)

    def remove(self, path: str, recursive: bool = False) -> None:
        """Unlink a file (or a stray symlink itself); remove a directory, recursively if asked."""
        guest = self._parse(path)
        comps = guest.components
        parent = self._open_parent(comps)
        leaf = _enc(comps[-1])
        try:
            if guest.dir_only and not st.S_ISDIR(os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode):
                raise _trailing_slash()  # T-PATH-1: "notes.txt/" never unlinks the file
            if not st.S_ISDIR(os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode):
                os.unlink(leaf, dir_fd=parent)  # unlink removes the name, never its target
            elif recursive:
                _rmtree_at(parent, leaf, self._dev)
            else:
                os.rmdir(leaf, dir_fd=parent)
        except OSError as exc:
            raise _mapped(exc) from None
        finally:
            os.close(parent)

    def rename(self, old: str, new: str) -> Entry:
        src_path, dst_path = self._parse(old), self._parse(new)
        src, dst = src_path.components, dst_path.components
        src_fd = self._open_parent(src)
        try:
            dst_fd = self._open_parent(dst)
        except BaseException:
            os.close(src_fd)
            raise
        try:
            kind = _kind(os.stat(_enc(src[-1]), dir_fd=src_fd, follow_symlinks=False))  # T-PATH-1
            if not (src_path.admits(kind == "dir") and dst_path.admits(kind == "dir")):
                raise _trailing_slash()  # T-PATH-1: "a.txt/" never names the file a.txt
            if not _renameat2_noreplace(src_fd, _enc(src[-1]), dst_fd, _enc(dst[-1])):
                # No RENAME_NOREPLACE here: check, then rename. Both names are confined,
                # so the window can only replace a name inside this volume.
                try:
                    os.stat(_enc(dst[-1]), dir_fd=dst_fd, follow_symlinks=False)
                    raise ConfinementError("exists", "target exists")
                except FileNotFoundError:
                    os.rename(_enc(src[-1]), _enc(dst[-1]), src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            raise _mapped(exc) from None
        finally:
            _close_all([src_fd, dst_fd])
        return self.stat(new)

    def usage(self, max_entries: int | None = None) -> Usage:
        """Bytes and entries under the root (T-DISK-1); symlinks and mounts not followed.

        Bounded descriptors (``_Tree``), so thousands of sibling directories
        cannot make a subtree vanish from the count on EMFILE; any walk error
        raises (the caller counts the volume as over quota, never as empty).
        Stops once more than ``max_entries`` entries were seen (``complete``
        False). A directory moved during the walk restarts it (three tries).
        """
        for attempt in range(3):
            try:
                return self._usage(max_entries)
            except OSError as exc:
                if exc.errno != errno.ESTALE or attempt == 2:
                    raise _mapped(exc) from None
        raise AssertionError("unreachable")

    def _usage(self, max_entries: int | None) -> Usage:
        total, entries = 0, 0
        linked: set[tuple[int, int]] = set()  # hard-linked inodes already counted
        limit = max_entries if max_entries is not None else -1

        def scan(fd: int) -> list[bytes] | None:
            nonlocal total, entries
            subdirs: list[bytes] = []
            with os.scandir(fd) as it:
                for item in it:
                    entries += 1
                    if 0 <= limit < entries:
                        return None
                    s = item.stat(follow_symlinks=False)
                    if st.S_ISREG(s.st_mode):
                        if s.st_nlink > 1:
                            if (s.st_dev, s.st_ino) in linked:
                                continue
                            linked.add((s.st_dev, s.st_ino))
                        total += s.st_size
                    elif st.S_ISDIR(s.st_mode) and s.st_dev == self._dev:
                        subdirs.append(_enc(item.name))
            return subdirs

        tree = _Tree(os.open(b".", _DIR_READ_FLAGS, dir_fd=self._root()), self._dev)
        try:
            first = scan(tree.fd)
            if first is None:
                return Usage(total, entries, complete=False)
            pending = [first]
            while pending:
                if not pending[-1]:
                    pending.pop()
                    if pending:
                        tree.up()
                    continue
                if tree.down(pending[-1].pop()):
                    found = scan(tree.fd)
                    if found is None:
                        return Usage(total, entries, complete=False)
                    pending.append(found)
            return Usage(total, entries)
        finally:
            tree.close()

    def usage_bytes(self) -> int:
        """Total size of the regular files, each inode once (see ``usage``)."""
        return self.usage().bytes


def copy_volume(src: Volume, dst: Volume, max_bytes: int, max_entries: int) -> Usage:
    """Copy the directories and single-link regular files of ``src`` into the
    empty ``dst`` (a forked cell's volume); symlinks, special files, hard
    links and other mounts are left out, as ``list_dir`` leaves them out.

    Iterative with bounded descriptors (two ``_Tree`` walks in step, plus one
    file pair and a scandir), so any depth or width costs no Python stack
    (T-DOS-1); every name is created with ``O_EXCL``/``mkdir`` under a
    directory fd of ``dst``, never through a path (T-PATH-2). Raises
    ``too_large`` past ``max_bytes`` or ``max_entries`` (the tenant's quota,
    T-DISK-1); any walk error raises. Returns what was copied."""
    total, entries = 0, 0

    def copy_level(sfd: int, dfd: int) -> list[bytes]:
        nonlocal total, entries
        subdirs: list[bytes] = []
        with os.scandir(sfd) as it:
            for item in it:
                raw = _enc(item.name)
                if raw.startswith(_enc(_TMP_PREFIX)):
                    continue  # a write in progress, not a file
                s = item.stat(follow_symlinks=False)
                if st.S_ISDIR(s.st_mode):
                    if s.st_dev != src._dev:
                        continue
                    entries += 1
                    if entries > max_entries:
                        raise ConfinementError("too_large", "the copy would cross the tenant's file limit")
                    os.mkdir(raw, 0o700, dir_fd=dfd)
                    subdirs.append(raw)
                elif st.S_ISREG(s.st_mode) and s.st_nlink == 1:
                    entries += 1
                    if entries > max_entries or total + s.st_size > max_bytes:
                        raise ConfinementError("too_large", "the copy would cross the tenant's disk quota")
                    total += _copy_file(sfd, dfd, raw, max_bytes - total)
        return subdirs

    stree = _Tree(os.open(b".", _DIR_READ_FLAGS, dir_fd=src._root()), src._dev)
    dtree = _Tree(os.open(b".", _DIR_READ_FLAGS, dir_fd=dst._root()), dst._dev)
    try:
        pending = [copy_level(stree.fd, dtree.fd)]
        while pending:
            if not pending[-1]:
                pending.pop()
                if pending:
                    stree.up()
                    dtree.up()
                continue
            name = pending[-1].pop()
            if not stree.down(name):
                continue  # gone meanwhile: its empty copy stays
            if not dtree.down(name):
                stree.up()
                raise OSError(errno.ESTALE, "the copy's own directory vanished")
            pending.append(copy_level(stree.fd, dtree.fd))
        return Usage(total, entries)
    except OSError as exc:
        raise _mapped(exc) from None
    finally:
        stree.close()
        dtree.close()


def _copy_file(sfd: int, dfd: int, name: bytes, budget: int) -> int:
    """One regular file, checked on its own fd (T-PATH-2); at most ``budget`` bytes."""
    fd = os.open(name, os.O_RDONLY | _SAFE, dir_fd=sfd)
    out = -1
    try:
        s = os.fstat(fd)
        if not st.S_ISREG(s.st_mode) or s.st_nlink != 1:
            return 0  # swapped meanwhile: left out like any special file
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE, 0o600, dir_fd=dfd)
        done = 0
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                return done
            done += len(chunk)
            if done > budget:
                raise ConfinementError("too_large", "the copy would cross the tenant's disk quota")
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    finally:
        os.close(fd)
        if out >= 0:
            os.close(out)


def _host_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Names a host walker read from a directory: one component each, never "." or ".." (T-PATH-1)."""
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\x00" in name:
            raise ConfinementError("invalid", "not a directory entry name", reason="bad_name")
    return tuple(names)


def _check_id(kind: str, value: str) -> None:
    # T-TENANT-1: ids become one path component each; nothing else may get in.
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ConfinementError("invalid", f"bad {kind} id", reason="bad_id")


def _owned_dir_at(parent_fd: int, name: str, *, create: bool) -> int:
    """Open (or make, 0700) one directory under ``parent_fd`` without following symlinks."""
    raw = _enc(name)
    try:
        if create:
            try:
                os.mkdir(raw, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                pass
        fd = os.open(raw, _DIR_READ_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise (_denied("symlink") if exc.errno in (errno.ENOTDIR, errno.ELOOP) else _mapped(exc)) from None
    s = os.fstat(fd)
    if s.st_uid != os.geteuid() or s.st_dev != os.fstat(parent_fd).st_dev:
        os.close(fd)
        raise _denied("not_owned")  # T-TENANT-1: someone else's directory, or a mount
    if create and st.S_IMODE(s.st_mode) != 0o700:
        os.fchmod(fd, 0o700)  # tenant data is private to the appliance's uid
    return fd


def _open_volumes_root(volumes_root: Path, *, create: bool) -> int:
    if create:
        os.makedirs(volumes_root, mode=0o700, exist_ok=True)
    fd = os.open(volumes_root, _DIR_READ_FLAGS)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise _denied("not_owned")
    return fd


def create_volume(volumes_root: Path, tenant_id: str, cell_id: str) -> Path:
    """Make ``volumes_root/tenant/cell`` (0700 each) with fd-relative, no-follow steps."""
    _check_id("tenant", tenant_id)
    _check_id("cell", cell_id)
    fds = [_open_volumes_root(volumes_root, create=True)]
    try:
        fds.append(_owned_dir_at(fds[-1], tenant_id, create=True))
        fds.append(_owned_dir_at(fds[-1], cell_id, create=True))
    finally:
        _close_all(fds)
    return Path(volumes_root) / tenant_id / cell_id


def open_volume(volumes_root: Path, tenant_id: str, cell_id: str, *,
                resolver: Literal["auto", "openat2", "walk"] = "auto", max_file_bytes: int | None = None) -> Volume:
    """Open an existing volume through the same no-follow walk (a symlinked tenant dir is refused)."""
    _check_id("tenant", tenant_id)
    _check_id("cell", cell_id)
    root = _open_volumes_root(volumes_root, create=False)
    try:
        tenant = _owned_dir_at(root, tenant_id, create=False)
    finally:
        os.close(root)
    try:
        cell = _owned_dir_at(tenant, cell_id, create=False)
    finally:
        os.close(tenant)
    return Volume.from_fd(cell, resolver=resolver, max_file_bytes=max_file_bytes)


def _open_tenant_dir(tenant_dir: Path, *, create: bool) -> int:
    """Open ``<root>/<tenant>`` by its own path, never its parent: a worker bound
    to one tenant (T-TENANT-1) may not read the directory that lists every
    tenant. The tenant component is checked and not followed if a symlink."""
    _check_id("tenant", tenant_dir.name)
    try:
        if create:
            try:
                os.mkdir(tenant_dir, 0o700)
            except FileExistsError:
                pass
            except FileNotFoundError:
                os.makedirs(tenant_dir.parent, mode=0o700, exist_ok=True)
                os.makedirs(tenant_dir, mode=0o700, exist_ok=True)
        fd = os.open(tenant_dir, _DIR_READ_FLAGS)
    except OSError as exc:
        raise (_denied("symlink") if exc.errno in (errno.ENOTDIR, errno.ELOOP) else _mapped(exc)) from None
    s = os.fstat(fd)
    try:
        parent_dev = os.stat(tenant_dir.parent).st_dev
    except OSError:
        parent_dev = -1
    if s.st_uid != os.geteuid() or s.st_dev != parent_dev:
        os.close(fd)
        raise _denied("not_owned")
    return fd


def create_volume_in(tenant_dir: Path, cell_id: str) -> Path:
    """:func:`create_volume` below a tenant directory opened by its own path (see _open_tenant_dir)."""
    _check_id("cell", cell_id)
    fds = [_open_tenant_dir(Path(tenant_dir), create=True)]
    try:
        fds.append(_owned_dir_at(fds[-1], cell_id, create=True))
    finally:
        _close_all(fds)
    return Path(tenant_dir) / cell_id


def open_volume_in(tenant_dir: Path, cell_id: str, *, max_file_bytes: int | None = None) -> Volume:
    """:func:`open_volume` below a tenant directory opened by its own path."""
    _check_id("cell", cell_id)
    tenant = _open_tenant_dir(Path(tenant_dir), create=False)
    try:
        cell = _owned_dir_at(tenant, cell_id, create=False)
    finally:
        os.close(tenant)
    return Volume.from_fd(cell, max_file_bytes=max_file_bytes)


def _remove_cell_dir(tenant: int, cell_id: str) -> bool:
    """Remove the cell's directory below the open ``tenant`` descriptor (closed
    here) without following links; False if it did not exist."""
    try:
        s = os.stat(_enc(cell_id), dir_fd=tenant, follow_symlinks=False)
        if not st.S_ISDIR(s.st_mode):
            raise _denied("symlink" if st.S_ISLNK(s.st_mode) else "special_file")
        dev = os.fstat(tenant).st_dev
        if s.st_dev != dev or not _rmdir_if_empty(tenant, _enc(cell_id)):
            _rmtree_at(tenant, _enc(cell_id), dev)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(tenant)


def _rmdir_if_empty(parent_fd: int, name: bytes) -> bool:
    """Remove directory ``name`` under ``parent_fd`` if it is empty (most
    deleted cells' volume and /tmp are): one rmdir, which follows no link and
    refuses a mount point, instead of the walk. False when it is not empty or
    the rmdir failed otherwise (the walk then decides); FileNotFoundError
    when it is gone."""
    try:
        os.rmdir(name, dir_fd=parent_fd)
        return True
    except FileNotFoundError:
        raise
    except OSError:
        return False


def remove_volume_in(tenant_dir: Path, cell_id: str) -> bool:
    """:func:`remove_volume` below a tenant directory opened by its own path."""
    _check_id("cell", cell_id)
    try:
        tenant = _open_tenant_dir(Path(tenant_dir), create=False)
    except ConfinementError as exc:
        if exc.code == "not_found":
            return False
        raise
    return _remove_cell_dir(tenant, cell_id)


def remove_volume(volumes_root: Path, tenant_id: str, cell_id: str) -> bool:
    """Delete a cell's volume without following symlinks; False if it did not exist."""
    _check_id("tenant", tenant_id)
    _check_id("cell", cell_id)
    root = _open_volumes_root(volumes_root, create=False)
    try:
        tenant = _owned_dir_at(root, tenant_id, create=False)
    except ConfinementError as exc:
        if exc.code == "not_found":
            return False
        raise
    finally:
        os.close(root)
    return _remove_cell_dir(tenant, cell_id)
