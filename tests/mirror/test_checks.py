"""Pure checks of the mirror as tables (T-SUPPLY-1), and their layering."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mirror.checks import (
    BadPeerURL,
    TarMember,
    UnsafePath,
    check_peer_url,
    check_tar_members,
    check_target_name,
    split_relative_path,
)
from mirror.content import BadRegistryContent, encode_revocations, expiry_state, parse_revocations


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../b", "a/./b", "a//b", "a\\b", "a\x00b",
                                  ".hidden", "metadata/.x", "a/b/c/d/e", "x" * 2000])
def test_T_SUPPLY_1_unsafe_relative_paths_refused(path: str) -> None:
    with pytest.raises(UnsafePath):
        split_relative_path(path)


def test_safe_relative_path_split() -> None:
    assert split_relative_path("targets/abc.python3.wasm") == ("targets", "abc.python3.wasm")


@pytest.mark.parametrize("name", ["..", "a/b", "../x", ".x", "a..b", "", "é.wasm", "x" * 200])
def test_T_SUPPLY_1_unsafe_target_names_refused(name: str) -> None:
    with pytest.raises(UnsafePath):
        check_target_name(name)


LIMITS = dict(max_members=10, max_total=100, max_file=50)


@pytest.mark.parametrize("members", [
    [TarMember("../x", "file", 1)],
    [TarMember("/metadata/x", "file", 1)],
    [TarMember("metadata/l", "symlink", 0)],
    [TarMember("metadata/h", "hardlink", 0)],
    [TarMember("metadata/d", "device", 0)],
    [TarMember("other/x", "file", 1)],
    [TarMember("metadata/big", "file", 51)],
    [TarMember(f"metadata/{i}", "file", 40) for i in range(3)],
    [TarMember(f"metadata/{i}", "file", 1) for i in range(11)],
], ids=["dotdot", "absolute", "symlink", "hardlink", "device", "outside", "file-cap", "total-cap", "count-cap"])
def test_T_SUPPLY_1_unsafe_tar_members_refused(members: list[TarMember]) -> None:
    with pytest.raises(UnsafePath):
        check_tar_members(members, **LIMITS)


def test_plain_bundle_tar_accepted() -> None:
    check_tar_members([TarMember("./", "dir", 0), TarMember("metadata", "dir", 0),
                       TarMember("./metadata/root.json", "file", 10)], **LIMITS)


@pytest.mark.parametrize("url,base", [
    ("http://192.168.1.20:8080/mirror", "http://192.168.1.20:8080/mirror/"),
    ("https://10.0.0.5/", "https://10.0.0.5/"),
    ("http://127.0.0.1:9000/mirror/", "http://127.0.0.1:9000/mirror/"),
    ("http://[fd12::1]:8080/mirror/", "http://[fd12::1]:8080/mirror/"),
])
def test_lan_peer_urls_accepted(url: str, base: str) -> None:
    assert check_peer_url(url) == base


@pytest.mark.parametrize("url", [
    "http://8.8.8.8/", "http://100.64.0.1/", "http://192.0.2.1/", "http://169.254.169.254/",
    "http://example.com/", "http://localhost/", "http://127.1/", "http://0177.0.0.1/", "http://2130706433/",
    "http://[::ffff:10.0.0.1]/", "file:///etc/passwd", "ftp://10.0.0.1/", "http://user:pw@10.0.0.1/",
    "http://10.0.0.1/?x=1", "http://10.0.0.1/a/../b", "http://１０.0.0.1/", "http://10.0.0.1:99999/",
])
def test_T_SUPPLY_1_non_lan_peer_urls_refused(url: str) -> None:
    with pytest.raises(BadPeerURL):
        check_peer_url(url)


@pytest.mark.parametrize("data", [
    b"[]", b"{}", b'{"schema":"cell-revocations/1","licenses":[1]}',
    b'{"schema":"cell-revocations/1","licenses":[],"licenses":["a"]}',
    b'{"schema":"cell-revocations/1","keys":["NOTHEX"]}',
    b'{"schema":"cell-revocations/1","extra":true}', b"\xff",
])
def test_bad_revocation_lists_refused(data: bytes) -> None:
    with pytest.raises(BadRegistryContent):
        parse_revocations(data)


def test_revocations_round_trip() -> None:
    rev = parse_revocations(encode_revocations(["lic-2", "lic-1"], ["0123456789abcdef"]))
    assert rev.licenses == {"lic-1", "lic-2"} and rev.keys == {"0123456789abcdef"}


def test_expiry_warns_at_14_days() -> None:
    now = datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert expiry_state(now + timedelta(days=30), now) == "ok"
    assert expiry_state(now + timedelta(days=13), now) == "warn"
    assert expiry_state(now - timedelta(seconds=1), now) == "expired"


def test_pure_modules_import_no_io_frameworks() -> None:
    code = ("import sys, mirror.checks, mirror.content, mirror.trust; "
            "bad = [m for m in ('flask', 'socket', 'urllib.request', 'sqlite3', 'wasmtime', 'textual', 'tui') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout + r.stderr
