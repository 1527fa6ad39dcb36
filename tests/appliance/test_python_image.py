"""The pre-initialised Python image (appliance/runtime/images.py, T-IMAGE-1).

Real guests: the image is built into the shared module cache by the same code
`cell warm` runs (minutes, once per machine; found afterwards), and sessions
start from it exactly as a worker's do.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.runtime import images, templates
from appliance.runtime.loader import Runtimes
from appliance.runtime.sessions import PythonSession
from tests.liveserver import shared_cache

MEMORY = 512 << 20


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtimes]:
    runtimes = Runtimes(shared_cache())
    images.build(runtimes)
    runtimes._loaded.clear()  # loaded afresh: the image is found the way a worker finds it
    yield runtimes
    runtimes.close()


def _session(rt: Runtimes, tmp_path: Path, name: str, envs: dict[str, str] | None = None,
             memory: int = MEMORY) -> PythonSession:
    volume = tmp_path / "vols" / "t" / name
    volume.mkdir(parents=True)
    return PythonSession(rt.get("python3"), str(volume), memory, envs)


def _out(session: PythonSession, code: str) -> str:
    outcome = session.run(code.encode(), 60.0, 1 << 20, None, None)
    assert outcome.status == "ok", outcome.stderr
    return outcome.stdout


def test_t_image_1_new_cell_has_the_stack_imported(rt: Runtimes, tmp_path: Path) -> None:
    s = _session(rt, tmp_path, "a")
    try:
        assert s.from_image
        got = _out(s, "import sys\nprint(sorted(m for m in ('numpy', 'pandas', 'matplotlib.pyplot') if m in sys.modules))")
        assert got.strip() == "['matplotlib.pyplot', 'numpy', 'pandas']"
        code = ("import pandas as pd\ndf = pd.DataFrame({'k': ['a', 'b', 'a'], 'v': [1, 2, 3]})\n"
                "print(df.groupby('k').v.sum().to_dict())")
        assert _out(s, code).strip() == "{'a': 4, 'b': 2}"
        # Rich results and the boot hooks came with the image.
        outcome = s.run(b"import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\n", 60.0, 1 << 20, None, None)
        assert outcome.status == "ok", outcome.stderr
        assert any("image/png" in r.data for r in outcome.results)
        assert _out(s, "import os\nprint(os.getcwd())").strip() == "/data"
    finally:
        s.close()


def test_image_cell_collects_figures_only_after_a_run_that_opened_one(rt: Runtimes, tmp_path: Path) -> None:
    """pyplot is loaded in the image, so the host's figure-collecting turn used to
    follow every run; each figure pyplot opens now says so, and only such runs
    pay that turn. A restored interpreter keeps the signal, and draws again."""
    s = _session(rt, tmp_path, "a")
    turns: list[bytes] = []

    def counting(session: PythonSession) -> None:
        inner = session._turn_once

        def turn_once(code: bytes, ctx: Any, timeout_s: float) -> Any:
            turns.append(code)
            return inner(code, ctx, timeout_s)
        session._turn_once = turn_once  # type: ignore[method-assign]

    def runs(session: PythonSession, code: str) -> tuple[int, int]:
        turns.clear()
        outcome = session.run(code.encode(), 60.0, 1 << 20, None, None)
        assert outcome.status == "ok", outcome.stderr
        return len(turns), sum("image/png" in r.data for r in outcome.results)

    counting(s)
    try:
        assert runs(s, "x = 1") == (1, 0)
        assert runs(s, "import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2])") == (2, 1)
        assert runs(s, "y = x + 1") == (1, 0)
        assert runs(s, "plt.subplots()\nplt.show()") == (2, 1)  # shown by the run; the extra turn finds nothing
        state = s.snapshot()
    finally:
        s.close()
    b = PythonSession(rt.get("python3"), str(tmp_path / "vols" / "t" / "a"), MEMORY, None, restore=state)
    counting(b)
    try:
        assert runs(b, "z = y") == (1, 0)
        # Drawn after the restore although the cell had drawn before it (its
        # font files, open in the capture, are opened again).
        assert runs(b, "plt.plot([3, 1])") == (2, 1)
    finally:
        b.close()


def test_t_image_1_random_state_is_reseeded_per_cell(rt: Runtimes, tmp_path: Path) -> None:
    code = "import random, numpy as np\nprint(random.random(), np.random.random())"
    a, b = _session(rt, tmp_path, "a"), _session(rt, tmp_path, "b")
    try:
        ra, rb = _out(a, code).split(), _out(b, code).split()
        assert ra[0] != rb[0]
        assert ra[1] != rb[1]
    finally:
        a.close()
        b.close()


def test_t_image_1_environment_and_files_are_the_cells_own(rt: Runtimes, tmp_path: Path) -> None:
    a = _session(rt, tmp_path, "a", envs={"CELL_ONLY_A": "yes"})
    b = _session(rt, tmp_path, "b")
    try:
        env_a = json.loads(_out(a, "import os, json\nprint(json.dumps(dict(os.environ)))"))
        env_b = json.loads(_out(b, "import os, json\nprint(json.dumps(dict(os.environ)))"))
        assert env_a["CELL_ONLY_A"] == "yes" and "CELL_ONLY_A" not in env_b
        assert env_b["HOME"] == "/data" and env_b["MPLBACKEND"] == "Agg"
        _out(a, "open('/data/mine.txt', 'w').write('a')\nopen('/tmp/t.txt', 'w').write('a')")
        assert _out(b, "import os\nprint(os.path.exists('/data/mine.txt'), os.path.exists('/tmp/t.txt'))").split() \
            == ["False", "False"]
        assert _out(a, "print(open('mine.txt').read())").strip() == "a"
        # The clock is the host's: two cells read the time now, not the build's.
        t = float(_out(b, "import time\nprint(time.time())"))
        import time
        assert abs(t - time.time()) < 60
    finally:
        a.close()
        b.close()


def test_t_image_1_cell_below_the_image_memory_starts_the_plain_way(rt: Runtimes, tmp_path: Path) -> None:
    image = rt.get("python3").image
    assert image is not None
    s = _session(rt, tmp_path, "small", memory=image.min_bytes - (1 << 20))
    try:
        assert not s.from_image
        assert _out(s, "import sys\nprint('pandas' in sys.modules)").strip() == "False"
    finally:
        s.close()


# (name, tamper, discarded): a file whose size no longer matches its record
# is skipped without being read; one whose bytes do not hash right is removed.
TAMPER = [
    ("flipped_byte", lambda p: _flip(p, p.stat().st_size // 2), True),
    ("flipped_first_byte", lambda p: _flip(p, 0), True),
    ("truncated", lambda p: _truncate(p), False),
]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)


@pytest.mark.parametrize("name,tamper,discarded", TAMPER, ids=[t[0] for t in TAMPER])
def test_t_image_1_tampered_image_is_refused(rt: Runtimes, tmp_path: Path, name: str, tamper: object,
                                             discarded: bool) -> None:
    """A private copy of the cache, its image tampered with: never loaded, the
    file is discarded, and cells start the plain way (nothing else breaks)."""
    image = rt.get("python3").image
    assert image is not None and callable(tamper)
    private = tmp_path / "cache" / "modules"
    private.mkdir(parents=True, mode=0o700)
    src = shared_cache()
    for entry in src.iterdir():
        if entry.suffix not in (".cwasm", ".json"):
            continue
        if entry.name.startswith(image.key):  # the image: a copy of our own, to tamper with
            shutil.copyfile(entry, private / entry.name)
            (private / entry.name).chmod(0o600)
        elif entry.name.startswith(templates.PY_SNAPSHOT_SHA256):  # the runtime: read only, linked when possible
            try:
                os.link(entry, private / entry.name)
            except OSError:
                shutil.copyfile(entry, private / entry.name)
                (private / entry.name).chmod(0o600)
    cwasm = next(private.glob(f"{image.key}-*.cwasm"))
    tamper(cwasm)
    fresh = Runtimes(private)
    try:
        loaded = fresh.get("python3")
        assert loaded.image is None
        assert cwasm.exists() is not discarded  # never deserialized either way
        s = _session(fresh, tmp_path, "after")
        try:
            assert not s.from_image
            assert _out(s, "print(6 * 7)").strip() == "42"
        finally:
            s.close()
    finally:
        fresh.close()


def test_t_image_1_key_names_no_other_entry_and_follows_its_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = templates.find_runtime("python3")
    key = images.image_key(runtime)
    assert key not in {t.pin for t in templates.REGISTRY}
    monkeypatch.setattr(images, "IMAGE_RECIPE", images.IMAGE_RECIPE + "import json\n")
    assert images.image_key(runtime) != key  # another recipe is another image


def test_t_image_1_cell_state_survives_capture_and_restore(rt: Runtimes, tmp_path: Path) -> None:
    """The mechanism behind cell snapshots: memory plus globals of a live cell,
    restored into a fresh instance on the same volume, go on where they were."""
    a = _session(rt, tmp_path, "a", envs={"CELL_ENV": "kept"})
    _out(a, "import pandas as pd\nx = 41\ndf = pd.DataFrame({'v': [1, 2]})\n"
            "def f(n):\n    return n * 2\nopen('/data/note.txt', 'w').write('n')\nfh = open('/data/note.txt')")
    state = a.snapshot()
    before = _out(a, "import random\nprint(random.random())")
    a.close()
    b = PythonSession(rt.get("python3"), str(tmp_path / "vols" / "t" / "a"), MEMORY, None, restore=state)
    try:
        assert _out(b, "print(x + 1, int(df.v.sum()), f(4))").split() == ["42", "3", "8"]
        assert _out(b, "import os\nprint(os.environ['CELL_ENV'], open('note.txt').read())").split() == ["kept", "n"]
        # Its random state is the cell's own, continued: the same next number as before the restore.
        assert _out(b, "import random\nprint(random.random())") == before
        # A file it had open is gone, and says so (no host descriptor is carried over).
        err = b.run(b"fh.read()", 10.0, 1 << 16, None, None)
        assert err.status == "error" and "Bad file descriptor" in err.stderr
    finally:
        b.close()


def test_t_image_1_restore_refuses_a_foreign_state(rt: Runtimes, tmp_path: Path) -> None:
    from appliance.runtime.guest_state import GuestState, StateError

    (tmp_path / "vols" / "t" / "x").mkdir(parents=True)
    with pytest.raises(StateError):
        PythonSession(rt.get("python3"), str(tmp_path / "vols" / "t" / "x"), MEMORY, None,
                      restore=GuestState(bytes(65536), {0: 1}))
    plain = _session(rt, tmp_path, "plain", memory=(rt.get("python3").image.min_bytes - (1 << 20)))  # type: ignore[union-attr]
    try:
        with pytest.raises(StateError, match="does not export its globals"):
            plain.snapshot()
    finally:
        plain.close()


def test_t_image_2_snapshot_file_restores_a_cell_and_a_tampered_one_is_refused(rt: Runtimes, tmp_path: Path) -> None:
    from appliance.runtime import snapshot_file

    key = os.urandom(32)
    a = _session(rt, tmp_path, "a")
    _out(a, "import numpy as np\nv = np.arange(10)\ny = 'kept'")
    image = rt.get("python3").image
    assert image is not None
    path = tmp_path / "snapshots" / "t" / "a"
    snapshot_file.write(path, a.snapshot(), image.key, "t", "a", key)
    a.close()
    image_key, state = snapshot_file.read(path, "t", "a", key, MEMORY)
    assert image_key == image.key
    b = PythonSession(rt.get("python3"), str(tmp_path / "vols" / "t" / "a"), MEMORY, None, restore=state)
    try:
        assert _out(b, "print(int(v.sum()), y)").split() == ["45", "kept"]
    finally:
        b.close()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(snapshot_file.SnapshotRefused, match="integrity"):
        snapshot_file.read(path, "t", "a", key, MEMORY)


def test_t_image_2_large_cell_round_trips_through_its_snapshot_file_pages_moved(rt: Runtimes, tmp_path: Path) -> None:
    """A cell holding several MB goes out as the pages that differ from a fresh
    instance of the image (written from its live memory) and comes back with
    every byte: the file's pages are moved into the new instance, not copied
    (the buffer they were read into reads zeros afterwards)."""
    import wasmtime

    from appliance.runtime import guest_state, snapshot_file
    from appliance.runtime.sessions import on_guest_stack

    image = rt.get("python3").image
    assert image is not None
    store = wasmtime.Store(rt.engine)
    store.set_wasi(wasmtime.WasiConfig())
    fresh = on_guest_stack(lambda: image.pre.instantiate(store)).exports(store)["memory"]
    assert isinstance(fresh, wasmtime.Memory)
    base = guest_state.memory_view(fresh, store)
    key = os.urandom(32)
    a = _session(rt, tmp_path, "a")
    digest = _out(a, "import hashlib, os\nbig = os.urandom(6_000_000) * 2\nprint(hashlib.sha256(big).hexdigest())")
    state = a.snapshot_diff(base, copy=False)
    assert sum(len(d) for _, d in state.runs) >= 12_000_000
    path = tmp_path / "snapshots" / "t" / "a"
    size = snapshot_file.write(path, state, image.key, "t", "a", key)
    assert path.stat().st_size == size and size < state.size
    a.close()
    _, back = snapshot_file.read(path, "t", "a", key, MEMORY)
    assert isinstance(back, guest_state.StateDiff) and back.movable
    largest = max((d for _, d in back.runs), key=len)
    assert len(largest) >= guest_state.MOVE_MIN and any(bytes(largest))
    b = PythonSession(rt.get("python3"), str(tmp_path / "vols" / "t" / "a"), MEMORY, None, restore=back)
    try:
        assert not any(bytes(largest))  # moved into the instance, not copied
        assert _out(b, "print(hashlib.sha256(big).hexdigest())") == digest
        assert _out(b, "more = bytes(20_000_000)\ndel big\nimport gc; gc.collect()\nprint(len(more))") == "20000000\n"
    finally:
        b.close()
