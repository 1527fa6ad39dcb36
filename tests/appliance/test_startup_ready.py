"""Start-up without waiting for the workers (issue 18, docs/operations.md):
the listener answers at once, /healthz says "starting" until a worker is up,
a run sent meanwhile waits for it (or gets 503 not_ready with Retry-After
past a bound), and a first worker that cannot start stops the service
instead of leaving it half up (fail closed)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from appliance.config import load_settings
from appliance.runtime import pool as pool_module
from appliance.runtime.pool import WorkerPool
from appliance.runtime.worker import worker_main
from appliance.services import Services, build_services, ensure_default_tenant
from appliance.web.app import create_app
from tests.liveserver import REPO, shared_cache, start_server


def gated_worker(conn: Connection, config: dict[str, Any], *, gate: str) -> None:
    """The real worker, held back before it starts until the test opens ``gate`` (a FIFO)."""
    with open(gate, "rb") as f:  # blocks until the other end is opened for writing: no polling
        f.read()
    worker_main(conn, config)


def failing_worker(conn: Connection, config: dict[str, Any]) -> None:
    """A worker that dies before it says ready, as one that cannot confine itself does."""
    os._exit(3)


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Node:
    def __init__(self, root: Path, target: Callable[..., None]) -> None:
        self.settings = load_settings({
            "SYNAPSE_ROOT": str(root / "root"), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
            "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_WORKERS": "1", "SYNAPSE_WORKER_SPARES": "1",
            "SYNAPSE_WARM_PYTHON": "0", "SYNAPSE_WARM_JAVASCRIPT": "0",
        })
        from appliance.datadir import prepare_root

        prepare_root(self.settings)
        self.pool = WorkerPool(self.settings, target=target)
        self.pool.start_in_background()
        self.services: Services = build_services(self.settings, pool=self.pool)
        key = ensure_default_tenant(self.services)
        assert key is not None
        self.key = key
        self.app = create_app(self.services)
        self.client = self.app.test_client()

    def run(self) -> Any:
        return self.client.post("/v1/execute", json={"template": "python3", "code": "print(1+1)"},
                                headers={"Authorization": f"Bearer {self.key}"})

    def close(self) -> None:
        self.services.close()
        ops = self.app.extensions.get("cell_ops")
        if ops is not None:
            ops.close()


@pytest.fixture
def gated(module_cache: None, tmp_path: Path) -> Iterator[tuple[Node, Path]]:
    gate = tmp_path / "gate"
    os.mkfifo(gate, 0o600)
    node = Node(tmp_path, functools.partial(gated_worker, gate=str(gate)))
    try:
        yield node, gate
    finally:
        try:
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))  # a worker still held back goes on (and is closed)
        except OSError:
            pass  # nobody reads the gate any more
        node.close()


def test_healthz_says_starting_until_a_worker_is_up_and_an_early_run_is_answered(gated: tuple[Node, Path]) -> None:
    node, gate = gated
    # The worker cannot be up: it waits on the FIFO nobody has opened yet.
    health = node.client.get("/healthz")
    assert health.status_code == 503 and health.get_json() == {"status": "starting"}
    answers: list[Any] = []
    early = threading.Thread(target=lambda: answers.append(node.run()))
    early.start()
    _wait_for(lambda: node.pool.waiting_for_start == 1, "the run to wait for the first worker")
    assert node.client.get("/healthz").status_code == 503  # still starting while the run waits
    with open(gate, "wb"):  # let the worker start
        pass
    early.join(timeout=120)
    assert not early.is_alive()
    answer = answers[0]
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["stdout"] == "2\n"
    assert node.pool.wait_started(timeout=60)
    health = node.client.get("/healthz")
    assert health.status_code == 200 and health.get_json() == {"status": "ok"}


def test_a_run_past_the_start_bound_is_503_not_ready_with_retry_after(gated: tuple[Node, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    node, gate = gated
    monkeypatch.setattr(pool_module, "FIRST_WORKER_WAIT_S", 0.2)
    answer = node.run()
    assert answer.status_code == 503
    assert answer.get_json()["code"] == "not_ready"
    assert answer.headers["Retry-After"] == str(pool_module.NOT_READY_RETRY_S)
    assert "Traceback" not in answer.get_data(as_text=True)
    with open(gate, "wb"):
        pass
    assert node.pool.wait_started(timeout=120)
    assert node.run().status_code == 200  # once up, runs are served


def test_t_escape_1_a_first_worker_that_cannot_start_leaves_the_node_not_ready(module_cache: None,
                                                                               tmp_path: Path) -> None:
    # Fail closed: no run is served, /healthz never says ok, and wait_started
    # tells `cell serve` to stop (as it refused to start before it listened early).
    node = Node(tmp_path, failing_worker)
    try:
        assert node.pool.wait_started(timeout=120) is False
        assert node.pool.start_error is not None and "worker 0" in node.pool.start_error
        answer = node.run()
        assert answer.status_code == 503 and answer.get_json()["code"] == "not_ready"
        assert node.client.get("/healthz").status_code == 503
    finally:
        node.close()


def test_cell_serve_listens_before_its_workers_are_ready_and_answers_a_run_sent_at_once(
        module_cache: None, tmp_path: Path) -> None:
    srv = start_server(tmp_path / "early", wait_ready=False)
    try:
        status, body, _ = srv.request("POST", "/v1/execute", {"template": "python3", "code": "print(1+1)"})
        assert status == 200, body
        assert body["stdout"] == "2\n"
        _wait_for(lambda: any(line.startswith("cell: ready:") for line in srv.log), "the ready line")
        lines = [line.split(" ", 2)[1] for line in srv.log if line.startswith(("cell: serving on", "cell: ready:"))]
        assert lines == ["serving", "ready:"]  # the listener first, then the workers
    finally:
        assert srv.stop() == 0


def test_t_escape_1_cell_serve_stops_with_exit_1_when_its_first_worker_cannot_start(tmp_path: Path) -> None:
    # The real `cell serve` main path, with workers that die before they say ready.
    code = ("import sys\nfrom appliance.runtime.pool import WorkerPool\nfrom appliance import cli\n"
            "from tests.appliance.test_startup_ready import failing_worker\n"
            "WorkerPool.__init__.__defaults__ = (None, failing_worker)\n"
            "sys.exit(cli.main(['serve']))\n")
    root = tmp_path / "root"
    env = dict(os.environ, SYNAPSE_ROOT=str(root), SYNAPSE_CONFIG_DIR=str(root / "etc"), SYNAPSE_PORT="0",
               SYNAPSE_HOST="127.0.0.1", SYNAPSE_MODULE_CACHE=str(shared_cache()))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "a worker did not start" in proc.stderr and "worker 0 died while starting" in proc.stderr
    assert "cell: ready:" not in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_worker_s_start_data_loads_without_the_pool_module() -> None:
    # Start-up: what a new worker unpickles is a plain SpawnProcess naming its
    # entry point (runtime/worker_entry.py), so the worker does not import
    # pool.py and all that the web process's side needs (broker, TUF registry).
    import io
    import json
    from multiprocessing import popen_spawn_posix, reduction

    from appliance.runtime import worker_entry

    proc = pool_module._WorkerProcess(target=worker_entry.worker_main, args=("conn", {"index": 0}), name="cell-worker-0")
    fp = io.BytesIO()
    popen_spawn_posix.set_spawning_popen(object())  # type: ignore[attr-defined]  # as while a worker is spawned
    try:
        reduction.dump(proc, fp)
    finally:
        popen_spawn_posix.set_spawning_popen(None)  # type: ignore[attr-defined]
    code = ("import json, pickle, sys\np = pickle.loads(sys.stdin.buffer.read())\n"
            "print(json.dumps([type(p).__name__, p._target.__module__, sorted(sys.modules)]))\n")
    done = subprocess.run([sys.executable, "-c", code], input=fp.getvalue(), cwd=REPO, capture_output=True, check=True)
    kind, target, loaded = json.loads(done.stdout)
    assert (kind, target) == ("SpawnProcess", "appliance.runtime.worker_entry")
    assert not {"appliance.runtime.pool", "appliance.runtime.broker", "mirror.registry", "appliance.config"} & set(loaded)
