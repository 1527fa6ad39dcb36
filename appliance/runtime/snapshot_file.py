"""A captured cell state on disk (threat T-IMAGE-2): the file format of cell snapshots.

A snapshot holds what ``guest_state.capture`` returns (linear memory and the
mutable globals) plus the key of the image it was taken from. Restoring one
puts its bytes into a fresh guest's memory, so a file that was changed on disk
must never be restored: it could hand one tenant another's interpreter, or
plant state in a cell. So every file carries a MAC under a key that is kept
outside the snapshot directory (the caller holds it), bound to the tenant and
cell it belongs to, over every byte of the file; it is checked on the bytes
read from one descriptor (opened without following links, a regular file of
ours, not larger than the cap) before anything in it is parsed. A file copied
to another cell or tenant, truncated, extended or edited is refused with
``SnapshotRefused``, whose message says which.

Layout: ``MAGIC``, a 16-byte random nonce, a 4-byte big-endian header length,
the header (ASCII JSON: image key, memory size, globals, runs), the non-zero
runs of memory in order, then the 16-byte tag: a Poly1305 under a key made
for this file alone (an HMAC-SHA256 of the tenant's key over the tenant, the
cell and the nonce; a Poly1305 key must never serve two messages, and the
nonce is fresh for every file written). Poly1305 runs at several GB/s here,
HMAC-SHA256 at about 1.5: most of a resume's cost was the MAC. Version 1
files (``MAGIC_V1``, no nonce, a 32-byte HMAC-SHA256 tag) are still read.
Zero runs are left out, as in an image.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import json
import mmap
import os
import stat
import threading
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives.poly1305 import Poly1305

from appliance import fileio
from appliance.fileio import write_atomic
from appliance.runtime import wasmimage
from appliance.runtime.guest_state import DIFF_PAGE, AnyState, Buffer, GuestState, StateDiff

MAGIC = b"CELLSNAP2\n"  # what write() writes: a nonce follows, the tag is a Poly1305 (below)
MAGIC_V1 = b"CELLSNAP1\n"  # files written before: HMAC-SHA256 tag; still read
NONCE_BYTES = 16
TAG_BYTES = 16
MAC_BYTES = 32  # the tag of a version 1 file
HEAD = len(MAGIC) + NONCE_BYTES  # enough of a file's start to know its MAC (both magics are as long)
MAX_HEADER = 1 << 20


class SnapshotRefused(Exception):
    """The file is not a snapshot this node wrote for this cell: never restored."""


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
PIECE = 1 << 20  # written a piece at a time


def _mac(key: bytes, tenant_id: str, cell_id: str) -> "hmac.HMAC":
    """The MAC of a snapshot, bound to its tenant and cell; the file's bytes are fed to it."""
    bound = json.dumps([tenant_id, cell_id]).encode()
    return hmac.new(key, len(bound).to_bytes(4, "big") + bound, hashlib.sha256)


def _one_time_key(key: bytes, tenant_id: str, cell_id: str, nonce: bytes) -> bytes:
    """The Poly1305 key of one version 2 file: from the tenant's key, its
    tenant and cell, and the file's own random nonce (so no two files written
    share one: Poly1305 keys are good for one message only)."""
    bound = json.dumps([tenant_id, cell_id]).encode()
    return hmac.new(key, b"cell-snapshot-poly1305-v2\x00" + len(bound).to_bytes(4, "big") + bound + nonce,
                    hashlib.sha256).digest()


class _Mac:
    """The integrity check of one file, chosen by its first ``HEAD`` bytes:
    version 2, a Poly1305 under a key of this file alone (its nonce); version
    1, the HMAC-SHA256 of ``_mac``. Either covers every byte but the tag,
    and binds the file to its tenant and cell. Anything else is refused."""

    def __init__(self, key: bytes, tenant_id: str, cell_id: str, head: Buffer) -> None:
        head = bytes(head[:HEAD])
        self._hmac: hmac.HMAC | None = None
        self._poly: Poly1305 | None = None
        if len(head) == HEAD and head.startswith(MAGIC):
            self.start, self.tag_bytes = HEAD, TAG_BYTES
            self._poly = Poly1305(_one_time_key(key, tenant_id, cell_id, head[len(MAGIC):]))
        elif head.startswith(MAGIC_V1):
            self.start, self.tag_bytes = len(MAGIC_V1), MAC_BYTES
            self._hmac = _mac(key, tenant_id, cell_id)
        else:
            raise SnapshotRefused("not a cell snapshot")

    def update(self, data: Buffer) -> None:
        if self._poly is not None:
            self._poly.update(data)
        elif self._hmac is not None:
            self._hmac.update(data)

    def digest(self) -> bytes:
        if self._poly is not None:
            return self._poly.finalize()
        assert self._hmac is not None
        return self._hmac.digest()


