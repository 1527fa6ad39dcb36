#!/usr/bin/env python3
"""Release audit (SECURITY.md §7): latency, path traversal and SSRF on a live server.

Starts a real Cell server (waitress + worker processes) on an ephemeral
loopback port with egress ON and a static egress hosts map, so that names
resolve without DNS and no packet can leave the machine, then:

  Phase 1  latency: p50/p99 per template over HTTP
  Phase 2  path traversal: WAT guest (host_fs_read / host_fs_write) and the
           files API, incl. symlink out and a new-file write through a
           symlinked directory
  Phase 3  SSRF: 169.254.169.254 and the rest of the deny table, numeric host
           forms, a name resolving to a private address, and a redirect to a
           private address (library level, with a recording connector)

Exits non-zero on any failure. Timings are reported, never judged.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from tests import guests  # noqa: E402
from tests.liveserver import ServerProcess, start_server  # noqa: E402

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"  [{'PASS' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)
    return ok


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def phase1(srv: ServerProcess, n: int) -> None:
    print("\nPhase 1 - latency over HTTP (client-side wall time, ms)")
    status, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
    status, jcell, _ = srv.request("POST", "/v1/cells", {"template": "javascript"})
    wat = '(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))'
    cases: list[tuple[str, Callable[[], tuple[int, Any, Any]]]] = [
        ("python3 persistent print(1+1)", lambda: srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": "print(1+1)"})),
        ("python3 one-shot /v1/execute", lambda: srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1+1)"})),
        ("javascript persistent", lambda: srv.request("POST", f"/v1/cells/{jcell['cell_id']}/exec", {"code": "console.log(1+1)"})),
        ("wasm one-shot (WAT)", lambda: srv.request("POST", "/v1/execute", {"template": "wasm", "code": wat})),
    ]
    print(f"  {'workload':34} {'p50':>8} {'p99':>8} {'server p50':>11}")
    for name, call in cases:
        call()  # warm
        times, server = [], []
        ok = True
        for _ in range(n):
            t = time.perf_counter()
            code, body, _ = call()
            times.append((time.perf_counter() - t) * 1000)
            ok = ok and code == 200 and body.get("status") == "ok"
            if isinstance(body, dict) and "latency_ms" in body:
                server.append(body["latency_ms"])
        print(f"  {name:34} {statistics.median(times):8.2f} {pct(times, 99):8.2f} {statistics.median(server):11.2f}")
        check(ok, f"{name}: every run answered ok")


TRAVERSAL_PATHS = [
    "../../../../../../etc/passwd", "/etc/passwd", "..", "../", "a/../../etc/passwd", "/data/../etc/passwd",
    "./../../etc/shadow", "//etc/passwd", "\\..\\..\\etc\\passwd", "%2e%2e/%2e%2e/etc/passwd", "\u2025/etc/passwd",
    "etc/passwd\x00.txt", "/proc/self/environ", "/dev/zero",
]


def phase2(srv: ServerProcess) -> None:
    print("\nPhase 2 - path traversal")
    status, cell, _ = srv.request("POST", "/v1/cells", {"template": "wasm"})
    cid = cell["cell_id"]
    volume = srv.root / "sandbox_volumes" / "default" / cid
    outside = Path(tempfile.mkdtemp(prefix="cell-audit-outside-"))
    (outside / "secret.txt").write_text("AUDIT-SECRET")
    os.symlink(outside / "secret.txt", volume / "link-to-secret")
    os.symlink(outside, volume / "linkdir")
    os.symlink(outside / "not-yet.txt", volume / "dangling")

    def guest(code: str) -> dict[str, Any]:
        _, body, _ = srv.request("POST", f"/v1/cells/{cid}/exec", {"code": code})
        return body  # type: ignore[no-any-return]

    for path in TRAVERSAL_PATHS + ["link-to-secret", "linkdir/secret.txt"]:
        body = guest(guests.read_probe(path))
        check(body.get("exit_code", 0) < 0 and "AUDIT-SECRET" not in json.dumps(body),
              f"guest host_fs_read({path!r}) refused (returned {body.get('exit_code')})")
    for path in ["linkdir/new.txt", "dangling", "../escape.txt", "/tmp/escape.txt"]:
        body = guest(guests.write_probe(path, b"PWNED"))
        created = (outside / "new.txt").exists() or (outside / "not-yet.txt").exists()
        check(body.get("exit_code", 0) < 0 and not created, f"guest host_fs_write({path!r}) refused, nothing created outside")
    for path in TRAVERSAL_PATHS + ["link-to-secret", "linkdir/secret.txt"]:
        from urllib.parse import quote

        code, body, _ = srv.request("GET", f"/v1/cells/{cid}/files?path={quote(path)}")
        check(code in (400, 404) and "AUDIT-SECRET" not in json.dumps(body), f"files API read {path!r} refused ({code})")
    for path in ["linkdir/new.txt", "dangling", "../../escape.txt"]:
        code, body, _ = srv.request("POST", f"/v1/cells/{cid}/files", {"path": path, "content": "PWNED"})
        check(code == 400 and not (outside / "new.txt").exists() and not (outside / "not-yet.txt").exists(),
              f"files API write {path!r} refused ({code})")


SSRF_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "http://169.254.169.254/", "http://[fd00:ec2::254]/",
    "http://127.0.0.1/", "http://127.1/", "http://2130706433/", "http://0177.0.0.1/", "http://0x7f.1/", "http://0x7f000001/",
    "http://localhost/", "http://LOCALHOST./", "http://printer.local/", "http://10.0.0.1/", "http://10.1/", "http://172.16.0.1/",
    "http://172.31.255.255/", "http://192.168.0.1/", "http://100.64.0.1/", "http://0.0.0.0/", "http://[::]/", "http://[::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:169.254.169.254]/", "http://[64:ff9b::a9fe:a9fe]/", "http://[2002:a9fe:a9fe::]/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://224.0.0.1/", "http://255.255.255.255/", "http://240.0.0.1/",
    "http://user:pw@169.254.169.254/", "http://example.com@169.254.169.254/", "http://169.254.169.254%2f@example.com/",
    "http://metadata.internal.example/", "http://rebind.example/", "http://mixed.example/",
    "gopher://169.254.169.254/", "file:///etc/passwd", "ftp://10.0.0.1/",
]
EGRESS_HOSTS = {
    "metadata.internal.example": ["169.254.169.254"],
    "rebind.example": ["10.0.0.7"],
    "mixed.example": ["93.184.215.14", "192.168.1.10"],
}


def phase3(srv: ServerProcess) -> None:
    print("\nPhase 3 - SSRF (egress ON; names from a static map, never DNS)")
    for url in SSRF_URLS:
        code, body, _ = srv.request("POST", "/v1/execute", {"template": "wasm", "code": guests.fetch_probe(url)})
        denials = body.get("denials", []) if isinstance(body, dict) else []
        reason = denials[0]["reason"] if denials else "-"
        check(code == 200 and body.get("exit_code") == -1 and any(d["threat"] == "T-SSRF-1" for d in denials),
              f"host_fetch({url}) denied by policy before connecting [{reason}]")
    # Redirect to a private address: library level, with a connector that records.
    from appliance.egress import fetch
    from appliance.policy.egress import EgressDenied, EgressPolicy

    connects: list[tuple[str, int]] = []

    class FakeSock:
        def __init__(self) -> None:
            self.sent = False

        def settimeout(self, _t: float) -> None: ...

        def sendall(self, _b: bytes) -> None:
            self.sent = True

        def recv(self, _n: int) -> bytes:
            if self.sent:
                self.sent = False
                return b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/\r\nContent-Length: 0\r\n\r\n"
            return b""

        def close(self) -> None: ...

    def connector(ip: str, port: int, timeout: float) -> Any:
        connects.append((ip, port))
        return FakeSock()

    try:
        fetch("http://public.example/", policy=EgressPolicy(enabled=True), max_bytes=1000, deadline=time.monotonic() + 5,
              resolver=lambda h, p: ["93.184.215.14"], connector=connector)
        denied = False
    except EgressDenied:
        denied = True
    except Exception as exc:  # any other failure is still not a connection to the private address
        denied = "169.254" not in str(exc)
    check(denied and connects == [("93.184.215.14", 80)], "redirect to 169.254.169.254 refused before a second connect")


def main(argv: list[str]) -> int:
    n = 20 if "--quick" in argv else 100
    hosts_file = Path(tempfile.mkdtemp(prefix="cell-audit-")) / "egress-hosts.json"
    hosts_file.write_text(json.dumps(EGRESS_HOSTS))
    print("Cell release audit: starting a live server on loopback (egress ON, static hosts map)")
    srv = start_server(env={"SYNAPSE_EGRESS": "on", "SYNAPSE_EGRESS_HOSTS": str(hosts_file)})
    try:
        print(f"  server {srv.url}")
        phase1(srv, n)
        phase2(srv)
        phase3(srv)
        code, verdict = srv.verify_receipts()
        print("\nReceipts")
        check(code == 200 and verdict.get("ok") is True, f"receipt chain verifies ({verdict.get('receipts')} receipts)")
    finally:
        srv.stop()
    print(f"\n{'FAILED' if failures else 'PASSED'}: {len(failures)} failure(s)")
    for f in failures:
        print(f"  - {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
