#!/usr/bin/env python3
"""Red-team corpus against a live server (SECURITY.md §7 release gate).

Starts a real Cell server on an ephemeral loopback port (egress ON, names
from a static map so nothing resolves through DNS and no packet leaves), then
throws the corpus of tests/redteam_corpus.py at it:

  ssrf      >= 100 URLs through a WAT guest's host_fetch: each denied by policy
  paths     >= 50 paths through host_fs_read, host_fs_write and the files API
  trailing  "notes.txt/" and its kin through both host functions and every
            files route: not_a_directory (-3 / 400), never the file; "dir/" works
  dos       spin, sleep, memory growth, output flood, deep recursion, huge
            module, 10,000 tiny host calls: each ends in its limit, the server
            keeps answering; a JavaScript guest forging the end of its run
            gets no early answer and runs no instruction after its answer
  tenants   another tenant's cells, files and receipts are 404 (also as MCP tools)
  receipts  verify shows a tenant only its own receipts and is rate-limited
            under a flood; an export cut short or with a receipt moved to
            another cell or tenant fails the offline verifier
  fairness  a tenant keeping more spinning runs in flight than there are
            workers leaves another tenant's print(1) (cell and one-shot)
            answered within 3 s, far below the flood's 6 s timeout (T-FAIR-1)
  requests  oversized and malformed requests get clear 4xx errors, never 500;
            unauthenticated or over-limit bodies are refused at the headers
            (answered before one body byte is sent)
  disk      1,200-deep trees (files API, one-shot guest), 5,000 sibling
            directories, a file flood past the tenant's file limit: every
            answer is 2xx or a clear 413, every run keeps its receipt, nothing
            is left on disk (T-DOS-1, T-DISK-1)
  license   Pro host functions without a license granting their feature are
            403 license_required, also with a forged license listing every
            feature in place (T-LIC-1, T-LIC-2)
  site      host_fetch to this host's own interface addresses is denied; a
            bad SYNAPSE_EGRESS_DENY stops start-up naming the key
  escape    a guest that escaped wasmtime (tests/escaped_guest.py): a worker
            started exactly as the pool starts one runs native Python that
            tries to read the node key, db, license, config, mirror, write the
            module cache, open sockets, execve, ptrace, read the supervisor's
            environ: one row per attempt, each EACCES/EPERM or SIGSYS
  image     cells started from one pre-initialised image see nothing of each
            other (module attributes, numpy, environ, sys.modules, rc, random)
  snapshots a node of its own, stopped (SIGTERM captures every cell) and
            restarted after its snapshot files were flipped, truncated, copied
            from another cell or tenant, re-keyed to another image, replaced by
            a link, a FIFO or a group-readable copy: each cell answers 409
            snapshot_invalid (snapshot_stale for the other image) once, the
            file is gone, the next run starts fresh; untouched cells (also the
            other tenant's) come back with their variables, and the run that
            restores one and crashes it is rolled back to it (T-IMAGE-2)
  incident  `cell incident snapshot --with-volume-contents` while the volume
            holds links to the node key and a thread swaps a file with such a
            link: the key's bytes and hash never reach the tarball

Exits non-zero on any failure; prints a table of counts per family.
"""
from __future__ import annotations

import argparse

import ctypes
import gzip
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.runtime.sessions import JS_TIMER_MARGIN  # noqa: E402
from appliance.ownaddrs import own_networks  # noqa: E402
from tests import guests  # noqa: E402
from tests.fairness_load import Flood, add_tenant, probe  # noqa: E402
from tests.liveserver import ServerProcess, start_server  # noqa: E402
from tests.procwatch import thread_cpu, tree_bytes, watch_after_answer, worker_pids  # noqa: E402
from tests.redteam_corpus import (EGRESS_HOSTS, JS_FORGED_END, JS_FORGED_MARKER, JS_IMITATE_IDLE_READ,  # noqa: E402
                                  JS_KEEP_WORKING, JS_LATE_TIMERS, ssrf_urls, trailing_slash_paths, traversal_paths)

tally: Counter[str] = Counter()
failures: list[str] = []


def record(family: str, ok: bool, what: str) -> None:
    tally[f"{family}:{'pass' if ok else 'fail'}"] += 1
    if not ok:
        failures.append(f"[{family}] {what}")


def ssrf(srv: ServerProcess, quick: bool) -> None:
    for url in ssrf_urls():
        code, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": guests.fetch_probe(url)})
        denials = body.get("denials", []) if isinstance(body, dict) else []
        ok = code == 200 and body.get("exit_code") in (-1, -3) and (body.get("exit_code") == -3 or any(d["threat"] == "T-SSRF-1" for d in denials))
        record("ssrf", ok, f"{url!r} -> {code} {body if not ok else ''}")


def cell_egress(srv: ServerProcess) -> None:
    # T-SSRF-1: a cell created without internet gets none on this egress-on node,
    # whichever way the client said so; and no cell can ask for more than the node.
    for fields in ({"allow_internet_access": False}, {"network": {"deny_out": ["0.0.0.0/0"]}}):
        _, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm", **fields})
        for url in ("http://metadata.attacker.example/", "http://203.0.113.7/", "https://example.com/"):
            code, body, _ = srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": guests.fetch_probe(url)})
            denials = body.get("denials", []) if isinstance(body, dict) else []
            ok = code == 200 and body.get("exit_code") == -1 and [d["reason"] for d in denials] == ["egress_off"]
            record("ssrf", ok, f"cell {fields} fetch {url} -> {code} {body if not ok else ''}")
        srv.request("DELETE", f"/v1/cells/{cell['cell_id']}")
    for fields in ({"network": {"allow_out": ["0.0.0.0/0"]}}, {"network": {"deny_out": ["10.0.0.0/8"]}},
                   {"secure": False}, {"volume_mounts": [{"path": "/", "name": "host"}]}):
        code, body, _ = srv.request("POST", "/v1/cells", {"template": "wasm", **fields})
        record("ssrf", code == 400 and isinstance(body, dict) and body.get("code") in ("not_offered", "secure_required"),
               f"create {fields} -> {code} {body}")


