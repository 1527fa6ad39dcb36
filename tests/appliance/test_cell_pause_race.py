"""A run that comes in while its cell is being paused (T-IMAGE-2): the run
goes on from the file its worker restores, and the cell is not left marked
paused (which would keep it from being paused again and make its next run
ask for a restore it does not need). A real pool, real workers and guests;
the run is started from inside the pause's own call, right after the worker
answered it, so the interleaving is exact (no sleeps)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from appliance.cells import CellService
from appliance.runtime import protocol
from appliance.runtime.pool import WorkerPool
from appliance.storage import Tenant
from tests.in_process import cell_service, named_tenant


class PausePool(WorkerPool):
    """The real pool; ``after_pause`` runs once the worker has answered a
    capture that releases a cell (a pause), before the service sees the answer."""

    after_pause: Callable[[], None] | None = None

    def call(self, handle: Any, msg: protocol.Request, **kwargs: Any) -> protocol.Reply:
        reply = super().call(handle, msg, **kwargs)
        hook, self.after_pause = self.after_pause, None
        if hook is not None and isinstance(msg, protocol.CaptureRequest) and msg.release:
            hook()
        return reply


@pytest.fixture(scope="module")
def service(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellService]:
    with cell_service(tmp_path_factory.mktemp("pause-race"), PausePool, SYNAPSE_WARM_PYTHON="0", SYNAPSE_WORKERS="1",
                      SYNAPSE_CELL_PAUSE_IDLE_S="3600", SYNAPSE_CELL_CAPTURE_IDLE_S="0") as cells:
        yield cells


def _tenant(cells: CellService) -> Tenant:
    return named_tenant(cells, "racer")


def _wait_for(cond: Callable[[], bool], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def _pause_all(cells: CellService) -> int:
    return cells.pause_idle(now=time.monotonic() + 7200)  # every cell counts as idle


@pytest.mark.parametrize("in_flight", [False, True], ids=["run-ends-before-the-pause-is-noted",
                                                          "run-still-running-when-the-pause-is-noted"])
def test_t_image_2_run_during_a_pause_leaves_the_cell_consistent(service: CellService, in_flight: bool) -> None:
    tenant = _tenant(service)
    record = service.create(tenant, "python3", 600_000, True, {}, {}, service.settings.memory_mb)
    volume = Path(service.volume_path(tenant.id, record.id))
    first = service.exec_in_cell(tenant, record.id, b"q = 'before'", True, None)
    assert first["status"] == "ok", first
    code = "print(q)"
    if in_flight:
        # The guest says it runs, then waits (bounded by its deadline) until the test lets it end.
        code = "import os\nopen('started', 'w').close()\nwhile not os.path.exists('go'):\n    pass\nprint(q)"
    answers: list[dict[str, Any]] = []
    runner = threading.Thread(target=lambda: answers.append(
        service.exec_in_cell(tenant, record.id, code.encode(), True, None, timeout_ms=60_000)))

    def race() -> None:
        runner.start()
        if in_flight:
            _wait_for(lambda: (volume / "started").exists())
        else:
            runner.join()

    assert isinstance(service.pool, PausePool)
    service.pool.after_pause = race
    assert _pause_all(service) == 1
    if in_flight:
        (volume / "go").touch()
    runner.join()
    answer = answers[0]
    assert answer["status"] == "ok" and answer["stdout"] == "before\n", answer
    assert answer.get("restored") is True, answer  # its worker went on from the pause's file
    # Not left marked paused: a later pause takes it again, and the run after
    # that resumes it from the file.
    with service._lock:
        assert record.id not in service._paused
    assert _pause_all(service) == 1
    again = service.exec_in_cell(tenant, record.id, b"print(q)", True, None)
    assert again["stdout"] == "before\n" and again.get("restored") is True, again
    service.delete(tenant, record.id)
