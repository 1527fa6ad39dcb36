"""The worker's side of the disk quota (T-DISK-1): a watch over the volume of
each run in progress that stops the guest once the volume (with a Python
cell's /tmp) holds more than the tenant may.

WASI writes go straight to the file system, where the host cannot meter them
call by call; the web process's ledger is ``appliance.quota``.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from appliance.confine import ConfinementError, Volume
from appliance.runtime import scratch


IDLE_POLL_S = 2.0  # after the last run, how long the watch thread keeps waking by itself


class VolumeWatch:
    """Walks the volume of the run in progress and stops the guest once it holds
    more than allowed (T-DISK-1). One per worker process, one daemon thread.

    WASI writes go straight to the file system, where the host cannot meter
    them call by call; this bounds them within a run. The overshoot is what
    the guest writes between two walks: one interval (``interval`` seconds,
    or four times the last walk's duration when that is longer, so walking
    takes at most a fifth of a core). Three walks in a row that fail also stop
    the guest: a volume that cannot be measured is over quota. A run shorter
    than one interval costs no walk; ending a run never waits for one.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._cond = threading.Condition()
        self._jobs: list[WatchedRun] = []  # a worker runs several requests at once (lanes)
        self._thread: threading.Thread | None = None
        # When the thread's present wait ends (monotonic); None while it walks.
        # A run's start wakes it only when its first walk is due before then,
        # and a run's end never does: the thread finds the job gone when it
        # wakes. So back-to-back runs cost no thread switch each.
        self._wake_at: float | None = None

    def watch(self, path: str, max_bytes: int, max_entries: int, stop: Callable[[], None]) -> WatchedRun:
        """A context manager around one run; ``.tripped`` says why it was stopped, if it was."""
        return WatchedRun(self, path, max_bytes, max_entries, stop)

    def _begin(self, job: WatchedRun) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="volume-watch", daemon=True)
                self._thread.start()
            job.due = time.monotonic() + job.wait
            self._jobs.append(job)
            if self._wake_at is not None and job.due < self._wake_at:
                self._cond.notify_all()

    def _end(self, job: WatchedRun) -> None:
        with self._cond:
            job.done = True  # under the lock: no stop can reach the guest's next run
            if job in self._jobs:
                self._jobs.remove(job)

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                now = time.monotonic()
                due = [job for job in self._jobs if job.due <= now]
                if not due:
                    if self._jobs:
                        idle_since = now
                        self._wake_at = min(job.due for job in self._jobs)
                    elif now - idle_since < IDLE_POLL_S:
                        self._wake_at = now + self.interval  # runs come and go: look again without being woken
                    else:
                        self._wake_at = float("inf")  # long idle: sleep until a run's start wakes us
                    self._cond.wait(timeout=None if self._wake_at == float("inf") else self._wake_at - now)
                    self._wake_at = None
                    continue  # a walk may be due now, or a run began or ended
            for job in due:
                started = time.monotonic()
                reason = job.check()  # outside the lock: ending a run never waits for a walk
                job.wait = max(self.interval, 4 * (time.monotonic() - started))
                job.due = time.monotonic() + job.wait
                job.failures = job.failures + 1 if reason == "unmeasured" else 0
                if reason is None or (reason == "unmeasured" and job.failures < 3):
                    continue
                with self._cond:
                    if not job.done:
                        job.tripped = reason
                        try:
                            job.stop()
                        except Exception:
                            pass  # the run's own deadline still ends it
                    if job in self._jobs:
                        self._jobs.remove(job)


class WatchedRun:
    def __init__(self, owner: VolumeWatch, path: str, max_bytes: int, max_entries: int, stop: Callable[[], None]) -> None:
        self.owner = owner
        self.path = path
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.stop = stop
        self.wait = owner.interval
        self.failures = 0
        self.due = 0.0  # when its next walk is due (monotonic)
        self.done = False
        self.tripped: str | None = None  # "quota_exceeded", "file_limit_exceeded" or "unmeasured"

    def __enter__(self) -> WatchedRun:
        self.owner._begin(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.owner._end(self)

    def check(self) -> str | None:
        """One walk: the reason to stop, or None."""
        try:
            with Volume(self.path, resolver="walk") as vol:  # a walk by fds: no guest path is resolved
                usage = vol.usage(max_entries=self.max_entries)
            # A Python cell's /tmp sits beside its volume and counts with it.
            usage = scratch.with_tmp(usage, scratch.tmp_usage(self.path, self.max_entries))
        except (ConfinementError, OSError):
            return "unmeasured"
        if not usage.complete or usage.entries > self.max_entries:
            return "file_limit_exceeded"
        if usage.bytes > self.max_bytes:
            return "quota_exceeded"
        return None