def paths(srv: ServerProcess) -> None:
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
    cid = cell["cell_id"]
    volume = srv.root / "sandbox_volumes" / "default" / cid
    outside = Path(tempfile.mkdtemp(prefix="cell-redteam-"))
    (outside / "secret.txt").write_text("REDTEAM-SECRET")
    (outside / "passwd").write_text("REDTEAM-SECRET")
    os.symlink(outside, volume / "link-out")
    os.symlink(outside, volume / "dir-link")
    os.symlink(outside / "created.txt", volume / "dangling")
    before = sorted(p.name for p in outside.iterdir())

    def untouched() -> bool:
        return sorted(p.name for p in outside.iterdir()) == before and (outside / "secret.txt").read_text() == "REDTEAM-SECRET"

    for path in traversal_paths():
        try:
            read = guests.read_probe(path)
            write = guests.write_probe(path, b"PWNED")
        except UnicodeEncodeError:
            continue
        # The security property: nothing outside the volume is read or
        # changed. On top, a path with a real ".." component, an absolute
        # path outside /data, a link, or a control character must be refused
        # outright; a merely odd name ("...", "..%2f") is a legal file name.
        parts = re.split(r"[/\\]", path)
        must_refuse = (".." in parts or (path.startswith("/") and not path.startswith("/data/"))
                       or any(ord(ch) < 32 or ord(ch) == 127 for ch in path)
                       or parts[0] in ("link-out", "dir-link", "dangling") or "\u2025" in path or "\uff0e" in path)
        _, body, _ = srv.request("POST", f"/v1/cells/{cid}/exec", {"code": read})
        rc = body.get("exit_code", 0)
        record("paths", (rc < 0 or not must_refuse) and "REDTEAM-SECRET" not in json.dumps(body), f"host_fs_read {path!r} -> {rc}")
        _, body, _ = srv.request("POST", f"/v1/cells/{cid}/exec", {"code": write})
        rc = body.get("exit_code", 0)
        record("paths", untouched() and (rc < 0 or not must_refuse), f"host_fs_write {path!r} -> {rc}")
        code, body, _ = srv.request("GET", f"/v1/cells/{cid}/files?path={quote(path, safe='')}")
        record("paths", (code in (400, 404) or not must_refuse) and "REDTEAM-SECRET" not in json.dumps(body), f"files GET {path!r} -> {code}")
        code, body, _ = srv.request("POST", f"/v1/cells/{cid}/files", {"path": path, "content": "PWNED"})
        record("paths", untouched() and (code in (400, 404, 409, 413) or not must_refuse), f"files POST {path!r} -> {code}")


