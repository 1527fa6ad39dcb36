"""Snapshots of live cells (T-IMAGE-2): fork, and cells that continue after a
restart. Real servers on loopback, real guests, real snapshot files."""
from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.confine import ConfinementError, Volume, copy_volume
from tests.appliance.test_api_e2e import new_cell, run, second_tenant
from tests.appliance.test_trees import few_descriptors
from tests.liveserver import ServerProcess, start_server


def fork(live: ServerProcess, cell: str, key: str | None = None) -> tuple[int, Any]:
    status, body, _ = live.request("POST", f"/v1/cells/{cell}/fork", key=key)
    return status, body


# -- fork ------------------------------------------------------------------------

def test_t_image_2_fork_keeps_variables_and_files_then_diverges(live: ServerProcess) -> None:
    src = new_cell(live, metadata={"who": "me"})
    run(live, src, "import pandas as pd\nx = 41\ndf = pd.DataFrame({'a': [1, 2]})\n"
                   "open('f.txt', 'w').write('hi')\nimport os; os.makedirs('d/e', exist_ok=True)\n"
                   "open('d/e/g.txt', 'w').write('deep')\nopen('/tmp/t.txt', 'w').write('tmp')")
    status, body = fork(live, src)
    assert status == 201, body
    child = body["cell_id"]
    assert child != src and body["template"] == "python3" and body["metadata"] == {"who": "me"}
    out = run(live, child, "print(x, df.a.sum(), open('f.txt').read(), open('d/e/g.txt').read(), open('/tmp/t.txt').read())")
    assert out["stdout"] == "41 3 hi deep tmp\n" and not out["restarted"], out
    # The two cells diverge: variables and files are each their own.
    run(live, child, "x = 1\nopen('f.txt', 'w').write('fork')")
    assert run(live, src, "print(x, open('f.txt').read())")["stdout"] == "41 hi\n"
    run(live, src, "x = 2")
    assert run(live, child, "print(x, open('f.txt').read())")["stdout"] == "1 fork\n"
    status, info, _ = live.request("GET", f"/v1/cells/{child}")
    assert status == 200 and info["disk_bytes"] >= len("fork") + len("deep") + len("tmp")
    for cell in (src, child):
        assert live.request("DELETE", f"/v1/cells/{cell}")[0] == 200


def test_t_tenant_1_fork_of_another_tenants_cell_is_404(live: ServerProcess) -> None:
    cell = new_cell(live)
    run(live, cell, "secret = 1")
    other = second_tenant(live)
    status, body = fork(live, cell, key=other)
    assert (status, body["code"]) == (404, "cell_not_found")
    _, mine, _ = live.request("GET", "/v1/cells", key=other)
    assert mine["cells"] == []
    assert fork(live, "c0-doesnotexist")[0] == 404


def test_fork_of_a_busy_cell_is_409_cell_busy(live: ServerProcess) -> None:
    cell = new_cell(live)
    answers: list[Any] = []
    runner = threading.Thread(target=lambda: answers.append(run(live, cell, "import time\ntime.sleep(4)\ny = 5")))
    runner.start()
    seen = None
    try:
        while runner.is_alive():
            status, body = fork(live, cell)
            if status == 409:
                seen = body
                break
            if status == 201:  # taken before the run reached the cell: try again
                live.request("DELETE", f"/v1/cells/{body['cell_id']}")
            time.sleep(0.05)
    finally:
        runner.join()
    assert seen is not None and seen["code"] == "cell_busy", seen
    assert answers and answers[0]["status"] == "ok"
    status, body = fork(live, cell)  # between runs: fine
    assert status == 201 and run(live, body["cell_id"], "print(y)")["stdout"] == "5\n"


def test_fork_of_a_non_python_cell_is_409_fork_unsupported(live: ServerProcess) -> None:
    cell = new_cell(live, template="javascript")
    run(live, cell, "globalThis.v = 1")
    status, body = fork(live, cell)
    assert (status, body["code"]) == (409, "fork_unsupported"), body
    assert "javascript" in body["error"]


# -- the confined copy under fork (T-DOS-1, T-PATH-2, T-DISK-1) ------------------

def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_text()
    return out


