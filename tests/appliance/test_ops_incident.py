"""`cell incident snapshot` takes a live node out of rotation, then writes a
private tarball an investigator can trust (SECURITY.md §8)."""
from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import os
import resource
import secrets
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance import confine
from appliance.config import Settings
from appliance.confine import create_volume, remove_volume
from appliance.ops import incident
from tests.appliance.test_confine import make_deep_tree
from tests.liveserver import REPO, start_server

RESOLVERS = ["openat2", "walk"]


@pytest.mark.slow
def test_incident_snapshot_stops_new_runs_and_captures_the_node(module_cache: None, tmp_path: Path) -> None:
    root = tmp_path / "node"
    srv = start_server(root)
    try:
        _, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"})
        srv.request("POST", f"/v1/cells/{cell['cell_id']}/exec", {"code": "open('evidence.txt', 'w').write('guest wrote this')"})
        env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"))
        out = tmp_path / "incident.tar.gz"
        proc = subprocess.run([sys.executable, "-m", "appliance.cli", "incident", "snapshot", "--out", str(out),
                               "--reason", "suspected escape"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 5
        status, body = 200, {}
        while time.monotonic() < deadline:
            status, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"})
            if status == 503:
                break
            time.sleep(0.2)
        assert (status, body["code"]) == (503, "incident")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(srv.url + "/healthz", timeout=10)
        assert info.value.code == 503
        info.value.close()
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        with tarfile.open(out) as tar:
            names = set(tar.getnames())
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            volumes = json.load(tar.extractfile("volumes.json"))  # type: ignore[arg-type]
        assert {"manifest.json", "db/cell.sqlite", "volumes.json", "cache-manifest.json"} <= names
        assert manifest["reason"] == "suspected escape" and "volumes/" not in " ".join(names)
        evidence = [v for v in volumes if v["path"].endswith("evidence.txt")]
        assert evidence and len(evidence[0]["sha256"]) == 64
        proc = subprocess.run([sys.executable, "-m", "appliance.cli", "incident", "clear"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0
        time.sleep(1.5)
        assert srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1)"})[0] == 200
    finally:
        srv.stop()


# -- T-PATH-2: the snapshot reads guest volumes while the guest may still run --

@dataclass
class Node:
    s: Settings
    vol: Path  # sandbox_volumes/tenantA/c1
    secret: bytes  # the node key's bytes: must never be hashed or archived
    key: Path


@pytest.fixture
def node(tmp_path: Path) -> Node:
    s = Settings(root=tmp_path / "root", config_dir=tmp_path / "etc", license_path=tmp_path / "etc" / "license.json")
    key = s.root / "keys" / "node.key"
    key.parent.mkdir(parents=True)
    secret = b"NODE-KEY-" + secrets.token_hex(24).encode()
    key.write_bytes(secret)
    vol = create_volume(s.volumes_dir, "tenantA", "c1")
    (vol / "public.txt").write_bytes(b"public")
    return Node(s, vol, secret, key)


def _leaks(node: Node, data: bytes) -> bool:
    """The secret's bytes or its sha256 anywhere in ``data``."""
    return node.secret in data or hashlib.sha256(node.secret).hexdigest().encode() in data


def _snapshot(node: Node, tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
    out = tmp_path / f"snap-{secrets.token_hex(4)}.tar.gz"
    result = incident.snapshot(node.s, out, with_contents=True, reason="test")
    raw = gzip.decompress(out.read_bytes())
    with tarfile.open(out) as tar:
        volumes = json.load(tar.extractfile("volumes.json"))  # type: ignore[arg-type]
    return result, volumes, raw


def _plant_leaf_link(node: Node) -> None:
    os.symlink(node.key, node.vol / "data.txt")


def _plant_relative_link(node: Node) -> None:
    os.symlink("../../../keys/node.key", node.vol / "data.txt")


def _plant_dir_link(node: Node) -> None:
    os.symlink(node.key.parent, node.vol / "keys")


def _plant_deep_dir_link(node: Node) -> None:
    (node.vol / "a" / "b").mkdir(parents=True)
    os.symlink(node.key.parent, node.vol / "a" / "b" / "c")


def _plant_hard_link(node: Node) -> None:
    os.link(node.key, node.vol / "data.txt")


def _plant_fifo(node: Node) -> None:
    os.mkfifo(node.vol / "data.txt")  # opened without O_NONBLOCK this would hang the snapshot


def _plant_cell_link(node: Node) -> None:
    os.symlink(node.key.parent, node.vol.parent / "c2")  # a whole "cell" that is a link


def _plant_tenant_link(node: Node) -> None:
    os.symlink(node.key.parent, node.s.volumes_dir / "tenantB")


PLANTED: list[tuple[str, Callable[[Node], None], str, dict[str, object]]] = [
    ("leaf-symlink", _plant_leaf_link, "tenantA/c1/data.txt", {"type": "symlink"}),
    ("relative-symlink", _plant_relative_link, "tenantA/c1/data.txt", {"type": "symlink"}),
    ("dir-symlink", _plant_dir_link, "tenantA/c1/keys", {"type": "symlink"}),
    ("deep-dir-symlink", _plant_deep_dir_link, "tenantA/c1/a/b/c", {"type": "symlink"}),
    ("hard-link", _plant_hard_link, "tenantA/c1/data.txt", {"type": "hard_link", "nlink": 2}),
    ("fifo", _plant_fifo, "tenantA/c1/data.txt", {"type": "special"}),
    ("cell-symlink", _plant_cell_link, "tenantA/c2", {"type": "symlink"}),
    ("tenant-symlink", _plant_tenant_link, "tenantB", {"type": "symlink"}),
]


@pytest.mark.parametrize(("plant", "where", "expected"), [p[1:] for p in PLANTED], ids=[p[0] for p in PLANTED])
def test_t_path_2_incident_snapshot_never_follows_planted_links(node: Node, tmp_path: Path, plant: Callable[[Node], None],
                                                                where: str, expected: dict[str, object]) -> None:
    plant(node)
    result, volumes, raw = _snapshot(node, tmp_path)
    assert not _leaks(node, raw), "the node key reached the snapshot"
    listed = {v["path"]: v for v in volumes}
    assert {k: listed[where].get(k) for k in expected} == expected
    assert "sha256" not in listed[where]
    assert listed["tenantA/c1/public.txt"]["sha256"] == hashlib.sha256(b"public").hexdigest()
    assert f"volumes/{where}".encode() not in raw.replace(b"volumes.json", b"")
    assert result["volume_errors"] == 0 and result["volumes_truncated"] is False


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_t_path_2_incident_snapshot_swap_at_open_never_leaks(node: Node, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, resolver: str) -> None:
    # The race at its worst moment, made deterministic: the guest swaps the
    # file for a link to the node key after the directory was listed as a
    # regular file and right before the snapshot opens it.
    (node.vol / "data.txt").write_bytes(b"public")
    real = confine.Volume.open_file_fd
    swapped: list[str] = []

    def swap_then_open(self: confine.Volume, names: tuple[str, ...]) -> tuple[int, os.stat_result]:
        if names == ("data.txt",):
            os.unlink(node.vol / "data.txt")
            os.symlink(node.key, node.vol / "data.txt")
            swapped.append("data.txt")
        return real(self, names)

    monkeypatch.setattr(confine.Volume, "open_file_fd", swap_then_open)
    listing = incident.list_volumes(node.s, copy_to=tmp_path / "copies", resolver=resolver)  # type: ignore[arg-type]
    assert swapped == ["data.txt"]
    entry = next(e for e in listing.entries if e["path"] == "tenantA/c1/data.txt")
    assert entry["type"] == "symlink" and "sha256" not in entry
    assert "volumes/tenantA/c1/data.txt" not in listing.copies
    for copy in (tmp_path / "copies").iterdir():
        assert not _leaks(node, copy.read_bytes())
    assert not _leaks(node, json.dumps(listing.entries).encode())


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(a), -100, bytes(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.mark.skipif(sys.platform != "linux", reason="RENAME_EXCHANGE is Linux-only")
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_t_path_2_incident_snapshot_swap_race_never_leaks(node: Node, tmp_path: Path, resolver: str) -> None:
    # A still-running guest swaps data.txt (a file) with a symlink to the node
    # key as fast as it can while the snapshot walks and copies the volume.
    (node.vol / "data.txt").write_bytes(b"public")
    os.symlink(node.key, node.vol / "data.txt_alt")
    (node.vol / "d").mkdir()
    (node.vol / "d" / "f").write_bytes(b"public")
    os.symlink(node.key.parent, node.vol / "d_alt")
    stop = threading.Event()
    swaps = 0

    def guest() -> None:
        nonlocal swaps
        while not stop.is_set():
            _exchange(node.vol / "data.txt", node.vol / "data.txt_alt")
            _exchange(node.vol / "d", node.vol / "d_alt")
            swaps += 1

    outcomes: Counter[str] = Counter()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=guest, daemon=True)
    thread.start()
    rounds = 0
    try:
        # Until both outcomes were seen (the race really ran), at most 3,000 rounds.
        while rounds < 3_000 and not (outcomes["hashed"] and outcomes["refused"]) or rounds < 200:
            rounds += 1
            copies = tmp_path / f"copies-{rounds}"
            listing = incident.list_volumes(node.s, copy_to=copies, resolver=resolver)  # type: ignore[arg-type]
            assert not _leaks(node, json.dumps(listing.entries).encode()), f"round {rounds}: key hashed"
            for member, copy in listing.copies.items():
                data = copy.read_bytes()
                assert not _leaks(node, data), f"round {rounds}: key copied as {member}"
                assert data == b"public", member
            for e in listing.entries:
                if e["path"] in ("tenantA/c1/data.txt", "tenantA/c1/data.txt_alt"):
                    outcomes["hashed" if "sha256" in e else "refused"] += 1
            for copy in listing.copies.values():
                copy.unlink()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    print(f"\n[incident swap race {resolver}] rounds={rounds} swaps={swaps} outcomes={dict(outcomes)} leaked_bytes=0")
    assert outcomes["hashed"] > 0 and outcomes["refused"] > 0
    assert node.key.read_bytes() == node.secret


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_t_path_2_incident_snapshot_walks_a_1200_deep_tree(node: Node, tmp_path: Path, resolver: str) -> None:
    make_deep_tree(node.vol, 1200, b"bottom")
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    # One descriptor per level (a recursive or fd-stack walk) would need 1,200.
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, old[1]))
    try:
        listing = incident.list_volumes(node.s, copy_to=tmp_path / "copies", resolver=resolver)  # type: ignore[arg-type]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
        assert remove_volume(node.s.volumes_dir, "tenantA", "c1")  # iterative; shutil.rmtree recurses
    bottom = "tenantA/c1/" + "d/" * 1200 + "f"
    listed = {e["path"]: e for e in listing.entries}
    assert listed[bottom]["sha256"] == hashlib.sha256(b"bottom").hexdigest()
    assert (tmp_path / "copies").is_dir() and listing.copies[f"volumes/{bottom}"].read_bytes() == b"bottom"
    assert listing.errors == 0


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_t_path_2_incident_snapshot_reaches_past_path_max(node: Node, resolver: str) -> None:
    # A guest can build a tree whose path is longer than PATH_MAX (rename a deep
    # directory under another); a file there must not hide from the snapshot.
    cur = os.open(node.vol, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(24):  # 24 x 201 bytes: past 4096
            os.mkdir("n" * 200, 0o700, dir_fd=cur)
            nxt = os.open("n" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        fd = os.open("hidden.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=cur)
        os.write(fd, b"evidence")
        os.close(fd)
    finally:
        os.close(cur)
    listing = incident.list_volumes(node.s, resolver=resolver)  # type: ignore[arg-type]
    hidden = [e for e in listing.entries if e["path"].endswith("/hidden.txt")]
    assert len(hidden) == 1 and len(hidden[0]["path"]) > 4096
    assert hidden[0]["sha256"] == hashlib.sha256(b"evidence").hexdigest()
    assert listing.errors == 0


def test_t_path_2_incident_snapshot_lists_what_it_cannot_read(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    # Too deep to walk is listed as an error and counted: never silently "nothing there".
    (node.vol / "a" / "b").mkdir(parents=True)
    (node.vol / "a" / "b" / "f").write_bytes(b"x")
    monkeypatch.setattr(incident, "MAX_WALK_DEPTH", 1)
    listing = incident.list_volumes(node.s)
    assert {"path": "tenantA/c1/a/b", "error": "too_deep"} in listing.entries
    assert listing.errors == 1
