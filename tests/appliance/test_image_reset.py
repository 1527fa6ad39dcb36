"""The reset of an image-started interpreter (sessions.py ``PY_FRESH_DEF``,
defined in the image as ``_cell_start.fresh`` and called once per start) and
the image property it relies on (images.py ``IMPORT_CACHE_CHECK``): the
import cache entries of the cell's own directories are dropped without
walking the whole cache; every call reseeds from the host's random source
(T-IMAGE-1). And what a start costs: the image's pages it writes."""
from __future__ import annotations

import ctypes
import json
import os
import struct
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


@pytest.mark.parametrize("reset", [sessions.PY_FRESH_CALL, sessions.PY_FRESH], ids=["image-call", "source"])
def test_t_image_1_reset_drops_the_cells_own_directories_from_the_import_cache(session: PythonSession,
                                                                                reset: str) -> None:
    _run(session, "import sys\n"
                  f"for p in {PLANTED!r}:\n    sys.path_importer_cache[p] = None\n"
                  "sys.path += ['/data/lib', '/tmp/extra']\n")
    before = _run(session, "print(len([p for p in sys.path_importer_cache if p.startswith('/usr/local/lib/')]))")
    _run(session, reset % json.dumps(dict(sessions.GUEST_ENV_BASE)))
    left = _run(session, f"print(sorted(p for p in {PLANTED!r} if p in sys.path_importer_cache))")
    assert left.strip() == "[]"
    after = _run(session, "print(len([p for p in sys.path_importer_cache if p.startswith('/usr/local/lib/')]))")
    assert after == before and int(after) > 10  # the stdlib's entries stay


STATE = ("import random, hashlib, os, numpy as np\n"
         "key, pos, has_gauss, gauss = np.random.get_state()[1:]\n"
         "print(random.random(), np.random.random(), hashlib.sha256(key.tobytes()).hexdigest(), hex(int(key[0])),\n"
         "      pos, has_gauss, os.getcwd(), sorted(os.environ.items()))\n")


def test_t_image_1_every_call_of_the_images_reset_reseeds_from_the_host(session: PythonSession) -> None:
    env = {**dict(sessions.GUEST_ENV_BASE), "CELL_TEST": "own"}
    seen = []
    for _ in range(3):
        _run(session, "import os, numpy as np\nos.chdir('/tmp')\nos.environ['PLANTED'] = '1'\nnp.random.seed(1)\n"
                      "np.random.standard_normal()\n")  # a state of the guest's own, then the reset
        _run(session, sessions.PY_FRESH_CALL % json.dumps(env))
        out = _run(session, STATE).split(" ", 5)
        seen.append(out)
        # numpy's whole key is replaced, first word's top bit set as numpy's own seeding sets it;
        # no gauss kept from before; the cell's own directory and environment only.
        assert out[3:5] == ["0x80000000", "624"], out
        assert out[5] == f"0 /data {sorted(env.items())!r}\n", out
    for i in range(3):  # random, numpy's next number and numpy's key: new at every call
        assert len({run[i] for run in seen}) == 3, seen


def _pages_written(s: PythonSession) -> int:
    """Bytes of the guest's linear memory that are private pages of this
    process: the image's pages this instance has written (copy-on-write)."""
    base = ctypes.cast(s._memory.data_ptr(s.store), ctypes.c_void_p).value
    size = s._memory.data_len(s.store)
    assert base is not None and base % 4096 == 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, size // 4096 * 8, base // 4096 * 8)
    finally:
        os.close(fd)
    written = 0
    for (entry,) in struct.iter_unpack("<Q", data):
        present, file_or_shared = entry >> 63 & 1, entry >> 61 & 1
        written += 4096 if present and not file_or_shared else 0
    return written


def test_image_start_writes_few_of_the_images_pages(session: PythonSession) -> None:
    """An idle cell costs the pages it wrote (SECURITY.md T-IMAGE-1 lists what
    is shared). The image defines and settles the reset, and has taken the
    allocator's free blocks between its objects: a start wrote ~1.9 MiB of
    them before, ~0.9 MiB with these (docs/operations.md)."""
    after_start = _pages_written(session)
    _run(session, "import pandas as pd\nx = 1\nprint(x)")
    assert 0 < after_start < (3 << 19), after_start  # 1.5 MiB
    assert _pages_written(session) - after_start < (256 << 10)
