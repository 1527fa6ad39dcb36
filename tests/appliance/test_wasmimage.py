"""The wasm binary rewriter behind memory images (appliance/runtime/wasmimage.py, T-IMAGE-1).

Real modules compiled from WAT by wasmtime, real instances: a module's hidden
mutable globals become readable, and a captured state written as a new
module starts exactly there. Malformed or unsupported modules are refused.
"""
from __future__ import annotations

import pytest
import wasmtime

from appliance.runtime import wasmimage
from appliance.runtime.wasmimage import WasmFormatError

# A toy "runtime": a hidden stack pointer and counter, an immutable global,
# a memory with an initial data segment, and a function that changes them.
TOY = r"""
(module
  (global $sp (mut i32) (i32.const 65536))
  (global $big (mut i64) (i64.const -5))
  (global $k i32 (i32.const 7))
  (global $f (mut f64) (f64.const 1.5))
  (memory (export "memory") 2 16)
  (data (i32.const 16) "hello")
  (func (export "step") (param $n i32)
    (global.set $sp (i32.sub (global.get $sp) (i32.const 16)))
    (global.set $big (i64.add (global.get $big) (i64.extend_i32_s (local.get $n))))
    (global.set $f (f64.mul (global.get $f) (f64.const 2)))
    (i32.store (i32.const 70000) (local.get $n))
    (i32.store8 (i32.const 16) (i32.const 72)))
  (func (export "sp") (result i32) (global.get $sp))
  (func (export "k") (result i32) (global.get $k))
  (func (export "grow") (result i32) (memory.grow (i32.const 1)))
)
"""


def _instance(data: bytes) -> tuple[wasmtime.Store, wasmtime.Instance]:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    return store, wasmtime.Instance(store, wasmtime.Module(engine, data), [])


def _call(store: wasmtime.Store, inst: wasmtime.Instance, name: str, *args: int) -> object:
    f = inst.exports(store)[name]
    assert isinstance(f, wasmtime.Func)
    return f(store, *args)


@pytest.mark.parametrize("value", [0, 1, 63, 64, 127, 128, 255, 16384, 2**31 - 1, 2**32 - 1])
def test_uleb_round_trip(value: int) -> None:
    assert wasmimage.read_uleb(wasmimage.uleb(value), 0) == (value, len(wasmimage.uleb(value)))


@pytest.mark.parametrize("value", [0, 1, -1, 63, -64, 64, -65, 2**31 - 1, -2**31])
def test_sleb_round_trip(value: int) -> None:
    enc = wasmimage.sleb(value)
    assert wasmimage.read_sleb(enc, 0, 32) == (value, len(enc))


def test_t_image_1_mutable_globals_become_exports() -> None:
    data = wasmtime.wat2wasm(TOY)
    assert [g.index for g in wasmimage.mutable_globals(data)] == [0, 1, 3]
    out = wasmimage.export_mutable_globals(data)
    store, inst = _instance(out)
    ex = inst.exports(store)
    _call(store, inst, "step", 5)
    values = {}
    for i in (0, 1, 3):
        g = ex[wasmimage.global_export_name(i)]
        assert isinstance(g, wasmtime.Global)
        values[i] = g.value(store)
    assert values == {0: 65536 - 16, 1: 0, 3: 3.0}
    # Everything but the export section is byte-for-byte the same.
    before = {s.id: data[s.start:s.end] for s in wasmimage.sections(data) if s.id != wasmimage.SEC_EXPORT}
    after = {s.id: out[s.start:s.end] for s in wasmimage.sections(out) if s.id != wasmimage.SEC_EXPORT}
    assert before == after


def test_t_image_1_module_without_exports_gets_an_export_section() -> None:
    data = wasmtime.wat2wasm("(module (global (mut i32) (i32.const 3)) (func))")
    store, inst = _instance(wasmimage.export_mutable_globals(data))
    g = inst.exports(store)["cell.global.0"]
    assert isinstance(g, wasmtime.Global) and g.value(store) == 3


def test_t_image_1_image_starts_in_the_captured_state() -> None:
    data = wasmimage.export_mutable_globals(wasmtime.wat2wasm(TOY))
    store, inst = _instance(data)
    _call(store, inst, "step", 9)
    _call(store, inst, "grow")  # 3 pages now: the image's minimum follows
    mem = inst.exports(store)["memory"]
    assert isinstance(mem, wasmtime.Memory)
    captured = bytes(mem.read(store, 0, mem.data_len(store)))
    values: dict[int, int | float] = {}
    for g in wasmimage.mutable_globals(data):
        item = inst.exports(store)[wasmimage.global_export_name(g.index)]
        assert isinstance(item, wasmtime.Global)
        values[g.index] = item.value(store)
    image = wasmimage.write_image(data, captured, values)
    store2, inst2 = _instance(image)
    mem2 = inst2.exports(store2)["memory"]
    assert isinstance(mem2, wasmtime.Memory)
    assert mem2.data_len(store2) == 3 * wasmimage.PAGE
    assert bytes(mem2.read(store2, 0, mem2.data_len(store2))) == captured
    assert bytes(mem2.read(store2, 16, 21)) == b"Hello"
    assert _call(store2, inst2, "sp") == 65536 - 16
    assert _call(store2, inst2, "k") == 7  # immutable globals are kept as written
    for i, v in values.items():
        item = inst2.exports(store2)[wasmimage.global_export_name(i)]
        assert isinstance(item, wasmtime.Global) and item.value(store2) == v
    # The image runs on from there like the original would.
    _call(store2, inst2, "step", 1)
    assert _call(store2, inst2, "sp") == 65536 - 32