def _layout(state: AnyState, image_key: str, prefix: bytes) -> list[Buffer]:
    """The file's bytes but the MAC, as parts (the runs' bytes are not copied).
    A ``StateDiff`` is written with ``"base": "image"``: its runs are the pages
    that differ from a fresh instance of the image, not the non-zero ones."""
    fields: dict[str, object] = {"image": image_key, "globals": {str(k): v for k, v in sorted(state.globals.items())}}
    parts: list[Buffer]
    if isinstance(state, StateDiff):
        fields.update(memory=state.size, base="image",
                      runs=[[a, a + memoryview(d).nbytes] for a, d in state.runs])
        parts = [d for _, d in state.runs]
    else:
        runs = wasmimage.data_segments(state.memory)
        view = memoryview(state.memory)
        fields.update(memory=len(state.memory), runs=runs)
        parts = [view[a:b] for a, b in runs]
    header = json.dumps(fields, sort_keys=True).encode("ascii")
    if isinstance(state, StateDiff):
        # JSON's trailing spaces, so that the runs (whole pages) start at page
        # offsets of the file: read() can then move them into a guest uncopied.
        padded = header + b" " * (-(len(prefix) + 4 + len(header)) % DIFF_PAGE)
        header = padded if len(padded) <= MAX_HEADER else header
    return [prefix + len(header).to_bytes(4, "big") + header, *parts]


def _prefix(version: int) -> bytes:
    """A new file's first bytes: the magic, and in version 2 a fresh random nonce."""
    return MAGIC + os.urandom(NONCE_BYTES) if version == 2 else MAGIC_V1


def encode(state: AnyState, image_key: str, tenant_id: str, cell_id: str, key: bytes, *, version: int = 2) -> bytes:
    """The file's bytes (``write`` writes the same, without joining them).
    ``version=1``: as written before version 2 (read() still takes those)."""
    parts = _layout(state, image_key, _prefix(version))
    body = b"".join(parts)
    mac = _Mac(key, tenant_id, cell_id, body)
    mac.update(body)
    return body + mac.digest()


def write(path: Path, state: AnyState, image_key: str, tenant_id: str, cell_id: str, key: bytes) -> int:
    """Write the snapshot (0600, atomically); its size in bytes (for the tenant's quota).
    The runs' bytes go from where they lie (a live memory, between runs) to the file."""
    parts = _layout(state, image_key, _prefix(2))
    mac = _Mac(key, tenant_id, cell_id, parts[0])
    # The MAC is worked out on another thread while the same bytes are written
    # (the writes let go of the GIL; nothing changes the bytes meanwhile); it goes last.
    def feed() -> None:
        for part in parts:
            mac.update(part)

    hasher = threading.Thread(target=feed, name="snapshot-mac", daemon=True)

    def pieces() -> Iterator[Buffer]:
        for part in parts:
            view = memoryview(part).cast("B")
            for at in range(0, len(view), PIECE):
                yield view[at:at + PIECE]
        hasher.join()
        yield mac.digest()

    hasher.start()
    try:
        _write_atomic_flushing(path, pieces())
    finally:
        hasher.join()
    return sum(memoryview(p).nbytes for p in parts) + TAG_BYTES


_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.restype = ctypes.c_int
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def _kick(fd: int, offset: int, length: int) -> None:
    """Start the disk write of a piece just written (sync_file_range, not
    waited for): the fsync at the end then finds most of the file on disk
    already instead of all of it still to write. A hint only (its failure is
    ignored); the fsync is what makes the file durable."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _write_atomic_flushing(path: Path, pieces: Iterator[Buffer]) -> None:
    """``write_atomic_parts(path, pieces, 0o600)``, each piece's disk write started as it is written."""
    fileio.write_atomic_parts(path, pieces, 0o600, after_part=_kick)


def decode(data: Buffer, tenant_id: str, cell_id: str, key: bytes, max_memory: int) -> tuple[str, AnyState]:
    """(image key, state) of a snapshot, after its MAC is checked; refuses anything else."""
    view = memoryview(data).cast("B")
    mac = _Mac(key, tenant_id, cell_id, view[:HEAD])
    if len(view) >= mac.start + 4 + mac.tag_bytes:
        mac.update(view[:-mac.tag_bytes])
    return _checked(view, mac, max_memory)


