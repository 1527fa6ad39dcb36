"""The compiled-module cache refuses tampered native code (T-CACHE-1) and
runtimes that do not match their pins (T-SUPPLY-1)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from appliance.runtime import templates
from appliance.runtime.engine import ModuleCache, make_engine

WAT = '(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 42))'
KEY = "ab" * 32


def compile_counter(engine: wasmtime.Engine, counter: list[int]) -> wasmtime.Module:
    counter.append(1)
    return wasmtime.Module(engine, WAT)


def test_cache_hit_after_first_compile(tmp_path: Path) -> None:
    engine, calls = make_engine(), []
    cache = ModuleCache(tmp_path / "modules")
    cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    assert len(calls) == 1 and cache.hits == 1
    assert oct((tmp_path / "modules").stat().st_mode & 0o777) == "0o700"
    for f in (tmp_path / "modules").iterdir():
        assert f.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("tamper", ["flip-byte", "truncate", "replace-meta-hash", "group-writable", "symlink"])
def test_t_cache_1_tampered_cwasm_is_never_loaded(tmp_path: Path, tamper: str) -> None:
    engine, calls = make_engine(), []
    cache = ModuleCache(tmp_path / "modules")
    cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    cwasm = next((tmp_path / "modules").glob("*.cwasm"))
    meta = cwasm.with_suffix(".json")
    if tamper == "flip-byte":
        data = bytearray(cwasm.read_bytes())
        data[len(data) // 2] ^= 0xFF
        cwasm.write_bytes(bytes(data))
    elif tamper == "truncate":
        cwasm.write_bytes(cwasm.read_bytes()[:100])
    elif tamper == "replace-meta-hash":
        record = json.loads(meta.read_text())
        record["sha256"] = "0" * 64
        meta.write_text(json.dumps(record))
    elif tamper == "group-writable":
        os.chmod(cwasm, 0o664)
    elif tamper == "symlink":
        target = tmp_path / "elsewhere.cwasm"
        target.write_bytes(cwasm.read_bytes())
        cwasm.unlink()
        os.symlink(target, cwasm)
    module = cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    assert len(calls) == 2  # recompiled from the verified source instead
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1 << 30)
    inst = wasmtime.Instance(store, module, [])
    assert inst.exports(store)["run"](store) == 42


def test_t_supply_1_runtime_not_matching_its_pin_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "python-snapshot.wasm"
    fake.write_bytes(b"\0asm\1\0\0\0")
    with pytest.raises(templates.RuntimeMissing, match="pinned"):
        templates.verified_bytes(fake, templates.PY_SNAPSHOT_SHA256)


def test_t_supply_1_shipped_runtimes_match_their_pins() -> None:
    for name in ("python3", "javascript"):
        rt = templates.find_runtime(name)
        assert templates.sha256_file(rt.wasm) == rt.sha256


def test_t_cache_1_file_swapped_after_the_check_is_not_what_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module is trusted by descriptor: the file hashed is the file deserialized,
    so renaming another file over it between the check and the load changes nothing."""
    engine, calls = make_engine(), []
    cache = ModuleCache(tmp_path / "modules")
    cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    cwasm = next((tmp_path / "modules").glob("*.cwasm"))
    real_load = wasmtime.Module.deserialize_file
    loaded_from: list[str] = []

    def swap_then_load(eng: wasmtime.Engine, path: str) -> wasmtime.Module:
        tmp = cwasm.with_suffix(".swap")  # the attacker's file, renamed over the checked one
        tmp.write_bytes(b"\x7fELF not the module" * 100)
        os.replace(tmp, cwasm)
        loaded_from.append(path)
        return real_load(eng, path)

    monkeypatch.setattr(wasmtime.Module, "deserialize_file", staticmethod(swap_then_load))
    module = cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    assert len(calls) == 1 and cache.hits == 1  # the checked file loaded; nothing recompiled
    assert loaded_from and loaded_from[0].startswith("/proc/self/fd/")
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    run = wasmtime.Instance(store, module, []).exports(store)["run"]
    assert run(store) == 42  # type: ignore[operator]


def test_t_cache_1_without_proc_the_hashed_bytes_are_the_loaded_bytes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime import engine as engine_mod

    engine, calls = make_engine(), []
    cache = ModuleCache(tmp_path / "modules")
    cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    real_exists = os.path.exists

    def no_proc(path: Any) -> bool:
        return False if str(path).startswith("/proc/") else real_exists(path)

    def no_path_loads(*_a: Any) -> Any:
        raise AssertionError("loaded by path")

    monkeypatch.setattr(engine_mod.os.path, "exists", no_proc)
    monkeypatch.setattr(wasmtime.Module, "deserialize_file", staticmethod(no_path_loads))
    cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    assert len(calls) == 1 and cache.hits == 1
    next((tmp_path / "modules").glob("*.cwasm")).write_bytes(b"\0" * 10)  # tampered: refused, recompiled
    cache.load(engine, KEY, lambda: compile_counter(engine, calls))
    assert len(calls) == 2


def test_t_escape_1_confining_runtimes_start_no_thread(tmp_path: Path) -> None:
    """A worker that will confine itself compiles (cold cache) without leaving a
    compiler thread pool behind: a thread started before confinement would stay unconfined."""
    import threading

    from appliance.runtime.loader import Runtimes

    before = len(os.listdir("/proc/self/task"))
    rt = Runtimes(tmp_path / "cache" / "modules", confining=True)
    try:
        rt.get("javascript")  # a cold cache: compiled here
        assert rt.cache.misses == 1
        assert len(os.listdir("/proc/self/task")) == before
        assert threading.active_count() >= 1
    finally:
        rt.close()


def test_a_warm_cache_is_seen_as_warm(module_cache: None) -> None:
    # Start-up starts every worker at once only when it sees the cache warm; the
    # engine tag's dotted version once made this check miss a warm cache.
    from appliance.config import Settings
    from appliance.runtime.pool import cache_is_warm
    from tests.liveserver import shared_cache

    assert cache_is_warm(Settings(module_cache=shared_cache()))


def test_an_empty_cache_is_cold(tmp_path: Path) -> None:
    from appliance.config import Settings
    from appliance.runtime.pool import cache_is_warm

    assert not cache_is_warm(Settings(module_cache=tmp_path))
