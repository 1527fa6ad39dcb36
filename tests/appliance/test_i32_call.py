"""governor.I32Call: a session's ``host_alloc`` and ``turn`` called straight
through wasmtime's C API instead of ``wasmtime.Func.__call__``. Each case of
a small guest is called both ways and must answer alike: the value, a trap,
a guest's exit, a host function's own exception (T-DOS-1: a deadline trap
raised in a host call must still end the run as a trap)."""
from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import wasmtime

from appliance.runtime.governor import I32Call

WAT = """
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "host" "boom" (func $boom (result i32)))
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add)
  (func (export "echo") (param i32) (result i32) local.get 0)
  (func (export "trap") (param i32) (result i32) unreachable)
  (func (export "quit") (param i32) (result i32) local.get 0 call $exit i32.const 0)
  (func (export "host") (param i32) (result i32) call $boom)
  (func (export "wide") (param i64) (result i32) i32.const 0)
  (func (export "two") (param i32) (result i32 i32) i32.const 0 i32.const 0)
  (func (export "none") (param i32))
)
"""


class HostBoom(Exception):
    pass


def _boom() -> int:
    raise HostBoom("raised by the host function")


def _instance() -> tuple[wasmtime.Store, Any]:
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.define_func("host", "boom", wasmtime.FuncType([], [wasmtime.ValType.i32()]), _boom)
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    instance = linker.instantiate(store, wasmtime.Module(engine, WAT))
    return store, instance.exports(store)


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "value", call()
    except wasmtime.ExitTrap as e:
        return "exit", e.code
    except wasmtime.Trap:
        return "trap", None
    except HostBoom as e:
        return "host exception", str(e)


CASES = [
    ("add", (2, 3), ("value", 5)),
    ("add", (-1, 0), ("value", -1)),
    ("add", (0x7FFFFFFF, 1), ("value", -(1 << 31))),  # wraps like i32.add
    ("echo", (0xFFFFFFF0,), ("value", -16)),  # an unsigned pointer goes in as its two's complement
    ("trap", (0,), ("trap", None)),
    ("quit", (7,), ("exit", 7)),
    ("host", (0,), ("host exception", "raised by the host function")),
]


@pytest.mark.parametrize("name,args,expected", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_i32_call_answers_as_func_call(name: str, args: tuple[int, ...], expected: tuple[str, Any]) -> None:
    store, ex = _instance()
    fast = I32Call(store, ex[name], len(args))
    assert _outcome(lambda: fast(store, *args)) == expected
    store2, ex2 = _instance()
    assert _outcome(lambda: ex2[name](store2, *args)) == expected


def test_i32_call_can_be_called_again_after_a_trap() -> None:
    store, ex = _instance()
    add, trap = I32Call(store, ex["add"], 2), I32Call(store, ex["trap"], 1)
    with pytest.raises(wasmtime.Trap):
        trap(store, 0)
    assert add(store, 40, 2) == 42


@pytest.mark.parametrize("name,params", [("wide", 1), ("two", 1), ("none", 1), ("add", 1), ("echo", 2)])
def test_i32_call_refuses_a_function_of_another_type(name: str, params: int) -> None:
    store, ex = _instance()
    with pytest.raises(RuntimeError, match="not"):
        I32Call(store, ex[name], params)


def test_i32_call_checks_the_argument_count() -> None:
    store, ex = _instance()
    add = I32Call(store, ex["add"], 2)
    with pytest.raises(TypeError):
        add(store, 1)


def test_i32_call_keeps_no_store_alive() -> None:
    """A closed session drops its Store; a call kept beside it must not hold it."""
    store, ex = _instance()
    call = I32Call(store, ex["add"], 2)
    assert call(store, 1, 1) == 2
    gone = weakref.ref(store)
    del store, ex
    gc.collect()
    assert gone() is None
    assert call is not None
