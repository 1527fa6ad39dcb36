"""Deep and wide guest trees and the per-tenant disk limits on a live server
(T-DOS-1: trees that break recursive walks; T-DISK-1: bytes and files).

Real server, real guests: a 1,200-deep tree made through the files API or by
a Python guest is deleted with a 2xx and leaves nothing on disk; thousands of
sibling directories (more than a worker's RLIMIT_NOFILE of 4096) are counted;
a volume that cannot be walked counts as over quota; the file-count limit
refuses new files through the files API and host_fs_write, and a WASI guest
that crosses either limit is stopped mid-run.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.confine import remove_tree
from tests import guests
from tests.liveserver import ServerProcess, start_server

pytestmark = pytest.mark.slow

DEPTH = 1200
DEEP_PATH = "/".join(["a"] * DEPTH)
BUILD_DEEP = f"import os\np = 'a'\nfor _ in range({DEPTH}):\n    os.mkdir(p)\n    p += '/a'\nprint('built')\n"
QUIET = {"SYNAPSE_WORKERS": "1", "SYNAPSE_WARM_PYTHON": "1", "SYNAPSE_WARM_JAVASCRIPT": "0"}


def _serve(root: Path, **env: str) -> ServerProcess:
    return start_server(root, env={**QUIET, **env})


def _stop(srv: ServerProcess) -> None:
    srv.stop()
    # pytest removes old temp directories with the recursive shutil.rmtree: leave no deep tree.
    remove_tree(srv.root)


@pytest.fixture(scope="module")
def disk(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = _serve(tmp_path_factory.mktemp("disk"), SYNAPSE_TENANT_QUOTA_MB="1", SYNAPSE_TENANT_FILE_LIMIT="30000")
    yield srv
    _stop(srv)


@pytest.fixture(scope="module")
def few(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = _serve(tmp_path_factory.mktemp("few"), SYNAPSE_TENANT_FILE_LIMIT="20")
    yield srv
    _stop(srv)


def _cell(srv: ServerProcess, template: str) -> str:
    status, cell, _ = srv.request("POST", "/v1/cells", {"template": template})
    assert status == 201, cell
    return str(cell["cell_id"])


def _volume(srv: ServerProcess, cid: str) -> Path:
    return srv.root / "sandbox_volumes" / "default" / cid


def _scratch_trees(srv: ServerProcess) -> list[Path]:
    """Run scratch directories (under each worker's pool) that still hold a guest tree."""
    pools = srv.root / "sandbox_volumes" / ".pool"
    return [d for pool in pools.iterdir() for d in pool.iterdir() if (d / "a").exists()]


def _ok_delete(srv: ServerProcess, cid: str) -> None:
    status, body, _ = srv.request("DELETE", f"/v1/cells/{cid}")
    assert status == 200, body
    assert not _volume(srv, cid).exists()


def test_t_dos_1_files_api_deep_tree_then_delete_cell(disk: ServerProcess) -> None:
    cid = _cell(disk, "wasm")
    status, entry, _ = disk.request("POST", f"/v1/cells/{cid}/files/mkdir", {"path": DEEP_PATH})
    assert status == 200 and entry["type"] == "dir", entry
    status, _, _ = disk.request("POST", f"/v1/cells/{cid}/files", {"path": DEEP_PATH + "/leaf.txt", "content": "deep"})
    assert status == 200
    _ok_delete(disk, cid)  # was: 500 RecursionError, row gone, volume left on disk and off the quota
    assert disk.request("GET", f"/v1/cells/{cid}")[0] == 404
    _, status_body, _ = disk.request("GET", "/v1/status")
    assert status_body["quota"]["used_files"] == 0


def test_t_dos_1_one_shot_deep_tree_answers_with_receipt(disk: ServerProcess) -> None:
    status, body, _ = disk.request("POST", "/v1/execute", {"template": "python3", "code": BUILD_DEEP, "timeout_ms": 30000})
    assert status == 200, body  # was: 500 RecursionError from the scratch cleanup, no receipt
    assert body["status"] == "ok" and body["stdout"] == "built\n"
    status, receipt, _ = disk.request("GET", f"/v1/receipts/{body['execution_id']}")
    assert status == 200 and receipt["receipt_hash"] == body["receipt"]["receipt_hash"]
    assert _scratch_trees(disk) == []  # the scratch volume went with the run


def test_t_disk_1_wide_tree_counted_past_worker_rlimit(disk: ServerProcess) -> None:
    """6,000 sibling directories, each with 150 bytes: the worker (RLIMIT_NOFILE
    4096) used to lose every subtree past its descriptor limit and count ~60%."""
    cid = _cell(disk, "python3")
    try:
        code = "import os\nfor i in range(6000):\n    os.mkdir(f'd{i}')\n    open(f'd{i}/f', 'wb').write(b'x' * 150)\nprint('ok')\n"
        status, body, _ = disk.request("POST", f"/v1/cells/{cid}/exec", {"code": code, "timeout_ms": 60000})
        assert status == 200 and body["status"] == "ok", body
        _, info, _ = disk.request("GET", f"/v1/cells/{cid}")
        assert info["disk_bytes"] == 900_000
        _, status_body, _ = disk.request("GET", "/v1/status")
        assert status_body["quota"]["used_files"] == 12_000
        status, body, _ = disk.request("POST", f"/v1/cells/{cid}/files", {"path": "more.bin", "content": "x" * 200_000})
        assert (status, body["code"]) == (413, "quota_exceeded")
    finally:
        _ok_delete(disk, cid)


def test_t_disk_1_unmeasurable_volume_counts_as_over_quota(disk: ServerProcess) -> None:
    cid = _cell(disk, "python3")
    volume = _volume(disk, cid)
    try:
        assert disk.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(1)"})[0] == 200
        # The walk now fails (the volume is not ours / not readable): never "zero bytes".
        os.chown(volume, 4242, -1) if os.geteuid() == 0 else os.chmod(volume, 0)
        status, body, _ = disk.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(2)"})
        assert status == 200 and body["stdout"] == "2\n"  # measured after the run: this walk fails
        status, body, _ = disk.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(3)"})
        assert (status, body["code"]) == (413, "quota_exceeded")
        status, body, _ = disk.request("POST", "/v1/cells", {"template": "wasm"})
        other = body["cell_id"]
        status, body, _ = disk.request("POST", f"/v1/cells/{other}/files", {"path": "x", "content": "y"})
        assert (status, body["code"]) == (413, "quota_exceeded")  # the whole tenant, not just that cell
        _ok_delete(disk, other)
    finally:
        os.chown(volume, os.geteuid(), -1) if os.geteuid() == 0 else os.chmod(volume, 0o700)
    status, body, _ = disk.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(4)"})
    assert status == 200 and body["stdout"] == "4\n"  # measured again once it can be
    _ok_delete(disk, cid)


def test_t_disk_1_wasi_writes_past_quota_stopped_mid_run(disk: ServerProcess) -> None:
    cid = _cell(disk, "python3")
    try:
        code = ("import time\nwith open('grow.bin', 'wb') as f:\n    while True:\n"
                "        f.write(b'x' * 65536)\n        f.flush()\n        time.sleep(0.01)\n")
        status, body, _ = disk.request("POST", f"/v1/cells/{cid}/exec", {"code": code, "timeout_ms": 30000})
        assert status == 200 and body["status"] == "killed", body  # not "timeout": stopped by the volume watch
        assert {"threat": "T-DISK-1", "function": "wasi", "reason": "quota_exceeded"} in body["denials"]
        assert body["receipt"]["receipt_hash"]
        status, body, _ = disk.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(1)"})
        assert (status, body["code"]) == (413, "quota_exceeded")
    finally:
        _ok_delete(disk, cid)


def test_t_dos_1_killed_workers_scratch_removed_by_its_successor(disk: ServerProcess) -> None:
    _, status_body, _ = disk.request("GET", "/v1/status")
    pid = status_body["workers"]["pids"][0]
    pool = disk.root / "sandbox_volumes" / ".pool" / f"w0-{pid}"
    answers: list[Any] = []
    code = "import os, time\nos.makedirs('/'.join(['a'] * 50))\nprint('built', flush=True)\ntime.sleep(25)\n"
    running = threading.Thread(target=lambda: answers.append(
        disk.request("POST", "/v1/execute", {"template": "python3", "code": code, "timeout_ms": 30000})))
    running.start()
    assert _wait_for(lambda: any((d / "a").exists() for d in pool.iterdir()))
    os.kill(pid, 9)  # the worker dies mid-run: nobody ran its cleanup
    running.join(timeout=120)
    status, body, _ = answers[0]
    assert status == 200 and body["status"] == "killed" and body["receipt"]["receipt_hash"]
    assert _wait_for(lambda: not pool.exists())  # the replacement worker removed it


def _exec(srv: ServerProcess, cid: str, code: str) -> dict[str, Any]:
    status, body, _ = srv.request("POST", f"/v1/cells/{cid}/exec", {"code": code})
    assert status == 200, body
    return dict(body)


def test_t_disk_1_file_limit_files_api_and_host_fs_write(few: ServerProcess) -> None:
    cid = _cell(few, "wasm")
    try:
        for i in range(19):
            assert few.request("POST", f"/v1/cells/{cid}/files", {"path": f"f{i}", "content": "x"})[0] == 200
        assert few.request("POST", f"/v1/cells/{cid}/files/mkdir", {"path": "d"})[0] == 200  # entry 20 of 20
        status, body, _ = few.request("POST", f"/v1/cells/{cid}/files", {"path": "f19", "content": "x"})
        assert (status, body["code"]) == (413, "file_limit_exceeded")
        status, body, _ = few.request("POST", f"/v1/cells/{cid}/files/mkdir", {"path": "e"})
        assert (status, body["code"]) == (413, "file_limit_exceeded")
        status, body, _ = few.request("POST", f"/v1/cells/{cid}/files", {"path": "d/new/deeper", "content": "x"})
        assert (status, body["code"]) == (413, "file_limit_exceeded")
        assert few.request("POST", f"/v1/cells/{cid}/files", {"path": "f0", "content": "replaced"})[0] == 200
        refused = _exec(few, cid, guests.write_probe("new.txt", b"hi"))
        assert refused["exit_code"] == -8
        assert {"threat": "T-DISK-1", "function": "host_fs_write", "reason": "file_limit_exceeded"} in refused["denials"]
        assert _exec(few, cid, guests.write_probe("f1", b"hi"))["exit_code"] == 2  # replacing is not a new file
        _, status_body, _ = few.request("GET", "/v1/status")
        assert (status_body["quota"]["used_files"], status_body["quota"]["limit_files"]) == (20, 20)
        assert few.request("DELETE", f"/v1/cells/{cid}/files?path=f0")[0] == 200
        assert _exec(few, cid, guests.write_probe("new.txt", b"hi"))["exit_code"] == 2
    finally:
        _ok_delete(few, cid)


FILE_FLOODS = {
    "python3": "i = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1\n",
    "javascript": "let i = 0; for (;;) { std.open('f' + (i++), 'w').close(); }",
}


@pytest.mark.parametrize("template", sorted(FILE_FLOODS))
def test_t_disk_1_wasi_file_flood_stopped_mid_run(few: ServerProcess, template: str) -> None:
    cid = _cell(few, template)
    try:
        code = FILE_FLOODS[template]
        status, body, _ = few.request("POST", f"/v1/cells/{cid}/exec", {"code": code, "timeout_ms": 30000})
        assert status == 200 and body["status"] == "killed", body
        assert {"threat": "T-DISK-1", "function": "wasi", "reason": "file_limit_exceeded"} in body["denials"]
        status, body, _ = few.request("POST", f"/v1/cells/{cid}/exec", {"code": "print(1)"})
        assert (status, body["code"]) == (413, "file_limit_exceeded")
    finally:
        _ok_delete(few, cid)


def _wait_for(condition: Any, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_t_dos_1_crash_mid_delete_leaves_no_orphan(module_cache: None, tmp_path: Path) -> None:
    """SIGKILL the server while it deletes a big tree, and plant the volume a
    crash between "volume made" and "row written" leaves: after a restart the
    first is still a cell whose DELETE finishes, the second is swept."""
    srv = _serve(tmp_path / "crash")
    try:
        cid = _cell(srv, "wasm")
        volume = _volume(srv, cid)
        assert srv.request("POST", f"/v1/cells/{cid}/files/mkdir", {"path": DEEP_PATH})[0] == 200
        for i in range(2000):
            (volume / f"s{i}").mkdir()
        orphan = volume.parent / "c-orphan-of-a-crash"
        (orphan / "a" / "b").mkdir(parents=True)
        answers: list[Any] = []
        deleting = threading.Thread(target=lambda: answers.append(_try_delete(srv, cid)))
        deleting.start()
        assert _wait_for(lambda: not volume.exists() or len(os.listdir(volume)) < 1900)
        srv.proc.kill()
        deleting.join(timeout=60)
        srv.stop()
        interrupted = volume.exists()
        srv = _serve(tmp_path / "crash")
        assert not orphan.exists()  # swept at start: no row owns it
        status, _, _ = srv.request("GET", f"/v1/cells/{cid}")
        if interrupted:
            assert status == 200  # the row outlives a partial delete: the volume still counts, and ...
            _ok_delete(srv, cid)  # ... a repeated DELETE finishes the job
        else:
            assert status == 404
        assert not volume.exists()
    finally:
        _stop(srv)


def _try_delete(srv: ServerProcess, cid: str) -> object:
    try:
        return srv.request("DELETE", f"/v1/cells/{cid}")[0]
    except OSError as exc:  # the server died under the request
        return exc
