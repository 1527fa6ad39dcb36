"""The wasmtime Engine and the compiled-module cache (threat T-CACHE-1).

Compiling the numpy-capable CPython takes minutes and gigabytes; loading its
serialized form takes milliseconds. But a ``.cwasm`` file is native code that
wasmtime maps and runs as it finds it: loading a tampered one is code
execution in the host. So the cache directory must be 0700 and owned by us,
every file's SHA-256 is recorded when it is written, and it is checked again
before every load, on the file that is then deserialized: one descriptor is
hashed and the same descriptor's inode is loaded (``/proc/self/fd/N``), so
swapping the file after the check changes nothing. A mismatch
is never loaded: the file is discarded and the module compiled afresh. A
confined worker sees the cache read-only (Landlock, T-ESCAPE-1), so it cannot
rewrite a module or its recorded hash; compiling into the cache happens in
`cell warm` or before a worker confines itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Callable

import wasmtime

from appliance.fileio import write_atomic
from appliance.runtime import cache_key
from appliance.runtime.governor import set_async_stack_size
from appliance.runtime.stack import WASM_STACK
from appliance.runtime.verify_memo import VerifyMemo, same_identity, sha256_fd

# Engine settings are part of the cache key (cache_key.py): a .cwasm only loads into an
# engine configured exactly like the one that wrote it. The stack sizes are
# not: they are limits the running code reads from its context, not compiled
# in (a .cwasm written before they were raised loads and runs unchanged).
ENGINE_TAG = cache_key.ENGINE_TAG
WASMTIME_VERSION = getattr(wasmtime, "__version__", None) or cache_key.WASMTIME_VERSION


def make_engine(parallel_compilation: bool = True) -> wasmtime.Engine:
    """``parallel_compilation=False`` for a worker that will confine itself:
    the compiler's thread pool would outlive the compile, and a thread started
    before confinement stays unconfined (T-ESCAPE-1). The setting is not part
    of the compiled form: the same cache serves both."""
    cfg = wasmtime.Config()
    cfg.parallel_compilation = parallel_compilation
    cfg.epoch_interruption = True  # wall-clock limits (T-DOS-1)
    cfg.consume_fuel = False  # epochs suffice for wall-clock; fuel costs 15-35 % more
    # The async stack first: wasmtime refuses a max_wasm_stack above it, and
    # wasmtime-py turns that refusal into an abort of the whole process.
    set_async_stack_size(cfg, WASM_STACK)
    cfg.max_wasm_stack = WASM_STACK  # deep C recursion in a guest: RecursionError, not a trap (stack.py)
    return wasmtime.Engine(cfg)


class CacheError(Exception):
    pass


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"module cache {path} is not a directory")
    if st.st_uid != os.getuid():
        raise CacheError(f"module cache {path} is owned by uid {st.st_uid}, not us ({os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _read_exactly(fd: int, size: int) -> bytes | None:
    """All ``size`` bytes of an open file, or None if it is shorter or longer now."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n <= 0:
            return None
        got += n
    if os.read(fd, 1):
        return None
    return bytes(buf)


