"""The reset of an image-started interpreter (sessions.py ``PY_FRESH``) and
the image property it relies on (images.py ``IMPORT_CACHE_CHECK``): the
import cache entries of the cell's own directories are dropped without
walking the whole cache (T-IMAGE-1)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.runtime import images, sessions
from appliance.runtime.loader import Runtimes
from appliance.runtime.sessions import PythonSession
from tests.liveserver import shared_cache


@pytest.fixture()
def session(module_cache: None, tmp_path: Path) -> Iterator[PythonSession]:
    rt = Runtimes(shared_cache())
    volume = tmp_path / "vol"
    volume.mkdir()
    s = PythonSession(rt.get("python3"), str(volume), 256 << 20)
    try:
        assert s.from_image, "the python image is missing from the module cache"
        yield s
    finally:
        s.close()
        rt.close()


def _run(s: PythonSession, code: str) -> str:
    out = s.run(code.encode(), 30.0, 1 << 16, None, None)
    assert out.status == "ok", out.stderr
    return str(out.stdout)


def test_t_image_1_image_holds_no_import_cache_entry_outside_the_stdlib(session: PythonSession) -> None:
    assert _run(session, images.IMPORT_CACHE_CHECK).strip() == "[]"


PLANTED = ["", ".", "/data", "/tmp", "/data/lib", "/tmp/extra"]


def test_t_image_1_reset_drops_the_cells_own_directories_from_the_import_cache(session: PythonSession) -> None:
    _run(session, "import sys\n"
                  f"for p in {PLANTED!r}:\n    sys.path_importer_cache[p] = None\n"
                  "sys.path += ['/data/lib', '/tmp/extra']\n")
    before = _run(session, "print(len([p for p in sys.path_importer_cache if p.startswith('/usr/local/lib/')]))")
    _run(session, sessions.PY_FRESH % json.dumps(dict(sessions.GUEST_ENV_BASE)))
    left = _run(session, f"print(sorted(p for p in {PLANTED!r} if p in sys.path_importer_cache))")
    assert left.strip() == "[]"
    after = _run(session, "print(len([p for p in sys.path_importer_cache if p.startswith('/usr/local/lib/')]))")
    assert after == before and int(after) > 10  # the stdlib's entries stay
