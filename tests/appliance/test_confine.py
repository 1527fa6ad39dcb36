"""Attacks on the confined volume adapter (T-PATH-1, T-PATH-2, T-TENANT-1).

Every filesystem attack runs twice: through openat2 and through the fallback
walker (``resolver="walk"``), which is what runs where openat2 is missing.
"""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import confine
from appliance.confine import (
    BadPath,
    ConfinementError,
    Volume,
    create_volume,
    open_volume,
    remove_volume,
)

RESOLVERS = ["openat2", "walk"]
SECRET = b"TOP-SECRET-" + secrets.token_hex(16).encode()


@dataclass
class World:
    root: Path  # volumes root
    path: Path  # tenantA/c1 volume
    outside: Path  # a directory outside every volume, holding secret.txt
    sibling: Path  # tenantAB/c1, a tenant whose id has tenantA as a prefix
    vol: Volume


@pytest.fixture(params=RESOLVERS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "sandbox_volumes"
    path = create_volume(root, "tenantA", "c1")
    sibling = create_volume(root, "tenantAB", "c1")
    (sibling / "secret.txt").write_bytes(SECRET)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    with Volume(path, resolver=request.param) as vol:
        assert vol.resolver == request.param
        yield World(root, path, outside, sibling, vol)


def _denied(call: object, *args: object, **kwargs: object) -> ConfinementError:
    with pytest.raises(ConfinementError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    assert info.value.code == "denied", info.value.code
    assert info.value.errno_code == -1
    return info.value


# T-PATH-1 / T-TENANT-1: guest path strings that must never reach a file outside.
ATTACKS = [
    "../../../../../../etc/passwd", "/etc/passwd", "a/../../b", "..", "a\x00b", "\x7f",
    "/data/../etc/passwd", "/data2/x", "//etc/passwd", "./../x", "\uff0e\uff0e/secret.txt",
    "\u2025/secret.txt", "..\\..\\etc\\passwd", "../../tenantAB/c1/secret.txt",
    "/data/../../tenantAB/c1/secret.txt", "/proc/self/root/etc/passwd", "x" * 300,
    "a/" * 2100, "\udc2e\udc2e/etc/passwd", "ok\n/../x",
]


@pytest.mark.parametrize("path", ATTACKS, ids=[repr(a)[:30] for a in ATTACKS])
def test_t_path_1_traversal_rejected(world: World, path: str) -> None:
    vol = world.vol
    for call, args in ((vol.read_bytes, (path, 100)), (vol.write_bytes, (path, b"pwn")), (vol.stat, (path,)),
                       (vol.make_dir, (path,)), (vol.remove, (path,)), (vol.rename, ("x", path))):
        with pytest.raises(ConfinementError) as info:
            call(*args)  # type: ignore[operator]
        assert info.value.code == "denied", (call, info.value.code)
    with pytest.raises(BadPath):
        vol.write_bytes(path, b"pwn", make_parents=True)
    assert (world.outside / "secret.txt").read_bytes() == SECRET
    assert (world.sibling / "secret.txt").read_bytes() == SECRET
    assert not list((world.root.parent).glob("**/pwn*"))


@pytest.mark.parametrize("name", ["%2e%2e", "...", "\u3002\u3002", "a..b", ".data"])
def test_t_path_1_odd_literal_names_stay_inside(world: World, name: str) -> None:
    assert world.vol.write_bytes(f"{name}/x", b"hi", make_parents=True) == 2
    assert (world.path / name / "x").read_bytes() == b"hi"
    assert world.vol.read_bytes(f"/data/{name}/x", 10) == b"hi"


@pytest.mark.parametrize("target", ["/etc/passwd", "OUTSIDE/secret.txt", "../../../outside/secret.txt"])
def test_t_path_2_symlink_leaf_denied(world: World, target: str) -> None:
    os.symlink(target.replace("OUTSIDE", str(world.outside)), world.path / "link")
    vol = world.vol
    assert _denied(vol.read_bytes, "link", 100).reason == "symlink"
    _denied(vol.write_bytes, "link", b"pwn")
    _denied(vol.stat, "link")
    assert vol.exists("link") is False
    assert [e.name for e in vol.list_dir()] == []
    assert (world.outside / "secret.txt").read_bytes() == SECRET
    assert os.path.islink(world.path / "link")


def test_t_path_2_symlinked_directory_denied(world: World) -> None:
    os.symlink(world.outside, world.path / "up")
    os.symlink("../../../outside", world.path / "rel")
    vol = world.vol
    for d in ("up", "rel"):
        _denied(vol.read_bytes, f"{d}/secret.txt", 100)
        _denied(vol.write_bytes, f"{d}/new.txt", b"pwn")
        _denied(vol.write_bytes, f"{d}/deep/new.txt", b"pwn", make_parents=True)
        _denied(vol.write_bytes, f"{d}/secret.txt", b"pwn")
        _denied(vol.list_dir, d)
        _denied(vol.make_dir, f"{d}/sub")
        _denied(vol.remove, f"{d}/secret.txt")
        _denied(vol.rename, f"{d}/secret.txt", "stolen.txt")
    assert sorted(os.listdir(world.outside)) == ["secret.txt"]
    assert (world.outside / "secret.txt").read_bytes() == SECRET


def test_t_path_2_dangling_symlink_write_denied(world: World) -> None:
    # The original bug: canonicalize() failed on a dangling link, so no check ran.
    target = world.outside / "created.txt"
    os.symlink(target, world.path / "dang")
    os.symlink(world.outside / "newdir", world.path / "dangdir")
    _denied(world.vol.write_bytes, "dang", b"pwn")
    _denied(world.vol.write_bytes, "dangdir/x", b"pwn", make_parents=True)
    _denied(world.vol.make_dir, "dangdir/x")
    assert not target.exists() and not (world.outside / "newdir").exists()


def test_t_path_1_hard_link_denied(world: World) -> None:
    os.link(world.outside / "secret.txt", world.path / "hl")
    vol = world.vol
    assert _denied(vol.read_bytes, "hl", 100).reason == "hard_link"
    _denied(vol.write_bytes, "hl", b"pwn")
    assert vol.exists("hl") is False and vol.list_dir() == []
    assert (world.outside / "secret.txt").read_bytes() == SECRET


def test_t_path_1_fifo_denied_without_hanging(world: World) -> None:
    os.mkfifo(world.path / "fifo")
    results: list[str] = []

    def attempt() -> None:
        for call, args in ((world.vol.read_bytes, ("fifo", 10)), (world.vol.write_bytes, ("fifo", b"x")),
                           (world.vol.stat, ("fifo",))):
            try:
                call(*args)  # type: ignore[operator]
                results.append("allowed")
            except ConfinementError as exc:
                results.append(exc.code)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "a FIFO hung the worker"
    assert results == ["denied", "denied", "denied"]
    assert world.vol.list_dir() == [] and world.vol.exists("fifo") is False


def test_t_tenant_1_sibling_prefix_tenant_unreachable(world: World) -> None:
    # The seed's check: canonicalize, then starts_with(volume) as a string.
    outside_of_a = os.path.realpath(world.root / "tenantAB" / "c1" / "secret.txt")
    assert outside_of_a.startswith(str(world.root / "tenantA"))  # why a string prefix check fails
    os.symlink("../../tenantAB/c1", world.path / "sib")
    vol = world.vol
    for path in ("../../tenantAB/c1/secret.txt", "/data/../../tenantAB/c1/secret.txt", "sib/secret.txt"):
        _denied(vol.read_bytes, path, 100)
    os.symlink(world.root / "tenantAB", world.root / "tenantEvil")
    with pytest.raises(ConfinementError) as info:
        open_volume(world.root, "tenantEvil", "c1")
    assert info.value.code == "denied"
    with pytest.raises(ConfinementError):
        create_volume(world.root, "tenantEvil", "c2")
    assert not (world.sibling.parent / "c2").exists()


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(a), -100, bytes(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _race(world: World, reader: object, prepare: object, attempts: int, label: str) -> Counter[str]:
    prepare()  # type: ignore[operator]
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        pairs = list(world.path.glob("*_alt"))
        while not stop.is_set():
            for alt in pairs:
                _exchange(alt, alt.with_name(alt.name[: -len("_alt")]))
            swaps += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=swapper, daemon=True)
    outcomes: Counter[str] = Counter()
    start = time.monotonic()
    thread.start()
    try:
        for _ in range(attempts):
            outcomes[reader()] += 1  # type: ignore[operator]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    print(f"\n[{label} {world.vol.resolver}] attempts={attempts} swaps={swaps} "
          f"outcomes={dict(outcomes)} secs={time.monotonic() - start:.2f} leaked_bytes=0")
    return outcomes


def _read_outcome(world: World, path: str) -> str:
    try:
        data = world.vol.read_bytes(path, 4096)
    except ConfinementError as exc:
        return exc.code
    assert data == b"public", f"leak: {data[:16]!r}"  # T-PATH-2: not one byte of the secret
    return "ok"


@pytest.mark.skipif(sys.platform != "linux", reason="RENAME_EXCHANGE is Linux-only")
def test_t_path_2_directory_swap_race_never_leaks(world: World) -> None:
    def prepare() -> None:
        (world.path / "a" / "d").mkdir(parents=True)
        (world.path / "a" / "d" / "f").write_bytes(b"public")
        (world.outside / "f").write_bytes(SECRET)
        os.symlink(world.outside, world.path / "d_alt")
        (world.path / "a" / "d").rename(world.path / "d")
        (world.path / "a").rmdir()

    outcomes = _race(world, lambda: _read_outcome(world, "d/f"), prepare, 20_000, "dir-swap")
    assert outcomes["ok"] > 0 and outcomes["denied"] + outcomes["not_found"] > 0
    assert set(outcomes) <= {"ok", "denied", "not_found", "not_a_directory"}


@pytest.mark.skipif(sys.platform != "linux", reason="RENAME_EXCHANGE is Linux-only")
def test_t_path_2_leaf_swap_race_never_leaks(world: World) -> None:
    def prepare() -> None:
        (world.path / "g").write_bytes(b"public")
        os.symlink(world.outside / "secret.txt", world.path / "g_alt")

    outcomes = _race(world, lambda: _read_outcome(world, "g"), prepare, 20_000, "leaf-swap")
    assert outcomes["ok"] > 0 and outcomes["denied"] > 0


@pytest.mark.skipif(sys.platform != "linux", reason="RENAME_EXCHANGE is Linux-only")
def test_t_path_2_write_race_never_escapes(world: World) -> None:
    def prepare() -> None:
        (world.path / "w").mkdir()
        os.symlink(world.outside, world.path / "w_alt")

    def write() -> str:
        try:
            world.vol.write_bytes("w/new.txt", b"guest")
            return "ok"
        except ConfinementError as exc:
            return exc.code

    outcomes = _race(world, write, prepare, 3_000, "write-swap")
    assert outcomes["ok"] > 0
    assert sorted(os.listdir(world.outside)) == ["secret.txt"]


def test_files_roundtrip_and_entries(world: World) -> None:
    vol = world.vol
    assert vol.write_bytes("/data/docs/a.txt", b"hello", make_parents=True) == 5
    assert vol.read_bytes("docs/a.txt", 3) == b"hel"
    entry = vol.stat("docs/a.txt")
    assert (entry.name, entry.path, entry.type, entry.size) == ("a.txt", "docs/a.txt", "file", 5)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry.modified_time)
    assert [e.as_dict()["path"] for e in vol.list_dir("/data")] == ["docs"]
    assert vol.stat("").type == "dir" and vol.stat("/data/").path == ""
    vol.write_bytes("docs/a.txt", b"bye")
    assert vol.read_bytes("docs/a.txt", 100) == b"bye"
    assert vol.make_dir("docs/sub/deeper").path == "docs/sub/deeper"
    assert vol.rename("docs/a.txt", "docs/sub/b.txt").path == "docs/sub/b.txt"
    vol.write_bytes("c.txt", b"c")
    with pytest.raises(ConfinementError) as info:
        vol.rename("c.txt", "docs/sub/b.txt")
    assert (info.value.code, info.value.errno_code) == ("exists", -7)
    assert vol.usage_bytes() == 4
    assert not [n for n in os.listdir(world.path / "docs") if n.startswith(".cell-tmp-")]
    for call, args, code, abi in ((vol.read_bytes, ("nope", 1), "not_found", -2),
                                  (vol.read_bytes, ("docs", 1), "is_a_directory", -6),
                                  (vol.write_bytes, ("docs", b""), "is_a_directory", -6),
                                  (vol.write_bytes, ("c.txt/x", b""), "not_a_directory", -3),
                                  (vol.make_dir, ("docs", False), "exists", -7),
                                  (vol.remove, ("docs",), "not_empty", -4),
                                  (vol.read_bytes, ("c.txt", -1), "invalid", -3)):
        with pytest.raises(ConfinementError) as info:
            call(*args)  # type: ignore[operator]
        assert (info.value.code, info.value.errno_code) == (code, abi)
    vol.remove("docs", recursive=True)
    vol.remove("c.txt")
    assert vol.list_dir() == [] and vol.usage_bytes() == 0


