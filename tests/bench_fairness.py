#!/usr/bin/env python3
"""Fairness under a flooding tenant (T-FAIR-1), measured on a live server.

Tenant A keeps more spinning runs in flight than the node has workers
(persistent cells and one-shot runs, 8 s timeout each); tenant B times its
`print(1)` in a persistent cell and as a one-shot run. Prints B's p50 and
max per kind. A benchmark: exits non-zero only if a run of B fails.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fairness_load import Flood, add_tenant, probe, summary  # noqa: E402
from tests.liveserver import start_server  # noqa: E402


def main(rounds: int = 10) -> int:
    srv = start_server(env={"SYNAPSE_LOG_LEVEL": "warning", "SYNAPSE_WORKERS": "2"})
    try:
        key_a, key_b = add_tenant(srv, "flooder"), add_tenant(srv, "victim")
        status, cell, _ = srv.request("POST", "/v1/cells", {"template": "python3"}, key=key_b)
        assert status == 201, cell
        quiet = probe(srv, key_b, cell["cell_id"], 3)
        flood = Flood(srv, key_a)
        flood.start()
        flood.wait_saturated(2)
        t = time.monotonic()
        refused: list[object] = []
        try:
            loaded = probe(srv, key_b, cell["cell_id"], rounds, refused)
            took = time.monotonic() - t
        finally:
            flood.stop()
        print(f"B alone:      cell p50/max {summary(quiet['cell'])[0]:.3f}/{summary(quiet['cell'])[1]:.3f} s, "
              f"one-shot p50/max {summary(quiet['one-shot'])[0]:.3f}/{summary(quiet['one-shot'])[1]:.3f} s")
        print(f"B while A floods ({rounds} rounds in {took:.1f} s): "
              f"cell p50/max {summary(loaded['cell'])[0]:.3f}/{summary(loaded['cell'])[1]:.3f} s, "
              f"one-shot p50/max {summary(loaded['one-shot'])[0]:.3f}/{summary(loaded['one-shot'])[1]:.3f} s")
        print(f"B refused: {refused}")
        print(f"A's answers: {sorted(set(map(tuple, flood.statuses)))}")
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
