"""Watch a live server's guests from outside: worker threads' CPU time and a
cell's volume (T-DOS-1 tests: no guest instruction runs after its answer).

CPU time is read per thread from /proc/<pid>/task/<tid>/stat (utime + stime,
in clock ticks), so a guest that keeps spinning after its answer shows up on
its own thread whatever the rest of the worker does.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from tests.liveserver import ServerProcess

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def worker_pids(srv: ServerProcess) -> list[int]:
    code, body, _ = srv.request("GET", "/v1/status")
    assert code == 200, body
    return [int(p) for p in body["workers"]["pids"]]


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """CPU seconds so far of every thread of these processes."""
    seen: dict[tuple[int, int], float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue  # the thread ended meanwhile
            fields = text.rsplit(")", 1)[1].split()  # fields[0] is the state (field 3 of stat)
            seen[(pid, int(tid))] = (int(fields[11]) + int(fields[12])) * TICK
    return seen


def tree_bytes(root: Path) -> int:
    """Bytes of regular files under root (iterative, links not followed)."""
    total, stack = 0, [root]
    while stack:
        for entry in os.scandir(stack.pop()):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


@dataclass
class AfterAnswer:
    busiest_thread_s: float  # most CPU any worker thread alive at the answer used in the window
    volume_growth: int  # bytes the cell's volume gained in the window
    window_s: float


def watch_after_answer(pids: list[int], volume: Path, cpu_at_answer: dict[tuple[int, int], float],
                       bytes_at_answer: int, window: float = 2.0, cpu_limit: float = 0.3) -> AfterAnswer:
    """Observe for ``window`` seconds after an answer; stop early once a
    worker thread burns more than ``cpu_limit`` or the volume grows."""
    start = time.monotonic()
    busiest, growth = 0.0, 0
    while True:
        now = thread_cpu(pids)
        busiest = max([now.get(k, v) - v for k, v in cpu_at_answer.items()] + [0.0])
        growth = tree_bytes(volume) - bytes_at_answer
        elapsed = time.monotonic() - start
        if busiest > cpu_limit or growth != 0 or elapsed >= window:
            return AfterAnswer(busiest, growth, elapsed)
        time.sleep(0.1)
