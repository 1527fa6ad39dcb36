"""Fair sharing of worker lanes between tenants (threat T-FAIR-1).

Pure: no clock, no threads, no I/O. The pool owns one :class:`FairShare`,
guards it with its own condition variable, and asks it three things: may this
tenant queue one more run (its queue share), which waiting runs may start now
(the fair queue), and what is left when a run ends.

The model. Each worker process runs up to ``lanes`` runs at once (one thread
each). A persistent cell lives in one worker, so a run of that cell can only
use a lane of that worker; a one-shot run names the worker the pool picked.

* **Reserve lane.** With two or more lanes per worker, the last free lane of a
  worker goes only to a tenant that has no run in flight anywhere on the node
  — unless the worker is dedicated to the asking tenant (tenant-bound
  workers, T-TENANT-1: nobody else could ever use that lane).
  A tenant that floods the node therefore holds at most ``lanes - 1`` lanes of
  each worker, and another tenant's short run always finds a lane on the
  worker that holds its cell. One tenant alone keeps what it had before lanes
  existed: one run per worker, every worker (work-conserving: the reserve is
  extra concurrency, never taken from a single tenant's share).
* **Fair queue.** When lanes free up, waiting runs start in round-robin order
  across tenants: the tenant with the fewest runs in flight first, ties broken
  by who was served longest ago; a tenant's own runs start in arrival order.
* **Caps.** ``tenant_max_runs`` (0 = none) bounds one tenant's runs in flight
  on the node; ``tenant_max_queued`` bounds how many of its runs may wait, so a
  flood cannot fill the node-wide queue and turn others away.
"""
from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class Ticket:
    """One run asking for a lane of one worker."""

    tenant: str
    worker: int
    seq: int
    granted: bool = False


@dataclass
class FairShare:
    workers: int
    lanes: int
    tenant_max_runs: int = 0
    tenant_max_queued: int = 0
    _running: dict[int, Counter[str]] = field(default_factory=dict)  # worker -> tenant -> runs in flight
    _tenant_running: Counter[str] = field(default_factory=Counter)
    _queued: Counter[str] = field(default_factory=Counter)  # runs admitted and not yet finished waiting
    _waiting: dict[str, deque[Ticket]] = field(default_factory=dict)
    _last_served: dict[str, int] = field(default_factory=dict)
    _dedicated: dict[int, str] = field(default_factory=dict)  # worker -> the one tenant it serves (T-TENANT-1)
    _seq: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))
    _grants: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        if self.workers < 1 or self.lanes < 1 or self.tenant_max_runs < 0 or self.tenant_max_queued < 0:
            raise ValueError("workers and lanes must be >= 1, caps >= 0")

    def dedicate(self, worker: int, tenant: str | None) -> None:
        """``worker`` serves only ``tenant`` from now on (None: nobody yet).
        No other tenant can use it, so its reserve lane is not kept back."""
        if tenant is None:
            self._dedicated.pop(worker, None)
        else:
            self._dedicated[worker] = tenant

    # -- queue share -----------------------------------------------------
    def admit(self, tenant: str) -> bool:
        """Count one more waiting run of ``tenant``; False when its queue share is full."""
        if self.tenant_max_queued and self._queued[tenant] >= self.tenant_max_queued:
            return False  # T-FAIR-1: one tenant may not fill the node's queue
        self._queued[tenant] += 1
        return True

    def leave(self, tenant: str) -> None:
        """The run stopped waiting (it started, timed out or failed)."""
        self._queued[tenant] -= 1
        if self._queued[tenant] <= 0:
            del self._queued[tenant]

    # -- lanes -----------------------------------------------------------
    def busy(self, worker: int) -> int:
        return sum(self._running.get(worker, Counter()).values())

    def running(self, tenant: str) -> int:
        return self._tenant_running[tenant]

    def may_start(self, tenant: str, worker: int) -> bool:
        busy = self.busy(worker)
        if busy >= self.lanes:
            return False
        if self.tenant_max_runs and self._tenant_running[tenant] >= self.tenant_max_runs:
            return False
        if (self.lanes >= 2 and busy == self.lanes - 1 and self._tenant_running[tenant] > 0
                and self._dedicated.get(worker) != tenant):
            return False  # T-FAIR-1: the last lane is kept for a tenant with nothing running
        return True

    def request(self, tenant: str, worker: int) -> Ticket:
        """Queue a run for a lane of ``worker``; :meth:`dispatch` decides when it starts."""
        ticket = Ticket(tenant, worker, next(self._seq))
        self._waiting.setdefault(tenant, deque()).append(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """A waiting run gave up (its wait timed out). A granted ticket is released instead."""
        if ticket.granted:
            self.release(ticket)
            return
        queue = self._waiting.get(ticket.tenant)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._waiting[ticket.tenant]

    def release(self, ticket: Ticket) -> None:
        """A granted run ended: its lane is free again."""
        if not ticket.granted:
            return
        ticket.granted = False
        lane = self._running[ticket.worker]
        lane[ticket.tenant] -= 1
        if lane[ticket.tenant] <= 0:
            del lane[ticket.tenant]
        self._tenant_running[ticket.tenant] -= 1
        if self._tenant_running[ticket.tenant] <= 0:
            del self._tenant_running[ticket.tenant]

    def dispatch(self) -> list[Ticket]:
        """Start every waiting run that may start now, fairly; returns those granted."""
        granted: list[Ticket] = []
        while True:
            order = sorted(self._waiting, key=lambda t: (self._tenant_running[t], self._last_served.get(t, 0), t))
            chosen = None
            for tenant in order:
                chosen = next((tk for tk in self._waiting[tenant] if self.may_start(tenant, tk.worker)), None)
                if chosen is not None:
                    break
            if chosen is None:
                return granted
            self._grant(chosen)
            granted.append(chosen)

    def _grant(self, ticket: Ticket) -> None:
        queue = self._waiting[ticket.tenant]
        queue.remove(ticket)
        if not queue:
            del self._waiting[ticket.tenant]
        ticket.granted = True
        self._running.setdefault(ticket.worker, Counter())[ticket.tenant] += 1
        self._tenant_running[ticket.tenant] += 1
        self._last_served[ticket.tenant] = next(self._grants)
        if len(self._last_served) > 4 * (len(self._waiting) + len(self._tenant_running)) + 1024:
            live = set(self._waiting) | set(self._tenant_running)
            self._last_served = {t: s for t, s in self._last_served.items() if t in live}

    def stats(self) -> dict[str, int]:
        return {"lanes": self.lanes * self.workers, "running": sum(self._tenant_running.values()),
                "tenants_running": len(self._tenant_running), "tenants_waiting": len(self._waiting)}


def tenant_cell_cap(node_max: int, configured: int, tenants: int) -> int:
    """Cells one tenant may hold. ``configured`` > 0 wins (never above the node's
    limit). Automatic (0): alone on the node a tenant may use every cell; with
    others it may hold at most three quarters, so a tenant filling the node
    still leaves the others room to create cells (T-FAIR-1). Cells are not
    preemptible: the reserve holds from the moment a second tenant exists."""
    if configured > 0:
        return min(configured, node_max)
    if tenants <= 1:
        return node_max
    return max(1, node_max - max(1, node_max // 4))