def trailing(srv: ServerProcess) -> None:
    # T-PATH-1: a trailing slash on a regular file is ENOTDIR, never the file.
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
    files = f"/v1/cells/{cell['cell_id']}/files"
    for name in ("notes.txt", "dir/notes.txt"):
        srv.request("POST", files, {"path": name, "content": "REDTEAM-NOTES"})

    def intact() -> bool:
        return all(srv.request("GET", f"{files}?path={quote(n)}")[1] == {"content": "REDTEAM-NOTES"}
                   for n in ("notes.txt", "dir/notes.txt"))

    for path in trailing_slash_paths():
        q = quote(path, safe="")
        _, body, _ = srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": guests.read_probe(path)})
        record("trailing", body.get("exit_code") == -3, f"host_fs_read {path!r} -> {body.get('exit_code')}")
        _, body, _ = srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": guests.write_probe(path, b"PWNED")})
        record("trailing", body.get("exit_code") == -3 and intact(), f"host_fs_write {path!r} -> {body.get('exit_code')}")
        for method, url, payload in (("GET", f"{files}?path={q}", None), ("POST", files, {"path": path, "content": "PWNED"}),
                                     ("GET", f"{files}/info?path={q}", None), ("GET", f"{files}/list?path={q}", None),
                                     ("DELETE", f"{files}?path={q}", None),
                                     ("POST", f"{files}/rename", {"old_path": path, "new_path": "moved.txt"})):
            code, body, _ = srv.request(method, url, payload)
            ok = (code, body.get("code") if isinstance(body, dict) else None) == (400, "not_a_directory")
            record("trailing", ok and "REDTEAM-NOTES" not in json.dumps(body) and intact(), f"files {method} {url[-40:]} {path!r} -> {code}")
        code, body, _ = srv.request("GET", f"{files}/exists?path={q}")
        record("trailing", (code, body) == (200, {"exists": False}), f"files exists {path!r} -> {code} {body}")
    code, body, _ = srv.request("POST", f"{files}/mkdir", {"path": "made/"})
    record("trailing", code == 200 and body.get("type") == "dir", f"mkdir 'made/' -> {code}")
    code, body, _ = srv.request("GET", f"{files}/list?path=dir/")
    record("trailing", code == 200 and [f["name"] for f in body.get("files", [])] == ["notes.txt"], f"list 'dir/' -> {code}")


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): what a guest's rename loop does, atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(a), -100, bytes(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def incident_snapshot(srv: ServerProcess) -> None:
    # T-PATH-2: the snapshot reads volumes a still-running guest controls.
    # Runs last: it takes the node out of rotation, and puts it back after.
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
    volume = srv.root / "sandbox_volumes" / "default" / cell["cell_id"]
    key = srv.root / "keys" / "node_ed25519"
    secret = key.read_bytes()
    marks = (secret, hashlib.sha256(secret).hexdigest().encode())
    (volume / "public.txt").write_text("public")
    os.symlink(key, volume / "key-link")
    os.symlink(key.parent, volume / "keys-dir")
    os.link(key, volume / "key-hardlink")
    (volume / "swap.txt").write_text("public")
    os.symlink(key, volume / "swap.txt_alt")
    env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
    stop = threading.Event()
    swaps = 0

    def guest() -> None:
        nonlocal swaps
        while not stop.is_set():
            _exchange(volume / "swap.txt", volume / "swap.txt_alt")
            swaps += 1

    thread = threading.Thread(target=guest, daemon=True)
    thread.start()
    try:
        for attempt in range(3):
            out = Path(tempfile.mkdtemp(prefix="cell-redteam-")) / "incident.tar.gz"
            proc = subprocess.run([sys.executable, "-m", "appliance.cli", "incident", "snapshot", "--out", str(out),
                                   "--with-volume-contents", "--reason", "red team"], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
            raw = gzip.decompress(out.read_bytes()) if proc.returncode == 0 else b""
            record("incident", proc.returncode == 0, f"snapshot {attempt} ran: {proc.stderr[-200:]}")
            record("incident", bool(raw) and not any(m in raw for m in marks),
                   f"snapshot {attempt}: node key bytes or hash absent (swaps so far {swaps})")
            record("incident", b"volumes/default/" + cell["cell_id"].encode() + b"/public.txt" in raw,
                   f"snapshot {attempt}: the volume's own files are archived")
    finally:
        stop.set()
        thread.join()
        for name in ("key-link", "keys-dir", "key-hardlink", "swap.txt", "swap.txt_alt"):
            (volume / name).unlink()  # the key is one-link again
    subprocess.run([sys.executable, "-m", "appliance.cli", "incident", "clear"], env=env, cwd=REPO,
                   capture_output=True, text=True, timeout=60, check=True)
    deadline = time.monotonic() + 10
    status = 503
    while time.monotonic() < deadline and status == 503:
        status = srv.request("GET", "/v1/cells")[0]
        if status == 503:
            time.sleep(0.1)
    record("incident", status == 200, f"back in rotation after clear -> {status}")


DOS_CASES = [
    ("spin", "wasm", guests.wat("spin.wat"), {"timeout"}),
    ("memory-growth", "wasm", guests.wat("grow.wat"), {"ok", "error"}),
    ("deep-recursion", "wasm", guests.wat("recurse.wat"), {"error"}),
    ("10k-host-calls", "wasm", guests.wat("many_calls.wat"), {"error"}),  # run() returns 10000 -> non-zero exit
    ("py-spin", "python3", "while True: pass", {"timeout"}),
    ("py-sleep", "python3", "import time; time.sleep(3600)", {"timeout"}),
    ("py-memory", "python3", "x = []\nwhile True: x.append(bytearray(10**6))", {"memory_limit"}),
    ("py-output-flood", "python3", "while True: print('A' * 65536)", {"output_limit"}),
    ("py-recursion", "python3", "import sys; sys.setrecursionlimit(10**6)\ndef f(n): return f(n+1)\nf(0)", {"error", "timeout"}),
    # Deep C recursion: RecursionError where CPython can see it, a named stack-overflow trap where it cannot;
    # never a SIGSEGV that takes the worker (and every cell on it) down (runtime/stack.py).
    ("py-deep-c-recursion", "python3", "import json\nl = []\nfor _ in range(100_000): l = [l]\njson.dumps(l)", {"error"}),
    ("py-deep-free", "python3", "l = []\nfor _ in range(400_000): l = [l]\ndel l", {"error"}),
    ("js-recursion", "javascript", "function f(n) { return f(n + 1) } f(0)", {"error"}),
    ("js-spin", "javascript", "for(;;){}", {"timeout"}),
    ("js-output-flood", "javascript", "for(;;) console.log('B'.repeat(65536))", {"output_limit"}),
    ("js-memory", "javascript", "let a = []; for(;;) a.push(new Array(1e6).fill(1))", {"memory_limit", "error", "timeout"}),
    # T-DOS-1 (results): the results channel refuses floods and garbage without stalling the run
    ("py-result-flood", "python3", "for i in range(1_000_000): display(i)", {"ok", "timeout"}),
    ("py-result-garbage", "python3", "import _host\nfor i in range(1_000_000):\n    _host.call(b'cell-result/1\\n' + b'[' * 100_000)",
     {"ok", "timeout"}),
    ("js-result-fd-flood", "javascript", "const f = std.fdopen(0x7FFF0001, 'w'); for(;;) f.puts('x'.repeat(65536))",
     {"timeout"}),
]


def dos(srv: ServerProcess) -> None:
    for name, template, code, expected in DOS_CASES:
        t = time.monotonic()
        status, body, _ = srv.request("POST", "/v1/execute", {"template": template, "code": code, "timeout_ms": 2000})
        elapsed = time.monotonic() - t
        ok = status == 200 and body.get("status") in expected and elapsed < 2.0 + 1.5 and "receipt" in body
        record("dos", ok, f"{name}: {status} {body.get('status') if isinstance(body, dict) else body} in {elapsed:.2f}s")
        alive, _, _ = srv.request("GET", "/v1/cells")
        record("dos", alive == 200, f"{name}: server still answering")
    huge = "(module (memory (export \"memory\") 1) (func (export \"run\") (result i32) i32.const 0) (data (i32.const 0) \"" + "A" * (9 * 1024 * 1024) + "\"))"
    status, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": huge})
    record("dos", status == 413 and body.get("code") == "module_too_large", f"huge module -> {status} {body.get('code')}")
    forged_end(srv)


def forged_end(srv: ServerProcess, limit: float = 2.0) -> None:
    """T-DOS-1: forged end-of-run signals in a persistent JavaScript cell.
    After each answer the worker's threads and the cell's volume are watched
    for 2 s: a guest still running would burn CPU and grow /data."""
    pids = worker_pids(srv)

    def attempt(cid: str, code: str) -> tuple[dict[str, Any], float]:
        t = time.monotonic()
        _, body, _ = srv.request("POST", f"/v1/cells/{cid}/exec", {"code": code, "timeout_ms": int(limit * 1000)})
        return body, time.monotonic() - t

    def quiet(name: str, volume: Path) -> None:
        after = watch_after_answer(pids, volume, thread_cpu(pids), tree_bytes(volume))
        record("dos", after.volume_growth == 0 and after.busiest_thread_s <= 0.3,
               f"{name}: after its answer +{after.volume_growth} bytes in /data, {after.busiest_thread_s:.2f} s CPU on a worker thread")

    for name, code, expected, to_deadline, stream in JS_FORGED_END:
        _, cell, _ = srv.request("POST", "/v1/cells", {"template": "javascript"})
        volume = srv.root / "sandbox_volumes" / "default" / cell["cell_id"]
        body, elapsed = attempt(cell["cell_id"], code)
        in_time = limit - 0.05 <= elapsed < limit + 1.5 if to_deadline else elapsed < limit
        shown = stream is None or JS_FORGED_MARKER in str(body.get(stream))
        record("dos", body.get("status") == expected and in_time and shown and "receipt" in body,
               f"js-{name}: {body.get('status')} in {elapsed:.2f}s")
        quiet(f"js-{name}", volume)
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "javascript"})
    volume = srv.root / "sandbox_volumes" / "default" / cell["cell_id"]
    body, elapsed = attempt(cell["cell_id"], JS_IMITATE_IDLE_READ + JS_KEEP_WORKING)
    record("dos", body.get("status") == "ok" and elapsed < limit, f"js-imitated-idle-read: {body.get('status')} in {elapsed:.2f}s")
    quiet("js-imitated-idle-read (parked)", volume)
    body, elapsed = attempt(cell["cell_id"], "1+1")
    record("dos", body.get("status") == "timeout" and elapsed < limit + 1.5,
           f"js-imitated-idle-read, next cell: {body.get('status')} in {elapsed:.2f}s")
    quiet("js-imitated-idle-read (woken)", volume)
    # Timers that would fire after the answer: cancelled at the deadline (the
    # interpreter kept), or, for QuickJS's own os timers, never run after it.
    for name, code, expected, kept in JS_LATE_TIMERS:
        _, cell, _ = srv.request("POST", "/v1/cells", {"template": "javascript"})
        volume = srv.root / "sandbox_volumes" / "default" / cell["cell_id"]
        body, elapsed = attempt(cell["cell_id"], code.replace("{delay}", str(int(limit * 1000) + 300)))
        status = body.get("status")
        in_time = limit - JS_TIMER_MARGIN - 0.05 <= elapsed < limit + 1.5 if status == "timeout" else elapsed < limit
        record("dos", status in expected and in_time and (not kept or "note" not in body) and "receipt" in body,
               f"js-{name}: {status} in {elapsed:.2f}s, interpreter kept: {'note' not in body}")
        quiet(f"js-{name}", volume)
        if kept:
            body, _ = attempt(cell["cell_id"], "await new Promise(r => setTimeout(r, 300)); 'next'")
            record("dos", body.get("stdout") == "next\n", f"js-{name}: the next run ran none of it ({body.get('status')})")


