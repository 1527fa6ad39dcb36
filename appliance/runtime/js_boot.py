"""The JavaScript session's boot loop: the one piece of guest-side code the
host runs in every QuickJS interpreter before any cell (see JsSession in
sessions.py and the command channel in command_channel.py).
"""
from __future__ import annotations

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
const stringify = JSON.stringify, protoOf = Object.getPrototypeOf, isArray = Array.isArray, OP = Object.prototype;
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
// A plain object or array as the cell's value is also its main result: a JSON
// bundle on the host's result fd (command_channel.RESULT_FD).
const resultFile = std.fdopen(0x7FFF0001, 'w');
function showJson(v) {
  if (v === null || typeof v !== 'object' || resultFile === null) return;
  const p = protoOf(v);
  if (!isArray(v) && p !== OP && p !== null) return;
  let body;
  try {
    const text = stringify(v);
    if (typeof text !== 'string') return;
    // text/plain: the JSON on one line while it is short, indented while it stays small
    const plain = text.length <= 80 || text.length > 65536 ? text : stringify(v, null, 2);
    body = stringify({ 'application/json': text, 'text/plain': plain, is_main_result: true });
  } catch (e) {
    return;  // cyclic, a BigInt, a throwing toJSON: no JSON form, the echo stays
  }
  resultFile.puts(body);
  resultFile.flush();
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
    showJson(v);
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