def _checked(view: memoryview, mac: _Mac, max_memory: int, movable: bool = False) -> tuple[str, AnyState]:
    """``decode`` once ``mac`` has been fed every byte of ``view`` but its
    tag. The runs of the state are views of ``view`` (no copy);
    ``movable``: ``view`` is a private anonymous mapping of its own (read())."""
    if len(view) < mac.start + 4 + mac.tag_bytes:
        raise SnapshotRefused("not a cell snapshot")
    body = view[:-mac.tag_bytes]
    if not hmac.compare_digest(bytes(view[-mac.tag_bytes:]), mac.digest()):
        raise SnapshotRefused("the snapshot's integrity check failed (changed, truncated, or not this cell's)")
    # From here on the bytes are ours; they are still parsed strictly.
    pos = mac.start
    size = int.from_bytes(body[pos:pos + 4], "big")
    pos += 4
    if size > MAX_HEADER or pos + size > len(body):
        raise SnapshotRefused("snapshot header out of bounds")
    try:
        header = json.loads(bytes(body[pos:pos + size]).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise SnapshotRefused("snapshot header is not JSON") from None
    pos += size
    if not isinstance(header, dict) or not isinstance(header.get("image"), str):
        raise SnapshotRefused("snapshot header is malformed")
    total = header.get("memory")
    if not isinstance(total, int) or total <= 0 or total % wasmimage.PAGE or total > max_memory:
        raise SnapshotRefused("snapshot memory size is not acceptable")
    globals_raw = header.get("globals")
    if not isinstance(globals_raw, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, (int, float)) for k, v in globals_raw.items()):
        raise SnapshotRefused("snapshot globals are malformed")
    base = header.get("base")
    if base not in (None, "image"):
        raise SnapshotRefused("snapshot base is unknown")
    memory = bytearray(total) if base is None else None
    pieces: list[tuple[int, Buffer]] = []
    last = 0
    runs = header.get("runs")
    if not isinstance(runs, list):
        raise SnapshotRefused("snapshot runs are malformed")
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(isinstance(x, int) for x in run)):
            raise SnapshotRefused("snapshot run is malformed")
        a, b = run
        if not last <= a < b <= total or pos + (b - a) > len(body):
            raise SnapshotRefused("snapshot run out of bounds")
        if memory is not None:
            memory[a:b] = body[pos:pos + (b - a)]
        else:
            pieces.append((a, body[pos:pos + (b - a)]))
        pos += b - a
        last = b
    if pos != len(body):
        raise SnapshotRefused("snapshot has trailing bytes")
    values = {int(k): v for k, v in globals_raw.items()}
    if memory is None:
        return header["image"], StateDiff(total, pieces, values, movable)
    return header["image"], GuestState(bytes(memory), values)


