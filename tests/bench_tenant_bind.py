#!/usr/bin/env python3
"""What tenant-bound workers cost (T-TENANT-1): a benchmark, not a test.

With a real pool and real guests (no HTTP), measures
* the first cell of a new tenant when a spare is ready (bind + cell start)
  and when none is (the budget is held by an idle worker of another tenant:
  reclaim, start a worker, bind), against a cell of a tenant whose worker is
  already bound and warm;
* the memory of a worker from /proc/<pid>/smaps_rollup (RSS and PSS): a
  spare, and a bound worker with its warm pool full.
Prints medians (the machine is shared: medians, not means). Exits non-zero
only if a run fails.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.cells import CellService  # noqa: E402
from appliance.config import load_settings  # noqa: E402
from appliance.receipts.nodekey import NodeKey  # noqa: E402
from appliance.receipts.store import ReceiptStore  # noqa: E402
from appliance.runtime.pool import WorkerPool  # noqa: E402
from appliance.storage import Store, Tenant  # noqa: E402
from tests.liveserver import shared_cache  # noqa: E402


def memory(pid: int) -> dict[str, int]:
    """RSS and PSS of a process in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key] = int(rest.split()[0])
    return out


def service(root: Path, **env: str) -> CellService:
    settings = load_settings({"SYNAPSE_ROOT": str(root), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_LOG_LEVEL": "warning", **env})
    for path in (settings.root, settings.volumes_dir, settings.db_path.parent, settings.keys_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(settings.db_path)
    pool = WorkerPool(settings)
    pool.start()
    return CellService(settings, store, pool, ReceiptStore(settings.db_path, NodeKey.generate()))


def wait(cond: Callable[[], bool], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError("condition not reached")
        time.sleep(0.02)


def first_cell(cells: CellService, tenant: Tenant) -> tuple[float, float]:
    """ms to create a python3 cell, and ms of its first run."""
    t = time.perf_counter()
    record = cells.create(tenant, "python3", 60_000, True, {}, {}, 64)
    created = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    answer = cells.exec_in_cell(tenant, record.id, b"print(1+1)", True, None)
    ran = (time.perf_counter() - t) * 1000
    if answer["stdout"] != "2\n":
        raise RuntimeError(f"run failed: {answer}")
    cells.delete(tenant, record.id)
    return created, ran


def med(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f}"


def main(rounds: int = 5) -> int:
    root = Path(tempfile.mkdtemp(prefix="cell-bench-bind-"))
    # A budget of 2: one bound worker and one spare at a time.
    cells = service(root / "spare", SYNAPSE_WORKERS="2", SYNAPSE_WORKER_SPARES="1")
    pool = cells.pool
    rows: dict[str, list[tuple[float, float]]] = {"bound, warm (baseline)": [], "new tenant, spare ready": []}
    binds: list[float] = []
    mem: dict[str, list[dict[str, int]]] = {"spare": [], "bound, warm pool full": []}
    try:
        for i in range(rounds):
            pool.reclaim_idle(now=time.monotonic() + 10**6)  # the last tenant's worker goes: room for a spare
            wait(lambda: pool.stats()["spares"] >= 1)
            spare_pid = next(w["pid"] for w in pool.sandbox_status()["workers"] if w["state"] == "spare")
            mem["spare"].append(memory(spare_pid))
            tenant = cells.store.add_tenant(f"bench{i}", 0, tenant_id=f"bench{i}")[0]
            rows["new tenant, spare ready"].append(first_cell(cells, tenant))
            handle = pool.pick_for_run(tenant.id)
            wait(lambda: _warm_full(pool, handle))
            # The bind alone: a spare narrowed to a tenant that runs nothing yet.
            pool.reclaim_idle(now=time.monotonic() + 10**6)
            wait(lambda: pool.stats()["spares"] >= 1)
            t = time.perf_counter()
            pool.pick_for_run(f"bind{i}")
            binds.append((time.perf_counter() - t) * 1000)
            handle = pool.pick_for_cell(tenant.id)  # bound again (the reclaim above stopped it)
            wait(lambda: _warm_full(pool, handle))
            rows["bound, warm (baseline)"].append(first_cell(cells, tenant))
            mem["bound, warm pool full"].append(memory(handle.process.pid))
    finally:
        pool.close()
    # No spare: a budget of 1 held by an idle worker of another tenant.
    cells = service(root / "nospare", SYNAPSE_WORKERS="1", SYNAPSE_WORKER_SPARES="1")
    pool = cells.pool
    pool.reclaim_grace_s = 0.0
    rows["new tenant, no spare (reclaim + start + bind)"] = []
    try:
        previous = cells.store.add_tenant("holder", 0, tenant_id="holder")[0]
        first_cell(cells, previous)
        for i in range(rounds):
            tenant = cells.store.add_tenant(f"cold{i}", 0, tenant_id=f"cold{i}")[0]
            rows["new tenant, no spare (reclaim + start + bind)"].append(first_cell(cells, tenant))
    finally:
        pool.close()
    print(f"medians of {rounds} rounds (shared 2-core machine: noisy)")
    print(f"{'case':48} {'create ms':>9} {'1st run ms':>10}")
    for name, values in rows.items():
        print(f"{name:48} {med([v[0] for v in values]):>9} {med([v[1] for v in values]):>10}")
    print(f"{'tenant bind alone (spare ready)':48} {med(binds):>9}")
    for name, samples in mem.items():
        print(f"memory of a worker, {name:26} RSS {statistics.median(s['Rss'] for s in samples) / 1024:6.1f} MiB  "
              f"PSS {statistics.median(s['Pss'] for s in samples) / 1024:6.1f} MiB")
    return 0


def _warm_full(pool: WorkerPool, handle: Any) -> bool:
    """True once the worker reports its warm pool at the configured size."""
    from appliance.runtime import protocol

    reply = pool.call(handle, protocol.StatsRequest(0), deadline_s=None, tenant=handle.tenant)
    assert isinstance(reply, protocol.StatsReply)
    return reply.warm.get("python3", 0) >= pool.settings.warm_python


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
