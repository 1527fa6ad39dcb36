"""Test-only: the host-call broker in one process, frames and all (T-ESCAPE-3).

``LoopbackCalls`` is what a pooled worker puts in ``RunContext.broker``
(:class:`appliance.runtime.broker_client.RunCalls`), except that each call
frame is encoded, decoded as the supervisor decodes a worker's frames,
admitted and served by a real :class:`appliance.runtime.broker.Broker`
holding a grant for the run, and the answer goes back through the codec the
same way. The attack tables of the host functions run through it, so they
check the supervisor's side of every call, not only the in-process one.
"""
from __future__ import annotations

from typing import Any

from appliance.policy.egress import EgressPolicy
from appliance.runtime import protocol
from appliance.runtime.broker import Broker, CallResult
from appliance.runtime.broker_client import BrokerClient

WORKER, REQ_ID = 1, 7
FRAME_CAP = protocol.MAX_CALL_FRAME


def spec_of(policy: EgressPolicy | None, hosts: dict[str, list[str]] | None = None) -> protocol.EgressSpec | None:
    """The run message's egress field for ``policy`` (what services.egress_message sends)."""
    if policy is None:
        return None
    return protocol.EgressSpec(enabled=policy.enabled, allow_hosts=list(policy.allow_hosts),
                               deny=[str(n) for n in policy.deny_networks], hosts=hosts)


def run_message(egress: protocol.EgressSpec | None = None, *, features: list[str] | None = None,
                tenant: str = "tenant1", cell: str | None = "cell1") -> protocol.ExecRequest:
    return protocol.ExecRequest(REQ_ID, template="wasm", code=b"", is_text=True, timeout_ms=5000, memory_mb=64,
                                tenant_id=tenant, cell_id=cell, egress=egress, features=features or [])


class LoopbackCalls:
    def __init__(self, broker: Broker, msg: protocol.ExecRequest, deadline_s: float = 30.0) -> None:
        self.broker = broker
        self.frames: list[Any] = []  # every call the "worker" sent, as the supervisor decoded it
        broker.open(WORKER, REQ_ID, msg, deadline_s)
        self._client = BrokerClient(self._to_supervisor)
        self._calls = self._client.for_run(REQ_ID)

    def _to_supervisor(self, call: object) -> None:
        decoded = protocol.decode(protocol.encode(call), protocol.FROM_WORKER, FRAME_CAP)
        self.frames.append(decoded)
        refusal = self.broker.admit(WORKER, decoded)
        assert refusal is None, refusal
        answer = self.broker.serve(WORKER, decoded)
        self._client.deliver(protocol.decode(protocol.encode(answer), protocol.TO_WORKER, FRAME_CAP))

    def fetch(self, url: str, max_len: int, wait_s: float) -> CallResult:
        return self._calls.fetch(url, max_len, wait_s)

    def mcp(self, raw: bytes, max_len: int, wait_s: float) -> CallResult:
        return self._calls.mcp(raw, max_len, wait_s)

    def close(self) -> None:
        self.broker.close(REQ_ID)