def tenants(srv: ServerProcess) -> None:
    env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "tenant", "add", "mallory"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    mallory = out.strip().rsplit(" ", 1)[-1]
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
    cid = cell["cell_id"]
    _, ran, _ = srv.request("POST", f"/v1/cells/{cid}/exec", {"code": "secret = 'victim'"})
    attempts = [
        ("GET", f"/v1/cells/{cid}", None), ("POST", f"/v1/cells/{cid}/exec", {"code": "print(secret)"}),
        ("POST", f"/v1/cells/{cid}/exec/stream", {"code": "print(secret)"}), ("DELETE", f"/v1/cells/{cid}", None),
        ("PUT", f"/v1/cells/{cid}/timeout", {"timeout_ms": 5000}), ("GET", f"/v1/cells/{cid}/files?path=x", None),
        ("POST", f"/v1/cells/{cid}/files", {"path": "x", "content": "y"}), ("DELETE", f"/v1/cells/{cid}/files?path=x", None),
        ("GET", f"/v1/cells/{cid}/files/list?path=", None), ("GET", f"/v1/cells/{cid}/files/exists?path=x", None),
        ("GET", f"/v1/cells/{cid}/files/info?path=x", None), ("POST", f"/v1/cells/{cid}/files/mkdir", {"path": "d"}),
        ("POST", f"/v1/cells/{cid}/files/rename", {"old_path": "x", "new_path": "y"}),
        ("GET", f"/v1/receipts/{ran['execution_id']}", None),
    ]
    for method, path, body in attempts:
        status, answer, _ = srv.request(method, path, body, key=mallory)
        record("tenants", status == 404 and "victim" not in json.dumps(answer), f"{method} {path} as another tenant -> {status}")
    _, listing, _ = srv.request("GET", "/v1/receipts?limit=1000", key=mallory)
    record("tenants", all(r["execution_id"] != ran["execution_id"] for r in listing["receipts"]), "receipt listing is per tenant")
    status, _, _ = srv.request("GET", "/v1/cells", key=mallory + "x")
    record("tenants", status == 401, "tampered key refused")
    # T-TENANT-1: mallory's own run is placed on a worker bound to mallory, never the victim's.
    status, _, _ = srv.request("POST", "/v1/execute", {"code": "print(1)"}, key=mallory)
    _, node, _ = srv.request("GET", "/v1/status", key=mallory)
    binding = node["worker_sandbox"]["tenant_binding"]
    record("tenants", status == 200 and binding["bound"] >= 2 and "tenant" not in json.dumps(node["worker_sandbox"]["workers"]),
           f"tenant-bound workers: {binding['bound']} bound after two tenants ran, no tenant id in the status")
    _mcp_tenants(srv, mallory, cid)


def _mcp_open(srv: ServerProcess, key: str | None = None) -> tuple[int, str]:
    status, _, headers = srv.request("POST", "/mcp", {
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "red", "version": "0"}}}, key=key)
    return status, {k.lower(): v for k, v in headers.items()}.get("mcp-session-id", "")


def _mcp_tenants(srv: ServerProcess, mallory: str, cid: str) -> None:
    """T-MCP-1: the MCP endpoint is the same door as /v1 (key, tenant isolation)."""
    for key in ("", mallory + "x"):
        status, _ = _mcp_open(srv, key)
        record("tenants", status == 401, f"/mcp initialize with key {key[:4]!r}... -> {status}")
    _, victim_sid = _mcp_open(srv)
    status, sid = _mcp_open(srv, mallory)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    status, _, _ = srv.request("POST", "/mcp", ping, key=mallory, headers={"Mcp-Session-Id": victim_sid})
    record("tenants", status == 404, f"/mcp: another tenant's session id -> {status}")
    for tool, args in (("run_code", {"code": "print(secret)", "cell_id": cid}), ("read_file", {"cell_id": cid, "path": "x"}),
                       ("write_file", {"cell_id": cid, "path": "x", "content": "y"}), ("list_files", {"cell_id": cid}),
                       ("delete_cell", {"cell_id": cid})):
        status, answer, _ = srv.request("POST", "/mcp", {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                                         "params": {"name": tool, "arguments": args}},
                                        key=mallory, headers={"Mcp-Session-Id": sid})
        result = answer.get("result", {}) if isinstance(answer, dict) else {}
        text = json.dumps(answer)
        record("tenants", status == 200 and result.get("isError") is True and "cell_not_found" in text
               and "victim" not in text, f"/mcp {tool} on another tenant's cell -> {status} {text[:80]}")


def _add_tenant(srv: ServerProcess, name: str) -> str:
    env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "tenant", "add", name], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return out.strip().rsplit(" ", 1)[-1]


def _offline_verify(path: Path, public_key: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "appliance.receipts.verify", str(path), "--public-key", public_key,
                           "--json"], cwd=REPO, capture_output=True, text=True)
    try:
        return done.returncode, (json.loads(done.stdout)["first_problem"] or {}).get("kind", "")
    except ValueError:
        return done.returncode, done.stdout[-200:]