def test_t_path_2_recursive_remove_does_not_follow(world: World) -> None:
    vol = world.vol
    vol.write_bytes("tree/a/b/f", b"x", make_parents=True)
    os.symlink(world.outside, world.path / "tree" / "a" / "out")
    os.symlink(world.outside / "secret.txt", world.path / "tree" / "s")
    assert vol.usage_bytes() == 1  # the outside secret is not counted
    vol.remove("tree", recursive=True)
    assert not (world.path / "tree").exists()
    assert (world.outside / "secret.txt").read_bytes() == SECRET
    os.symlink(world.outside, world.path / "lnk")
    vol.remove("lnk")  # the link itself goes; its target stays
    assert world.outside.is_dir()


def test_write_failure_cleans_temp(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(5, "injected")

    monkeypatch.setattr(confine.os, "rename", broken)
    with pytest.raises(ConfinementError) as info:
        world.vol.write_bytes("f.txt", b"data")
    assert info.value.code == "io"
    assert os.listdir(world.path) == []


def test_too_large_write_refused(world: World) -> None:
    small = Volume.from_fd(os.open(world.path, os.O_RDONLY | os.O_DIRECTORY), max_file_bytes=4)
    with small, pytest.raises(ConfinementError) as info:
        small.write_bytes("big", b"12345")
    assert (info.value.code, info.value.errno_code) == ("too_large", -5)


def test_errno_table_pinned() -> None:
    assert confine.ERRNO_CODES == {"denied": -1, "not_found": -2, "invalid": -3, "not_a_directory": -3,
                                   "io": -4, "not_empty": -4, "too_large": -5, "is_a_directory": -6,
                                   "exists": -7}


def test_auto_resolver_prefers_openat2(tmp_path: Path) -> None:
    with Volume(create_volume(tmp_path, "t", "c")) as vol:
        assert vol.resolver in RESOLVERS
        if sys.platform == "linux":
            assert vol.resolver == "openat2"
    with pytest.raises(ConfinementError):
        vol.read_bytes("x", 1)  # closed


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "x" * 65, "t\x00", "t\u00e9", "a b", "../x", "t\n"])
def test_t_tenant_1_bad_ids_rejected(tmp_path: Path, bad: str) -> None:
    for args in ((bad, "c"), ("t", bad)):
        with pytest.raises(ConfinementError) as info:
            create_volume(tmp_path, *args)
        assert info.value.code == "invalid"
    assert os.listdir(tmp_path) == [] or os.listdir(tmp_path / "t") == []


