"""The host-call broker: the supervisor makes a worker's network calls (T-ESCAPE-3).

A worker runs hostile guests, so it has no network and starts no process
(its seccomp filter and Landlock rules deny both, whatever the config). The
two host functions that need the outside world send a typed frame over the
worker's channel instead (:class:`protocol.FetchCall`,
:class:`protocol.McpCall`), and the supervisor answers it here:

* **Bound to the run in flight.** The pool opens a grant when it sends a run
  to a worker and closes it when the run is answered. A call naming another
  run, a run of another worker, a control request, or a run already answered
  is refused, and the worker is replaced (T-PROTO-1): an honest worker never
  sends one.
* **Bounded.** One call at a time per run (a guest is suspended inside its
  host call), at most :attr:`Broker.max_per_worker` per worker; a second call
  for a run whose first is not answered yet is a flood, refused the same way.
* **The supervisor's policy, never the worker's words.** The egress policy,
  host map, Pro features, tenant and cell come from the run message the
  supervisor itself sent; the frame gives only the guest's URL or MCP request
  (guest-controlled: checked by the protocol, then by the same parsers as
  before) and ``max_len``. The deadline is the supervisor's own: the run's
  limit from when it was sent, and at most 60 s.
* The fetch itself is :func:`appliance.egress.fetch`, unchanged: every policy
  check (deny table, own addresses, operator deny-list, allowlist, redirects)
  happens before any connection.

:func:`fetch_here` and :func:`mcp_here` are also what an in-process runner
(tests, no worker) calls, so both paths share one piece of code.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from appliance.policy.egress import EgressDenied
from appliance.policy.mcp import RequestRejected, parse_request
from appliance.runtime import protocol

log = logging.getLogger("cell.broker")

DENIED, INVALID, IO_ERROR, TOO_LARGE = -1, -3, -4, -5
HARD_DEADLINE_S = 60.0  # no host call outlives this, whatever the run's limit (SECURITY.md §4)


@dataclass(frozen=True)
class CallResult:
    code: int  # bytes in body (>= 0) or a negative host-function code
    body: bytes = b""
    denial: str | None = None  # the policy's reason when code is DENIED


def fetch_here(url: str, policy: Any, resolver: Any, max_len: int, deadline: float, **hooks: Any) -> CallResult:
    """``host_fetch`` in this process: policy check, then fetch (T-SSRF-1/2).

    ``hooks`` are the test-only injection points of :func:`appliance.egress.fetch`
    (connector, address_check, own_addresses); the appliance passes none."""
    if policy is None or not getattr(policy, "enabled", False):
        return CallResult(DENIED, denial="egress_off")  # air-gap default
    # start-up: the HTTP client loads ssl; only a node whose guests fetch pays for it
    from appliance import egress

    try:
        result = egress.fetch(url, policy=policy, max_bytes=max_len, deadline=deadline, resolver=resolver, **hooks)
    except EgressDenied as e:
        return CallResult(DENIED, denial=e.reason)
    except egress.EgressError as e:
        return CallResult(TOO_LARGE if e.reason == "too_large" else IO_ERROR)
    body = result.body[:max_len]
    return CallResult(len(body), body)


def mcp_here(client: Any, raw: bytes, max_len: int, deadline: float, tenant_id: str, cell_id: str) -> CallResult:
    """``host_mcp_call`` in this process: parse the guest's request, then call (T-PRO-2)."""
    if client is None:
        return CallResult(DENIED, denial="mcp_off")  # no servers configured, or not licensed
    from appliance.mcp import McpError  # start-up: subprocess and ssl load only when MCP is used

    try:
        request = parse_request(raw)
    except RequestRejected as e:
        client.refused(tenant_id, cell_id, e.reason)  # every call is logged, refused ones too
        return CallResult(e.code, denial=e.reason if e.code == DENIED else None)
    try:
        out = client.call(request, deadline=deadline, max_bytes=max_len, tenant_id=tenant_id, cell_id=cell_id)
    except McpError as e:
        return CallResult(int(e.code), denial=(e.detail or e.reason) if e.code == DENIED else None)
    if len(out) > max_len:  # the client already refuses this; never answer more than the guest's buffer
        return CallResult(TOO_LARGE)
    return CallResult(len(out), bytes(out))


class SendWatch:
    """Kills a worker whose pipe does not take an answer by the run's limit
    (T-DOS-1): a worker that stops reading cannot hold the supervisor's thread
    in a blocked send. One thread per pool, woken every ``tick_s``; guarding a
    send is a dictionary entry, so the common, quick send costs no thread."""

    def __init__(self, tick_s: float = 0.25) -> None:
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._items: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    def start(self, limit: float, kill: Callable[[], None]) -> int:
        with self._lock:
            token = next(self._ids)
            self._items[token] = (limit, kill)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cell-broker-watch", daemon=True)
                self._thread.start()
        return token

    def done(self, token: int) -> None:
        with self._lock:
            self._items.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._tick_s)
            now = time.monotonic()
            with self._lock:
                due = [(t, kill) for t, (limit, kill) in self._items.items() if limit <= now]
                for t, _ in due:
                    del self._items[t]
            for _, kill in due:
                try:
                    kill()
                except Exception:
                    pass


