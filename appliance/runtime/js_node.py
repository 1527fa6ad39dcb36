"""A small Node compatibility layer for JavaScript cells: ``process``,
``require('fs' | 'path' | 'process')`` and the common synchronous ``fs``
functions, written over QuickJS's own ``std`` and ``os`` modules.

It is guest code, run once in every new interpreter (JsSession) before the
first cell, like Python's boot. It adds no host access: every path goes
through the guest's WASI calls, so the preopened volume (``/data``) is all
it can reach, and a path outside it fails as the guest's own calls do
(``ENOENT``). Errors carry Node's ``code``/``errno``/``syscall``/``path``.
What it leaves out is listed in docs/migrating-from-e2b.md. ``import ... from
'fs'`` is turned into ``require`` by the host (code_prep.node_imports).
"""
from __future__ import annotations

JS_NODE = r"""
(() => {
const S = std, O = os, LSTAT = typeof os.lstat === 'function' ? os.lstat : os.stat, def = Object.defineProperty, keys = Object.keys, U8 = Uint8Array, AB = ArrayBuffer;
// WASI errno numbers (wasi snapshot preview1) -> Node's codes.
const CODES = { 2: 'EACCES', 8: 'EBADF', 20: 'EEXIST', 28: 'EINVAL', 29: 'EIO', 31: 'EISDIR', 33: 'EMFILE',
  44: 'ENOENT', 51: 'ENOSPC', 54: 'ENOTDIR', 55: 'ENOTEMPTY', 58: 'ENOTSUP', 63: 'EPERM', 69: 'EROFS',
  76: 'ENOTCAPABLE' };
function fsErr(errno, syscall, path) {
  if (errno < 0) errno = -errno;
  const code = CODES[errno] || 'EIO';
  const e = new Error(code + ': ' + S.strerror(errno).toLowerCase() + ', ' + syscall + " '" + path + "'");
  e.errno = -errno; e.code = code; e.syscall = syscall; e.path = path;
  return e;
}
function argErr(name, what) {
  const e = new TypeError('The "' + name + '" argument must be ' + what);
  e.code = 'ERR_INVALID_ARG_TYPE';
  return e;
}
function P(path) {
  if (typeof path !== 'string') throw argErr('path', 'of type string');
  if (path.indexOf('\0') >= 0) { const e = new TypeError('The "path" argument must not contain null bytes'); e.code = 'ERR_INVALID_ARG_VALUE'; throw e; }
  return path;
}
function encodingOf(options) {
  const e = typeof options === 'string' ? options : (options && options.encoding) || null;
  if (e === null || e === 'buffer') return null;
  const l = String(e).toLowerCase();
  if (l === 'utf8' || l === 'utf-8') return 'utf8';
  const x = new TypeError("Cell's fs reads and writes text as utf8 only, not " + JSON.stringify(e));
  x.code = 'ERR_INVALID_ARG_VALUE';
  throw x;
}
function flagOf(options, dflt) { return (options && typeof options === 'object' && options.flag) || dflt; }
function utf8(u) {  // bytes -> string, bad sequences as U+FFFD
  let s = '';
  const n = u.length, parts = [];
  for (let i = 0; i < n; ) {
    let c = u[i++], need = 0, cp = 0xFFFD;
    if (c < 0x80) cp = c;
    else if (c >= 0xC2 && c < 0xE0) { need = 1; cp = c & 0x1F; }
    else if (c >= 0xE0 && c < 0xF0) { need = 2; cp = c & 0x0F; }
    else if (c >= 0xF0 && c < 0xF5) { need = 3; cp = c & 0x07; }
    for (let k = 0; k < need; k++) {
      if (i >= n || (u[i] & 0xC0) !== 0x80) { cp = 0xFFFD; need = 0; break; }
      cp = (cp << 6) | (u[i++] & 0x3F);
    }
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) cp = 0xFFFD;
    s += String.fromCodePoint(cp);
    if (s.length > 8192) { parts.push(s); s = ''; }
  }
  parts.push(s);
  return parts.join('');
}
function bytesOut(u) {  // a Uint8Array whose toString() is its text, as a Buffer's is
  def(u, 'toString', { value: function toString(enc) { encodingOf(enc || 'utf8'); return utf8(this); }, configurable: true, writable: true });
  return u;
}
function isDir(st) { return (st.mode & O.S_IFMT) === O.S_IFDIR; }
function stat(path, syscall, link) {
  const r = (link ? LSTAT : O.stat)(path);
  if (r[1] !== 0) throw fsErr(r[1], syscall, path);
  return r[0];
}
function Stats(st) {
  this.dev = st.dev; this.ino = st.ino; this.mode = st.mode; this.nlink = st.nlink; this.uid = st.uid; this.gid = st.gid;
  this.rdev = st.rdev; this.size = st.size; this.blocks = st.blocks;
  this.atimeMs = st.atime; this.mtimeMs = st.mtime; this.ctimeMs = st.ctime; this.birthtimeMs = st.ctime;
  this.atime = new Date(st.atime); this.mtime = new Date(st.mtime); this.ctime = new Date(st.ctime); this.birthtime = new Date(st.ctime);
}
Stats.prototype.isFile = function () { return (this.mode & O.S_IFMT) === O.S_IFREG; };
Stats.prototype.isDirectory = function () { return (this.mode & O.S_IFMT) === O.S_IFDIR; };
Stats.prototype.isSymbolicLink = function () { return (this.mode & O.S_IFMT) === O.S_IFLNK; };
function open(path, flag, syscall) {
  const eo = {}, f = S.open(path, flag, eo);
  if (f === null) throw fsErr(eo.errno || 29, syscall || 'open', path);
  return f;
}
function readFileSync(path, options) {
  path = P(path);
  const enc = encodingOf(options), st = stat(path, 'open');
  if (isDir(st)) throw fsErr(31, 'read', path);
  const f = open(path, 'rb');
  try {
    if (enc !== null) return f.readAsString();
    const parts = [];
    let total = 0;
    for (;;) {
      const buf = new AB(65536), n = f.read(buf, 0, 65536);
      if (!(n > 0)) break;
      parts.push(new U8(buf, 0, n)); total += n;
    }
    const out = new U8(total);
    let off = 0;
    for (const p of parts) { out.set(p, off); off += p.length; }
    return bytesOut(out);
  } finally { f.close(); }
}
function writeTo(path, data, options, dflt, syscall) {
  path = P(path);
  encodingOf(options);
  const flag = flagOf(options, dflt);
  let view = null;
  if (typeof data === 'string') view = null;
  else if (data instanceof AB) view = new U8(data);
  else if (ArrayBuffer.isView(data)) view = new U8(data.buffer, data.byteOffset, data.byteLength);
  else throw argErr('data', 'of type string or an instance of Buffer, TypedArray, or DataView');
  const f = open(path, flag);
  let bad = false;
  try {
    if (view === null) f.puts(data);
    else if (view.length && f.write(view.buffer, view.byteOffset, view.length) !== view.length) bad = true;
    f.flush();
    if (f.error()) bad = true;
  } finally {
    if (f.close() !== 0) bad = true;
  }
  if (bad) throw fsErr(29, syscall, path);
}
function writeFileSync(path, data, options) { writeTo(path, data, options, 'w', 'write'); }
function appendFileSync(path, data, options) { writeTo(path, data, options, 'a', 'write'); }
function existsSync(path) {
  try { return O.stat(P(path))[1] === 0; } catch (e) { return false; }
}
function Dirent(name, st) { this.name = name; this._mode = st ? st.mode : 0; }
Dirent.prototype.isFile = function () { return (this._mode & O.S_IFMT) === O.S_IFREG; };
Dirent.prototype.isDirectory = function () { return (this._mode & O.S_IFMT) === O.S_IFDIR; };
Dirent.prototype.isSymbolicLink = function () { return (this._mode & O.S_IFMT) === O.S_IFLNK; };
function readdirSync(path, options) {
  path = P(path);
  const r = O.readdir(path);
  if (r[1] !== 0) throw fsErr(r[1], 'scandir', path);
  const names = r[0].filter((n) => n !== '.' && n !== '..').sort();
  if (options && typeof options === 'object' && options.withFileTypes)
    return names.map((n) => new Dirent(n, LSTAT(path.replace(/\/+$/, '') + '/' + n)[0]));
  return names;
}
function mkdirSync(path, options) {
  path = P(path);
  const recursive = !!(options && typeof options === 'object' && options.recursive);
  let mode = typeof options === 'number' ? options : (options && options.mode) || 0o777;
  if (!recursive) {
    const r = O.mkdir(path, mode);
    if (r < 0) throw fsErr(r, 'mkdir', path);
    return undefined;
  }
  const parts = path.split('/');
  let pre = path[0] === '/' ? '' : '.', first;
  for (const part of parts) {
    if (!part) continue;
    pre = pre + '/' + part;
    const st = O.stat(pre);
    if (st[1] === 0) {
      if (!isDir(st[0])) throw fsErr(54, 'mkdir', path);
      continue;
    }
    const r = O.mkdir(pre, mode);
    if (r < 0 && r !== -20) throw fsErr(r, 'mkdir', path);
    if (first === undefined && r === 0) first = pre;
  }
  return first;
}
function statSync(path, options, link) {
  path = P(path);
  const r = (link ? LSTAT : O.stat)(path);
  if (r[1] !== 0) {
    if (options && options.throwIfNoEntry === false && (r[1] === 44 || r[1] === -44)) return undefined;
    throw fsErr(r[1], link ? 'lstat' : 'stat', path);
  }
  return new Stats(r[0]);
}
function unlinkSync(path) {
  path = P(path);
  if (isDir(stat(path, 'unlink', true))) throw fsErr(31, 'unlink', path);
  const r = O.remove(path);
  if (r < 0) throw fsErr(r, 'unlink', path);
}
function rmdirSync(path) {
  path = P(path);
  if (!isDir(stat(path, 'rmdir', true))) throw fsErr(54, 'rmdir', path);
  const r = O.remove(path);
  if (r < 0) throw fsErr(r, 'rmdir', path);
}
function rmSync(path, options) {
  path = P(path);
  const force = !!(options && options.force), recursive = !!(options && options.recursive);
  const top = LSTAT(path);
  if (top[1] !== 0) { if (force && top[1] === 44) return; throw fsErr(top[1], 'rm', path); }
  if (isDir(top[0]) && !recursive) { const e = fsErr(31, 'rm', path); e.code = 'ERR_FS_EISDIR'; throw e; }
  // Depth first, without recursion: directories are removed after what they hold.
  const stack = [[path, false]];
  while (stack.length) {
    const [p, seen] = stack.pop(), st = LSTAT(p);
    if (st[1] !== 0) throw fsErr(st[1], 'rm', p);
    if (isDir(st[0]) && !seen) {
      stack.push([p, true]);
      const r = O.readdir(p);
      if (r[1] !== 0) throw fsErr(r[1], 'scandir', p);
      for (const n of r[0]) if (n !== '.' && n !== '..') stack.push([p + '/' + n, false]);
      continue;
    }
    const r = O.remove(p);
    if (r < 0) throw fsErr(r, 'rm', p);
  }
}
function renameSync(from, to) {
  const r = O.rename(P(from), P(to));
  if (r < 0) throw fsErr(r, 'rename', from);
}
function copyFileSync(from, to) { writeFileSync(to, readFileSync(from)); }
const fs = { readFileSync, writeFileSync, appendFileSync, existsSync, readdirSync, mkdirSync, statSync,
  lstatSync: (p, o) => statSync(p, o, true), unlinkSync, rmdirSync, rmSync, renameSync, copyFileSync,
  Stats, Dirent, constants: { F_OK: 0, R_OK: 4, W_OK: 2, X_OK: 1 } };

// path: POSIX only.
function normalize(p) {
  const abs = p[0] === '/', out = [];
  for (const part of p.split('/')) {
    if (!part || part === '.') continue;
    if (part === '..') { if (out.length && out[out.length - 1] !== '..') out.pop(); else if (!abs) out.push('..'); continue; }
    out.push(part);
  }
  const s = (abs ? '/' : '') + out.join('/');
  return s || (abs ? '/' : '.');
}
const path = {
  sep: '/', delimiter: ':', normalize,
  join: (...a) => normalize(a.filter((x) => x !== '').join('/') || '.'),
  resolve: (...a) => {
    let r = '';
    for (let i = a.length - 1; i >= 0 && r[0] !== '/'; i--) if (a[i]) r = a[i] + (r ? '/' + r : '');
    if (r[0] !== '/') r = O.getcwd()[0] + (r ? '/' + r : '');
    return normalize(r);
  },
  isAbsolute: (p) => p[0] === '/',
  dirname: (p) => { const s = p.replace(/\/+$/, ''), i = s.lastIndexOf('/'); return i < 0 ? '.' : i === 0 ? '/' : s.slice(0, i); },
  basename: (p, ext) => { const b = p.replace(/\/+$/, '').split('/').pop() || ''; return ext && b.endsWith(ext) && b !== ext ? b.slice(0, -ext.length) : b; },
  extname: (p) => { const b = p.replace(/\/+$/, '').split('/').pop() || '', i = b.lastIndexOf('.'); return i <= 0 ? '' : b.slice(i); },
};
path.posix = path;

// process.env: a live view of the interpreter's environment (std.getenv/setenv).
const env = new Proxy({}, {
  get: (t, k) => (typeof k === 'string' ? S.getenv(k) : undefined),
  set: (t, k, v) => { if (typeof k === 'string') S.setenv(k, String(v)); return true; },
  has: (t, k) => typeof k === 'string' && S.getenv(k) !== undefined,
  deleteProperty: (t, k) => { if (typeof k === 'string') S.unsetenv(k); return true; },
  ownKeys: () => keys(S.getenviron()),
  getOwnPropertyDescriptor: (t, k) => {
    const v = typeof k === 'string' ? S.getenv(k) : undefined;
    return v === undefined ? undefined : { value: v, writable: true, enumerable: true, configurable: true };
  },
});
const out = (stream) => ({ write: (s) => { stream.puts(String(s)); return true; } });
const process = {
  env, argv: ['qjs'], platform: 'wasi', version: 'v0.0.0-cell', versions: {}, pid: 1, exitCode: undefined,
  cwd: () => O.getcwd()[0],
  chdir: (d) => { const r = O.chdir(P(d)); if (r < 0) throw fsErr(r, 'chdir', d); },
  nextTick: (fn, ...args) => queueMicrotask(() => fn(...args)),
  hrtime: { bigint: () => BigInt(Math.round(O.now() * 1000)) },
  stdout: out(S.out), stderr: out(S.err),
};
const MODULES = { fs, 'node:fs': fs, path, 'node:path': path, process, 'node:process': process };
function require(name) {
  const m = MODULES[name];
  if (m !== undefined) return m;
  const e = new Error("Cannot find module '" + String(name) + "': a Cell JavaScript sandbox is QuickJS, not Node; "
    + "it offers only 'fs' (synchronous functions), 'path' and 'process', and no npm packages");
  e.code = 'MODULE_NOT_FOUND';
  throw e;
}
def(globalThis, 'process', { value: process, writable: true, configurable: true });
def(globalThis, 'require', { value: require, writable: true, configurable: true });
})();
"""
