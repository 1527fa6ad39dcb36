"""The session class of the test-only "shout" template."""
from __future__ import annotations

from appliance.runtime import context
from appliance.runtime.capture import ChunkSink
from appliance.runtime.outcome import Outcome
from appliance.runtime.sessions import PythonSession


class ShoutSession(PythonSession):
    def run(self, code: bytes, timeout_s: float, cap: int, sink: ChunkSink | None,
            ctx: context.RunContext | None) -> Outcome:
        outcome = super().run(code, timeout_s, cap, sink, ctx)
        outcome.stdout = outcome.stdout.upper()
        return outcome
