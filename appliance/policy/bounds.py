"""Guest pointer and length checks (threat T-MEM-1). Pure.

wasmtime-py hands i32 arguments to Python as *signed* ints, and
``Memory.read`` silently truncates past the end and accepts negative offsets
(reading from the end of memory). Every pointer/length pair a guest passes is
converted to unsigned and checked against the memory's current size here,
before any read or write.
"""
from __future__ import annotations

MASK32 = 0xFFFFFFFF
MAX_TRANSFER = 10_000_000  # the threat model's hard ceiling per host call


def u32(value: int) -> int:
    return value & MASK32


def span(ptr: int, length: int, memory_size: int, cap: int | None = None) -> tuple[int, int] | None:
    """(start, length) if [ptr, ptr+length) lies inside memory, else None.

    ``cap`` clamps the length first (used for max_len-style arguments where a
    larger request is legal but served only up to the ceiling).
    """
    start = u32(ptr)
    size = u32(length)
    if cap is not None:
        size = min(size, cap)
    if memory_size < 0 or start > memory_size or size > memory_size - start:
        return None
    return start, size
