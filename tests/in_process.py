"""The cell service built in-process on a real pool, real workers and guests,
for tests that must decide exactly when each event happens (no HTTP, no
sleeps): the settings, directories, stores and pool a server would make."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.cells import CellService
from appliance.config import load_settings
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.runtime.pool import WorkerPool
from appliance.storage import Store, Tenant
from tests.liveserver import shared_cache


@contextmanager
def cell_service(root: Path, pool_class: type[WorkerPool] = WorkerPool, **env: str) -> Iterator[CellService]:
    """A started service under ``root`` (no warm JavaScript sessions unless
    ``env`` says otherwise); its pool, receipt store and store are closed on exit."""
    settings = load_settings({"SYNAPSE_ROOT": str(root / "root"), "SYNAPSE_CONFIG_DIR": str(root / "etc"),
                              "SYNAPSE_MODULE_CACHE": str(shared_cache()), "SYNAPSE_WARM_JAVASCRIPT": "0",
                              **env})
    for path in (settings.root, settings.volumes_dir, settings.db_path.parent, settings.keys_dir,
                 settings.snapshots_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(settings.db_path)
    receipts = ReceiptStore(settings.db_path, NodeKey.generate())
    pool = pool_class(settings)
    pool.start()
    try:
        yield CellService(settings, store, pool, receipts)
    finally:
        pool.close()
        receipts.close()
        store.close()


def named_tenant(cells: CellService, name: str) -> Tenant:
    """The tenant whose id and name are ``name``, added on first use."""
    existing = [t for t in cells.store.list_tenants() if t.id == name]
    return existing[0] if existing else cells.store.add_tenant(name, 0, tenant_id=name)[0]


def worker_config(root: Path | str, **extra: Any) -> dict[str, Any]:
    """The settings a worker process is started with (pool._config), for a
    worker built in the test's own process on ``root``; ``extra`` adds or replaces."""
    return {"index": 0, "cache_dir": str(shared_cache()), "volumes_dir": f"{root}/vols", "memory_mb": 256,
            "output_cap_bytes": 1 << 20, "module_max_bytes": 1 << 20, "mirror_dir": f"{root}/no-mirror", **extra}
