"""How a worker keeps track of the run in flight in each cell (worker.py
``in_flight``, what a cancel stops: T-DOS-1): the bookkeeping of a run that
has been answered never removes the cell's next run, which the supervisor
may send the moment it reads the answer."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from appliance.runtime import protocol
from appliance.runtime.worker import Worker
from tests.liveserver import shared_cache


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class _NextRunArrivesAtOnce(Worker):
    """The supervisor's side, at its fastest: the cell's next run is on the
    pipe and received the moment the answer to its previous run has been
    written, before the thread that answered has finished its bookkeeping."""

    next_frame = b""
    supervisor: Any = None

    def send(self, msg: Any) -> None:
        super().send(msg)
        if isinstance(msg, protocol.RunReply) and msg.req_id == 1:
            self.supervisor.send_bytes(self.next_frame)
            assert self._receive_one()


@pytest.fixture()
def worker(module_cache: None, tmp_path: Path) -> Any:
    parent, child = multiprocessing.Pipe()
    config = {"index": 0, "cache_dir": str(shared_cache()), "volumes_dir": str(tmp_path / "vols"), "memory_mb": 256,
              "output_cap_bytes": 1 << 20, "module_max_bytes": 1 << 20, "warm": {"python3": 0, "javascript": 0},
              "mirror_dir": str(tmp_path / "no-mirror")}
    w = _NextRunArrivesAtOnce(child, config)
    w.supervisor = parent
    w.start_threads()
    try:
        yield w
    finally:
        for session in w.sessions.values():
            session.close()
        w.runtimes.close()
        parent.close()
        child.close()


def _reply(conn: Any, req_id: int, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not conn.poll(left):
            raise AssertionError(f"no answer to request {req_id} within {timeout} s")
        msg = protocol.decode(conn.recv_bytes(), protocol.FROM_WORKER, 1 << 30)
        if getattr(msg, "req_id", None) == req_id:
            return msg


def test_t_dos_1_a_cancel_stops_the_cells_next_run_received_while_the_last_answer_is_being_finished(
        worker: _NextRunArrivesAtOnce, tmp_path: Path) -> None:
    volume = str(tmp_path / "vols" / "t" / "c1")
    bound = worker.handle(protocol.BindRequest(0, cell_id="c1", template="python3", volume=volume, memory_mb=256))
    assert isinstance(bound, protocol.OkReply)

    def run(req_id: int, code: str) -> protocol.ExecRequest:
        return protocol.ExecRequest(req_id, template="python3", code=code.encode(), is_text=True, timeout_ms=60_000,
                                    memory_mb=256, tenant_id="t", cell_id="c1", volume=volume)

    worker.next_frame = protocol.encode(run(2, "import time\ntime.sleep(30)\nprint('not stopped')"))
    worker.supervisor.send_bytes(protocol.encode(run(1, "print(1+1)")))
    assert worker._receive_one()
    first = _reply(worker.supervisor, 1, 30.0)
    assert first.outcome.stdout == "2\n"
    session: Any = worker.sessions["c1"]
    # The first run's thread has finished with it; the second run sleeps in the guest.
    _until(lambda: worker._in_flight == 1 and session.governor.deadline is not None, "the second run to be running")
    started = time.monotonic()
    cancelled = worker.handle(protocol.CancelRequest(3, cell_id="c1"))
    assert isinstance(cancelled, protocol.OkReply)
    second = _reply(worker.supervisor, 2, 10.0)
    assert second.outcome.status == "killed" and second.outcome.cancelled, second.outcome
    assert "not stopped" not in second.outcome.stdout
    assert time.monotonic() - started < 10.0
