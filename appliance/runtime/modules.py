"""Customer-supplied Wasm modules (template ``wasm``).

A module is checked before it is instantiated (threat T-IMPORT-1): it may
import WASI preview 1 and the ``cell`` host functions of the guest ABI, and
nothing else; a Pro host function is refused before the module runs unless
the license in force grants that function's own feature (T-LIC-2). It must
export ``memory`` and ``_start`` or ``run``.
Each run gets a fresh Store and instance.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Collection
from typing import Callable

import wasmtime

from appliance.runtime import context, hostfuncs, profuncs
from appliance.runtime.capture import Capture, ChunkSink
from appliance.runtime.governor import Governor, set_stdin_bytes
from appliance.runtime.outcome import NO_EXIT, Outcome, exited_status, trap_cause, trap_status, trap_words
from appliance.runtime.sessions import GUEST_ENV_BASE
from appliance.runtime.stack import on_guest_stack

PRO_FUNCTIONS = profuncs.FUNCTIONS


class ModuleRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ModuleRunner:
    def __init__(self, engine: wasmtime.Engine, linker_factory: Callable[[], wasmtime.Linker], cache_size: int = 64) -> None:
        self.engine = engine
        self.linker = linker_factory()
        hostfuncs.define(self.linker)
        profuncs.define(self.linker)  # linked always, reachable only after the license check below
        self._wasi_names: set[str] | None = None
        self._cache: OrderedDict[str, wasmtime.Module] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()  # runs of one worker compile on several threads

    def compile(self, source: bytes, is_text: bool, max_bytes: int, granted: Collection[str] | bool) -> wasmtime.Module:
        """Compile (or reuse) a module and check its imports against ``granted``.

        ``granted`` is the set of Pro features the license in force grants
        (``load_weights``, ``host_mcp_call``); ``True``/``False`` mean all or
        none of them (tests and the free tier).
        """
        if len(source) > max_bytes:
            raise ModuleRefused(413, "module_too_large", f"module is {len(source)} bytes; the limit is {max_bytes}")
        key = hashlib.sha256(b"wat:" + source if is_text else b"bin:" + source).hexdigest()
        with self._cache_lock:
            module = self._cache.get(key)
        if module is None:
            try:
                binary = bytes(wasmtime.wat2wasm(source.decode("utf-8"))) if is_text else source
                module = wasmtime.Module(self.engine, binary)
            except UnicodeDecodeError:
                raise ModuleRefused(400, "invalid_module", "WAT text must be UTF-8") from None
            except wasmtime.WasmtimeError as e:
                raise ModuleRefused(400, "invalid_module", _first_line(str(e))) from None
            self._check_shape(module, granted)
            with self._cache_lock:
                self._cache[key] = module
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        else:
            self._check_shape(module, granted)
        return module

    def _check_shape(self, module: wasmtime.Module, granted: Collection[str] | bool) -> None:
        features = frozenset(PRO_FUNCTIONS) if granted is True else frozenset() if granted is False else frozenset(granted)
        for imp in module.imports:
            name = imp.name or ""
            if imp.module == "cell":
                if name in PRO_FUNCTIONS and name not in features:
                    # T-IMPORT-1, T-LIC-2: each Pro host function needs a valid
                    # pro/hub license that lists its own feature.
                    raise ModuleRefused(403, "license_required",
                                        f"cell.{name} needs a Pro license that grants the {name} feature")
                if name not in hostfuncs.FUNCTIONS and name not in PRO_FUNCTIONS:
                    raise ModuleRefused(400, "unknown_import", f"unknown import cell.{name}")
            elif imp.module != "wasi_snapshot_preview1":
                raise ModuleRefused(400, "unknown_import", f"unknown import {imp.module}.{name}")
        exports = {e.name: e.type for e in module.exports}
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            raise ModuleRefused(400, "invalid_module", "the module must export its memory as 'memory'")
        if not isinstance(exports.get("_start"), wasmtime.FuncType) and not isinstance(exports.get("run"), wasmtime.FuncType):
            raise ModuleRefused(400, "invalid_module", "the module must export _start or run")

    def run(
        self,
        module: wasmtime.Module,
        volume_path: str,
        ctx: context.RunContext,
        timeout_s: float,
        memory_bytes: int,
        cap: int,
        sink: ChunkSink | None,
        stdin: bytes | None = None,
    ) -> Outcome:
        """One run on a thread whose stack holds the guest's (stack.py, T-DOS-1)."""
        return on_guest_stack(lambda: self._run(module, volume_path, ctx, timeout_s, memory_bytes, cap, sink, stdin))

    def _run(self, module: wasmtime.Module, volume_path: str, ctx: context.RunContext, timeout_s: float,
             memory_bytes: int, cap: int, sink: ChunkSink | None, stdin: bytes | None) -> Outcome:
        capture = Capture()
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=memory_bytes, instances=1, tables=4, memories=1, table_elements=100_000)
        governor = Governor(store)
        w = wasmtime.WasiConfig()
        w.argv = ["module"]
        w.env = list(GUEST_ENV_BASE[:2])
        w.preopen_dir(volume_path, "/data", True)
        w.stdout_custom = capture.writer(1)
        w.stderr_custom = capture.writer(2)
        if stdin:
            set_stdin_bytes(w, stdin)
        store.set_wasi(w)
        capture.reset(cap, sink, governor)
        ctx.governor = governor
        context.enter(ctx)
        governor.arm(timeout_s)
        exit_code: int | None = None
        trap: BaseException | None = None
        try:
            instance = self.linker.instantiate(store, module)
            ex = instance.exports(store)
            start = ex.get("_start")
            if isinstance(start, wasmtime.Func):
                start(store)
                exit_code = 0
            else:
                value = ex["run"](store)  # type: ignore[operator]
                exit_code = int(value) if isinstance(value, int) else 0
        except wasmtime.ExitTrap as e:
            exit_code = e.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            trap = e
        finally:
            stop_reason = governor.stop_reason
            governor.disarm()
            context.enter(None)
        out, err, truncated = capture.finish()
        if trap is not None:
            status = trap_status(trap, stop_reason)
            detail = _first_line(str(trap))
            if "memory minimum size" in detail or "exceeds memory limits" in detail:
                status = "memory_limit"
            err = (err + ("\n" if err and not err.endswith("\n") else "") + f"trap: {trap_words(trap)} ({detail})\n") if status == "error" else err
            return Outcome(NO_EXIT, status, out, err, truncated, session_alive=False, denials=ctx.denials)
        assert exit_code is not None
        status = "output_limit" if truncated else exited_status(exit_code, err)
        return Outcome(exit_code, status, out, err, truncated, session_alive=False, denials=ctx.denials)


def _first_line(text: str) -> str:
    text = trap_cause(text)  # wasmtime puts the reason after the backtrace of guest-named functions
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return text.strip()[:300]
