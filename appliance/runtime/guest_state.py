"""The whole state of a guest instance: its linear memory plus its mutable globals.

Readable only for modules rewritten by ``wasmimage.export_mutable_globals``
(the Python image is one: images.py), and only between calls into the guest,
when nothing of the host is on its stack. What lives on the host's side of
WASI is not in here: the preopened directories must be given again, the same
ones in the same order, when the state is restored (the guest's libc keeps
their descriptor numbers in memory); a file the guest had open is gone
afterwards (its descriptor answers EBADF).
"""
from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from appliance.runtime import wasmimage

if TYPE_CHECKING:  # start-up: the web process imports this module (via snapshot_file) but never wasmtime
    import wasmtime


class StateError(Exception):
    pass


Buffer = Union[bytes, bytearray, memoryview]


@dataclass
class GuestState:
    memory: bytes
    globals: dict[int, int | float]


@dataclass
class StateDiff:
    """A state as the pages that differ from a fresh instance of the image
    (``size`` bytes of memory in all; memory past the image's is compared with
    zeros): what a snapshot file keeps, so an idle cell costs its own pages,
    not the image's. ``runs``: (offset, bytes), in order, not overlapping;
    their bytes may be views of a live memory or of a file's buffer (no copy)."""
    size: int
    runs: list[tuple[int, Buffer]]
    globals: dict[int, int | float]
    # The runs are views of a private anonymous mapping made for them alone
    # (snapshot_file.read): restore may move its pages into the guest's memory
    # instead of copying them, leaving zeros behind (the state is consumed).
    movable: bool = field(default=False, compare=False)


AnyState = Union[GuestState, StateDiff]
DIFF_PAGE = 4096
_CHUNK = 16 * DIFF_PAGE  # pages are compared a chunk at a time first: most of an idle cell is the image's
_ZERO = bytearray(_CHUNK)

_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_mremap = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MOVE_MIN = 1 << 20  # shorter runs are copied: each move splits the memory's mapping (vm.max_map_count)


def _address(view: memoryview) -> int:
    """Where a writable, contiguous byte buffer lies (kept alive by the caller's ``view``)."""
    return ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))


def diff(state: GuestState, base: Buffer) -> StateDiff:
    """The pages of ``state`` that differ from the memory ``base`` (a fresh
    instance's); past the base, the pages that are not all zeros."""
    return _diff(memoryview(bytearray(state.memory)), dict(state.globals), memoryview(bytearray(base)), True)


def _diff(view: memoryview, values: dict[int, int | float], base: memoryview, copy: bool) -> StateDiff:
    """Compared where the bytes lie (memcmp: no digest, no copy of a page that
    is the image's). ``copy``: the runs are ``bytes``; else views into ``view``,
    valid only while nothing writes the memory (between runs)."""
    size, known = len(view), len(base)
    if size % DIFF_PAGE or known % DIFF_PAGE:
        raise StateError("memories are compared in whole pages")
    here, there, zero = _address(view), _address(base), _address(memoryview(_ZERO))
    runs: list[tuple[int, Buffer]] = []
    start = -1

    def close(end: int) -> None:
        nonlocal start
        if start >= 0:
            runs.append((start, bytes(view[start:end]) if copy else view[start:end]))
            start = -1

    memcmp = _memcmp  # the loops below run once per page: kept short (no call but memcmp's)
    for chunk in range(0, size, _CHUNK):
        end = min(chunk + _CHUNK, size)
        if end <= known or chunk >= known:  # all of the chunk on one side of the base's end
            if not memcmp(here + chunk, there + chunk if chunk < known else zero, end - chunk):
                close(chunk)
                continue
        for off in range(chunk, end, DIFF_PAGE):
            if memcmp(here + off, there + off if off < known else zero, DIFF_PAGE):
                if start < 0:
                    start = off
            elif start >= 0:
                close(off)
    close(size)
    return StateDiff(size, runs, values)


def _global_indices(module: wasmtime.Module) -> list[int]:
    out = []
    for e in module.exports:
        if e.name.startswith(wasmimage.GLOBAL_EXPORT_PREFIX):
            suffix = e.name[len(wasmimage.GLOBAL_EXPORT_PREFIX):]
            if not suffix.isdigit():
                raise StateError(f"unexpected export {e.name!r}")
            out.append(int(suffix))
    return sorted(out)


def _memory(ex: Any) -> wasmtime.Memory:
    import wasmtime  # loaded already: only a worker captures or restores guest state

    memory = ex["memory"]
    if not isinstance(memory, wasmtime.Memory):
        raise StateError("export 'memory' is not a memory")
    return memory


