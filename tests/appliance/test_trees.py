"""Guest-made trees that are deep, wide or changing under the walk (T-DOS-1, T-DISK-1).

Every walk of a tree a guest controls (removal, usage) must be iterative and
hold a bounded number of descriptors: a 1,500-deep chain or thousands of
sibling directories are removed and counted exactly even with RLIMIT_NOFILE
far below the number of directories, and a walk that fails says so.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.confine import ConfinementError, Usage, Volume, _Tree, create_volume, open_volume, remove_tree, remove_volume

DEEP = 1500  # past Python's recursion limit (1000), which is where shutil.rmtree fails
WIDE = 300


def _chain(top: Path, depth: int, leaf: bytes = b"") -> None:
    """``a/a/.../a`` built fd-relative (the full path may exceed PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("a", 0o700, dir_fd=fd)
            nxt = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if leaf:
            wfd = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
            os.write(wfd, leaf)
            os.close(wfd)
    finally:
        os.close(fd)


def _siblings(top: Path, count: int, size: int) -> None:
    for i in range(count):
        (top / f"d{i}").mkdir()
        (top / f"d{i}" / "f").write_bytes(b"x" * size)


@contextmanager
def few_descriptors(spare: int = 24) -> Iterator[None]:
    """RLIMIT_NOFILE just above what is open now: a walk holding one fd per
    directory hits EMFILE at once. ``spare=0``: no new descriptor at all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open("/", os.O_RDONLY)  # the lowest free number
    os.close(probe)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(probe, highest) + spare if spare else probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(autouse=True)
def no_deep_leftovers(tmp_path: Path) -> Iterator[None]:
    """pytest later deletes old temp directories with the recursive
    shutil.rmtree: never leave a deep tree behind, even when a test fails."""
    yield
    for child in list(tmp_path.iterdir()):
        remove_tree(child)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[tuple[Path, Volume]]:
    path = create_volume(tmp_path / "vols", "t", "c")
    with Volume(path) as vol:
        yield path, vol


def test_t_dos_1_deep_tree_breaks_recursive_rmtree(tmp_path: Path) -> None:
    """The attack itself: the standard library's recursive walk fails on this tree."""
    _chain(tmp_path, DEEP)
    # In a child: the failed walk leaves scandir iterators for the GC to close.
    done = subprocess.run([sys.executable, "-c", "import shutil, sys; shutil.rmtree(sys.argv[1])", str(tmp_path / "a")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "RecursionError" in done.stderr
    assert remove_tree(tmp_path / "a") is True


def test_t_dos_1_deep_tree_removed_by_files_api_remove(volume: tuple[Path, Volume]) -> None:
    path, vol = volume
    _chain(path, DEEP, b"deep")
    with few_descriptors():
        assert vol.usage() == Usage(4, DEEP + 1)
        vol.remove("a", recursive=True)
    assert os.listdir(path) == []


def test_t_dos_1_deep_tree_volume_removed(tmp_path: Path) -> None:
    path = create_volume(tmp_path / "vols", "t", "c")
    _chain(path, DEEP, b"deep")
    _siblings(path, WIDE, 1)
    with few_descriptors():
        assert remove_volume(tmp_path / "vols", "t", "c") is True
    assert os.listdir(tmp_path / "vols" / "t") == []


def test_t_dos_1_remove_tree_scratch_deep_and_wide(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _chain(scratch, DEEP)
    _siblings(scratch, WIDE, 1)
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "f").write_bytes(b"kept")
    os.symlink(outside, scratch / "link")  # T-PATH-2: unlinked, never followed
    with few_descriptors():
        assert remove_tree(scratch) is True
        assert remove_tree(scratch) is False
    assert not scratch.exists() and (outside / "f").read_bytes() == b"kept"


def test_t_disk_1_wide_tree_counted_past_rlimit(volume: tuple[Path, Volume]) -> None:
    """More sibling directories than descriptors: nothing hides from the count."""
    path, vol = volume
    _siblings(path, WIDE, 10)
    with few_descriptors():
        assert vol.usage() == Usage(WIDE * 10, WIDE * 2)
        assert vol.usage_bytes() == WIDE * 10


def test_t_disk_1_walk_error_raises_never_zero(volume: tuple[Path, Volume]) -> None:
    path, vol = volume
    _siblings(path, 5, 10)
    with few_descriptors(spare=0), pytest.raises(ConfinementError) as info:
        vol.usage()  # EMFILE on the first open
    assert info.value.code == "io"


def test_t_disk_1_walk_stops_at_entry_bound(volume: tuple[Path, Volume]) -> None:
    path, vol = volume
    _siblings(path, 50, 1)
    bounded = vol.usage(max_entries=20)
    assert not bounded.complete and bounded.entries == 21
    assert vol.usage(max_entries=100) == Usage(50, 100)


def test_t_disk_1_hard_links_counted_once_and_names_counted_each(volume: tuple[Path, Volume]) -> None:
    path, vol = volume
    (path / "f").write_bytes(b"12345")
    os.link(path / "f", path / "g")
    assert vol.usage() == Usage(5, 2)


def test_t_dos_1_directory_moved_under_the_walk_is_detected(tmp_path: Path) -> None:
    """Going up re-opens ``..``; if the directory was moved elsewhere meanwhile
    the walk stops (ESTALE) instead of carrying on in the wrong place."""
    (tmp_path / "p" / "q").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    tree = _Tree(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), os.stat(tmp_path).st_dev)
    try:
        assert tree.down(b"p") and tree.down(b"q")
        os.rename(tmp_path / "p" / "q", tmp_path / "other" / "q")
        with pytest.raises(OSError) as info:
            tree.up()
        assert info.value.errno == 116  # ESTALE
    finally:
        tree.close()


def test_t_disk_1_open_volume_usage_matches_after_changes(tmp_path: Path) -> None:
    path = create_volume(tmp_path / "vols", "t", "c")
    with open_volume(tmp_path / "vols", "t", "c") as vol:
        vol.write_bytes("a/b/c.txt", b"abc", make_parents=True)
        vol.make_dir("empty/inner")
        assert vol.usage() == Usage(3, 5)
        vol.remove("a", recursive=True)
        assert vol.usage() == Usage(0, 2)
    assert sorted(os.listdir(path)) == ["empty"]
