"""The size of a cell's snapshot file, remembered by the web process so that a
run does not stat it (T-DISK-1, T-IMAGE-2), is never stale: after each event
that writes or removes the file (idle capture, pause and resume, capture at a
stop, a capture over the quota removed, a crash that rolls back or drops a
capture that is behind, a fork, a restart), the run that follows records the
cell's usage exactly as a fresh walk of its volume, /tmp and snapshot finds it.

A real pool, real workers and guests, the service called in-process so that
each event happens exactly when the test says (captures and pauses are asked
with a moment far in the future; no sleeps)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Callable

import pytest

from appliance.cells import CellService
from appliance.quota import measure_volume
from appliance.storage import Tenant
from tests.in_process import cell_service, named_tenant

# Freeing a list nested 400,000 deep recurses in C below any guard: a wasm stack
# overflow that kills the interpreter (as in test_cell_snapshots.py).
CRASH = b"l = []\nfor _ in range(400_000):\n    l = [l]\ndel l"
LATER = 7200.0  # seconds ahead: every cell counts as idle for captures and pauses


@pytest.fixture(scope="module")
def service(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellService]:
    with cell_service(tmp_path_factory.mktemp("snapshot-memo"), SYNAPSE_WORKERS="1",
                      SYNAPSE_CELL_PAUSE_IDLE_S="3600", SYNAPSE_CELL_CAPTURE_IDLE_S="3600") as cells:
        yield cells


def _tenant(cells: CellService) -> Tenant:
    return named_tenant(cells, "memo")


def _run(cells: CellService, tenant: Tenant, cell_id: str, code: bytes) -> dict[str, object]:
    answer = cells.exec_in_cell(tenant, cell_id, code, True, None, timeout_ms=30_000)
    assert answer["status"] in ("ok", "error"), answer
    return answer


def _snapshot_bytes(cells: CellService, tenant: Tenant, cell_id: str) -> int:
    path = cells.settings.snapshots_dir / tenant.id / cell_id
    return path.stat().st_size if path.exists() else 0


def _assert_counted_as_on_disk(cells: CellService, tenant: Tenant, cell_id: str, snapshot: bool) -> None:
    """What the quota holds for the cell (recorded by the last run, no walk) is
    what a fresh walk finds: volume and /tmp, plus the snapshot file if any."""
    with cells.quota._lock:
        recorded = cells.quota._usage[cell_id][1]  # as the run left it: reading it must not walk again
    bound = cells.settings.tenant_file_limit + 1
    volume = measure_volume(cells.settings.volumes_dir, tenant.id, cell_id, bound)
    assert volume is not None and recorded is not None
    beside = cells._beside_volume(tenant.id, cell_id, bound)  # its /tmp and a stat of its snapshot
    size = _snapshot_bytes(cells, tenant, cell_id)
    assert (size > 0) == snapshot, size
    assert (recorded.bytes, recorded.entries) == (volume.bytes + beside.bytes, volume.entries + beside.entries)
    assert recorded.bytes >= size


def _idle_capture(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    assert cells.capture_idle(now=time.monotonic() + LATER, budget_s=60) >= 1
    return True


def _pause(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    assert cells.pause_idle(now=time.monotonic() + LATER) >= 1
    return True  # the next run resumes it from the file, which stays


def _drain_capture(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    assert cells.capture_cells() >= 1
    return True


def _capture_removed_over_quota(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    _idle_capture(cells, tenant, cell_id)
    _run(cells, tenant, cell_id, b"y = 2")  # this run learns the captured size
    cells._discard_capture(cells.cell(tenant, cell_id), "over the quota")  # as when the capture put the tenant over (T-DISK-1)
    return False


def _crash_rolls_back(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    _idle_capture(cells, tenant, cell_id)
    answer = _run(cells, tenant, cell_id, CRASH)
    assert answer.get("rolled_back") is True, answer
    return True


def _crash_drops_a_capture_behind(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    _idle_capture(cells, tenant, cell_id)
    _run(cells, tenant, cell_id, b"y = 2")  # learns the size; the capture is now behind
    answer = _run(cells, tenant, cell_id, CRASH)  # the worker removes the capture that is behind
    assert not answer.get("rolled_back"), answer
    return False


def _fork(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    _idle_capture(cells, tenant, cell_id)
    _run(cells, tenant, cell_id, b"y = 2")
    child = cells.fork(tenant, cell_id)
    _run(cells, tenant, child.id, b"z = 3")
    _assert_counted_as_on_disk(cells, tenant, child.id, snapshot=False)
    cells.delete(tenant, child.id)
    return True


def _restart(cells: CellService, tenant: Tenant, cell_id: str) -> bool:
    # A new service on the same data and pool remembers nothing: it stats.
    _idle_capture(cells, tenant, cell_id)
    again = CellService(cells.settings, cells.store, cells.pool, cells.receipts)
    assert not again._snap_sizes
    _run(again, tenant, cell_id, b"y = 2")
    _assert_counted_as_on_disk(again, tenant, cell_id, snapshot=True)
    return True


EVENTS: list[tuple[str, Callable[[CellService, Tenant, str], bool]]] = [
    ("idle-capture", _idle_capture),
    ("pause-then-resume", _pause),
    ("capture-at-a-stop", _drain_capture),
    ("capture-over-the-quota-removed", _capture_removed_over_quota),
    ("crash-rolled-back-to-the-capture", _crash_rolls_back),
    ("crash-drops-a-capture-behind", _crash_drops_a_capture_behind),
    ("fork", _fork),
    ("restart", _restart),
]


@pytest.mark.parametrize("event", [e[1] for e in EVENTS], ids=[e[0] for e in EVENTS])
def test_t_disk_1_remembered_snapshot_size_is_never_stale(service: CellService,
                                                          event: Callable[[CellService, Tenant, str], bool]) -> None:
    tenant = _tenant(service)
    record = service.create(tenant, "python3", 600_000, True, {}, {}, service.settings.memory_mb)
    try:
        _run(service, tenant, record.id, b"x = 1\nopen('f.txt', 'w').write('kept' * 100)")
        _assert_counted_as_on_disk(service, tenant, record.id, snapshot=False)  # remembered: none
        has_snapshot = event(service, tenant, record.id)
        answer = _run(service, tenant, record.id, b"print(x)")
        assert answer["stdout"] == "1\n" or not has_snapshot, answer
        _assert_counted_as_on_disk(service, tenant, record.id, snapshot=has_snapshot)
        _run(service, tenant, record.id, b"w = 4")  # and the run after (from memory when nothing changed)
        _assert_counted_as_on_disk(service, tenant, record.id, snapshot=has_snapshot)
    finally:
        service.delete(tenant, record.id)
    assert not (service.settings.snapshots_dir / tenant.id / record.id).exists()
    assert record.id not in service._snap_sizes  # nothing left of a deleted cell
