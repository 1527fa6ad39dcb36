"""How a worker hands requests to its threads (worker.py ``RequestThreads``)
and keeps track of the run in flight in each cell (``in_flight``, what a
cancel stops: T-DOS-1).

A request goes to the thread that became idle last (only that thread wakes),
never waits behind a run in progress, and the bookkeeping of a run that has
been answered never removes the cell's next run, which the supervisor may
send the moment it reads the answer."""
from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from appliance.runtime import protocol
from appliance.runtime.worker import RequestThreads, Worker
from tests.in_process import worker_config


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class _Served:
    """A serve function that records which thread served each request; a
    request given an Event is held until the Event is set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by: dict[str, int] = {}
        self.done: set[str] = set()

    def __call__(self, request: tuple[str, threading.Event | None]) -> None:
        name, hold = request
        with self.lock:
            self.by[name] = threading.get_ident()
        if hold is not None:
            assert hold.wait(10.0), f"{name} was never released"
        with self.lock:
            self.done.add(name)


def test_a_request_goes_to_the_thread_that_became_idle_last() -> None:
    served = _Served()
    threads = RequestThreads(served, keep=3)
    first, second = threading.Event(), threading.Event()
    threads.submit(("a", first))
    threads.submit(("b", second))  # "a" is running: a second thread
    _until(lambda: {"a", "b"} <= set(served.by), "both runs to start")
    assert served.by["a"] != served.by["b"]
    first.set()
    _until(lambda: len(threads._idle) == 1, "the first thread to be idle")
    second.set()
    _until(lambda: len(threads._idle) == 2, "the second thread to be idle")
    for name in ("c", "d", "e"):
        threads.submit((name, None))
        _until(lambda: name in served.done and len(threads._idle) == 2, f"{name} to end")
        assert served.by[name] == served.by["b"], "the thread idle last (warm) serves the next request"


def test_a_request_never_waits_behind_a_run_in_progress() -> None:
    served = _Served()
    threads = RequestThreads(served, keep=1)
    threads.submit(("warm", None))
    _until(lambda: "warm" in served.done and len(threads._idle) == 1, "an idle thread")
    held = threading.Event()
    threads.submit(("long", held))  # takes the one idle thread
    _until(lambda: "long" in served.by, "the long run to start")
    threads.submit(("quick", None))  # no idle thread: a new one, at once
    _until(lambda: "quick" in served.done, "the second run to end while the first still runs")
    assert "long" not in served.done
    held.set()
    _until(lambda: "long" in served.done and len(threads._idle) == 1, "the long run to end")
    assert served.by["quick"] != served.by["long"]


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
    config = worker_config(tmp_path, warm={"python3": 0, "javascript": 0})
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
