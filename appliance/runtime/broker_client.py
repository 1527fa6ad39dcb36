"""The worker's side of the host-call broker (T-ESCAPE-3; the supervisor's
side is :mod:`appliance.runtime.broker`).

A worker has no network: ``host_fetch`` and ``host_mcp_call`` send a
:class:`protocol.FetchCall` / :class:`protocol.McpCall` over the worker's
channel and block until the supervisor's :class:`protocol.CallAnswer` comes
back, at most until the run's deadline plus the kill grace (by then the
supervisor has killed the worker anyway). One call at a time per run: the
guest is suspended inside its host call. An answer whose ids match no waiting
call (a late one, after the wait gave up) is dropped.
"""
from __future__ import annotations

import itertools
import queue
import threading
from typing import Callable

from appliance.runtime import protocol
from appliance.runtime.broker import IO_ERROR, CallResult

WAIT_MARGIN_S = 5.0  # beyond the run's deadline and the kill grace: the supervisor answers or kills first


class BrokerClient:
    """One per worker: sends calls, routes answers to the thread that waits."""

    def __init__(self, send: Callable[[object], None], grace_s: float = 1.0) -> None:
        self._send = send
        self._grace_s = grace_s
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[int, queue.SimpleQueue[protocol.CallAnswer]]] = {}

    def deliver(self, answer: protocol.CallAnswer) -> None:
        """Called by the worker's reading loop for every CallAnswer frame."""
        with self._lock:
            entry = self._waiting.get(answer.call_id)
        if entry is not None and entry[0] == answer.req_id:
            entry[1].put(answer)

    def for_run(self, req_id: int) -> RunCalls:
        return RunCalls(self, req_id)

    def call(self, make: Callable[[int], protocol.HostCall], req_id: int, wait_s: float, max_len: int) -> CallResult:
        call_id = next(self._ids)
        answers: queue.SimpleQueue[protocol.CallAnswer] = queue.SimpleQueue()
        with self._lock:
            self._waiting[call_id] = (req_id, answers)
        try:
            try:
                self._send(make(call_id))
            except (OSError, ValueError):
                return CallResult(IO_ERROR)  # the supervisor is gone
            try:
                answer = answers.get(timeout=max(0.0, wait_s) + self._grace_s + WAIT_MARGIN_S)
            except queue.Empty:
                return CallResult(IO_ERROR)
        finally:
            with self._lock:
                self._waiting.pop(call_id, None)
        if answer.code > max_len:  # never more than the guest's buffer, whatever arrives
            return CallResult(IO_ERROR)
        return CallResult(answer.code, answer.body, answer.denial)


class RunCalls:
    """The broker as one run's host functions see it (``RunContext.broker``)."""

    def __init__(self, client: BrokerClient, req_id: int) -> None:
        self._client = client
        self._req_id = req_id

    def fetch(self, url: str, max_len: int, wait_s: float) -> CallResult:
        if not protocol.call_url_ok(url):
            # The supervisor's parser would refuse it too (T-SSRF-1); never
            # sent, since such a frame costs a worker its life.
            return CallResult(-1, denial="bad_url")
        return self._client.call(lambda cid: protocol.FetchCall(self._req_id, cid, url, max_len), self._req_id,
                                 wait_s, max_len)

    def mcp(self, raw: bytes, max_len: int, wait_s: float) -> CallResult:
        return self._client.call(lambda cid: protocol.McpCall(self._req_id, cid, raw, max_len), self._req_id,
                                 wait_s, max_len)