class ModuleCache:
    """Serialized modules keyed by source sha256 + wasmtime version + engine settings."""

    def __init__(self, directory: Path, memo: VerifyMemo | None = None) -> None:
        self.directory = Path(directory)
        self.memo = memo  # remembered hashes (verify_memo.py); None: hash in full at every load
        _ensure_private_dir(self.directory)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _paths(self, source_sha256: str) -> tuple[Path, Path]:
        stem = f"{source_sha256}-{WASMTIME_VERSION}-{ENGINE_TAG}"
        return self.directory / f"{stem}.cwasm", self.directory / f"{stem}.json"

    def load(
        self,
        engine: wasmtime.Engine,
        source_sha256: str,
        compile_source: Callable[[], wasmtime.Module],
        progress: Callable[[str], None] | None = None,
    ) -> wasmtime.Module:
        cwasm, meta = self._paths(source_sha256)
        with self._lock:
            module = self._load_checked(engine, cwasm, meta)
            if module is not None:
                self.hits += 1
                return module
            self.misses += 1
            if progress:
                progress(f"compiling module {source_sha256[:12]} (once per machine)")
            module = compile_source()
            self._store(module, cwasm, meta)
            return module

    def lookup(self, engine: wasmtime.Engine, key: str) -> wasmtime.Module | None:
        """The module cached under ``key`` if it passes the same check as
        ``load``; None when absent or refused (never compiles)."""
        cwasm, meta = self._paths(key)
        with self._lock:
            return self._load_checked(engine, cwasm, meta)

    def _load_checked(self, engine: wasmtime.Engine, cwasm: Path, meta: Path) -> wasmtime.Module | None:
        try:
            recorded = json.loads(meta.read_text())
            fd = os.open(cwasm, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError):
            return None
        try:
            st = os.fstat(fd)
            # T-CACHE-1: only a regular file of ours, not writable by others, whose
            # bytes still hash to what we recorded when we wrote it.
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                return None
            if not isinstance(recorded, dict) or recorded.get("size") != st.st_size:
                return None
            if self.memo is not None and os.path.exists(f"/proc/self/fd/{fd}"):
                return self._load_fd_memo(engine, fd, self.memo, recorded.get("sha256"), cwasm)
            return self._load_fd(engine, fd, st.st_size, recorded.get("sha256"), cwasm)
        except OSError:
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _load_fd(engine: wasmtime.Engine, fd: int, size: int, expected: object,
                 cwasm: Path) -> wasmtime.Module | None:
        """Hash the open file and load that same file: trusted by descriptor.

        wasmtime loads from a path; ``/proc/self/fd/N`` names the inode this
        descriptor holds, so renaming another file over ``cwasm`` after the
        check changes nothing (the file is 0600 and the only writers with our
        uid replace files, never rewrite them; confined workers cannot write
        the cache at all). This maps the file as wasmtime does by path (page
        cache shared between workers); reading the bytes and deserializing
        them instead costs ~2 s and ~280 MiB of private memory per worker for
        the Python runtime, so it is only the fallback without /proc.
        """
        proc_path = f"/proc/self/fd/{fd}"
        if os.path.exists(proc_path):
            digest = sha256_fd(fd, size)
            if digest is None:
                return None  # shorter or longer than recorded
            if digest != expected:
                cwasm.unlink(missing_ok=True)
                return None
            try:
                return wasmtime.Module.deserialize_file(engine, proc_path)
            except wasmtime.WasmtimeError:
                return None
        data = _read_exactly(fd, size)
        if data is None or hashlib.sha256(data).hexdigest() != expected:
            cwasm.unlink(missing_ok=True)
            return None
        try:
            return wasmtime.Module.deserialize(engine, data)  # the bytes hashed are the bytes loaded
        except wasmtime.WasmtimeError:
            return None

    @staticmethod
    def _load_fd_memo(engine: wasmtime.Engine, fd: int, memo: VerifyMemo, expected: object,
                      cwasm: Path) -> wasmtime.Module | None:
        """As ``_load_fd``, with the hash remembered for this descriptor's exact
        identity (T-CACHE-1): the same inode is deserialized through
        /proc/self/fd/N, and its identity is checked again afterwards, so a
        write in place during the load is refused too."""
        digest, ident = memo.digest_of(fd)
        if digest is None:
            return None
        if digest != expected:
            cwasm.unlink(missing_ok=True)
            return None
        try:
            module = wasmtime.Module.deserialize_file(engine, f"/proc/self/fd/{fd}")
        except wasmtime.WasmtimeError:
            return None
        return module if same_identity(fd, ident) else None

    def _store(self, module: wasmtime.Module, cwasm: Path, meta: Path) -> None:
        data = bytes(module.serialize())
        write_atomic(cwasm, data, 0o600)
        record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        write_atomic(meta, json.dumps(record).encode(), 0o600)

    def entries(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for meta in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            out.append({"name": meta.stem, **record})
        return out