@dataclass
class _Grant:
    """What the supervisor sent with one run: the only thing a call may use."""
    worker: int  # the worker's generation (unique per started process)
    run: protocol.ExecRequest
    deadline: float
    open_call: bool = False


class Broker:
    """The supervisor's side. One per pool; thread-safe.

    :meth:`open` / :meth:`close` bracket a run, :meth:`admit` is called by the
    worker's pipe reader for every call frame (a refusal there costs the worker
    its life), :meth:`serve` by the thread waiting for the run's answer.
    """

    def __init__(self, settings: Any, *, max_per_worker: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.max_per_worker = max_per_worker or max(1, int(getattr(settings, "lanes_per_worker", 1)))
        self._clock = clock
        self._lock = threading.Lock()
        self._grants: dict[int, _Grant] = {}
        self._mcp: Any = None
        self._mcp_lock = threading.Lock()
        self.send_watch = SendWatch()
        # TEST-ONLY: keyword arguments for appliance.egress.fetch (a recording
        # connector, a hook admitting a loopback test server). Never set by the appliance.
        self.fetch_hooks: dict[str, Any] = {}

    # -- grants ------------------------------------------------------------
    def open(self, worker: int, req_id: int, msg: Any, deadline_s: float | None) -> None:
        """Record the run ``msg`` (sent as ``req_id`` to ``worker``); other messages get no grant."""
        if isinstance(msg, protocol.ExecRequest) and deadline_s is not None:
            with self._lock:
                self._grants[req_id] = _Grant(worker, msg, self._clock() + deadline_s)

    def close(self, req_id: int) -> None:
        with self._lock:
            self._grants.pop(req_id, None)

    def admit(self, worker: int, call: protocol.HostCall) -> str | None:
        """None when ``call`` may be served; else why the worker is not to be trusted (T-ESCAPE-3)."""
        with self._lock:
            grant = self._grants.get(call.req_id)
            if grant is None or grant.worker != worker:
                return "host call for a run not in flight on this worker"
            if grant.open_call:
                return "host call while the run's previous call is unanswered"
            if sum(1 for g in self._grants.values() if g.worker == worker and g.open_call) >= self.max_per_worker:
                return "more host calls at once than the worker has lanes"
            grant.open_call = True
        return None

    def serve(self, worker: int, call: protocol.HostCall) -> protocol.CallAnswer:
        """Run an admitted call under the run's own policy; never raises."""
        with self._lock:
            grant = self._grants.get(call.req_id)
        try:
            if grant is None or grant.worker != worker:
                result = CallResult(DENIED, denial="not_in_flight")  # the run ended meanwhile
            else:
                deadline = min(grant.deadline, self._clock() + HARD_DEADLINE_S)
                result = self._fetch(grant, call, deadline) if isinstance(call, protocol.FetchCall) \
                    else self._mcp_call(grant, call, deadline)
        except Exception as e:  # a bug here must not take the supervisor's thread down
            log.warning("host call failed unexpectedly: %s", type(e).__name__)
            result = CallResult(IO_ERROR)
        finally:
            with self._lock:
                if grant is not None and self._grants.get(call.req_id) is grant:
                    grant.open_call = False
        return protocol.CallAnswer(call.req_id, call.call_id, result.code, result.body, result.denial)

    # -- the calls ---------------------------------------------------------
    def _fetch(self, grant: _Grant, call: protocol.FetchCall, deadline: float) -> CallResult:
        # import cycle: the worker module imports broker_client, which imports this one
        from appliance.runtime.worker import egress_policy, static_resolver

        spec = grant.run.egress
        if spec is None or not spec.enabled:
            return CallResult(DENIED, denial="egress_off")  # air-gap default (T-SSRF-1)
        resolver = static_resolver(spec.hosts) if spec.hosts is not None else None
        return fetch_here(call.url, egress_policy(spec), resolver, call.max_len, deadline, **self.fetch_hooks)

    def _mcp_call(self, grant: _Grant, call: protocol.McpCall, deadline: float) -> CallResult:
        # T-LIC-2: the features the supervisor found in the license for this run
        client = self._client() if "host_mcp_call" in grant.run.features else None
        return mcp_here(client, call.request, call.max_len, deadline, grant.run.tenant_id, grant.run.cell_id or "")

    def _client(self) -> Any:
        """The node's MCP client, made on first use: stdio servers are the
        supervisor's children, never a worker's (T-ESCAPE-3)."""
        path = getattr(self.settings, "mcp_servers", None)
        with self._mcp_lock:
            if self._mcp is None and path is not None:
                # start-up: subprocess and ssl load only on a node with MCP servers
                from appliance.mcp import McpClient, load_config

                self._mcp = McpClient(load_config(path))
            return self._mcp

    def set_mcp_client(self, client: Any) -> None:
        """Use ``client`` for MCP calls (tests hand in one built from a table)."""
        with self._mcp_lock:
            self._mcp = client

    def shutdown(self) -> None:
        with self._mcp_lock:
            client, self._mcp = self._mcp, None
        if client is not None:
            client.close()
