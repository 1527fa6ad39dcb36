"""The run context a host function sees.

Host functions are defined once on a shared Linker, so they cannot close over
one run's state. wasmtime calls them synchronously on the thread that called
into the guest, and each Store is only ever driven by one thread, so a
thread-local "current run" is exact: the runner sets it before entering the
guest and clears it after.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.runtime.governor import Governor


@dataclass
class RunContext:
    governor: "Governor"
    volume: Any = None  # appliance.confine.Volume of the cell, for host_fs_*
    egress: Any = None  # appliance.policy.egress.EgressPolicy, for host_fetch
    quota_left: int | None = None  # bytes the tenant may still add (host_fs_write); None = unlimited
    files_left: int | None = None  # new files the tenant may still make (host_fs_write, T-DISK-1); None = unlimited
    weights: Any = None  # appliance.confine.Volume of SYNAPSE_ROOT/weights, for load_weights; Pro only
    mcp: Any = None  # appliance.mcp.McpClient of the worker, for host_mcp_call; Pro only
    resolver: Any = None  # static name map (SYNAPSE_EGRESS_HOSTS) instead of DNS, or None
    # broker_client.RunCalls in a pooled worker: host_fetch / host_mcp_call go to
    # the supervisor (T-ESCAPE-3). None: an in-process runner (tests) calls here.
    broker: Any = None
    tenant_id: str = ""
    cell_id: str = ""
    result_cap: int = 8 << 20  # one rich result of a Python run, in bytes (rich.py; T-DOS-1)
    results_cap: int = 16 << 20  # all rich results of the run together
    on_result: Any = None  # results_channel.ResultCallback: streams each result as it is shown, or None
    rich: Any = None  # results_channel.RunResults of the run in progress (bound by the session)
    denials: list[dict[str, str]] = field(default_factory=list)

    def deny(self, threat: str, function: str, reason: str) -> None:
        # Bounded: a guest looping on denied calls must not grow host memory.
        if len(self.denials) < 100:
            self.denials.append({"threat": threat, "function": function, "reason": reason})


_local = threading.local()


def current() -> RunContext | None:
    return getattr(_local, "ctx", None)


def enter(ctx: RunContext | None) -> None:
    _local.ctx = ctx
