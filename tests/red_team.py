#!/usr/bin/env python3
"""Red-team corpus against a live server (DESIGN §9 release gate).

Starts a real Cell server on an ephemeral loopback port (egress ON, names
from a static map so nothing resolves through DNS and no packet leaves), then
throws the corpus of tests/redteam_corpus.py at it:

  ssrf      >= 100 URLs through a WAT guest's host_fetch: each denied by policy
  paths     >= 50 paths through host_fs_read, host_fs_write and the files API
  trailing  "notes.txt/" and its kin through both host functions and every
            files route: not_a_directory (-3 / 400), never the file; "dir/" works
  dos       spin, sleep, memory growth, output flood, deep recursion, huge
            module, 10,000 tiny host calls: each ends in its limit, the server
            keeps answering
  tenants   another tenant's cells, files and receipts are 404
  requests  oversized and malformed requests get clear 4xx errors, never 500
  escape    a guest that escaped wasmtime (tests/escaped_guest.py): a worker
            started exactly as the pool starts one runs native Python that
            tries to read the node key, db, license, config, mirror, write the
            module cache, open sockets, execve, ptrace, read the supervisor's
            environ: one row per attempt, each EACCES/EPERM or SIGSYS
  incident  `cell incident snapshot --with-volume-contents` while the volume
            holds links to the node key and a thread swaps a file with such a
            link: the key's bytes and hash never reach the tarball

Exits non-zero on any failure; prints a table of counts per family.
"""
from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import guests  # noqa: E402
from tests.liveserver import ServerProcess, start_server  # noqa: E402
from tests.redteam_corpus import EGRESS_HOSTS, ssrf_urls, trailing_slash_paths, traversal_paths  # noqa: E402

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
    ("js-spin", "javascript", "for(;;){}", {"timeout"}),
    ("js-output-flood", "javascript", "for(;;) console.log('B'.repeat(65536))", {"output_limit"}),
    ("js-memory", "javascript", "let a = []; for(;;) a.push(new Array(1e6).fill(1))", {"memory_limit", "error", "timeout"}),
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


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    hosts = Path(tempfile.mkdtemp(prefix="cell-redteam-")) / "hosts.json"
    hosts.write_text(json.dumps(EGRESS_HOSTS))
    print(f"Cell red team: {len(ssrf_urls())} SSRF inputs, {len(traversal_paths())} path inputs, "
          f"{len(trailing_slash_paths())} trailing-slash inputs, {len(DOS_CASES) + 1} DoS guests")
    srv = start_server(env={"SYNAPSE_EGRESS": "on", "SYNAPSE_EGRESS_HOSTS": str(hosts)})
    try:
        for family, fn in (("ssrf", lambda: ssrf(srv, quick)), ("paths", lambda: paths(srv)),
                           ("trailing", lambda: trailing(srv)), ("dos", lambda: dos(srv)),
                           ("tenants", lambda: tenants(srv)), ("requests", lambda: requests(srv)),
                           ("incident", lambda: incident_snapshot(srv)), ("escape", escape)):
            t = time.monotonic()
            fn()
            print(f"  {family:9} pass {tally[family + ':pass']:4}  fail {tally[family + ':fail']:3}  ({time.monotonic() - t:.1f}s)")
        code, verdict, _ = srv.request("GET", "/v1/receipts/verify")
        record("receipts", code == 200 and verdict.get("ok") is True, f"chain verifies: {verdict}")
        print(f"  receipts  chain of {verdict.get('count')} verifies: {verdict.get('ok')}")
    finally:
        srv.stop()
    total_pass = sum(v for k, v in tally.items() if k.endswith(":pass"))
    print(f"\n{total_pass} passed, {len(failures)} failed")
    for f in failures:
        print(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