def _global(ex: Any, index: int) -> wasmtime.Global:
    import wasmtime  # as in _memory

    item = ex[wasmimage.global_export_name(index)]
    if not isinstance(item, wasmtime.Global):
        raise StateError(f"global {index} is not exported")
    return item


def capture(module: wasmtime.Module, instance: wasmtime.Instance, store: wasmtime.Store) -> GuestState:
    """A copy of the instance's memory and of every global the module exports for capture."""
    values = capture_globals(module, instance, store)
    memory = _memory(instance.exports(store))
    return GuestState(bytes(memory.read(store, 0, memory.data_len(store))), values)


def memory_view(memory: wasmtime.Memory, store: wasmtime.Store) -> memoryview:
    """The whole linear memory as a writable byte view, no copy. Valid only
    until the memory grows or its store is dropped, and to be used only while
    the guest is not running (between calls into it)."""
    size = memory.data_len(store)
    raw = (ctypes.c_ubyte * size).from_address(ctypes.addressof(memory.data_ptr(store).contents))
    return memoryview(raw).cast("B")


def capture_diff(module: wasmtime.Module, instance: wasmtime.Instance, store: wasmtime.Store,
                 base: memoryview, *, copy: bool = True) -> StateDiff:
    """``diff(capture(...), base)`` without copying the whole memory first: the
    pages are compared where they lie (between runs nothing else touches them)
    and only those that differ are copied; with ``copy=False`` not even those:
    the runs are views of the live memory, to be written out before the guest
    runs again or its session is closed."""
    values = capture_globals(module, instance, store)
    return _diff(memory_view(_memory(instance.exports(store)), store), values, base, copy)


def capture_globals(module: wasmtime.Module, instance: wasmtime.Instance, store: wasmtime.Store) -> dict[int, int | float]:
    indices = _global_indices(module)
    if not indices:
        raise StateError("this module does not export its globals; its state cannot be captured")
    ex = instance.exports(store)
    values: dict[int, int | float] = {}
    for index in indices:
        value = _global(ex, index).value(store)
        if not isinstance(value, (int, float)):
            raise StateError(f"global {index} holds a {type(value).__name__}")
        values[index] = value
    return values


def restore(module: wasmtime.Module, instance: wasmtime.Instance, store: wasmtime.Store, state: AnyState) -> None:
    """Put ``state`` into a fresh instance of the module it was captured from
    (a ``StateDiff``: of the image it was diffed against)."""
    indices = _global_indices(module)
    if sorted(state.globals) != indices:
        raise StateError("the captured globals are not this module's")
    ex = instance.exports(store)
    memory = _memory(ex)
    have = memory.data_len(store)
    want = state.size if isinstance(state, StateDiff) else len(state.memory)
    if want % wasmimage.PAGE or want < have:
        raise StateError(f"a capture of {want} bytes does not fit an instance of {have}")
    if want > have:
        memory.grow(store, (want - have) // wasmimage.PAGE)  # within the Store's limit, or a WasmtimeError
    view = memory_view(memory, store)  # after the grow: each run straight into place
    base = _address(view)
    movable = isinstance(state, StateDiff) and state.movable
    runs: list[tuple[int, Buffer]] = list(state.runs) if isinstance(state, StateDiff) else [(0, state.memory)]
    for offset, data in runs:
        n = memoryview(data).nbytes
        if offset < 0 or offset + n > len(view):
            raise StateError("a captured page lies outside the memory")
        if not (movable and isinstance(data, memoryview) and _move_pages(data, base + offset)):
            view[offset:offset + n] = data
    for index in indices:
        _global(ex, index).set_value(store, state.globals[index])


def _move_pages(src: memoryview, dst: int) -> bool:
    """Move the pages under ``src`` (in a private anonymous mapping) to ``dst``
    in a linear memory: no copy, no page faults. False (nothing done) when the
    run is short or not page-aligned: the caller copies it. Bounds are the
    caller's (the run lies inside the memory). ``src`` is left mapped, zero."""
    n = len(src)
    addr = _address(src)
    if n < MOVE_MIN or n % mmap.PAGESIZE or addr % mmap.PAGESIZE or dst % mmap.PAGESIZE:
        return False
    if _mremap(addr, n, n, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, dst) == dst:
        return True
    # A failed move may have unmapped the destination already: map fresh pages there, the run is then copied.
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10  # MAP_FIXED
    if _mmap(dst, n, prot, flags, -1, 0) != dst:
        raise StateError(f"the memory could not be restored in place (errno {ctypes.get_errno()})")
    return False
