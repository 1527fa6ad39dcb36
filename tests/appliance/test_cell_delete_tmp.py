"""A deleted cell's /tmp (``<volumes>/.tmp/<tenant>/<cell>``, scratch.py) is
removed from the /tmp root down by descriptors, never through a link
(T-PATH-2, T-DOS-1): what is there goes, nothing there is fine, and anything
that would have to be followed or is left in place fails the delete (the
cell is kept, the delete can be retried), never an outside directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from appliance.cells import _remove_tmp
from appliance.confine import ConfinementError

TENANT, CELL = "tenant-a", "c1-0123456789abcdef0123"


def _absent_root(root: Path, outside: Path) -> None:
    pass  # no cell ever had a /tmp: no root


def _absent_cell(root: Path, outside: Path) -> None:
    (root / TENANT).mkdir(parents=True)


def _empty(root: Path, outside: Path) -> None:
    (root / TENANT / CELL).mkdir(parents=True)


def _tree(root: Path, outside: Path) -> None:
    deep = root / TENANT / CELL / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "f.bin").write_bytes(b"x" * 1000)
    (root / TENANT / CELL / "link").symlink_to(outside)  # a link inside goes as a link, its target stays


def _cell_is_a_link(root: Path, outside: Path) -> None:
    (root / TENANT).mkdir(parents=True)
    (root / TENANT / CELL).symlink_to(outside)


def _tenant_is_a_link(root: Path, outside: Path) -> None:
    root.mkdir(parents=True)
    (outside / CELL).mkdir()
    (root / TENANT).symlink_to(outside)


def _root_is_a_link(root: Path, outside: Path) -> None:
    (outside / TENANT / CELL).mkdir(parents=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(outside)


# (name, layout, the delete goes through)
CASES: list[tuple[str, Callable[[Path, Path], None], bool]] = [
    ("no-tmp-root", _absent_root, True),
    ("no-tmp-of-this-cell", _absent_cell, True),
    ("empty-tmp", _empty, True),
    ("tmp-with-a-tree-and-a-link-inside", _tree, True),
    ("tmp-is-a-symlink", _cell_is_a_link, False),
    ("tenant-dir-is-a-symlink", _tenant_is_a_link, False),
    ("tmp-root-is-a-symlink", _root_is_a_link, False),
]


@pytest.mark.parametrize("layout,removed", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_t_path_2_delete_removes_a_cells_tmp_without_following_links(tmp_path: Path,
                                                                       layout: Callable[[Path, Path], None],
                                                                       removed: bool) -> None:
    volumes, outside = tmp_path / "volumes", tmp_path / "outside"
    volumes.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("not the cell's")
    root = volumes / ".tmp"
    layout(root, outside)
    before = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    if removed:
        _remove_tmp(root, TENANT, CELL)
        assert not os.path.lexists(root / TENANT / CELL)
    else:
        with pytest.raises(ConfinementError):
            _remove_tmp(root, TENANT, CELL)
    assert (outside / "keep.txt").read_text() == "not the cell's"  # nothing outside is touched
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before
