"""A small WebAssembly binary rewriter for memory images (pure Python, no adapters).

Two rewrites, both on the binary format directly (sections, LEB128):

* ``export_mutable_globals``: add an export for every mutable global the module
  defines (``__stack_pointer`` is not exported by a C toolchain), so a host can
  read and set the whole state of an instance: its linear memory plus these
  globals. Only the export section changes; code, types and data are copied
  byte for byte.
* ``write_image``: a module whose initial state *is* a captured state (the
  Wizer technique): the data section is replaced by active segments holding the
  captured memory's non-zero pages, each mutable global's initialiser by its
  captured value, and the memory's minimum by the captured size. wasmtime then
  maps those segments copy-on-write, so instances started from one image share
  every page none of them has written.

Anything this module does not understand is refused (``WasmFormatError``),
never copied through half-understood: passive data segments or a data-count
section (``memory.init`` could name a segment that no longer exists), more
than one memory, imported memories, 64-bit memories, mutable globals of a
reference or vector type. The rewritten module is compiled and validated by
wasmtime before it is ever used.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"\x00asm\x01\x00\x00\x00"
SEC_CUSTOM, SEC_TYPE, SEC_IMPORT, SEC_FUNC, SEC_TABLE, SEC_MEMORY = 0, 1, 2, 3, 4, 5
SEC_GLOBAL, SEC_EXPORT, SEC_START, SEC_ELEM, SEC_CODE, SEC_DATA, SEC_DATACOUNT, SEC_TAG = 6, 7, 8, 9, 10, 11, 12, 13
# The order sections must appear in (the tag section sits between memory and global).
SECTION_ORDER = (SEC_TYPE, SEC_IMPORT, SEC_FUNC, SEC_TABLE, SEC_MEMORY, SEC_TAG, SEC_GLOBAL, SEC_EXPORT,
                 SEC_START, SEC_ELEM, SEC_DATACOUNT, SEC_CODE, SEC_DATA)

PAGE = 65536  # a wasm page
CHUNK = 4096  # the granularity at which zero runs are left out of an image (a host page)
I32, I64, F32, F64 = 0x7F, 0x7E, 0x7D, 0x7C
NUMERIC = (I32, I64, F32, F64)
GLOBAL_EXPORT_PREFIX = "cell.global."
# wasmtime's validator accepts at most this many data segments.
MAX_SEGMENTS = 100_000


class WasmFormatError(ValueError):
    """The bytes are not a module this rewriter understands: nothing is written."""


@dataclass(frozen=True)
class Section:
    id: int
    start: int  # first byte of the section's header (its id)
    body: int  # first byte of its payload
    end: int  # one past its payload


@dataclass(frozen=True)
class GlobalDef:
    index: int  # in the module's global index space (imported globals first)
    valtype: int
    mutable: bool


def _read_leb(data: bytes, pos: int, bits: int) -> tuple[int, int, int, int]:
    """(value bits, bits read, last byte, next position) of one LEB128 number of at most ``bits``."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WasmFormatError("truncated LEB128")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, shift, b, pos
        if shift >= bits + 7:
            raise WasmFormatError("LEB128 too long")


def read_uleb(data: bytes, pos: int, max_bits: int = 32) -> tuple[int, int]:
    result, _, _, pos = _read_leb(data, pos, max_bits)
    if result >> max_bits:
        raise WasmFormatError("LEB128 out of range")
    return result, pos


def read_sleb(data: bytes, pos: int, bits: int) -> tuple[int, int]:
    result, shift, b, pos = _read_leb(data, pos, bits)
    if b & 0x40:
        result -= 1 << shift
    if not -(1 << (bits - 1)) <= result < (1 << (bits - 1)):
        raise WasmFormatError("LEB128 out of range")
    return result, pos