def receipts(srv: ServerProcess) -> None:
    eve = _add_tenant(srv, "eve")
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
    _, ran, _ = srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": "print('victim')"})
    # T-TENANT-1: verify describes the caller's receipts only: no node-wide count, no other tenant's ids.
    code, answer, _ = srv.request("GET", "/v1/receipts/verify", key=eve)
    leak = json.dumps(answer)
    record("receipts", code == 200 and answer.get("receipts") == 0 and "count" not in answer
           and ran["execution_id"] not in leak, f"verify as another tenant -> {code} {answer}")
    # T-DOS-2: a flood of verify calls is rate-limited and does not hold up another tenant's run.
    results: list[tuple[int, Any, dict[str, str]]] = []
    go = threading.Barrier(25)

    def flood() -> None:
        go.wait()
        results.append(srv.request("GET", "/v1/receipts/verify", key=eve))

    threads = [threading.Thread(target=flood) for _ in range(24)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.monotonic()
    status, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"})
    took = time.monotonic() - t0
    for t in threads:
        t.join(timeout=120)
    limited = [r for r in results if r[0] == 429]
    record("receipts", bool(limited) and all(b.get("code") == "verify_rate_limited" and h.get("Retry-After")
                                             for _, b, h in limited) and {c for c, _, _ in results} <= {200, 429},
           f"24 concurrent verify calls -> {sorted(c for c, _, _ in results)}")
    record("receipts", status == 200 and body.get("stdout") == "1\n" and took < 5.0,
           f"print(1) during a verify flood -> {status} in {took:.2f}s")
    # T-RCPT-2: exports bind tenant and cell, and end with a signed seal.
    _, node, _ = srv.request("GET", "/v1/status")
    env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
    out = Path(tempfile.mkdtemp(prefix="cell-redteam-")) / "export.jsonl"
    subprocess.run([sys.executable, "-m", "appliance.cli", "receipts", "export", "--out", str(out)], env=env,
                   cwd=REPO, capture_output=True, text=True, check=True)
    clean = out.read_text().splitlines(keepends=True)
    record("receipts", _offline_verify(out, node["node_public_key"]) == (0, ""), "clean export verifies")

    def attack(name: str, lines: list[str], expected: str) -> None:
        out.write_text("".join(lines))
        got = _offline_verify(out, node["node_public_key"])
        record("receipts", got == (1, expected), f"export {name} -> {got}")

    def edited(edit: Any) -> list[str]:
        objs = [json.loads(line) for line in clean]
        edit(objs)
        return [json.dumps(o, separators=(",", ":"), ensure_ascii=False) + "\n" for o in objs]

    no_header_cp = edited(lambda o: o[0].__setitem__("checkpoint", None))
    attack("last 2 rows dropped, header checkpoint removed", no_header_cp[:-3] + no_header_cp[-1:], "truncated")
    attack("last row and trailer dropped, header checkpoint removed", no_header_cp[:-2], "truncated")
    mine = next(i for i, line in enumerate(clean) if ran["execution_id"] in line)
    attack("victim receipt moved to another cell", edited(lambda o: o[mine].__setitem__("cell_id", "cell-elsewhere")),
           "bad_signature")
    attack("victim receipt moved to another tenant", edited(lambda o: o[mine].__setitem__("tenant_id", "eve")),
           "bad_signature")
    attack("victim receipt stripped of its envelope", edited(lambda o: o[mine].__setitem__("envelope", None)),
           "bad_signature" if mine == 1 else "downgrade")


def fairness(srv: ServerProcess) -> None:
    """T-FAIR-1: one tenant floods (2 persistent cells + 3 one-shot clients,
    each re-sending `while True: pass` with a 6 s timeout); another tenant's
    short runs must not wait for the flood's runs to end."""
    flooder, neighbour = add_tenant(srv, "flooder"), add_tenant(srv, "neighbour")
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"}, key=neighbour)
    workers = srv.request("GET", "/v1/status", key=neighbour)[1]["workers"]["workers"]
    flood = Flood(srv, flooder, cells=2, one_shots=max(3, workers + 1), timeout_ms=6000)
    flood.start()
    refused: list[Any] = []
    try:
        # T-TENANT-1: the flooder's runs reach only the worker bound to it;
        # the neighbour's cell lives in a worker of its own.
        flood.wait_saturated(1)
        times = probe(srv, neighbour, cell["cell_id"], 3, refused)
    finally:
        flood.stop()
    for kind, values in times.items():
        for took in values:
            record("fairness", took < 3.0, f"another tenant's print(1) ({kind}) took {took:.2f}s while one tenant floods")
    record("fairness", not refused, f"another tenant's runs refused while one tenant floods: {refused}")
    # The flooder is held to its share, not starved: its runs end at their own
    # limit, and what waits too long is turned away with a clear code.
    record("fairness", (200, "timeout") in flood.statuses
           and set(flood.statuses) <= {(200, "timeout"), (429, "tenant_busy"), (503, "busy")},
           f"the flooding tenant's runs end at their own limit or are refused clearly: {sorted(set(flood.statuses))}")


MALFORMED = [
    ("POST", "/v1/cells", b"{", 400), ("POST", "/v1/cells", b"", 400), ("POST", "/v1/cells", b"null", 400),
    ("POST", "/v1/cells", b'{"template": 5}', 400), ("POST", "/v1/cells", b'{"template": "python3", "envs": {"A=B": "x"}}', 400),
    ("POST", "/v1/cells", b'{"template": "python3", "envs": {"A": "x\\u0000"}}', 400),
    ("POST", "/v1/cells", b'{"template": "python3", "metadata": [1]}', 400), ("POST", "/v1/cells", b'{"template": "python3", "persistent": "yes"}', 400),
    ("POST", "/v1/cells", b'{"template": "python3", "memory_mb": 999999}', 400), ("POST", "/v1/cells", b'{"template": "python3", "timeout_ms": true}', 400),
    ("POST", "/v1/execute", b'{"template": "python3", "code": 5}', 400), ("POST", "/v1/execute", b'{"template": "python3"}', 400),
    ("POST", "/v1/execute", b'{"template": "python3", "code": "x", "code_b64": "eA=="}', 400),
    ("POST", "/v1/execute", b'{"template": "wasm", "code_b64": "AAAA"}', 400), ("POST", "/v1/execute", b'{"template": "python3", "code": "\\ud800"}', 400),
    ("POST", "/v1/execute", b'{"template": "python3", "code": "1", "timeout_ms": 99999999}', 400),
    ("POST", "/v1/execute", b'{"template": "python3", "code": "1", "envs": {"A": "\\ud800"}}', 400),
    ("POST", "/v1/execute", b'{"template": "python3", "code": "1", "envs": ["A=1"]}', 400),
    ("POST", "/v1/execute", b'{"template": "wasm", "code": "(module)", "envs": {"A": "x"}}', 400),
    ("POST", "/v1/execute", b"[" * 100000 + b"]" * 100000, 400), ("GET", "/v1/receipts?limit=abc", None, 400),
    ("GET", "/v1/receipts?after=-1", None, 400), ("GET", "/v1/cells/" + "x" * 5000, None, 404),
    ("PATCH", "/v1/cells", b"{}", 405),
]


def requests(srv: ServerProcess) -> None:
    for item in MALFORMED:
        method, path, raw, expected = (item[0], item[1], item[2], item[3]) if len(item) == 4 else (item[0], item[1], None, item[3])
        status, body, _ = srv.request(method, path, raw=raw)
        ok = status == expected and isinstance(body, dict) and set(body) == {"error", "code"}
        record("requests", ok, f"{method} {path[:40]} {raw[:40] if raw else ''!r} -> {status} {body if not ok else ''}")
    status, body, _ = srv.request("POST", "/v1/execute", raw=b'{"code": "' + b"x" * (11 * 1024 * 1024) + b'"}')
    record("requests", status == 413 and body.get("code") == "payload_too_large", f"11 MB body -> {status}")
    status, body, _ = srv.request("GET", "/v1/cells", headers={"Authorization": "Basic Zm9vOmJhcg=="})
    record("requests", status == 401, f"Basic auth header -> {status}")
    # T-DOS-2 (metrics): made-up methods, without a key, add no metric series of their own.
    for i in range(20):
        srv.request(f"REDTEAM{i}", "/v1/cells", key="not-a-key")
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    record("requests", "REDTEAM" not in text and 'method="other"' in text, "20 made-up HTTP methods -> counted as other")


# T-LIC-2: each Pro host function, with its real and a wrong signature, alone and together.
PRO_IMPORTS = [
    ("load_weights", '(import "cell" "load_weights" (func (param i32 i32 i64 i32 i32) (result i32)))'),
    ("host_mcp_call", '(import "cell" "host_mcp_call" (func (param i32 i32 i32 i32) (result i32)))'),
    ("load_weights", '(import "cell" "load_weights" (func))'),
    ("host_mcp_call", '(import "cell" "host_mcp_call" (func (result i32)))'),
    ("load_weights", '(import "cell" "load_weights" (func (param i32 i32 i64 i32 i32) (result i32)))'
                     ' (import "cell" "host_mcp_call" (func (param i32 i32 i32 i32) (result i32)))'),
]


def _pro_refused(srv: ServerProcess, label: str) -> None:
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
    for name, imports in PRO_IMPORTS:
        wat = f'(module {imports} (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))'
        for path in ("/v1/execute", f"/v1/cells/{cell['cell_id']}/exec"):
            body_in = {"template": "wasm", "code": wat} if path == "/v1/execute" else {"code": wat}
            status, body, _ = srv.request("POST", path, body_in)
            ok = status == 403 and body.get("code") == "license_required" and name in str(body.get("error"))
            record("license", ok, f"{label}: {path} importing {imports[:60]} -> {status} {body}")


def licenses(srv: ServerProcess) -> None:
    _pro_refused(srv, "no license")
    # A license signed by a key the appliance does not trust, claiming every feature.
    from tests.factories import make_keypair, make_license, stamp

    attacker = make_keypair()
    now = datetime.now(timezone.utc)
    path = srv.root / "etc" / "license.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_license(attacker.signing_key, attacker.key_id, tier="hub",
                                  features=["load_weights", "host_mcp_call", "multi_tenant"],
                                  issued_at=stamp(now - timedelta(hours=1)), not_before=stamp(now - timedelta(hours=1)),
                                  expires_at=stamp(now + timedelta(days=30))))
    try:
        deadline = time.monotonic() + 10
        lic: dict[str, Any] = {}
        while time.monotonic() < deadline:
            lic = srv.request("GET", "/v1/status")[1].get("license") or {}
            if lic.get("reason_code") == "unknown_key":
                break
            time.sleep(0.2)
        record("license", lic.get("tier") == "free" and lic.get("features") == [] and lic.get("reason_code") == "unknown_key",
               f"forged license -> {lic}")
        _pro_refused(srv, "forged license")
    finally:
        path.unlink()


