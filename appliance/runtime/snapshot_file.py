"""A captured cell state on disk (threat T-IMAGE-2): the file format of cell snapshots.

A snapshot holds what ``guest_state.capture`` returns (linear memory and the
mutable globals) plus the key of the image it was taken from. Restoring one
puts its bytes into a fresh guest's memory, so a file that was changed on disk
must never be restored: it could hand one tenant another's interpreter, or
plant state in a cell. So every file carries an HMAC-SHA256 under a key that
is kept outside the snapshot directory (the caller holds it), over the tenant
and cell it belongs to and every byte of the file; it is checked on the bytes
read from one descriptor (opened without following links, a regular file of
ours, not larger than the cap) before anything in it is parsed. A file copied
to another cell or tenant, truncated, extended or edited is refused with
``SnapshotRefused``, whose message says which.

Layout: ``MAGIC``, a 4-byte big-endian header length, the header (ASCII JSON:
image key, memory size, globals, runs), the non-zero runs of memory in order,
then the 32-byte MAC. Zero runs are left out, as in an image.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

from appliance.fileio import write_atomic
from appliance.runtime import wasmimage
from appliance.runtime.guest_state import GuestState

MAGIC = b"CELLSNAP1\n"
MAC_BYTES = 32
MAX_HEADER = 1 << 20


class SnapshotRefused(Exception):
    """The file is not a snapshot this node wrote for this cell: never restored."""


def _mac(key: bytes, tenant_id: str, cell_id: str, body: bytes) -> bytes:
    bound = json.dumps([tenant_id, cell_id]).encode()
    m = hmac.new(key, len(bound).to_bytes(4, "big") + bound, hashlib.sha256)
    m.update(body)
    return m.digest()


def encode(state: GuestState, image_key: str, tenant_id: str, cell_id: str, key: bytes) -> bytes:
    runs = wasmimage.data_segments(state.memory)
    header = json.dumps({"image": image_key, "memory": len(state.memory),
                         "globals": {str(k): v for k, v in sorted(state.globals.items())},
                         "runs": runs}, sort_keys=True).encode("ascii")
    view = memoryview(state.memory)
    body = b"".join([MAGIC, len(header).to_bytes(4, "big"), header, *(bytes(view[a:b]) for a, b in runs)])
    return body + _mac(key, tenant_id, cell_id, body)


def write(path: Path, state: GuestState, image_key: str, tenant_id: str, cell_id: str, key: bytes) -> int:
    """Write the snapshot (0600, atomically); its size in bytes (for the tenant's quota)."""
    data = encode(state, image_key, tenant_id, cell_id, key)
    write_atomic(path, data, 0o600)
    return len(data)


def decode(data: bytes, tenant_id: str, cell_id: str, key: bytes, max_memory: int) -> tuple[str, GuestState]:
    """(image key, state) of a snapshot, after its MAC is checked; refuses anything else."""
    if len(data) < len(MAGIC) + 4 + MAC_BYTES or not data.startswith(MAGIC):
        raise SnapshotRefused("not a cell snapshot")
    body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, tenant_id, cell_id, body)):
        raise SnapshotRefused("the snapshot's integrity check failed (changed, truncated, or not this cell's)")
    # From here on the bytes are ours; they are still parsed strictly.
    pos = len(MAGIC)
    size = int.from_bytes(body[pos:pos + 4], "big")
    pos += 4
    if size > MAX_HEADER or pos + size > len(body):
        raise SnapshotRefused("snapshot header out of bounds")
    try:
        header = json.loads(body[pos:pos + size].decode("ascii"))
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
    memory = bytearray(total)
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
        memory[a:b] = body[pos:pos + (b - a)]
        pos += b - a
        last = b
    if pos != len(body):
        raise SnapshotRefused("snapshot has trailing bytes")
    return header["image"], GuestState(bytes(memory), {int(k): v for k, v in globals_raw.items()})


def read(path: Path, tenant_id: str, cell_id: str, key: bytes, max_memory: int) -> tuple[str, GuestState]:
    """Read and check a snapshot file: a regular file of ours, no link followed."""
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
        chunks: list[bytes] = []
        got = 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > cap:
                raise SnapshotRefused("snapshot is larger than any this cell could have written")
    finally:
        os.close(fd)
    return decode(b"".join(chunks), tenant_id, cell_id, key, max_memory)