def test_volume_lifecycle_modes_and_remove(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = create_volume(tmp_path / "vols", "tenant", "cell")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    outside = tmp_path / "keep.txt"
    outside.write_bytes(SECRET)
    os.symlink(outside, path / "l")
    assert remove_volume(tmp_path / "vols", "tenant", "cell") is True
    assert remove_volume(tmp_path / "vols", "tenant", "cell") is False
    assert outside.read_bytes() == SECRET


def test_t_path_2_remove_empty_volume_fast_path(tmp_path: Path) -> None:
    """An empty volume goes with one rmdir; a cell name that is a symlink to an
    empty directory is refused, and neither the link nor its target is removed."""
    create_volume(tmp_path / "vols", "tenant", "empty")
    assert remove_volume(tmp_path / "vols", "tenant", "empty") is True
    assert not (tmp_path / "vols" / "tenant" / "empty").exists()
    target = tmp_path / "empty-target"
    target.mkdir()
    os.symlink(target, tmp_path / "vols" / "tenant" / "link")
    with pytest.raises(ConfinementError) as info:
        remove_volume(tmp_path / "vols", "tenant", "link")
    assert info.value.code == "denied"
    assert target.is_dir() and (tmp_path / "vols" / "tenant" / "link").is_symlink()
    path = create_volume(tmp_path / "vols", "tenant", "full")
    (path / "d").mkdir()
    (path / "d" / "f").write_bytes(b"x")
    assert remove_volume(tmp_path / "vols", "tenant", "full") is True  # not empty: the walk
    assert not path.exists()


def test_volume_usable_after_fork(world: World) -> None:
    world.vol.write_bytes("f", b"public")
    pid = os.fork()
    if pid == 0:  # child: the inherited root fd still confines
        ok = world.vol.read_bytes("f", 10) == b"public"
        try:
            world.vol.read_bytes("../../x", 10)
            ok = False
        except ConfinementError:
            pass
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# T-PATH-1: "notes.txt/" names a directory or nothing (POSIX ENOTDIR); read as
# the file it was a quiet way past every check that expects a directory.
TRAILING_FILE_FORMS = [
    "notes.txt/", "notes.txt//", "notes.txt/.", "notes.txt/./", "notes.txt/.//", "./notes.txt/",
    "/data/notes.txt/", "/data/notes.txt/.", "dir/notes.txt/", "dir/notes.txt//", "dir/notes.txt/.",
    "dir/./notes.txt/", "/data/dir/notes.txt/",
]


def _trailing(call: object, *args: object, **kwargs: object) -> None:
    with pytest.raises(ConfinementError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    err = info.value
    assert (err.code, err.reason, err.errno_code) == ("not_a_directory", "trailing_slash", -3), (call, err.code)
    assert "ends with '/'" in err.message


@pytest.fixture
def notes(world: World) -> World:
    world.vol.write_bytes("notes.txt", b"public", make_parents=True)
    world.vol.write_bytes("dir/notes.txt", b"public", make_parents=True)
    world.vol.write_bytes("other.txt", b"other")
    return world


@pytest.mark.parametrize("path", TRAILING_FILE_FORMS)
def test_t_path_1_trailing_slash_on_file_refused(notes: World, path: str) -> None:
    vol = notes.vol
    _trailing(vol.read_bytes, path, 100)
    _trailing(vol.write_bytes, path, b"pwn")
    _trailing(vol.write_bytes, path, b"pwn", make_parents=True)
    _trailing(vol.stat, path)
    assert vol.exists(path) is False  # as for "notes.txt/x": what stat refuses does not exist
    with pytest.raises(ConfinementError) as info:
        vol.list_dir(path)
    assert (info.value.code, info.value.errno_code) == ("not_a_directory", -3)
    _trailing(vol.remove, path)
    _trailing(vol.remove, path, recursive=True)
    _trailing(vol.rename, path, "moved.txt")
    _trailing(vol.rename, "other.txt", path)
    for call, args in ((vol.make_dir, (path,)), (vol.make_dir, (path, False))):
        with pytest.raises(ConfinementError) as info:
            call(*args)  # type: ignore[operator]
        assert info.value.code in ("not_a_directory", "exists")
    # nothing changed, moved or was created
    assert (notes.path / "notes.txt").read_bytes() == b"public"
    assert (notes.path / "dir" / "notes.txt").read_bytes() == b"public"
    assert (notes.path / "other.txt").read_bytes() == b"other"
    assert sorted(os.listdir(notes.path)) == ["dir", "notes.txt", "other.txt"]
    assert os.listdir(notes.path / "dir") == ["notes.txt"]


@pytest.mark.parametrize("path", ["new.txt/", "new.txt/.", "dir/new.txt//", "deep/er/new.txt/"])
def test_t_path_1_trailing_slash_write_creates_nothing(notes: World, path: str) -> None:
    _trailing(notes.vol.write_bytes, path, b"x")
    _trailing(notes.vol.write_bytes, path, b"x", make_parents=True)
    with pytest.raises(ConfinementError) as info:
        notes.vol.read_bytes(path, 10)
    assert info.value.code == "not_found"
    assert sorted(os.listdir(notes.path)) == ["dir", "notes.txt", "other.txt"]
    assert os.listdir(notes.path / "dir") == ["notes.txt"]


@pytest.mark.parametrize("path", ["link/", "link/.", "up/", "up/secret.txt/"])
def test_t_path_2_trailing_slash_does_not_follow_a_symlink(world: World, path: str) -> None:
    os.symlink(world.outside / "secret.txt", world.path / "link")
    os.symlink(world.outside, world.path / "up")
    vol = world.vol
    _denied(vol.read_bytes, path, 100)
    _denied(vol.write_bytes, path, b"pwn")
    _denied(vol.stat, path)
    _denied(vol.list_dir, path)
    assert vol.exists(path) is False
    assert sorted(os.listdir(world.outside)) == ["secret.txt"]
    assert (world.outside / "secret.txt").read_bytes() == SECRET


@pytest.mark.parametrize("form", ["{}/", "{}//", "{}/.", "/data/{}/", "./{}/./"])
def test_t_path_1_trailing_slash_on_directory_still_works(notes: World, form: str) -> None:
    vol = notes.vol
    assert vol.make_dir(form.format("made")).type == "dir"
    assert (notes.path / "made").is_dir()
    assert vol.make_dir(form.format("a/b/c")).path == "a/b/c"
    assert [e.name for e in vol.list_dir(form.format("dir"))] == ["notes.txt"]
    assert vol.stat(form.format("dir")).type == "dir" and vol.exists(form.format("dir"))
    with pytest.raises(ConfinementError) as info:
        vol.read_bytes(form.format("dir"), 10)
    assert (info.value.code, info.value.errno_code) == ("is_a_directory", -6)
    with pytest.raises(ConfinementError) as info:
        vol.write_bytes(form.format("dir"), b"x", make_parents=True)
    assert (info.value.code, info.value.errno_code) == ("is_a_directory", -6)
    assert vol.rename(form.format("made"), form.format("renamed")).type == "dir"
    vol.remove(form.format("renamed"))
    vol.remove(form.format("a"), recursive=True)
    assert sorted(os.listdir(notes.path)) == ["dir", "notes.txt", "other.txt"]


def make_deep_tree(root: Path, depth: int, payload: bytes) -> None:
    """``root/d/d/.../d/f`` (``depth`` directories) built one fd-relative step at a time.

    ``os.makedirs`` recurses once per level and overflows the stack at this depth.
    """
    cur = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", 0o700, dir_fd=cur)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=cur)
        os.write(fd, payload)
        os.close(fd)
    finally:
        os.close(cur)


def _fd_ceiling(extra: int) -> tuple[int, int]:
    import resource

    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + extra, old[1]))
    return old


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_t_path_2_deep_tree_resolves_with_bounded_descriptors(world: World) -> None:
    import resource

    deep = ("d/" * 1200).rstrip("/")
    make_deep_tree(world.path, 1200, b"bottom")
    old = _fd_ceiling(16)  # the walker used to hold one fd per level: 1,200 here
    try:
        assert world.vol.read_bytes(deep + "/f", 10) == b"bottom"
        assert world.vol.stat(deep + "/").type == "dir"
        _trailing(world.vol.read_bytes, deep + "/f/", 10)
        fd = world.vol.open_dir_fd(tuple(deep.split("/")))
        os.close(fd)
        fd, s = world.vol.open_file_fd((*deep.split("/"), "f"))
        os.close(fd)
        assert s.st_size == 6
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
        world.vol.remove("d", recursive=True)  # iterative; shutil.rmtree would recurse 1,200 deep


@pytest.mark.parametrize("names", [("..",), ("a/b",), ("",), (".",), ("a\x00",), ("ok", "..")])
def test_t_path_1_host_walker_names_checked(world: World, names: tuple[str, ...]) -> None:
    for call in (world.vol.open_dir_fd, world.vol.open_file_fd):
        with pytest.raises(ConfinementError) as info:
            call(names)  # type: ignore[operator]
        assert (info.value.code, info.value.reason) == ("invalid", "bad_name")