def _answer_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def _headers_only(srv: ServerProcess, head: str) -> tuple[int, str]:
    """Send request headers and no body; the answer must come anyway (T-DOS-2)."""
    host, port = srv.url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head.encode())
        data = b""
        try:
            # Read the whole answer, not until close: the server may keep the
            # connection a while to drain a body the client announced.
            while not _answer_complete(data) and (chunk := sock.recv(65536)):
                data += chunk
        except OSError:
            pass
    head_part, _, body = data.partition(b"\r\n\r\n")
    if not head_part.startswith(b"HTTP/1.1 "):
        return 0, ""
    try:
        code = str(json.loads(body).get("code"))
    except ValueError:
        code = ""
    return int(head_part.split()[1]), code


def bodies(srv: ServerProcess) -> None:
    post = "POST /v1/execute HTTP/1.1\r\nHost: cell\r\nContent-Type: application/json\r\n"
    cases = [
        ("unauthenticated, Content-Length 100 GiB", post + f"Content-Length: {100 * 1024 ** 3}\r\n\r\n", (413, "payload_too_large")),
        ("unauthenticated, Content-Length 5 MB", post + "Content-Length: 5000000\r\n\r\n", (401, "unauthorized")),
        ("wrong key, Content-Length 5 MB", post + "Authorization: Bearer nope\r\nContent-Length: 5000000\r\n\r\n", (401, "bad_key")),
        ("unauthenticated, chunked", post + "Transfer-Encoding: chunked\r\n\r\n", (401, "unauthorized")),
        ("unauthenticated, Expect: 100-continue", post + "Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n", (401, "unauthorized")),
        ("valid key, Content-Length 10 MB + 1", post + f"Authorization: Bearer {srv.api_key}\r\nContent-Length: {10 * 1024 * 1024 + 1}\r\n\r\n",
         (413, "payload_too_large")),
    ]
    for name, head, expected in cases:
        got = _headers_only(srv, head)
        record("requests", got == expected, f"{name} (no body sent) -> {got}, expected {expected}")


def own_address_hosts() -> dict[str, list[str]]:
    """Names for this host's own interface addresses (the server runs here too)."""
    addresses = sorted({str(net.network_address if net.num_addresses == 1 else net[1]) for net in own_networks()})
    return {f"self-{i}.attacker.example": [a] for i, a in enumerate(addresses)}


def site(srv: ServerProcess, own: dict[str, list[str]]) -> None:
    # T-SSRF-1: the appliance's own addresses, whatever kind they are.
    for name, addresses in own.items():
        code, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": guests.fetch_probe(f"http://{name}/")})
        denials = body.get("denials", []) if isinstance(body, dict) else []
        ok = code == 200 and body.get("exit_code") == -1 and any(d["threat"] == "T-SSRF-1" for d in denials)
        record("site", ok, f"own address {addresses[0]} -> {code} {body if not ok else ''}")
    # A bad deny-list entry stops start-up, naming the key.
    env = dict(os.environ, SYNAPSE_ROOT=tempfile.mkdtemp(prefix="cell-redteam-bad-"), SYNAPSE_EGRESS="on",
               SYNAPSE_EGRESS_DENY="2001:db8::/64,10.0.0.0/33", SYNAPSE_PORT="0")
    env["SYNAPSE_CONFIG_DIR"] = str(Path(env["SYNAPSE_ROOT"]) / "etc")
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "serve"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    record("site", out.returncode != 0 and "SYNAPSE_EGRESS_DENY" in out.stdout + out.stderr,
           f"bad SYNAPSE_EGRESS_DENY -> exit {out.returncode}: {(out.stdout + out.stderr)[-200:]}")


DISK_FILE_LIMIT = 20_000
DEEP = "/".join(["a"] * 1200)
PY_DEEP = "import os\np = 'a'\nfor _ in range(1200):\n    os.mkdir(p)\n    p += '/a'\nprint('built')\n"
PY_WIDE = "import os\nfor i in range(5000):\n    os.mkdir(f'd{i}')\n    open(f'd{i}/f', 'wb').write(b'x' * 150)\n"
PY_FILE_FLOOD = "i = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1\n"


def disk(srv: ServerProcess) -> None:
    volumes = srv.root / "sandbox_volumes"

    def drop(cid: str, what: str) -> None:
        code, _, _ = srv.request("DELETE", f"/v1/cells/{cid}")
        record("disk", code == 200 and not (volumes / "default" / cid).exists(), f"{what}: DELETE -> {code}, volume gone")

    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
    cid = cell["cell_id"]
    code, _, _ = srv.request("POST", f"/v1/cells/{cid}/files/mkdir", {"path": DEEP})
    record("disk", code == 200, f"files API mkdir 1200 deep -> {code}")
    drop(cid, "1200-deep files API tree")

    code, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": PY_DEEP, "timeout_ms": 30000})
    leftovers = [d for pool in (volumes / ".pool").iterdir() for d in pool.iterdir() if (d / "a").exists()]
    record("disk", code == 200 and body.get("status") == "ok" and "receipt" in body and not leftovers,
           f"one-shot guest builds 1200 nested dirs -> {code} {body.get('status') if isinstance(body, dict) else body}, "
           f"{len(leftovers)} scratch trees left")

    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
    wide = cell["cell_id"]
    code, body, _ = srv.request("POST", f"/v1/cells/{wide}/exec", {"code": PY_WIDE, "timeout_ms": 60000})
    _, info, _ = srv.request("GET", f"/v1/cells/{wide}")
    record("disk", code == 200 and info.get("disk_bytes") == 750_000,
           f"5000 sibling dirs (> worker RLIMIT_NOFILE) counted: {info.get('disk_bytes')} of 750000 bytes")
    drop(wide, "5000 sibling dirs")

    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
    flood = cell["cell_id"]
    code, body, _ = srv.request("POST", f"/v1/cells/{flood}/exec", {"code": PY_FILE_FLOOD, "timeout_ms": 30000})
    stopped = {"threat": "T-DISK-1", "function": "wasi", "reason": "file_limit_exceeded"} in body.get("denials", [])
    record("disk", code == 200 and body.get("status") == "killed" and stopped and "receipt" in body,
           f"file flood stopped at the file limit mid-run -> {code} {body.get('status')}")
    _, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
    other = cell["cell_id"]
    code, body, _ = srv.request("POST", f"/v1/cells/{other}/files", {"path": "one-more", "content": "x"})
    record("disk", code == 413 and body.get("code") == "file_limit_exceeded", f"files API past the file limit -> {code} {body}")
    code, body, _ = srv.request("POST", f"/v1/cells/{other}/exec", {"code": guests.write_probe("one-more", b"x")})
    record("disk", code == 413 and body.get("code") == "file_limit_exceeded", f"run past the file limit -> {code}")
    drop(flood, "file flood")
    code, body, _ = srv.request("POST", f"/v1/cells/{other}/exec", {"code": guests.write_probe("one-more", b"x")})
    record("disk", code == 200 and body.get("exit_code") == 1, f"host_fs_write after the flood is gone -> {code} {body.get('exit_code')}")
    drop(other, "file limit probe")


