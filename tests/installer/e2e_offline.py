"""End-to-end offline install, run as a child process — inside ``unshare -n``
(only loopback) when the test can create a network namespace.

verify -> install v1 -> serve + POST /v1/execute -> upgrade to v2 (data kept)
-> serve again with the same key -> downgrade refused -> rollback -> serve ->
uninstall (data kept). Prints one JSON report on the last line of stdout.

Usage: python e2e_offline.py CONFIG.json (keys: v1, v2, trusted, root, module_cache, repo)
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def bring_up_loopback() -> None:
    """A fresh network namespace has `lo` down; raise it (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), 0x8913, req))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH", b"lo", flags | 0x1))


def network_isolated() -> bool:
    """True when no route leaves the machine (connect to a public address fails at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 53))  # TEST-NET-1: never actually sent, connect() only routes
        except OSError as exc:
            return exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
    return False


class Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.root = Path(cfg["root"])
        self.report: dict[str, Any] = {"steps": []}
        self.env = dict(os.environ, CELL_INSTALLER_TRUSTED_KEYS=cfg["trusted"],
                        SYNAPSE_MODULE_CACHE=cfg["module_cache"])

    def installer(self, *args: str, expect: int = 0) -> str:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "installer", *args], cwd=self.cfg["repo"], env=self.env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.report["steps"].append({"cmd": " ".join(args[:1]), "rc": proc.returncode,
                                     "seconds": round(time.monotonic() - t, 2)})
        if proc.returncode != expect:
            raise AssertionError(f"installer {' '.join(args)} exited {proc.returncode}, expected {expect}:\n"
                                 + proc.stdout[-6000:])
        return proc.stdout

    def install(self, bundle: str, *extra: str, expect: int = 0) -> str:
        return self.installer("install", bundle, "--root", str(self.root), *extra, expect=expect)

    @property
    def data(self) -> Path:
        return self.root / "var/lib/synapse"

    def current(self) -> str:
        return os.readlink(self.root / "opt/synapse/current")

    def venv_version(self) -> str:
        py = self.root / "opt/synapse/current/venv/bin/python"
        # -I and cwd outside the checkout: the flat layout would otherwise shadow the installed packages.
        out = subprocess.run([str(py), "-I", "-c", "import importlib.metadata as m, installer;"
                              "print(m.version('cell-appliance'), installer.__file__)"],
                             text=True, capture_output=True, check=True, cwd=self.root).stdout.split()
        assert out[1].startswith(str(self.root)), f"installer package is not the installed one: {out[1]}"
        return out[0]

    def serve_and_execute(self, label: str) -> dict[str, Any]:
        env = dict(self.env, SYNAPSE_ROOT=str(self.data), SYNAPSE_CONFIG_DIR=str(self.root / "etc/synapse"),
                   SYNAPSE_HOST="127.0.0.1", PYTHONUNBUFFERED="1", SYNAPSE_WORKERS="1")
        t = time.monotonic()
        proc = subprocess.Popen([str(self.root / "opt/synapse/current/venv/bin/cell"), "serve", "--dev", "--port", "0"],
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.root)
        found: dict[str, str] = {}
        log: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.append(line)
                if m := re.search(r"serving on (http://\S+)", line):
                    found["url"] = m.group(1)
                if m := re.search(r"API key of tenant 'default': (\S+)", line):
                    found["key"] = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        try:
            if not ready.wait(300) or "key" not in found:
                raise AssertionError(f"{label}: server did not start:\n" + "".join(log[-40:]))
            started = time.monotonic() - t
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
            req = urllib.request.Request(found["url"] + "/v1/execute", method="POST",
                                         data=json.dumps({"template": "python3", "code": "print(6 * 7)"}).encode(),
                                         headers={"Authorization": f"Bearer {found['key']}",
                                                  "Content-Type": "application/json"})
            with opener.open(req, timeout=120) as resp:
                body = json.loads(resp.read())
            assert body["status"] == "ok" and body["stdout"] == "42\n", body
            return {"label": label, "key": found["key"], "startup_s": round(started, 2),
                    "latency_ms": body["latency_ms"], "receipt": body["receipt"]["receipt_hash"]}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self) -> dict[str, Any]:
        r = self.report
        v1, v2 = self.cfg["v1"], self.cfg["v2"]
        r["bundle_bytes"] = os.path.getsize(v1)
        self.installer("verify", v1)
        out = self.install(v1)
        r["install_v1"] = _timings(out)
        ver1 = self.venv_version()
        assert (self.root / "etc/systemd/system/cell.service").is_file()
        first = self.serve_and_execute("v1")
        keep = {p: _digest(self.data / p) for p in ("keys/node_ed25519", "dev-api-key")}
        keep["config"] = _digest(self.root / "etc/synapse/config.toml")
        (self.root / "etc/synapse/license.json").write_text('{"operator": "placed this"}\n')
        keep["license"] = _digest(self.root / "etc/synapse/license.json")

        out = self.install(v2)
        r["install_v2"] = _timings(out)
        ver2 = self.venv_version()
        assert ver2 != ver1, (ver1, ver2)
        assert os.readlink(self.root / "opt/synapse/previous") == f"versions/{ver1}"
        after = {p: _digest(self.data / p) for p in ("keys/node_ed25519", "dev-api-key")}
        after["config"] = _digest(self.root / "etc/synapse/config.toml")
        after["license"] = _digest(self.root / "etc/synapse/license.json")
        assert after == keep, "upgrade must keep keys, config, license and data"
        second = self.serve_and_execute("v2")
        assert second["key"] == first["key"], "the tenant and its key survive the upgrade"

        out = self.install(v1, expect=2)
        assert "downgrade" in out
        self.installer("rollback", "--root", str(self.root))
        assert self.current() == f"versions/{ver1}" and self.venv_version() == ver1
        third = self.serve_and_execute("rolled back")
        assert third["key"] == first["key"]

        self.installer("uninstall", "--root", str(self.root))
        assert not (self.root / "opt/synapse").exists()
        assert not (self.root / "etc/systemd/system/cell.service").exists()
        assert (self.data / "keys/node_ed25519").is_file() and (self.data / "db").is_dir()
        r.update(versions=[ver1, ver2], serves=[first, second, third])
        for s in r["serves"]:
            s.pop("key")
        return r


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _timings(out: str) -> dict[str, float]:
    m = re.search(r"installed \S+ in ([\d.]+)s \((.*)\)", out)
    assert m, out[-2000:]
    timings = {"total": float(m.group(1))}
    for part in m.group(2).split(", "):
        name, secs = part.split()
        timings[name] = float(secs.rstrip("s"))
    return timings


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    isolated = False
    if cfg.get("netns"):
        bring_up_loopback()
        isolated = network_isolated()
        if not isolated:
            print("e2e: expected an isolated network namespace", file=sys.stderr)
            return 1
    report = Driver(cfg).run()
    report["isolated"] = isolated
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