def test_t_path_2_copy_volume_copies_files_and_leaves_out_links_and_specials(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a" / "b").mkdir(parents=True)
    dst.mkdir()
    (src / "top.txt").write_text("1")
    (src / "a" / "b" / "deep.txt").write_text("22")
    (tmp_path / "outside.txt").write_text("secret")
    (src / "link").symlink_to(tmp_path / "outside.txt")
    (src / "a" / "dirlink").symlink_to(tmp_path)
    os.mkfifo(src / "fifo")
    os.link(tmp_path / "outside.txt", src / "hard")
    with Volume(src) as s, Volume(dst) as d:
        usage = copy_volume(s, d, 1000, 1000)
    assert _tree(dst) == {"top.txt": "1", "a/b/deep.txt": "22"}
    assert usage.bytes == 3 and usage.entries == 4
    assert not (dst / "link").exists() and not (dst / "fifo").exists() and not (dst / "a" / "dirlink").exists()


@pytest.mark.parametrize("max_bytes,max_entries", [(2, 100), (100, 2)], ids=["bytes", "entries"])
def test_t_disk_1_copy_volume_stops_at_the_quota(tmp_path: Path, max_bytes: int, max_entries: int) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    dst.mkdir()
    for i in range(3):
        (src / "d" / f"{i}.txt").write_text("xx")
    with Volume(src) as s, Volume(dst) as d, pytest.raises(ConfinementError) as err:
        copy_volume(s, d, max_bytes, max_entries)
    assert err.value.code == "too_large"


def test_t_dos_1_copy_volume_of_a_deep_tree_holds_few_descriptors(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    depth = 600
    for _ in range(depth):  # deeper than any path string allows, made with relative steps
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    os.close(fd)
    before = set(os.listdir("/proc/self/fd"))
    # A copy holding one descriptor per level would hit EMFILE at once; other
    # threads of the test process may close descriptors meanwhile, so the leak
    # check is "nothing new left open", not an equal count.
    with Volume(src) as s, Volume(dst) as d, few_descriptors():
        usage = copy_volume(s, d, 1 << 20, 10_000)
    assert usage.entries == depth + 1
    assert not set(os.listdir("/proc/self/fd")) - before
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    try:
        assert stat.S_ISREG(os.stat("leaf", dir_fd=fd).st_mode)
    finally:
        os.close(fd)


# -- surviving a restart ----------------------------------------------------------

def test_t_image_2_cells_survive_sigterm_and_restart(module_cache: None, tmp_path: Path) -> None:
    """SIGTERM captures every idle persistent Python cell; after the restart each
    continues with its variables (restored lazily, on its next run), the
    snapshot counts in the quota until then, a tampered one is refused and
    discarded, and a deleted cell's snapshot goes with it."""
    root = tmp_path / "restart"
    srv = start_server(root)
    try:
        kept, tampered, deleted, rolled = (new_cell(srv, timeout_ms=600000) for _ in range(4))
        for i, cell in enumerate((kept, tampered, deleted, rolled)):
            run(srv, cell, f"import pandas as pd\nv = {i} + 100\nopen('kept.txt', 'w').write('yes')")
        js = new_cell(srv, template="javascript", timeout_ms=600000)
        run(srv, js, "globalThis.w = 1")
    finally:
        srv.stop()
    snaps = root / "snapshots" / "default"
    for cell in (kept, tampered, deleted):
        st = os.lstat(snaps / cell)
        assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o600
    assert not (snaps / js).exists()
    data = bytearray((snaps / tampered).read_bytes())
    data[len(data) // 2] ^= 1
    (snaps / tampered).write_bytes(bytes(data))
    again = start_server(root)
    try:
        size = (snaps / kept).stat().st_size
        status, info, _ = again.request("GET", f"/v1/cells/{kept}")
        assert status == 200 and info["disk_bytes"] >= size  # T-DISK-1: the snapshot counts
        out = run(again, kept, "print(v, pd.__name__, open('kept.txt').read())")
        assert out["stdout"] == "100 pandas yes\n" and out.get("restored") is True, out
        assert (snaps / kept).stat().st_size == size  # the file stays the restored state
        # The run that restores a cell and crashes it rolls back to that state.
        status, body, _ = again.request("POST", f"/v1/cells/{rolled}/exec", {"code": "v = -1\n" + CRASHES[0][2]})
        assert status == 200 and body["status"] == "error" and body.get("rolled_back") is True, body
        assert run(again, rolled, "print(v)")["stdout"] == "103\n"
        assert run(again, kept, "v += 1; print(v)")["stdout"] == "101\n"
        _, info, _ = again.request("GET", f"/v1/cells/{kept}")
        assert info["disk_bytes"] >= size  # T-DISK-1: still counted while it exists
        # A changed snapshot is refused, discarded, and nothing else breaks.
        status, body, _ = again.request("POST", f"/v1/cells/{tampered}/exec", {"code": "print(v)"})
        assert (status, body["code"]) == (409, "snapshot_invalid"), body
        assert not (snaps / tampered).exists()
        out = run(again, tampered, "print(open('kept.txt').read(), 'v' in globals())")
        assert out["stdout"] == "yes False\n"
        # Deleting a cell removes its snapshot.
        assert again.request("DELETE", f"/v1/cells/{deleted}")[0] == 200
        assert not (snaps / deleted).exists()
        # A cell that had no capture still says so.
        status, body, _ = again.request("POST", f"/v1/cells/{js}/exec", {"code": "w"})
        assert (status, body["code"]) == (409, "cell_lost") and "no snapshot" in body["error"], body
    finally:
        again.stop()


def test_t_image_2_restart_with_many_cells_keeps_every_ones_variables(module_cache: None, tmp_path: Path) -> None:
    """SIGTERM captures every idle cell, spread over several workers (captured
    in parallel, several per worker), and the service exits cleanly; after the
    restart each cell answers with its own variable. The 500-cell version is
    tests/bench_restart_cells.py."""
    root = tmp_path / "many"
    count = int(os.environ.get("CELL_SNAPSHOT_CELLS", "8"))
    per_worker = max(1, (count + 1) // 2)  # two workers (the node's cell limit is per worker x workers)
    env = {"SYNAPSE_WORKERS": "2", "SYNAPSE_MAX_CELLS_PER_WORKER": str(per_worker)}
    srv = start_server(root, env=env)
    try:
        cells = [new_cell(srv, timeout_ms=600000) for _ in range(count)]
        for i, cell in enumerate(cells):
            run(srv, cell, f"n = {i}")
        stopped = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.stop()
    stop_s = time.monotonic() - stopped
    assert f"cell: captured {count} cell(s) to snapshots" in srv.log, srv.log[-20:]
    assert not [line for line in srv.log if "Traceback" in line], srv.log[-20:]
    again = start_server(root, env=env)
    try:
        started = time.monotonic()
        for i, cell in enumerate(cells):
            out = run(again, cell, "print(n)")
            assert out["stdout"] == f"{i}\n" and out.get("restored") is True, out
        print(f"\n{count} cells: stop (capture) {stop_s:.1f}s, first runs after restart {time.monotonic() - started:.1f}s")
    finally:
        again.stop()


def test_t_image_2_fork_of_a_cell_restored_after_restart(module_cache: None, tmp_path: Path) -> None:
    """A cell not yet run since the restart is restored from its snapshot to be forked."""
    root = tmp_path / "forkrestart"
    srv = start_server(root)
    try:
        cell = new_cell(srv, timeout_ms=600000)
        run(srv, cell, "z = 'before'")
    finally:
        srv.stop()
    again = start_server(root)
    try:
        status, body = fork(again, cell)
        assert status == 201, body
        assert run(again, body["cell_id"], "print(z)")["stdout"] == "before\n"
        out = run(again, cell, "print(z)")
        assert out["stdout"] == "before\n" and not out.get("restored"), out
    finally:
        again.stop()


# -- where a bound worker may write snapshots (T-IMAGE-2, T-TENANT-1) --------------

@pytest.mark.parametrize("tenant_id", ["../x", "", "a/b", "x" * 65, ".."])
def test_t_image_2_tenant_snapshot_dir_refuses_a_malformed_tenant(tenant_id: str) -> None:
    from appliance.runtime import sandbox
    with pytest.raises(sandbox.SandboxError):
        sandbox.tenant_snapshot_dir({"snapshots_dir": "/srv/snapshots"}, tenant_id)


def test_t_image_2_bound_worker_writes_only_its_tenants_snapshots(tmp_path: Path) -> None:
    from appliance.config import load_settings
    from appliance.runtime import landlock, sandbox
    from appliance.runtime.pool import sandbox_config
    from tests.liveserver import shared_cache
    settings = load_settings({"SYNAPSE_ROOT": str(tmp_path), "SYNAPSE_CONFIG_DIR": str(tmp_path / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache())})
    config = {"cache_dir": str(shared_cache()), "volumes_dir": str(settings.volumes_dir), "weights_dir": None,
              "snapshots_dir": str(settings.snapshots_dir)}
    mine = sandbox.tenant_snapshot_dir(config, "tenant-a")
    assert mine == str(settings.snapshots_dir.resolve() / "tenant-a")
    dirs = [*sandbox.tenant_dirs(str(settings.volumes_dir), "tenant-a"), mine]
    rules = sandbox.worker_rules({**config, "sandbox": dict(sandbox_config(settings), volume_set=dirs)}, ())
    landlock.check(rules)
    snaps = str(settings.snapshots_dir.resolve())
    assert [p for p in rules.read_write if p.startswith(snaps)] == [f"{snaps}/tenant-a"]
    # The node secret the keys are derived from is in keys/, which no worker may read.
    assert not any(p.startswith(str(settings.keys_dir)) for p in (*rules.read_only, *rules.read_write))


def test_t_image_2_tenant_keys_differ_and_the_secret_is_private(tmp_path: Path) -> None:
    from appliance.runtime import snapshot_file
    secret = snapshot_file.node_secret(tmp_path / "keys")
    assert snapshot_file.node_secret(tmp_path / "keys") == secret  # made once, then read
    assert (tmp_path / "keys" / snapshot_file.SECRET_FILE).stat().st_mode & 0o777 == 0o600
    a, b = snapshot_file.tenant_key(secret, "a"), snapshot_file.tenant_key(secret, "b")
    assert a != b and len(a) == 32 and secret not in (a, b)
    (tmp_path / "keys" / snapshot_file.SECRET_FILE).chmod(0o644)
    with pytest.raises(snapshot_file.SnapshotRefused):
        snapshot_file.node_secret(tmp_path / "keys")


def test_t_image_2_page_diff_round_trips_through_a_snapshot_file(tmp_path: Path) -> None:
    from appliance.runtime import guest_state, snapshot_file, wasmimage
    base = bytearray(2 * wasmimage.PAGE)
    base[100:110] = b"image-data"
    now = bytearray(base) + bytearray(wasmimage.PAGE)
    now[5] = 7  # a changed page of the image
    now[2 * wasmimage.PAGE + 9] = 1  # a page past the image
    d = guest_state.diff(guest_state.GuestState(bytes(now), {0: 1}), base)
    assert [(a, len(b)) for a, b in d.runs] == [(0, guest_state.DIFF_PAGE), (2 * wasmimage.PAGE, guest_state.DIFF_PAGE)]
    path = tmp_path / "snap"
    size = snapshot_file.write(path, d, "img", "t", "c", b"k" * 32)
    # The two pages, after a header padded to a whole page (the runs start at a page offset of the file).
    assert size == 3 * guest_state.DIFF_PAGE + snapshot_file.TAG_BYTES
    assert path.read_bytes()[guest_state.DIFF_PAGE + 5] == 7
    _, back = snapshot_file.read(path, "t", "c", b"k" * 32, 4 * wasmimage.PAGE)
    assert back == d


@pytest.mark.parametrize("base_pages,extra_pages,changed", [
    (16, 0, []),  # nothing changed: no runs
    (16, 0, [0, 15]),  # first and last page of one chunk
    (20, 5, [3, 16, 17, 19, 20, 24]),  # the base ends inside a chunk; pages past it compared with zeros
    (33, 40, list(range(10, 60))),  # one run across the base's end and several chunks
])
def test_t_image_2_page_diff_matches_a_page_by_page_comparison(base_pages: int, extra_pages: int,
                                                                changed: list[int]) -> None:
    from appliance.runtime import guest_state
    page = guest_state.DIFF_PAGE
    base = bytes((i * 7) % 251 for i in range(base_pages * page))
    now = bytearray(base) + bytearray(extra_pages * page)
    for index in changed:
        now[index * page + (index * 13) % page] ^= 0x5A
    d = guest_state.diff(guest_state.GuestState(bytes(now), {0: 1}), base)
    zero = bytes(page)
    want = [i for i in range(base_pages + extra_pages)
            if now[i * page:(i + 1) * page] != (base[i * page:(i + 1) * page] if i < base_pages else zero)]
    got = [a // page + k for a, data in d.runs for k in range(len(data) // page)]
    assert got == want == sorted(changed)
    assert all(bytes(data) == bytes(now[a:a + len(data)]) for a, data in d.runs)
    assert all(b1 < a2 for (a1, data), (a2, _) in zip(d.runs, d.runs[1:]) for b1 in [a1 + len(data)])  # runs merged


# -- pausing idle cells to disk ---------------------------------------------------

def test_t_image_2_idle_cell_is_paused_to_its_snapshot_and_resumed(module_cache: None, tmp_path: Path) -> None:
    """SYNAPSE_CELL_PAUSE_IDLE_S: an idle cell's state goes to its snapshot and
    its interpreter is closed; its next run (or a fork) resumes it, and the
    resumed state stays what a crash in the next run rolls back to."""
    root = tmp_path / "pause"
    srv = start_server(root, env={"SYNAPSE_CELL_PAUSE_IDLE_S": "1"})
    try:
        cell, forked = new_cell(srv, timeout_ms=600000), new_cell(srv, timeout_ms=600000)
        for c in (cell, forked):
            run(srv, c, "import pandas as pd\nq = 'kept'")
        snap, fsnap = (root / "snapshots" / "default" / c for c in (cell, forked))
        # T-DISK-1: a paused cell's snapshot counts, once the capture's answer is in
        # (the file is on disk a moment before the service has recorded it).
        deadline = time.monotonic() + 60
        for c, f in ((cell, snap), (forked, fsnap)):
            while not f.exists() or srv.request("GET", f"/v1/cells/{c}")[1]["disk_bytes"] < f.stat().st_size:
                assert time.monotonic() < deadline, "the paused cell's snapshot is not counted"
                time.sleep(0.05)
        status, body = fork(srv, forked)  # a paused cell can be forked: it is resumed first
        assert status == 201, body
        assert run(srv, body["cell_id"], "print(q)")["stdout"] == "kept\n"
        # The resumed state stays a roll-back source: the run that resumes the
        # cell and crashes it rolls back to it.
        crash = run(srv, cell, "q = 'changed'\n" + CRASHES[0][2])
        assert crash["status"] == "error" and crash.get("rolled_back") is True, crash
        assert snap.exists()
        out = run(srv, cell, "print(q, pd.__name__)")
        assert out["stdout"] == "kept pandas\n", out
        assert srv.request("DELETE", f"/v1/cells/{cell}")[0] == 200
        assert not snap.exists()  # files never outlive their cell
    finally:
        srv.stop()


def test_t_disk_1_snapshots_and_forks_within_a_small_quota(module_cache: None, tmp_path: Path) -> None:
    """With a 1 MB quota: a fork whose copy would cross it is 413; an idle
    capture that would cross it is not kept, and runs go on; nor is the
    capture at a stop: after the restart the cell answers ``cell_lost`` saying
    why, its files kept, and runs go on."""
    root = tmp_path / "small"
    env = {"SYNAPSE_TENANT_QUOTA_MB": "1", "SYNAPSE_CELL_CAPTURE_IDLE_S": "1"}
    srv = start_server(root, env=env)
    try:
        cell = new_cell(srv, timeout_ms=600000)
        run(srv, cell, "open('half.bin', 'wb').write(b'x' * 600_000)\nv = 'small'")
        status, body = fork(srv, cell)
        assert (status, body["code"]) == (413, "quota_exceeded"), body
        _, cells, _ = srv.request("GET", "/v1/cells")
        assert [c["cell_id"] for c in cells["cells"]] == [cell]  # nothing of the failed fork is left
        assert not (root / "sandbox_volumes" / "default").exists() or \
            sorted(p.name for p in (root / "sandbox_volumes" / "default").iterdir()) == [cell]
        # An idle capture that would put the tenant over its quota is not kept:
        # the tenant's runs go on (T-DISK-1).
        deadline = time.monotonic() + 60
        while not any(f"cell {cell}: its capture was not kept" in line for line in list(srv.log)):
            assert time.monotonic() < deadline, "the idle capture was not tried"
            time.sleep(0.1)
        while (root / "snapshots" / "default" / cell).exists():  # logged just before it is removed
            assert time.monotonic() < deadline, "the capture over the quota was kept"
            time.sleep(0.05)
        assert run(srv, cell, "print(v)")["stdout"] == "small\n"
    finally:
        srv.stop()
    assert not (root / "snapshots" / "default" / cell).exists()  # T-DISK-1: not kept at the stop either
    again = start_server(root, env=env)
    try:
        status, body, _ = again.request("POST", f"/v1/cells/{cell}/exec", {"code": "print(v)"})
        assert (status, body["code"]) == (409, "cell_lost") and "disk quota" in body["error"], body
        assert run(again, cell, "print(len(open('half.bin', 'rb').read()))")["stdout"] == "600000\n"
    finally:
        again.stop()


def test_t_disk_1_a_restored_file_over_the_quota_is_not_kept(module_cache: None, tmp_path: Path) -> None:
    """A pause is taken whatever the quota (it gives RAM back); the run that
    resumes a cell whose snapshot puts the tenant over is answered, adding
    nothing, and the file then goes (it is not kept as the cell's capture
    over the quota): the accounting is the volume alone, and runs go on."""
    root = tmp_path / "paused-over"
    srv = start_server(root, env={"SYNAPSE_TENANT_QUOTA_MB": "1", "SYNAPSE_CELL_PAUSE_IDLE_S": "3"})
    try:
        cell = new_cell(srv, timeout_ms=600000)
        run(srv, cell, "open('half.bin', 'wb').write(b'x' * 600_000)\nv = 'paused'")
        volume = srv.request("GET", f"/v1/cells/{cell}")[1]["disk_bytes"]
        snap = root / "snapshots" / "default" / cell
        deadline = time.monotonic() + 60
        while not snap.exists() or srv.request("GET", f"/v1/cells/{cell}")[1]["disk_bytes"] <= volume:
            assert time.monotonic() < deadline, "the cell was not paused"
            time.sleep(0.05)
        out = run(srv, cell, "print(v)")
        assert out["stdout"] == "paused\n" and out.get("restored") is True, out
        assert not snap.exists()
        assert srv.request("GET", f"/v1/cells/{cell}")[1]["disk_bytes"] == volume
        assert run(srv, cell, "print(len(open('half.bin', 'rb').read()), v)")["stdout"] == "600000 paused\n"
    finally:
        srv.stop()


@pytest.mark.parametrize("cells", [1, 3], ids=["one-cell", "three-cells-captured-at-once"])
def test_t_disk_1_captures_at_sigterm_stay_within_the_quota(module_cache: None, tmp_path: Path, cells: int) -> None:
    """T-DISK-1 / T-IMAGE-2: a tenant at its quota with live cells is stopped
    (SIGTERM): no capture over the quota is kept, whichever lands first; after
    the restart the quota counts exactly the volumes, and each cell answers
    ``cell_lost`` once, saying why, then runs on with its files."""
    root = tmp_path / "stop"
    env = {"SYNAPSE_TENANT_QUOTA_MB": "1"}
    srv = start_server(root, env=env)
    try:
        ids = [new_cell(srv, timeout_ms=600000) for _ in range(cells)]
        for cell in ids:
            run(srv, cell, f"open('part.bin', 'wb').write(b'x' * {900_000 // cells})\nv = 1")
        before = {cell: srv.request("GET", f"/v1/cells/{cell}")[1]["disk_bytes"] for cell in ids}
    finally:
        srv.stop()
    snaps = root / "snapshots" / "default"
    assert not snaps.exists() or sorted(p.name for p in snaps.iterdir()) == []
    assert sum(1 for line in srv.log if "its capture was not kept" in line) == cells
    again = start_server(root, env=env)
    try:
        after = {cell: again.request("GET", f"/v1/cells/{cell}")[1]["disk_bytes"] for cell in ids}
        assert after == before  # the volumes, and nothing else
        for cell in ids:
            status, body, _ = again.request("POST", f"/v1/cells/{cell}/exec", {"code": "print(v)"})
            assert (status, body["code"]) == (409, "cell_lost") and "disk quota" in body["error"], body
            assert run(again, cell, "print(len(open('part.bin', 'rb').read()))")["stdout"] == f"{900_000 // cells}\n"
    finally:
        again.stop()


# -- idle captures: roll back on a crash, restore after a worker is killed ----------

@pytest.fixture(scope="module")
def capturing(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own with idle captures on (1 s): the session-wide one has
    them off, so tests elsewhere that expect a crash to lose the interpreter do
    not depend on how soon after the previous run their crash comes; and the
    workers SIGKILLed here are not the ones other tests use."""
    server = start_server(tmp_path_factory.mktemp("capturing"), env={"SYNAPSE_CELL_CAPTURE_IDLE_S": "1"})
    yield server
    server.stop()

def _wait_for_capture(capturing: ServerProcess, cell: str, since_ns: int = 0) -> Path:
    """Until the cell's idle capture (SYNAPSE_CELL_CAPTURE_IDLE_S) is on disk,
    written after ``since_ns``."""
    snap = capturing.root / "snapshots" / "default" / cell
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if snap.stat().st_mtime_ns > since_ns:
                return snap
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError("the idle cell was not captured")


CRASHES = [
    # Freeing a list nested 400,000 deep recurses in C below any guard: a wasm stack overflow.
    ("stack-overflow", "", "x = 0\nl = []\nfor _ in range(400_000):\n    l = [l]\ndel l", {}, "error"),
    ("deadline", "", "x = 0\nwhile True:\n    pass", {"timeout_ms": 1000}, "timeout"),
    # 64 MB of state cannot be restored within the grace left after a deadline: the next run restores it.
    ("deadline-large-state", "big = bytes(range(256)) * (256 << 10)\n", "x = 0\nwhile True:\n    pass",
     {"timeout_ms": 1000}, "timeout"),
]


@pytest.mark.parametrize("setup,code,extra,status", [c[1:] for c in CRASHES], ids=[c[0] for c in CRASHES])
def test_t_image_2_crash_after_an_idle_capture_rolls_back(capturing: ServerProcess, setup: str, code: str,
                                                          extra: dict[str, Any], status: str) -> None:
    """A run that kills the interpreter goes back to the capture taken while the
    cell was idle before it: its variables from before the run are kept, the
    answer says ``rolled_back``; the capture counts in the quota and goes with
    the cell (T-DISK-1)."""
    cell = new_cell(capturing)
    run(capturing, cell, setup + "x = 41\nopen('f.txt', 'w').write('kept')")
    snap = _wait_for_capture(capturing, cell)
    deadline = time.monotonic() + 30  # the file is in place a moment before the service measures it again
    while capturing.request("GET", f"/v1/cells/{cell}")[1]["disk_bytes"] < snap.stat().st_size + len("kept"):
        assert time.monotonic() < deadline, "the capture is not counted in disk_bytes"
        time.sleep(0.05)
    out = run(capturing, cell, code, **extra)
    assert out["status"] == status and out.get("rolled_back") is True, out
    assert "rolled back" in out["note"] and "variables are lost" not in out["stderr"], out
    after = run(capturing, cell, "print(x, open('f.txt').read())")
    assert after["stdout"] == "41 kept\n" and not after["restarted"] and not after.get("restored"), after
    assert snap.exists()  # still the capture: a second crash before the next idle one rolls back again
    assert capturing.request("DELETE", f"/v1/cells/{cell}")[0] == 200
    assert not snap.exists()


def test_sdk_execution_says_rolled_back(capturing: ServerProcess) -> None:
    """The SDK's Execution carries ``rolled_back`` (and ``restored``) as the answer gives them."""
    from cell_sdk import Sandbox
    with Sandbox("python3", api_url=capturing.url, api_key=capturing.api_key) as sbx:
        sbx.run_code("x = 41")
        _wait_for_capture(capturing, sbx.sandbox_id)
        crashed = sbx.run_code(CRASHES[0][2])
        assert crashed.rolled_back and not crashed.restored and crashed.note and "rolled back" in crashed.note
        assert sbx.run_code("x + 1").text == "42"


def test_t_image_2_crash_with_a_capture_behind_starts_fresh_and_says_so(capturing: ServerProcess) -> None:
    """A capture older than the cell's last run is never rolled back to: the
    crash starts a fresh interpreter as without captures, the note says no
    capture was available, and the stale capture is removed."""
    cell = new_cell(capturing)
    run(capturing, cell, "x = 1")
    snap = _wait_for_capture(capturing, cell)
    run(capturing, cell, "y = 2")  # the capture is now behind
    out = run(capturing, cell, CRASHES[0][2])
    assert out["status"] == "error" and not out.get("rolled_back"), out
    assert "no capture" in out["note"] and "variables are lost" in out["stderr"], out
    assert not snap.exists()
    after = run(capturing, cell, "print('x' in globals(), 'y' in globals())")
    assert after["stdout"] == "False False\n", after
    capturing.request("DELETE", f"/v1/cells/{cell}")


def test_t_dos_1_worker_killed_by_the_supervisor_restores_the_cells_capture(capturing: ServerProcess) -> None:
    """Workers SIGKILLed (as the supervisor kills one that overran): a cell with
    an idle capture continues from it on its next run (``restored``), and the
    note says what the capture is behind by; a cell without one says cell_lost."""
    cell = new_cell(capturing)
    bare = new_cell(capturing)
    run(capturing, cell, "x = 7")
    _wait_for_capture(capturing, cell)
    run(capturing, cell, "y = 8")  # one run past the capture
    run(capturing, bare, "z = 1")
    _, status, _ = capturing.request("GET", "/v1/status")
    pids = status["workers"]["pids"]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    answers: list[Any] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        code, body, _ = capturing.request("POST", f"/v1/cells/{cell}/exec", {"code": "print(x, 'y' in globals())"})
        answers.append((code, body))
        if code == 200 and body["status"] == "ok":
            break
        assert code == 503 or (code == 200 and body["status"] == "killed"), body  # replacements still settling
        time.sleep(0.2)
    assert body["stdout"] == "7 False\n" and body.get("restored") is True, answers
    assert "last run" in body["note"], body
    assert run(capturing, cell, "print(x)")["stdout"] == "7\n"
    code, body, _ = capturing.request("POST", f"/v1/cells/{bare}/exec", {"code": "print(z)"})
    while code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
        code, body, _ = capturing.request("POST", f"/v1/cells/{bare}/exec", {"code": "print(z)"})
    assert (code, body["code"]) == (409, "cell_lost"), body
    for c in (cell, bare):
        capturing.request("DELETE", f"/v1/cells/{c}")


def test_t_dos_1_run_whose_worker_overran_rolls_back_to_the_idle_capture(capturing: ServerProcess) -> None:
    """A worker that does not answer by the run's deadline plus the grace
    (frozen here with SIGSTOP) is killed by the supervisor: that run answers
    ``timeout`` with ``rolled_back``, and the cell's next run has the variables
    from before it (restored from the capture on a new worker)."""
    cell = new_cell(capturing)
    run(capturing, cell, "x = 5")
    _wait_for_capture(capturing, cell)
    _, status, _ = capturing.request("GET", "/v1/status")
    pids = status["workers"]["pids"]
    answers: list[Any] = []
    runner = threading.Thread(target=lambda: answers.append(capturing.request(
        "POST", f"/v1/cells/{cell}/exec", {"code": "x = 0\nimport time\ntime.sleep(30)", "timeout_ms": 1000})))
    runner.start()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        runner.join(timeout=60)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the one the supervisor killed
    code, body, _ = answers[0]
    assert code == 200 and body["status"] == "timeout" and body.get("rolled_back") is True, body
    assert "replaced" in body["note"] and "rolled back" in body["note"], body
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        code, body, _ = capturing.request("POST", f"/v1/cells/{cell}/exec", {"code": "print(x)"})
        if code == 200 and body["status"] == "ok":
            break
        assert code == 503 or (code == 200 and body["status"] == "killed"), body
        time.sleep(0.2)
    assert body["stdout"] == "5\n" and body.get("restored") is True, body
    capturing.request("DELETE", f"/v1/cells/{cell}")
