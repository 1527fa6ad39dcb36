#!/usr/bin/env python3
"""What a durable receipt adds to a run (issue: receipts, benchmark).

In one process, the same persistent Python cell runs ``print(1+1)`` through
CellService with the real ReceiptStore (SQLite WAL, synchronous=FULL, signed
chain) and with a no-op store, in interleaved batches; prints medians, p99
and the difference. A benchmark, never an assertion: exits 0 unless a run
fails.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class NoReceipts:
    """Same interface as ReceiptStore.append, writes nothing (baseline only)."""

    def append(self, **fields: Any) -> dict[str, Any]:
        return {"schema": "v1", **fields}


def main() -> int:
    from appliance.config import load_settings
    from appliance.services import build_services, ensure_default_tenant
    from tests.liveserver import shared_cache

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    root = Path(tempfile.mkdtemp(prefix="cell-bench-rcpt-"))
    settings = load_settings({"SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_WORKERS": "1"})
    services = build_services(settings)
    try:
        ensure_default_tenant(services)
        tenant = services.store.list_tenants()[0]
        cell = services.cells.create(tenant, "python3", 600_000, True, {}, {}, 256)
        real = services.cells.receipts
        samples: dict[str, list[float]] = {"receipts on": [], "receipts off": []}
        for _ in range(n // 20):
            for label, store in (("receipts on", real), ("receipts off", NoReceipts())):
                services.cells.receipts = store  # type: ignore[assignment]
                for _ in range(20):
                    t = time.perf_counter()
                    out = services.cells.exec_in_cell(tenant, cell.id, b"print(1+1)", False, None)
                    samples[label].append((time.perf_counter() - t) * 1000)
                    if out["status"] != "ok":
                        print("run failed:", out)
                        return 1
        services.cells.receipts = real
        print(f"{'exec_in_cell, persistent python print(1+1)':44} {'p50 ms':>8} {'p99 ms':>8}")
        for label, values in samples.items():
            ordered = sorted(values)
            print(f"  {label:42} {statistics.median(values):8.3f} {ordered[int(0.99 * (len(ordered) - 1))]:8.3f}")
        delta = statistics.median(samples["receipts on"]) - statistics.median(samples["receipts off"])
        print(f"  receipt write adds {delta:.3f} ms at p50 (fsync of the WAL on every commit)")
    finally:
        services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
