"""scratch.tmp_usage_after_run: the worker's after-run walk of a Python cell's
/tmp (T-DISK-1), opened by its own path like the volume beside it. It counts
what scratch.tmp_usage counts, never follows a link in place of the
directory, and a walk that cannot be made raises (never "empty")."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.confine import ConfinementError
from appliance.runtime import scratch


@pytest.mark.parametrize("volume", [
    "/srv/cell/volumes/t1/c1",
    "/v/t/c",
    "/srv/cell/volumes/t1/c1/",  # not plain: pathlib decides
    "/srv//cell/volumes/t1/c1",
    "/srv/cell/./volumes/t1/c1",
    "//srv/t1/c1",
    "/t1/c1",
    "relative/t1/c1",
])
def test_tmp_path_for_is_tmp_dir_for(volume: str) -> None:
    assert scratch.tmp_path_for(volume) == str(scratch.tmp_dir_for(volume))


def _cell(tmp_path: Path) -> str:
    volume = tmp_path / "vols" / "t1" / "c1"
    volume.mkdir(parents=True)
    scratch.make_tmp_dir(str(volume))
    return str(volume)


def test_t_disk_1_counts_what_tmp_usage_counts(tmp_path: Path) -> None:
    volume = _cell(tmp_path)
    tmp = scratch.tmp_dir_for(volume)
    (tmp / "a").write_bytes(b"x" * 1000)
    (tmp / "d" / "e").mkdir(parents=True)
    (tmp / "d" / "e" / "b").write_bytes(b"y" * 24)
    os.link(tmp / "a", tmp / "d" / "hard")  # one inode, counted once
    assert scratch.tmp_usage_after_run(volume) == scratch.tmp_usage(volume)
    assert scratch.tmp_usage_after_run(volume).bytes == 1024
    assert scratch.tmp_usage_after_run(volume, max_entries=2).complete is False


def test_t_disk_1_no_tmp_is_nothing(tmp_path: Path) -> None:
    volume = tmp_path / "vols" / "t1" / "js-cell"  # a JavaScript cell has no /tmp
    volume.mkdir(parents=True)
    assert scratch.tmp_usage_after_run(str(volume)) == scratch.tmp_usage(str(volume))
    assert scratch.tmp_usage_after_run(str(volume)).entries == 0


def test_t_disk_1_a_link_in_place_of_the_tmp_is_refused(tmp_path: Path) -> None:
    volume = _cell(tmp_path)
    tmp = scratch.tmp_dir_for(volume)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "big").write_bytes(b"z" * 4096)
    os.rmdir(tmp)
    os.symlink(elsewhere, tmp)
    with pytest.raises((ConfinementError, OSError)):
        scratch.tmp_usage_after_run(volume)
