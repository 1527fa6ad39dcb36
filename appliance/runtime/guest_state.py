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
import hashlib
from dataclasses import dataclass
from typing import Any, Union

import wasmtime

from appliance.runtime import wasmimage


class StateError(Exception):
    pass


@dataclass
class GuestState:
    memory: bytes
    globals: dict[int, int | float]


@dataclass
class StateDiff:
    """A state as the pages that differ from a fresh instance of the image
    (``size`` bytes of memory in all; memory past the image's is compared with
    zeros): what a snapshot file keeps, so an idle cell costs its own pages,
    not the image's. ``runs``: (offset, bytes), in order, not overlapping."""
    size: int
    runs: list[tuple[int, bytes]]
    globals: dict[int, int | float]


AnyState = Union[GuestState, StateDiff]
DIFF_PAGE = 4096


def page_hashes(memory: bytes) -> list[bytes]:
    """One digest per page of a base memory (kept instead of its bytes)."""
    view = memoryview(memory)
    return [hashlib.blake2b(view[i:i + DIFF_PAGE], digest_size=32).digest() for i in range(0, len(view), DIFF_PAGE)]


def diff(state: GuestState, base: list[bytes]) -> StateDiff:
    """The pages of ``state`` that differ from the base whose page digests are
    ``base``; past the base, the pages that are not all zeros."""
    return _diff(memoryview(state.memory), dict(state.globals), base)


def _diff(view: memoryview, values: dict[int, int | float], base: list[bytes]) -> StateDiff:
    zero = bytes(DIFF_PAGE)
    runs: list[tuple[int, bytes]] = []
    start = -1
    for index, off in enumerate(range(0, len(view), DIFF_PAGE)):
        page = view[off:off + DIFF_PAGE]
        if index < len(base):
            same = hashlib.blake2b(page, digest_size=32).digest() == base[index]
        else:
            same = page == zero
        if not same and start < 0:
            start = off
        elif same and start >= 0:
            runs.append((start, bytes(view[start:off])))
            start = -1
    if start >= 0:
        runs.append((start, bytes(view[start:])))
    return StateDiff(len(view), runs, values)


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
    memory = ex["memory"]
    if not isinstance(memory, wasmtime.Memory):
        raise StateError("export 'memory' is not a memory")
    return memory


def _global(ex: Any, index: int) -> wasmtime.Global:
    item = ex[wasmimage.global_export_name(index)]
    if not isinstance(item, wasmtime.Global):
        raise StateError(f"global {index} is not exported")
    return item


def capture(module: wasmtime.Module, instance: wasmtime.Instance, store: wasmtime.Store) -> GuestState:
    """A copy of the instance's memory and of every global the module exports for capture."""
    values = capture_globals(module, instance, store)
    memory = _memory(instance.exports(store))
    return GuestState(bytes(memory.read(store, 0, memory.data_len(store))), values)


def capture_diff(module: wasmtime.Module, instance: wasmtime.Instance, store: wasmtime.Store,
                 base: list[bytes]) -> StateDiff:
    """``diff(capture(...), base)`` without copying the whole memory first: the
    pages are compared where they lie (between runs nothing else touches them)
    and only those that differ are copied."""
    values = capture_globals(module, instance, store)
    memory = _memory(instance.exports(store))
    size = memory.data_len(store)
    raw = (ctypes.c_ubyte * size).from_address(ctypes.addressof(memory.data_ptr(store).contents))
    return _diff(memoryview(raw).cast("B"), values, base)


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
    if isinstance(state, StateDiff):
        for offset, data in state.runs:
            if offset < 0 or offset + len(data) > want:
                raise StateError("a captured page lies outside the memory")
            memory.write(store, data, offset)
    else:
        memory.write(store, state.memory, 0)
    for index in indices:
        _global(ex, index).set_value(store, state.globals[index])