def escape() -> None:
    """T-ESCAPE-1..3: the escaped-guest table against a confined worker (one row per attempt)."""
    import functools

    from appliance.runtime.pool import WorkerPool
    from tests import escaped_guest
    from tests.liveserver import shared_cache

    settings, paths_ = escaped_guest.prepare_root(Path(tempfile.mkdtemp(prefix="cell-escape-")) / "root", shared_cache())
    pool = WorkerPool(settings, target=functools.partial(escaped_guest.escaped_worker, paths=paths_))
    pool.start()
    try:
        for attempt, expected in escaped_guest.EXPECTED.items():
            got = escaped_guest.observe(pool, attempt)
            record("escape", got == expected, f"{attempt}: {got}, expected {expected}")
    finally:
        pool.close()
    # T-ESCAPE-3: egress on and a stdio MCP server configured change nothing for
    # the worker (the supervisor's broker makes those calls).
    base = Path(tempfile.mkdtemp(prefix="cell-escape-egress-"))
    (base / "mcp.json").write_text(escaped_guest.MCP_TABLE)
    settings, paths_ = escaped_guest.prepare_root(base / "root", shared_cache(),
                                                  env={"SYNAPSE_EGRESS": "on", "SYNAPSE_MCP_SERVERS": str(base / "mcp.json")})
    pool = WorkerPool(settings, target=functools.partial(escaped_guest.escaped_worker, paths=paths_))
    pool.start()
    try:
        for attempt in escaped_guest.EGRESS_ON_ROWS:
            got = escaped_guest.observe(pool, attempt)
            expected = escaped_guest.EXPECTED[attempt]
            record("escape", got == expected, f"egress+MCP on: {attempt}: {got}, expected {expected}")
    finally:
        pool.close()


# T-IMAGE-1: cells started from one pre-initialised image share its pages
# copy-on-write only. Each row: code run in cell A, then code in a new cell B
# whose stdout must be exactly the expected (nothing of A visible in B).
IMAGE_CASES = [
    ("module attribute", "import pandas as pd\npd.PLANTED = 'A'", "import pandas as pd\nprint(hasattr(pd, 'PLANTED'))", "False"),
    ("numpy global state", "import numpy as np\nnp.set_printoptions(precision=1)",
     "import numpy as np\nprint(np.get_printoptions()['precision'])", "8"),
    ("environment", "import os\nos.environ['PLANTED'] = 'A'\nos.putenv('PLANTED2', 'A')",
     "import os\nprint('PLANTED' in os.environ, os.getenv('PLANTED2'))", "False None"),
    ("sys.modules", "import sys, types\nsys.modules['planted'] = types.ModuleType('planted')",
     "import sys\nprint('planted' in sys.modules)", "False"),
    ("matplotlib rc", "import matplotlib\nmatplotlib.rcParams['lines.linewidth'] = 9",
     "import matplotlib\nprint(matplotlib.rcParams['lines.linewidth'])", "1.5"),
    # The reset lives in the image (sessions.PY_IMAGE_START): a cell that replaces
    # it, or seeds numpy, changes only its own interpreter.
    ("the image's reset replaced", "import sys\nsys.modules['_cell_start'].fresh = lambda env: None",
     "import sys\nprint(sys.modules['_cell_start'].fresh.__name__)", "_cell_fresh"),
    ("numpy seeded", "import numpy as np\nnp.random.seed(7)",
     "import numpy as np\nprint(np.random.random() == np.random.RandomState(7).random())", "False"),
]


def image(srv: ServerProcess) -> None:
    for name, plant, probe_code, want in IMAGE_CASES:
        _, a, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
        srv.request("POST", f"/v1/cells/{a['cell_id']}/exec", {"code": plant})
        _, b, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
        code, out, _ = srv.request("POST", f"/v1/cells/{b['cell_id']}/exec", {"code": probe_code})
        got = out.get("stdout", "").strip() if isinstance(out, dict) else ""
        record("image", code == 200 and got == want, f"{name}: cell B saw {got!r}, want {want!r}")
        for c in (a, b):
            srv.request("DELETE", f"/v1/cells/{c['cell_id']}")
    # The random state is each cell's own, not the image's.
    draws = set()
    for _ in range(3):
        _, c, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
        _, out, _ = srv.request("POST", f"/v1/cells/{c['cell_id']}/exec",
                                {"code": "import random, numpy as np\nprint(random.random(), np.random.random())"})
        draws.add(out.get("stdout", "") if isinstance(out, dict) else "")
        srv.request("DELETE", f"/v1/cells/{c['cell_id']}")
    record("image", len(draws) == 3, f"random draws of three new cells: {sorted(draws)}")


# T-IMAGE-2: snapshot files changed on disk between a stop and a start. Each
# row: (cell name, what is done to its file, the code its next run answers).
SNAPSHOT_ATTACKS = [
    ("flipped", "a byte in the middle flipped", "snapshot_invalid"),
    ("truncated", "the last 100 bytes cut off", "snapshot_invalid"),
    ("other_cell", "replaced by another cell's snapshot (same tenant)", "snapshot_invalid"),
    ("other_tenant", "replaced by the other tenant's snapshot", "snapshot_invalid"),
    ("other_image", "re-encoded (validly keyed) for another image", "snapshot_stale"),
    ("symlink", "a symlink to its own valid snapshot moved aside", "snapshot_invalid"),
    ("fifo", "a FIFO planted in its place", "snapshot_invalid"),
    ("group_readable", "made group- and world-readable (0644)", "snapshot_invalid"),
]


def _attack_snapshot(root: Path, kind: str, path: Path, donor: Path, foreign: Path, cell_id: str) -> None:
    from appliance.runtime import snapshot_file

    data = path.read_bytes()
    if kind == "flipped":
        path.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    elif kind == "truncated":
        path.write_bytes(data[:-100])
    elif kind in ("other_cell", "other_tenant"):
        path.write_bytes((donor if kind == "other_cell" else foreign).read_bytes())
    elif kind == "other_image":
        key = snapshot_file.tenant_key(snapshot_file.node_secret(root / "keys"), "default")
        _, state = snapshot_file.decode(data, "default", cell_id, key, 1 << 32)
        path.write_bytes(snapshot_file.encode(state, "0" * 64, "default", cell_id, key))
    elif kind == "symlink":
        aside = path.parent.parent / f"aside-{cell_id}"
        os.replace(path, aside)
        os.symlink(aside, path)
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path, 0o600)
    else:
        os.chmod(path, 0o644)


