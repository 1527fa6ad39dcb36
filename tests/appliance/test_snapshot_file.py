"""Cell snapshot files (appliance/runtime/snapshot_file.py, T-IMAGE-2): written
0600, bound to their tenant and cell by an HMAC under a key kept elsewhere,
and refused — never restored — when anything about them changed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from appliance.runtime import snapshot_file, wasmimage
from appliance.runtime.guest_state import GuestState
from appliance.runtime.snapshot_file import MAGIC, MAGIC_V1, SnapshotRefused, decode, encode, read, write

KEY = b"k" * 32
MAX = 4 * wasmimage.PAGE


def _state() -> GuestState:
    mem = bytearray(2 * wasmimage.PAGE)
    mem[10:15] = b"hello"
    mem[wasmimage.PAGE + 7] = 9
    return GuestState(bytes(mem), {0: 65536 - 32, 3: -1})


def test_t_image_2_round_trip_private_file(tmp_path: Path) -> None:
    path = tmp_path / "snapshots" / "t1" / "c1"
    size = write(path, _state(), "imagekey", "t1", "c1", KEY)
    assert path.stat().st_size == size
    assert path.stat().st_mode & 0o777 == 0o600
    image, state = read(path, "t1", "c1", KEY, MAX)
    assert image == "imagekey" and state == _state()
    assert size < len(_state().memory)  # zero runs are left out


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


TAMPERED: list[tuple[str, Callable[[bytes], bytes], str, str, bytes]] = [
    ("memory_byte", lambda d: _flip(d, len(d) - 40), "t1", "c1", KEY),
    ("header_byte", lambda d: _flip(d, len(MAGIC) + 10), "t1", "c1", KEY),
    ("mac_byte", lambda d: _flip(d, len(d) - 1), "t1", "c1", KEY),
    ("truncated", lambda d: d[:-100], "t1", "c1", KEY),
    ("extended", lambda d: d + b"\x00" * 10, "t1", "c1", KEY),
    ("other_cell", lambda d: d, "t1", "c2", KEY),
    ("other_tenant", lambda d: d, "t2", "c1", KEY),
    ("other_key", lambda d: d, "t1", "c1", b"x" * 32),
    ("not_a_snapshot", lambda d: b"\x00asm" + d[4:], "t1", "c1", KEY),
    ("empty", lambda d: b"", "t1", "c1", KEY),
    ("magic_only", lambda d: d[:len(MAGIC)], "t1", "c1", KEY),
    # Version 2: the nonce chooses the file's Poly1305 key; a version 2 file
    # relabelled as version 1 (or back) meets the other MAC and fails it.
    ("nonce_byte", lambda d: _flip(d, len(MAGIC) + 3), "t1", "c1", KEY),
    ("relabelled_version", lambda d: (MAGIC_V1 if d.startswith(MAGIC) else MAGIC) + d[len(MAGIC):], "t1", "c1", KEY),
]


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("name,change,tenant,cell,key", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_t_image_2_changed_or_foreign_snapshot_is_refused(name: str, change: Callable[[bytes], bytes], tenant: str,
                                                         cell: str, key: bytes, version: int) -> None:
    data = change(encode(_state(), "imagekey", "t1", "c1", KEY, version=version))
    with pytest.raises(SnapshotRefused):
        decode(data, tenant, cell, key, MAX)


@pytest.mark.parametrize("version", [2, 1])
def test_t_image_2_both_versions_decode_when_untouched(version: int) -> None:
    data = encode(_state(), "imagekey", "t1", "c1", KEY, version=version)
    assert data.startswith(MAGIC if version == 2 else MAGIC_V1)
    assert decode(data, "t1", "c1", KEY, MAX) == ("imagekey", _state())


def test_t_image_2_every_file_written_has_a_nonce_of_its_own() -> None:
    # A Poly1305 key serves one message only: the same state written twice gets two nonces, two keys.
    a, b = (encode(_state(), "imagekey", "t1", "c1", KEY) for _ in range(2))
    assert a[:len(MAGIC)] == b[:len(MAGIC)] == MAGIC
    assert a[len(MAGIC):snapshot_file.HEAD] != b[len(MAGIC):snapshot_file.HEAD]
    assert a[snapshot_file.HEAD:-snapshot_file.TAG_BYTES] == b[snapshot_file.HEAD:-snapshot_file.TAG_BYTES]


def test_t_image_2_oversized_memory_is_refused_even_with_a_valid_mac() -> None:
    big = GuestState(bytes(8 * wasmimage.PAGE), {0: 1})
    with pytest.raises(SnapshotRefused, match="memory size"):
        decode(encode(big, "k", "t1", "c1", KEY), "t1", "c1", KEY, MAX)


@pytest.mark.parametrize("kind", ["symlink", "group_readable", "fifo"])
def test_t_image_2_unsafe_files_are_refused(tmp_path: Path, kind: str) -> None:
    real = tmp_path / "real"
    write(real, _state(), "imagekey", "t1", "c1", KEY)
    path = tmp_path / "snap"
    if kind == "symlink":
        path.symlink_to(real)
    elif kind == "group_readable":
        path.write_bytes(real.read_bytes())
        path.chmod(0o640)
    else:
        os.mkfifo(path, 0o600)  # opening it must not block the reader
    with pytest.raises(SnapshotRefused):
        read(path, "t1", "c1", KEY, MAX)


def test_missing_snapshot_is_not_a_refusal(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "none", "t1", "c1", KEY, MAX)


# The reader reads a piece at a time while a second thread MACs what has
# arrived: small pieces here, so a file of a few pages spans many of them and
# a change in the first, a middle, or the last piece (or across a boundary)
# is still seen before anything is parsed.
PIECE = 16 * 1024


_BIG = os.urandom(4 * wasmimage.PAGE)


def _big_state() -> GuestState:
    return GuestState(_BIG, {0: 1, 3: 2})


def test_t_image_2_pipelined_read_round_trips_over_many_pieces(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_file, "READ_PIECE", PIECE)
    path = tmp_path / "snap"
    size = write(path, _big_state(), "imagekey", "t1", "c1", KEY)
    assert size > 8 * PIECE
    image, state = read(path, "t1", "c1", KEY, 8 * wasmimage.PAGE)
    assert image == "imagekey" and state == _big_state()


PIPELINE_TAMPERED: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("first_piece_nonce", lambda d: _flip(d, len(MAGIC) + 5)),
    ("first_piece_header", lambda d: _flip(d, snapshot_file.HEAD + 9)),
    ("first_piece_memory", lambda d: _flip(d, PIECE - 100)),
    ("last_byte_of_a_piece", lambda d: _flip(d, 3 * PIECE - 1)),
    ("first_byte_of_a_piece", lambda d: _flip(d, 3 * PIECE)),
    ("last_piece_memory", lambda d: _flip(d, len(d) - snapshot_file.TAG_BYTES - 1)),
    ("last_piece_mac", lambda d: _flip(d, len(d) - 1)),
    ("truncated_by_one", lambda d: d[:-1]),
    ("truncated_to_whole_pieces", lambda d: d[:(len(d) // PIECE) * PIECE]),
    ("extended_by_one", lambda d: d + b"\x00"),
    ("extended_by_a_piece", lambda d: d + bytes(PIECE)),
]


@pytest.mark.parametrize("name,change", PIPELINE_TAMPERED, ids=[t[0] for t in PIPELINE_TAMPERED])
def test_t_image_2_pipelined_read_refuses_a_change_in_any_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                name: str, change: Callable[[bytes], bytes]) -> None:
    monkeypatch.setattr(snapshot_file, "READ_PIECE", PIECE)
    path = tmp_path / "snap"
    write(path, _big_state(), "imagekey", "t1", "c1", KEY)
    path.write_bytes(change(path.read_bytes()))  # still 0600, ours
    with pytest.raises(SnapshotRefused):
        read(path, "t1", "c1", KEY, 8 * wasmimage.PAGE)


def test_t_image_2_a_version_1_file_is_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Written before version 2 (HMAC-SHA256): a paused cell survives the upgrade; a change in it is still refused.
    monkeypatch.setattr(snapshot_file, "READ_PIECE", PIECE)
    path = tmp_path / "snap"
    data = encode(_big_state(), "imagekey", "t1", "c1", KEY, version=1)
    path.write_bytes(data)
    path.chmod(0o600)
    assert read(path, "t1", "c1", KEY, 8 * wasmimage.PAGE) == ("imagekey", _big_state())
    path.write_bytes(_flip(data, len(data) - snapshot_file.MAC_BYTES - 1))
    with pytest.raises(SnapshotRefused):
        read(path, "t1", "c1", KEY, 8 * wasmimage.PAGE)
