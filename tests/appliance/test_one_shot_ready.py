"""One-shot sessions prepared ahead (worker.py ``ready_once``, sessions.py
``PY_ONE_SHOT_WARM_UP``): an image-started Python interpreter kept for one
``/v1/execute`` run has already paid its first pandas call's page faults. Its
warm-up must leave nothing a run could see (T-IMAGE-1: the reset still comes
last), and sessions that become cells never get one."""
from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from appliance.runtime.protocol import BindRequest, ExecRequest
from appliance.runtime.worker import ONE_SHOT_READY, Worker
from tests.in_process import worker_config

PROBE = ("import os, sys, random, numpy as np, pandas as pd\n"
         "names = sorted(k for k in globals() if not k.startswith('__') and k not in "
         "('os', 'sys', 'random', 'np', 'pd'))\n"
         "print(names, os.getcwd(), os.environ.get('HOME'), 'pandas' in sys.modules)\n"
         "print(random.random(), np.random.random())\n"
         "df = pd.DataFrame({'k': list('abcab'), 'v': [1, 2, 3, 4, 5]})\n"
         "print(df.groupby('k')['v'].sum().to_dict())\n")


@pytest.fixture()
def worker(module_cache: None, tmp_path: Path) -> Any:
    parent, child = multiprocessing.Pipe()
    config = worker_config(tmp_path, warm={"python3": 1, "javascript": 0})
    w = Worker(child, config)
    try:
        yield w
    finally:
        for queue in [*w.warm.values(), *w.ready_once.values()]:
            for session, _ in queue:
                session.close()
        for session in w.sessions.values():
            session.close()
        w.runtimes.close()
        parent.close()
        child.close()


def _fill(worker: Worker) -> None:
    for _ in range(10):
        if not worker._refill_one():
            return
    raise AssertionError("the pools never filled")


def _one_shot(worker: Worker, req_id: int) -> list[str]:
    reply = worker.handle(ExecRequest(req_id, template="python3", code=PROBE.encode(), is_text=True, timeout_ms=30000,
                                      memory_mb=256, tenant_id="t"))
    assert reply.outcome.status == "ok", reply.outcome
    return str(reply.outcome.stdout).splitlines()


def test_t_image_1_prepared_one_shot_session_keeps_nothing_of_its_warm_up(worker: Worker, tmp_path: Path) -> None:
    assert worker.runtimes.get("python3").image is not None, "the python image is missing from the module cache"
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain = worker._new_session("python3", str(plain_dir), worker.default_memory, None)  # as any cell starts
    try:
        baseline = str(plain.run(PROBE.encode(), 30.0, 1 << 20, None, None).stdout).splitlines()
    finally:
        plain.close()
    assert baseline[0].endswith(" /data /data True") and not plain.warmed_up
    _fill(worker)
    assert len(worker.warm["python3"]) == 1 and len(worker.ready_once["python3"]) == ONE_SHOT_READY
    assert all(s.warmed_up for s, _ in worker.ready_once["python3"]) and not worker.warm["python3"][0][0].warmed_up
    first = _one_shot(worker, 1)
    # A prepared one was taken.
    assert len(worker.ready_once["python3"]) == ONE_SHOT_READY - 1 and len(worker.warm["python3"]) == 1
    _fill(worker)
    second = _one_shot(worker, 2)
    for out in (first, second):
        # The image's names only (no name of the warm-up), the cell's working
        # directory and environment: the reset ran after the warm-up.
        assert out[0] == baseline[0] and out[2] == "{'a': 5, 'b': 7, 'c': 3}", (out, baseline)
    assert len({first[1], second[1], baseline[1]}) == 3  # random and numpy's generator reseeded in each (T-IMAGE-1)


def test_t_image_1_new_cells_never_get_a_warmed_up_session(worker: Worker, tmp_path: Path) -> None:
    _fill(worker)
    reply = worker.handle(BindRequest(1, cell_id="c1", template="python3", volume=str(tmp_path / "vols" / "t" / "c1"),
                                      memory_mb=256))
    assert reply.warm is True
    assert not worker.sessions["c1"].warmed_up  # its pages stay the image's, shared (idle cell PSS)
    assert len(worker.ready_once["python3"]) == ONE_SHOT_READY


def test_one_shot_with_other_memory_or_envs_takes_no_prepared_session(worker: Worker) -> None:
    _fill(worker)
    reply = worker.handle(ExecRequest(1, template="python3", code=b"import os\nprint(os.environ['X'])", is_text=True,
                                      timeout_ms=30000, memory_mb=256, tenant_id="t", envs={"X": "own"}))
    assert reply.outcome.stdout == "own\n"
    assert len(worker.ready_once["python3"]) == ONE_SHOT_READY and len(worker.warm["python3"]) == 1