def snapshots() -> None:
    srv = start_server()
    root = srv.root
    try:
        cells = {}
        for name in ["control", "donor", "crasher"] + [a[0] for a in SNAPSHOT_ATTACKS]:
            _, body, _ = srv.request("POST", "/v1/cells", {"template": "python3", "timeout_ms": 600000})
            cells[name] = body["cell_id"]
            srv.request("POST", f"/v1/cells/{cells[name]}/exec", {"code": f"import pandas as pd\nv = {name!r}"})
        mallory = _add_tenant(srv, "snapshot-mallory")
        _, other, _ = srv.request("POST", "/v1/cells", {"template": "python3", "timeout_ms": 600000}, key=mallory)
        srv.request("POST", f"/v1/cells/{other['cell_id']}/exec", {"code": "v = 'mallory'"}, key=mallory)
        other_tenant = next(p.name for p in (root / "snapshots").iterdir() if p.name != "default") \
            if (root / "snapshots").is_dir() else ""
    finally:
        srv.stop()  # SIGTERM: every idle cell is captured
    snaps = root / "snapshots" / "default"
    foreign = root / "snapshots" / other_tenant / other["cell_id"]
    captured = all((snaps / c).is_file() for c in cells.values()) and foreign.is_file()
    record("snapshots", captured, f"SIGTERM captured every cell: {sorted(os.listdir(snaps)) if snaps.is_dir() else None}")
    if not captured:
        return
    for name, _, _ in SNAPSHOT_ATTACKS:
        _attack_snapshot(root, name, snaps / cells[name], snaps / cells["donor"], foreign, cells[name])
    again = start_server(root)
    try:
        for name, what, want in SNAPSHOT_ATTACKS:
            cid = cells[name]
            t = time.monotonic()
            code, body, _ = again.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(v)"}, timeout=30)
            got = (code, body.get("code") if isinstance(body, dict) else None)
            record("snapshots", got == (409, want) and time.monotonic() - t < 30,
                   f"{name} ({what}): {got}, want (409, {want!r}) {body if got != (409, want) else ''}")
            record("snapshots", not os.path.lexists(snaps / cid), f"{name}: the refused file is gone")
            code, body, _ = again.request("POST", f"/v1/cells/{cid}/exec", {"code": "print('v' in globals())"})
            fresh = code == 200 and isinstance(body, dict) and body.get("stdout") == "False\n"
            record("snapshots", fresh, f"{name}: the next run starts fresh: {code} {body}")
        for name in ("control", "donor"):
            code, body, _ = again.request("POST", f"/v1/cells/{cells[name]}/exec", {"code": "print(v)"})
            record("snapshots", code == 200 and body.get("stdout") == f"{name}\n" and body.get("restored") is True,
                   f"untouched cell {name} keeps its variables: {code} {body}")
        # The run that restores a cell and crashes it (a wasm stack overflow) rolls back to the restored state.
        code, body, _ = again.request("POST", f"/v1/cells/{cells['crasher']}/exec", {
            "code": "v = 'changed'\nl = []\nfor _ in range(400_000):\n    l = [l]\ndel l"})
        record("snapshots", code == 200 and body.get("status") == "error" and body.get("rolled_back") is True,
               f"a crash in the restoring run is rolled back: {code} {body}")
        code, body, _ = again.request("POST", f"/v1/cells/{cells['crasher']}/exec", {"code": "print(v)"})
        record("snapshots", code == 200 and body.get("stdout") == "crasher\n",
               f"the crashed cell has its variables from before the crash: {code} {body}")
        code, body, _ = again.request("POST", f"/v1/cells/{other['cell_id']}/exec", {"code": "print(v)"},
                                      key=mallory)
        record("snapshots", code == 200 and body.get("stdout") == "mallory\n",
               f"the other tenant's cell (whose snapshot was copied) keeps its variables: {code} {body}")
        code, body, _ = again.request("POST", "/v1/execute", {"template": "python3", "code": "print(6 * 7)"})
        record("snapshots", code == 200 and body.get("stdout") == "42\n", f"one-shot runs still answer: {code} {body}")
    finally:
        again.stop()


FAMILIES = ("ssrf", "paths", "trailing", "dos", "tenants", "fairness", "receipts", "requests", "disk", "image",
            "snapshots", "site", "license", "incident", "escape")


def _families(text: str) -> set[str]:
    names = {f for f in text.split(",") if f}
    unknown = names - set(FAMILIES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown family {sorted(unknown) or text!r}; known: {', '.join(FAMILIES)}")
    return names


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Attack tables against a live Cell server on loopback: every row "
                                     "must be refused or contained. Exit 1 when any row fails.")
    parser.add_argument("--quick", action="store_true", help="a sample of the SSRF inputs instead of all")
    parser.add_argument("--only", "--family", dest="only", type=_families, action="append", metavar="F1,F2",
                        help=f"run just these families (the server still starts); all by default. "
                             f"Families: {', '.join(FAMILIES)}")
    args = parser.parse_args(argv)  # --help prints this and exits; an unknown flag is an error, never "run all"
    quick = args.quick
    only: set[str] | None = set().union(*args.only) if args.only else None
    hosts = Path(tempfile.mkdtemp(prefix="cell-redteam-")) / "hosts.json"
    own = own_address_hosts()
    hosts.write_text(json.dumps({**EGRESS_HOSTS, **own}))
    print(f"Cell red team: {len(ssrf_urls())} SSRF inputs, {len(traversal_paths())} path inputs, "
          f"{len(trailing_slash_paths())} trailing-slash inputs, {len(DOS_CASES) + len(JS_FORGED_END) + len(JS_LATE_TIMERS) + 2} DoS guests")
    srv = start_server(env={"SYNAPSE_EGRESS": "on", "SYNAPSE_EGRESS_HOSTS": str(hosts),
                            "SYNAPSE_TENANT_FILE_LIMIT": str(DISK_FILE_LIMIT)})
    try:
        for family, fn in (("ssrf", lambda: (ssrf(srv, quick), cell_egress(srv))), ("paths", lambda: paths(srv)),
                           ("trailing", lambda: trailing(srv)), ("dos", lambda: dos(srv)),
                           ("tenants", lambda: tenants(srv)), ("fairness", lambda: fairness(srv)),
                           ("receipts", lambda: receipts(srv)),
                           ("requests", lambda: (requests(srv), bodies(srv))),
                           ("disk", lambda: disk(srv)), ("image", lambda: image(srv)), ("snapshots", snapshots),
                           ("site", lambda: site(srv, own)), ("license", lambda: licenses(srv)),
                           ("incident", lambda: incident_snapshot(srv)),  # takes the node out of rotation: after every server row
                           ("escape", escape)):
            if only is not None and family not in only:
                continue
            t = time.monotonic()
            fn()
            print(f"  {family:9} pass {tally[family + ':pass']:4}  fail {tally[family + ':fail']:3}  ({time.monotonic() - t:.1f}s)")
        code, verdict = srv.verify_receipts()
        record("receipts", code == 200 and verdict.get("ok") is True, f"default tenant's receipts verify: {verdict}")
        env = dict(os.environ, SYNAPSE_ROOT=str(srv.root), SYNAPSE_CONFIG_DIR=str(srv.root / "etc"))
        whole = subprocess.run([sys.executable, "-m", "appliance.cli", "receipts", "verify", "--db",
                                str(srv.root / "db" / "cell.sqlite")], env=env, cwd=REPO, capture_output=True, text=True)
        record("receipts", whole.returncode == 0, f"whole chain (operator): {whole.stdout.strip()}")
        print(f"  receipts  {verdict.get('receipts')} of the default tenant verified: {verdict.get('ok')}; "
              f"whole chain: {whole.stdout.strip()}")
    finally:
        srv.stop()
    total_pass = sum(v for k, v in tally.items() if k.endswith(":pass"))
    print(f"\n{total_pass} passed, {len(failures)} failed")
    for f in failures:
        print(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