def uleb(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative unsigned LEB128")
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        done = (value == 0 and not b & 0x40) or (value == -1 and b & 0x40)
        out.append(b if done else b | 0x80)
        if done:
            return bytes(out)


def _name(data: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = read_uleb(data, pos)
    if pos + n > len(data):
        raise WasmFormatError("truncated name")
    return data[pos:pos + n], pos + n


def sections(data: bytes) -> list[Section]:
    """The module's sections in order; refuses a malformed layout."""
    if data[:8] != MAGIC:
        raise WasmFormatError("not a WebAssembly 1.0 module")
    out: list[Section] = []
    pos = 8
    last = -1
    while pos < len(data):
        start = pos
        sid = data[pos]
        size, body = read_uleb(data, pos + 1)
        end = body + size
        if end > len(data):
            raise WasmFormatError(f"section {sid} runs past the end of the module")
        if sid != SEC_CUSTOM:
            if sid not in SECTION_ORDER:
                raise WasmFormatError(f"unknown section id {sid}")
            rank = SECTION_ORDER.index(sid)
            if rank <= last:
                raise WasmFormatError(f"section {sid} out of order or repeated")
            last = rank
        out.append(Section(sid, start, body, end))
        pos = end
    return out


def _find(secs: list[Section], sid: int) -> Section | None:
    for s in secs:
        if s.id == sid:
            return s
    return None


def _skip_limits(data: bytes, pos: int) -> tuple[int, int | None, int, int]:
    """(min, max, flags, new position) of a limits encoding."""
    flags = data[pos]
    if flags & ~0x07:
        raise WasmFormatError(f"unknown limits flags {flags:#x}")
    bits = 64 if flags & 0x04 else 32
    lo, pos = read_uleb(data, pos + 1, bits)
    hi: int | None = None
    if flags & 0x01:
        hi, pos = read_uleb(data, pos, bits)
    return lo, hi, flags, pos


def _imports(data: bytes, secs: list[Section]) -> tuple[int, int]:
    """(imported globals, imported memories)."""
    sec = _find(secs, SEC_IMPORT)
    if sec is None:
        return 0, 0
    n, pos = read_uleb(data, sec.body)
    globals_ = memories = 0
    for _ in range(n):
        _, pos = _name(data, pos)
        _, pos = _name(data, pos)
        kind = data[pos]
        pos += 1
        if kind == 0x00:
            _, pos = read_uleb(data, pos)
        elif kind == 0x01:
            pos += 1  # reftype
            _, _, _, pos = _skip_limits(data, pos)
        elif kind == 0x02:
            _, _, _, pos = _skip_limits(data, pos)
            memories += 1
        elif kind == 0x03:
            if data[pos] not in (*NUMERIC, 0x7B, 0x70, 0x6F):
                raise WasmFormatError(f"imported global of unknown type {data[pos]:#x}")
            pos += 2
            globals_ += 1
        elif kind == 0x04:
            pos += 1
            _, pos = read_uleb(data, pos)
        else:
            raise WasmFormatError(f"unknown import kind {kind:#x}")
    if pos != sec.end:
        raise WasmFormatError("import section size mismatch")
    return globals_, memories


def _skip_const_expr(data: bytes, pos: int) -> int:
    """Past the ``end`` of a constant expression; refuses instructions it does not know."""
    while True:
        if pos >= len(data):
            raise WasmFormatError("truncated constant expression")
        op = data[pos]
        pos += 1
        if op == 0x0B:
            return pos
        if op == 0x41:
            _, pos = read_sleb(data, pos, 32)
        elif op == 0x42:
            _, pos = read_sleb(data, pos, 64)
        elif op == 0x43:
            pos += 4
        elif op == 0x44:
            pos += 8
        elif op in (0x23, 0xD2):  # global.get, ref.func
            _, pos = read_uleb(data, pos)
        elif op == 0xD0:  # ref.null
            pos += 1
        elif op in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended-const arithmetic
            continue
        elif op == 0xFD and data[pos:pos + 1] == b"\x0c":  # v128.const
            pos += 17
        else:
            raise WasmFormatError(f"unsupported instruction {op:#x} in a constant expression")


def _globals(data: bytes, secs: list[Section]) -> tuple[list[GlobalDef], list[tuple[int, int]]]:
    """Defined globals, and the byte span of each one's initialiser."""
    imported, _ = _imports(data, secs)
    sec = _find(secs, SEC_GLOBAL)
    if sec is None:
        return [], []
    n, pos = read_uleb(data, sec.body)
    defs: list[GlobalDef] = []
    spans: list[tuple[int, int]] = []
    for i in range(n):
        if pos + 2 > sec.end:
            raise WasmFormatError("truncated global section")
        valtype, mut = data[pos], data[pos + 1]
        if mut not in (0, 1):
            raise WasmFormatError(f"global {imported + i} has mutability byte {mut:#x}")
        if valtype not in (*NUMERIC, 0x7B, 0x70, 0x6F):
            raise WasmFormatError(f"global {imported + i} has a type this rewriter does not know ({valtype:#x})")
        pos += 2
        start = pos
        pos = _skip_const_expr(data, pos)
        defs.append(GlobalDef(imported + i, valtype, bool(mut)))
        spans.append((start, pos))
    if pos != sec.end:
        raise WasmFormatError("global section size mismatch")
    return defs, spans


def mutable_globals(data: bytes) -> list[GlobalDef]:
    """The mutable globals the module defines (imported ones are the host's)."""
    defs, _ = _globals(data, sections(data))
    return [g for g in defs if g.mutable]


def global_export_name(index: int) -> str:
    return f"{GLOBAL_EXPORT_PREFIX}{index}"


def _section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + uleb(len(payload)) + payload


def export_mutable_globals(data: bytes) -> bytes:
    """The same module with an export ``cell.global.<index>`` for each mutable
    global it defines; refuses a module that already uses such a name."""
    secs = sections(data)
    wanted = [g for g in _globals(data, secs)[0] if g.mutable]
    for g in wanted:
        if g.valtype not in NUMERIC:
            raise WasmFormatError(f"mutable global {g.index} is not a number; its state cannot be captured")
    sec = _find(secs, SEC_EXPORT)
    entries = bytearray()
    count = 0
    if sec is not None:
        count, pos = read_uleb(data, sec.body)
        first = pos
        for _ in range(count):
            name, pos = _name(data, pos)
            if name.startswith(GLOBAL_EXPORT_PREFIX.encode()):
                raise WasmFormatError(f"the module already exports {name.decode(errors='replace')!r}")
            pos += 1
            _, pos = read_uleb(data, pos)
        if pos != sec.end:
            raise WasmFormatError("export section size mismatch")
        entries += data[first:sec.end]
    for g in wanted:
        name = global_export_name(g.index).encode()
        entries += uleb(len(name)) + name + b"\x03" + uleb(g.index)
    payload = _section(SEC_EXPORT, uleb(count + len(wanted)) + bytes(entries))
    if sec is not None:
        return data[:sec.start] + payload + data[sec.end:]
    # No export section yet: it goes before the first section that must follow it.
    after = SECTION_ORDER.index(SEC_EXPORT)
    for s in secs:
        if s.id != SEC_CUSTOM and SECTION_ORDER.index(s.id) > after:
            return data[:s.start] + payload + data[s.start:]
    return data + payload


def _const(valtype: int, value: int | float) -> bytes:
    if valtype == I32:
        if not isinstance(value, int):
            raise WasmFormatError("i32 global captured as a non-integer")
        v = value & 0xFFFFFFFF
        return b"\x41" + sleb(v - (1 << 32) if v >> 31 else v) + b"\x0b"
    if valtype == I64:
        if not isinstance(value, int):
            raise WasmFormatError("i64 global captured as a non-integer")
        v = value & 0xFFFFFFFFFFFFFFFF
        return b"\x42" + sleb(v - (1 << 64) if v >> 63 else v) + b"\x0b"
    if valtype == F32:
        return b"\x43" + struct.pack("<f", float(value)) + b"\x0b"
    if valtype == F64:
        return b"\x44" + struct.pack("<d", float(value)) + b"\x0b"
    raise WasmFormatError(f"cannot write a global of type {valtype:#x}")


def data_segments(memory: bytes | memoryview) -> list[tuple[int, int]]:
    """(offset, end) of the runs of ``memory`` that hold a non-zero byte, at
    ``CHUNK`` granularity; all-zero chunks are left out (memory starts zeroed)."""
    view = memoryview(memory)
    zero = bytes(CHUNK)
    runs: list[tuple[int, int]] = []
    start: int | None = None
    size = len(view)
    for off in range(0, size, CHUNK):
        chunk = view[off:off + CHUNK]
        empty = chunk == zero[:len(chunk)]
        if not empty and start is None:
            start = off
        elif empty and start is not None:
            runs.append((start, off))
            start = None
    if start is not None:
        runs.append((start, size))
    # Merge the closest runs until the count is one wasmtime accepts.
    gap = CHUNK
    while len(runs) > MAX_SEGMENTS // 2:
        gap *= 2
        merged = [runs[0]]
        for a, b in runs[1:]:
            if a - merged[-1][1] <= gap:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        runs = merged
    return runs


def check_imageable(data: bytes) -> None:
    """Refuse, before anything is run, a module ``write_image`` would refuse
    for its structure (``WasmFormatError``)."""
    _structure(data)


def _structure(data: bytes) -> tuple[list[Section], int, int | None, list[bytes]]:
    """Sections, the memory's limits flags and maximum, and the passive data
    segments (kept as they are), after every structural check."""
    secs = sections(data)
    if _find(secs, SEC_DATACOUNT) is not None:
        raise WasmFormatError("the module has a data-count section (memory.init/data.drop); not imaged")
    if _find(secs, SEC_START) is not None:
        raise WasmFormatError("the module has a start function; an image would run it twice")
    _, imported_memories = _imports(data, secs)
    if imported_memories:
        raise WasmFormatError("the module imports its memory")
    msec = _find(secs, SEC_MEMORY)
    if msec is None:
        raise WasmFormatError("the module defines no memory")
    n, pos = read_uleb(data, msec.body)
    if n != 1:
        raise WasmFormatError(f"the module defines {n} memories; only one is imaged")
    _, hi, flags, pos = _skip_limits(data, pos)
    if flags & ~0x01 or pos != msec.end:
        raise WasmFormatError("only a plain 32-bit, unshared memory is imaged")
    for g in _globals(data, secs)[0]:
        if g.mutable and g.valtype not in NUMERIC:
            raise WasmFormatError(f"mutable global {g.index} is not a number; its state cannot be captured")
    passive: list[bytes] = []
    dsec = _find(secs, SEC_DATA)
    if dsec is not None:
        count, pos = read_uleb(data, dsec.body)
        for _ in range(count):
            start = pos
            kind, pos = read_uleb(data, pos)
            if kind == 0:
                pos = _skip_const_expr(data, pos)
            elif kind == 2:
                index, pos = read_uleb(data, pos)
                if index != 0:
                    raise WasmFormatError(f"a data segment names memory {index}")
                pos = _skip_const_expr(data, pos)
            elif kind != 1:
                raise WasmFormatError(f"unknown data segment kind {kind}")
            size, pos = read_uleb(data, pos)
            pos += size
            if pos > dsec.end:
                raise WasmFormatError("data segment runs past its section")
            if kind == 1:
                # Without a data-count section no instruction can name it
                # (memory.init needs one): carried over unchanged.
                passive.append(data[start:pos])
        if pos != dsec.end:
            raise WasmFormatError("data section size mismatch")
    return secs, flags, hi, passive


def write_image(data: bytes, memory: bytes | memoryview, global_values: dict[int, int | float]) -> bytes:
    """A module that starts in the captured state: ``memory`` as its initial
    linear memory (and minimum size), ``global_values`` (index -> value, for
    every mutable global it defines) as its globals' initialisers. Active data
    segments are replaced by the captured memory (it already holds what they
    wrote); passive ones are kept."""
    secs, flags, hi, passive = _structure(data)
    if len(memory) % PAGE:
        raise WasmFormatError("captured memory is not a whole number of pages")
    msec = _find(secs, SEC_MEMORY)
    assert msec is not None
    _, pos = read_uleb(data, msec.body)
    lo, _, _, _ = _skip_limits(data, pos)
    pages = len(memory) // PAGE
    if pages < lo or (hi is not None and pages > hi):
        raise WasmFormatError(f"captured memory of {pages} pages is outside the module's limits")
    limits = bytes([flags]) + uleb(pages) + (uleb(hi) if hi is not None else b"")
    mem_payload = _section(SEC_MEMORY, b"\x01" + limits)
    # Global section: every mutable global's initialiser becomes its captured value.
    gsec = _find(secs, SEC_GLOBAL)
    defs, spans = _globals(data, secs)
    glob_payload = b""
    if gsec is not None:
        wanted = {g.index for g in defs if g.mutable}
        if set(global_values) != wanted:
            raise WasmFormatError(f"captured globals {sorted(global_values)} are not the mutable ones {sorted(wanted)}")
        body = bytearray(uleb(len(defs)))
        for g, (a, b) in zip(defs, spans):
            body += bytes([g.valtype, int(g.mutable)])
            body += _const(g.valtype, global_values[g.index]) if g.mutable else data[a:b]
        glob_payload = _section(SEC_GLOBAL, bytes(body))
    elif global_values:
        raise WasmFormatError("captured globals for a module that defines none")
    # Data section: the captured memory's non-zero runs, active in memory 0.
    view = memoryview(memory)
    runs = data_segments(view)
    parts: list[bytes] = [uleb(len(runs) + len(passive))]
    for a, b in runs:
        parts.append(b"\x00\x41" + sleb(a - (1 << 32) if a >> 31 else a) + b"\x0b" + uleb(b - a))
        parts.append(bytes(view[a:b]))
    parts += passive
    data_body = b"".join(parts)
    data_payload = bytes([SEC_DATA]) + uleb(len(data_body)) + data_body
    # Reassemble: every other section byte for byte, custom sections included.
    out: list[bytes] = [MAGIC]
    wrote_data = False
    for s in secs:
        if s.id == SEC_MEMORY:
            out.append(mem_payload)
        elif s.id == SEC_GLOBAL:
            out.append(glob_payload)
        elif s.id == SEC_DATA:
            out.append(data_payload)
            wrote_data = True
        else:
            out.append(data[s.start:s.end])
    if not wrote_data:
        out.append(data_payload)  # the data section is the last known section
    return b"".join(out)
