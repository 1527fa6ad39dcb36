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

from dataclasses import dataclass
from typing import Any

import wasmtime

from appliance.runtime import wasmimage


class StateError(Exception):
    pass


@dataclass
class GuestState:
    memory: bytes
    globals: dict[int, int | float]


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
    memory = _memory(ex)
    return GuestState(bytes(memory.read(store, 0, memory.data_len(store))), values)


def restore(module: wasmtime.Module, instance: wasmtime.Instance, store: wasmtime.Store, state: GuestState) -> None:
    """Put ``state`` into a fresh instance of the module it was captured from."""
    indices = _global_indices(module)
    if sorted(state.globals) != indices:
        raise StateError("the captured globals are not this module's")
    ex = instance.exports(store)
    memory = _memory(ex)
    have, want = memory.data_len(store), len(state.memory)
    if want % wasmimage.PAGE or want < have:
        raise StateError(f"a capture of {want} bytes does not fit an instance of {have}")
    if want > have:
        memory.grow(store, (want - have) // wasmimage.PAGE)  # within the Store's limit, or a WasmtimeError
    memory.write(store, state.memory, 0)
    for index in indices:
        _global(ex, index).set_value(store, state.globals[index])