def read(path: Path, tenant_id: str, cell_id: str, key: bytes, max_memory: int) -> tuple[str, AnyState]:
    """Read and check a snapshot file: a regular file of ours, no link followed,
    read once into one buffer. Its MAC is fed on a second thread, each piece
    as soon as it has arrived, while the next piece is read; every byte has
    been fed, and the MAC checked, before anything in the file is parsed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO never blocks
    except FileNotFoundError:
        raise  # no capture exists: the caller's answer, not a refusal
    except OSError as e:
        raise SnapshotRefused(f"snapshot cannot be opened safely: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SnapshotRefused("snapshot is not a private regular file of this service")
        cap = max_memory + MAX_HEADER + len(MAGIC) + 4 + MAC_BYTES
        if st.st_size > cap:
            raise SnapshotRefused("snapshot is larger than any this cell could have written")
        if st.st_size < len(MAGIC) + 4 + MAC_BYTES:
            raise SnapshotRefused("not a cell snapshot")
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a hint only (read ahead when not in cache)
        view = _private_buffer(st.st_size)
        mac: _Mac | None = None
        feeder: _Feeder | None = None
        try:
            got = 0
            while got < st.st_size:
                n = os.readv(fd, [view[got:got + READ_PIECE]])
                if n == 0:
                    break
                got += n
                if feeder is None and got >= HEAD:  # the file's first bytes say which MAC it carries
                    mac = _Mac(key, tenant_id, cell_id, view[:HEAD])
                    feeder = _Feeder(mac, view[:max(st.st_size - mac.tag_bytes, 0)])
                if feeder is not None:
                    feeder.advance(got)
            if got != st.st_size or os.read(fd, 1) or mac is None:
                raise SnapshotRefused("snapshot changed while it was read")
        finally:
            if feeder is not None:
                feeder.finish()  # joined on every way out: nothing feeds the MAC after this
    finally:
        os.close(fd)
    return _checked(view, mac, max_memory, movable=True)


READ_PIECE = 4 << 20  # read a piece at a time; the MAC thread takes what has arrived meanwhile


def _private_buffer(size: int) -> memoryview:
    """``size`` bytes of private anonymous memory for a file's bytes. Asked for
    in huge pages where the kernel offers them (one fault per 2 MiB as the read
    fills it, not one per 4 KiB: on this machine that is most of a read's
    cost); else all its pages made in one go."""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        buffer.close()
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    return memoryview(buffer)


class _Feeder:
    """Feeds ``mac`` the bytes of ``body`` on a thread of its own, up to where
    the reader has got (``advance``), while the reader reads on; ``finish``
    waits until every byte the reader reported has been fed (hmac.update lets
    go of the GIL on large buffers, as readv does; Poly1305 is quicker than
    the read, the thread mostly waits). Reader and thread touch
    disjoint parts of the buffer; the lock orders the bytes' arrival before
    their use."""

    def __init__(self, mac: _Mac, body: memoryview) -> None:
        self._mac, self._body = mac, body
        self._ready = threading.Condition()
        self._got, self._done = 0, False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="snapshot-mac", daemon=True)
        self._thread.start()

    def advance(self, got: int) -> None:
        with self._ready:
            self._got = min(got, len(self._body))
            self._ready.notify()

    def finish(self) -> None:
        with self._ready:
            self._done = True
            self._ready.notify()
        self._thread.join()
        if self._error is not None:
            raise SnapshotRefused("the snapshot's integrity check could not be computed") from self._error

    def _run(self) -> None:
        fed = 0
        try:
            while True:
                with self._ready:
                    while self._got == fed and not self._done:
                        self._ready.wait()
                    got, done = self._got, self._done
                if got > fed:
                    self._mac.update(self._body[fed:got])
                    fed = got
                elif done:
                    return
        except BaseException as e:  # reported by finish(): the MAC is then incomplete, the file refused
            self._error = e


# -- where snapshots live, and their keys (T-IMAGE-2) ---------------------------
#
# ``$SYNAPSE_ROOT/snapshots/<tenant>/<cell>``. A worker bound to a tenant may
# write only that tenant's directory (sandbox.narrow_to_tenant) and holds only
# that tenant's key, derived from a node secret kept in ``keys/`` (which no
# worker can read): an escaped guest can at worst forge snapshots of its own
# tenant's cells, never another tenant's.

SECRET_FILE = "snapshot-secret"


def node_secret(keys_dir: Path) -> bytes:
    """The node's snapshot secret (32 random bytes, 0600), made on first use."""
    path = Path(keys_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        write_atomic(path, os.urandom(32), 0o600)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SnapshotRefused(f"{path} is not a private regular file of this service")
        secret = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(secret) != 32:
        raise SnapshotRefused(f"{path} does not hold a 32-byte secret")
    return secret


def tenant_key(secret: bytes, tenant_id: str) -> bytes:
    """The MAC key of one tenant's snapshots."""
    return hmac.new(secret, b"cell-snapshot-tenant-v1\x00" + tenant_id.encode(), hashlib.sha256).digest()


def path_for(snapshots_dir: Path | str, tenant_id: str, cell_id: str) -> Path:
    return Path(snapshots_dir) / tenant_id / cell_id


def _tenant_fd(snapshots_dir: Path | str, tenant_id: str) -> int | None:
    try:
        # os.path.join, not pathlib: this runs once per run (cells.py _with_capture).
        return os.open(os.path.join(snapshots_dir, tenant_id), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None


def size(snapshots_dir: Path | str, tenant_id: str, cell_id: str) -> int:
    """Bytes the cell's snapshot takes on disk (0: none). Whatever sits at the
    name counts, a link or a directory included: unknown is never zero (T-DISK-1)."""
    fd = _tenant_fd(snapshots_dir, tenant_id)
    if fd is None:
        return 0
    try:
        return max(os.stat(cell_id, dir_fd=fd, follow_symlinks=False).st_size, 1)
    except FileNotFoundError:
        return 0
    finally:
        os.close(fd)


def exists(snapshots_dir: Path | str, tenant_id: str, cell_id: str) -> bool:
    return size(snapshots_dir, tenant_id, cell_id) > 0


def remove(snapshots_dir: Path | str, tenant_id: str, cell_id: str) -> bool:
    """Unlink the cell's snapshot (never following a link); False when there was none."""
    fd = _tenant_fd(snapshots_dir, tenant_id)
    if fd is None:
        return False
    try:
        os.unlink(cell_id, dir_fd=fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