def test_t_image_1_negative_and_large_global_values() -> None:
    data = wasmimage.export_mutable_globals(wasmtime.wat2wasm(TOY))
    mem = bytes(2 * wasmimage.PAGE)
    for sp in (0, -1, 2**31 - 1, -2**31, 0xFFFFFFFF):
        image = wasmimage.write_image(data, mem, {0: sp, 1: -2**63, 3: -0.25})
        store, inst = _instance(image)
        assert _call(store, inst, "sp") == (sp if -2**31 <= sp < 2**31 else sp - 2**32)
        g = inst.exports(store)["cell.global.1"]
        assert isinstance(g, wasmtime.Global) and g.value(store) == -2**63


def test_zero_pages_are_left_out_of_the_image() -> None:
    mem = bytearray(4 * wasmimage.PAGE)
    mem[5] = 1
    mem[3 * wasmimage.PAGE + 100] = 2
    runs = wasmimage.data_segments(mem)
    assert runs == [(0, wasmimage.CHUNK), (3 * wasmimage.PAGE, 3 * wasmimage.PAGE + wasmimage.CHUNK)]


BAD_MODULES = [
    ("not_wasm", lambda d: b"\x7fELF" + d[4:], "not a WebAssembly"),
    ("truncated_section", lambda d: d[:-3], "past the end"),
    ("section_out_of_order", lambda d: d[:8] + b"\x01\x01\x00" + d[8:], "out of order"),
    ("passive_data", lambda d: wasmtime.wat2wasm(
        '(module (memory 1) (global (mut i32) (i32.const 0)) (data "x") (func (memory.init 0 (i32.const 0) (i32.const 0) (i32.const 1))))'),
     "data-count"),
    ("two_memories", lambda d: wasmtime.wat2wasm("(module (memory 1) (memory 1))"), "2 memories"),
    ("imported_memory", lambda d: wasmtime.wat2wasm('(module (import "env" "m" (memory 1)))'), "imports its memory"),
    ("start_function", lambda d: wasmtime.wat2wasm("(module (memory 1) (func $s) (start $s))"), "start function"),
    ("memory64", lambda d: wasmtime.wat2wasm("(module (memory i64 1))"), "32-bit"),
]


@pytest.mark.parametrize("name,make,message", BAD_MODULES, ids=[b[0] for b in BAD_MODULES])
def test_t_image_1_unsupported_modules_are_refused(name: str, make: object, message: str) -> None:
    assert callable(make)
    bad = make(wasmtime.wat2wasm(TOY))
    with pytest.raises(WasmFormatError, match=message):
        wasmimage.write_image(bad, bytes(wasmimage.PAGE), {})


def test_t_image_1_export_name_collision_is_refused() -> None:
    data = wasmtime.wat2wasm('(module (global $g (mut i32) (i32.const 0)) (export "cell.global.0" (global $g)))')
    with pytest.raises(WasmFormatError, match="already exports"):
        wasmimage.export_mutable_globals(data)


def test_t_image_1_wrong_captured_globals_are_refused() -> None:
    data = wasmimage.export_mutable_globals(wasmtime.wat2wasm(TOY))
    mem = bytes(2 * wasmimage.PAGE)
    with pytest.raises(WasmFormatError, match="not the mutable ones"):
        wasmimage.write_image(data, mem, {0: 1})
    with pytest.raises(WasmFormatError, match="outside the module's limits"):
        wasmimage.write_image(data, bytes(wasmimage.PAGE), {0: 1, 1: 1, 3: 1.0})
    with pytest.raises(WasmFormatError, match="whole number of pages"):
        wasmimage.write_image(data, b"\x00" * 100, {0: 1, 1: 1, 3: 1.0})


def test_t_image_1_garbled_leb_is_refused() -> None:
    with pytest.raises(WasmFormatError):
        wasmimage.read_uleb(b"\xff\xff\xff\xff\xff\xff", 0)
    with pytest.raises(WasmFormatError):
        wasmimage.read_uleb(b"\x80", 0)


def test_t_image_1_unreferenced_passive_segments_are_kept() -> None:
    """Without a data-count section no instruction can name a passive segment;
    it is carried over unchanged, and the active one is superseded by the capture."""
    data = wasmimage.export_mutable_globals(wasmtime.wat2wasm(
        '(module (memory (export "memory") 1) (global (mut i32) (i32.const 0)) (data "abc") (data (i32.const 8) "zz"))'))
    mem = bytearray(wasmimage.PAGE)
    mem[8:10] = b"zz"
    mem[100] = 9
    image = wasmimage.write_image(data, bytes(mem), {0: 4})
    dsec = next(s for s in wasmimage.sections(image) if s.id == wasmimage.SEC_DATA)
    assert image[dsec.body] == 2  # one run of the capture + the passive segment
    assert b"\x01\x03abc" in image[dsec.body:dsec.end]
    store, inst = _instance(image)
    m = inst.exports(store)["memory"]
    assert isinstance(m, wasmtime.Memory)
    assert bytes(m.read(store, 0, wasmimage.PAGE)) == bytes(mem)
