"""Per-tenant disk limits (T-DISK-1): bytes, files, and what happens when a
volume cannot be measured. Real volumes on disk; the ledger walks them."""
from __future__ import annotations

import json
import random

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest

from appliance.confine import Usage, create_volume
from appliance.errors import PayloadTooLarge
from appliance.cells import _usage as cells_usage
from appliance import quota as quota_module
from appliance.quota import Allowance, DiskQuota, measure_volume
from appliance.runtime import volume_watch
from appliance.runtime.volume_watch import VolumeWatch
from appliance.runtime import protocol

MB = 1024 * 1024


def ledger(root: Path, cells: dict[str, list[str]], limits: tuple[int, int] = (MB, 10)) -> DiskQuota:
    return DiskQuota(limits=lambda: limits,
                     measure=lambda tenant, cell, bound: measure_volume(root, tenant, cell, bound),
                     cells=lambda tenant: cells.get(tenant, []))


def refused(quota: DiskQuota, tenant: str, adding: int = 0, files: int = 0) -> str:
    with pytest.raises(PayloadTooLarge) as info:
        quota.check(tenant, adding, files)
    assert info.value.status == 413
    return info.value.code


def test_t_disk_1_file_limit_refuses_new_entries(tmp_path: Path) -> None:
    vol = create_volume(tmp_path, "t", "c")
    for i in range(9):
        (vol / f"f{i}").write_bytes(b"x")
    quota = ledger(tmp_path, {"t": ["c"]})
    allowed = quota.check("t", 0, 1)
    assert (allowed.bytes_left, allowed.files_left) == (MB - 9, 1)
    (vol / "f9").write_bytes(b"x")
    quota.record("t", "c", measure_volume(tmp_path, "t", "c", 11))
    assert quota.check("t", 0, 0).files_left == 0  # at the limit: replacing a file is fine
    assert refused(quota, "t", files=1) == "file_limit_exceeded"
    assert refused(quota, "t", adding=MB) == "quota_exceeded"


def test_t_disk_1_files_counted_across_the_tenants_cells(tmp_path: Path) -> None:
    for cell in ("a", "b"):
        vol = create_volume(tmp_path, "t", cell)
        for i in range(6):
            (vol / f"f{i}").write_bytes(b"")
    create_volume(tmp_path, "other", "c")
    quota = ledger(tmp_path, {"t": ["a", "b"], "other": ["c"]})
    assert quota.tenant("t")[:2] == (0, 12)
    assert refused(quota, "t") == "file_limit_exceeded"  # already past it: runs are refused too
    assert quota.check("other", 0, 1).files_left == 10  # another tenant is not affected


@pytest.mark.parametrize("breakage", ["not_owned", "gone_tenant_dir"])
def test_t_disk_1_unmeasured_volume_is_over_quota_not_zero(tmp_path: Path, breakage: str) -> None:
    vol = create_volume(tmp_path, "t", "c")
    quota = ledger(tmp_path, {"t": ["c"]})
    if breakage == "not_owned":
        os.chown(vol, 4242, -1) if os.geteuid() == 0 else os.chmod(vol, 0)
    elif breakage == "gone_tenant_dir":
        os.rename(tmp_path / "t", tmp_path / "t-moved")
        os.symlink(tmp_path / "t-moved", tmp_path / "t")  # T-PATH-2: not followed, so unmeasurable
    assert refused(quota, "t") == "quota_exceeded"
    # Once the volume can be walked again, the next check measures it afresh.
    if breakage == "not_owned":
        os.chown(vol, os.geteuid(), -1) if os.geteuid() == 0 else os.chmod(vol, 0o700)
    elif breakage == "gone_tenant_dir":
        os.unlink(tmp_path / "t")
        os.rename(tmp_path / "t-moved", tmp_path / "t")
    assert quota.check("t").bytes_left == MB


def test_t_disk_1_walk_stopped_at_its_bound_is_over_the_limit(tmp_path: Path) -> None:
    vol = create_volume(tmp_path, "t", "c")
    for i in range(50):
        (vol / f"f{i}").write_bytes(b"")
    quota = ledger(tmp_path, {"t": ["c"]})
    usage = measure_volume(tmp_path, "t", "c", 11)
    assert usage is not None and not usage.complete and usage.entries == 12  # one past the bound
    assert refused(quota, "t") == "file_limit_exceeded"


def test_t_disk_1_a_failed_or_missing_walk_is_unmeasured() -> None:
    assert cells_usage(None) is None
    assert cells_usage(protocol.VolumeUsage(measured=False)) is None
    assert cells_usage(protocol.VolumeUsage(7, 11, complete=False)) == Usage(7, 11, complete=False)


@pytest.mark.parametrize("raw", [{"bytes": "1"}, {"bytes": 1, "complete": 1}, {"entries": -1}, {"measured": "yes"}, [1], "x"])
def test_t_disk_1_malformed_usage_from_a_worker_is_refused(raw: object) -> None:
    # A worker's report is decoded by the typed protocol: anything malformed costs the worker its life.
    frame = json.dumps({"type": "result", "req_id": 1, "guest_ms": 1, "volume_usage": raw,
                        "outcome": {"exit_code": 0, "status": "ok", "stdout": "", "stderr": "", "truncated": False}})
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(frame.encode(), protocol.FROM_WORKER, 1 << 20)


@pytest.mark.parametrize("what", ["bytes", "files"])
def test_t_disk_1_volume_watch_stops_a_run_that_crosses_the_limit(tmp_path: Path, what: str) -> None:
    stopped = threading.Event()
    with VolumeWatch(interval=0.01).watch(str(tmp_path), max_bytes=1000, max_entries=10, stop=stopped.set) as run:
        if what == "bytes":
            (tmp_path / "big").write_bytes(b"x" * 2000)
        else:
            for i in range(11):
                (tmp_path / f"f{i}").write_bytes(b"")
        assert stopped.wait(30)
    assert run.tripped == ("quota_exceeded" if what == "bytes" else "file_limit_exceeded")


def test_t_disk_1_volume_watch_never_stops_a_run_after_it_ended(tmp_path: Path) -> None:
    watch = VolumeWatch(interval=0.01)
    stops: list[str] = []
    with watch.watch(str(tmp_path), max_bytes=10, max_entries=10, stop=lambda: stops.append("first")) as first:
        pass
    (tmp_path / "big").write_bytes(b"x" * 100)  # over the first run's limit, after it ended
    stopped = threading.Event()
    with watch.watch(str(tmp_path), max_bytes=1000, max_entries=10, stop=stopped.set) as second:
        (tmp_path / "bigger").write_bytes(b"x" * 2000)
        assert stopped.wait(30)
    assert stops == [] and first.tripped is None and second.tripped == "quota_exceeded"


@pytest.mark.parametrize("idle", ["polling", "asleep"])
def test_t_disk_1_volume_watch_walks_a_run_that_starts_while_it_waits(tmp_path: Path, idle: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A run's start wakes the watch thread only when it is asleep; either way the run is walked and stopped.
    monkeypatch.setattr(volume_watch, "IDLE_POLL_S", 3600.0 if idle == "polling" else 0.0)
    watch = VolumeWatch(interval=0.01)
    with watch.watch(str(tmp_path), max_bytes=1000, max_entries=10, stop=lambda: None):
        pass
    deadline = time.monotonic() + 30
    while not (watch._wake_at is not None and (watch._wake_at == float("inf")) == (idle == "asleep")):
        assert time.monotonic() < deadline, "the watch thread never settled into its idle wait"
        time.sleep(0.005)
    stopped = threading.Event()
    with watch.watch(str(tmp_path), max_bytes=1000, max_entries=10, stop=stopped.set) as run:
        (tmp_path / "big").write_bytes(b"x" * 2000)
        assert stopped.wait(30)
    assert run.tripped == "quota_exceeded"


def test_t_disk_1_volume_watch_checks(tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"x" * 10)
    watch = VolumeWatch()
    assert watch.watch(str(tmp_path), 1000, 10, stop=lambda: None).check() is None
    assert watch.watch(str(tmp_path), 5, 10, stop=lambda: None).check() == "quota_exceeded"
    assert watch.watch(str(tmp_path), 1000, 0, stop=lambda: None).check() == "file_limit_exceeded"
    assert watch.watch(str(tmp_path / "missing"), 1, 1, stop=lambda: None).check() == "unmeasured"


@pytest.mark.parametrize("late", [None, Usage(10, 1)], ids=["measure-again", "a-walk"])
def test_t_disk_1_a_late_record_of_a_deleted_cell_does_not_hold_the_tenant_over_quota(tmp_path: Path,
                                                                                         late: Usage | None) -> None:
    """A capture or pause ending while its cell is deleted asks for a new walk
    after the delete forgot the cell; that walk can never succeed, so the
    tenant must not be held over its quota by it."""
    create_volume(tmp_path, "t", "kept")
    cells = {"t": ["kept", "deleted"]}
    quota = ledger(tmp_path, cells)
    create_volume(tmp_path, "t", "deleted")
    assert quota.tenant("t")[2] == []
    (tmp_path / "t" / "deleted").rmdir()
    cells["t"].remove("deleted")
    quota.forget("deleted")
    quota.record("t", "deleted", late)  # the capture's late "measure again", or a late walk
    assert quota.tenant("t")[:3] == (0, 0, [])
    assert quota.check("t").bytes_left == MB


def test_t_disk_1_an_unmeasured_live_cell_still_holds_the_tenant_over_quota(tmp_path: Path) -> None:
    """The tombstone is for deleted cells only: a live cell whose walk fails is over quota."""
    create_volume(tmp_path, "t", "c")
    quota = ledger(tmp_path, {"t": ["c"]})
    quota.forget("other")
    quota.record("t", "c", None)
    (tmp_path / "t" / "c").rmdir()  # its walk now fails
    assert refused(quota, "t") == "quota_exceeded"


@pytest.mark.parametrize("walk", ["succeeds", "fails"])
def test_t_disk_1_a_cell_measured_again_keeps_its_figure_for_checks_made_meanwhile(walk: str) -> None:
    """A capture measures its cell again (``refresh``). A check of the tenant
    made on another thread while that walk runs counts the cell's last figure:
    it must not see an unmeasured cell, which is over quota. (Marking the cell
    unmeasured first dropped 1-3 of 500 captures at a stop, the tenant at a
    quarter of its quota.) Once the walk is done its result is in force, and
    a walk that failed holds the tenant over quota (fail closed)."""
    figures: dict[str, Usage | None] = {"a": Usage(100, 1), "b": Usage(200, 1)}
    walking, release = threading.Event(), threading.Event()

    def measure(tenant: str, cell: str, bound: int) -> Usage | None:
        if cell == "b" and figures["b"] != Usage(200, 1):
            walking.set()
            assert release.wait(10)
        return figures[cell]

    quota = DiskQuota(lambda: (1000, 100), measure, lambda tenant: ["a", "b"])
    assert quota.check("t").bytes_left == 700
    figures["b"] = Usage(600, 2) if walk == "succeeds" else None  # the capture wrote its snapshot
    refresher = threading.Thread(target=quota.refresh, args=("t", "b"))
    refresher.start()
    try:
        assert walking.wait(10)
        assert quota.check("t").bytes_left == 700  # the old figure, not "unmeasured"
        assert quota.tenant("t")[2] == []
    finally:
        release.set()
        refresher.join(10)
    if walk == "succeeds":
        assert quota.check("t").bytes_left == 300
    else:
        assert refused(quota, "t") == "quota_exceeded"


class _Reference:
    """The ledger as plain data, summed by brute force on every question: what
    ``DiskQuota.tenant`` must answer, whatever running totals it keeps."""

    def __init__(self, disk: dict[str, Usage | None], listing: dict[str, list[str]]) -> None:
        self.usage: dict[str, tuple[str, Usage | None]] = {}
        self.gone: OrderedDict[str, None] = OrderedDict()
        self.loaded: set[str] = set()
        self.disk, self.listing = disk, listing

    def record(self, tenant: str, cell: str, usage: Usage | None) -> None:
        if cell not in self.gone:
            self.usage[cell] = (tenant, usage)

    def forget(self, cell: str) -> None:
        self.usage.pop(cell, None)
        self.gone[cell] = None
        if len(self.gone) > quota_module.GONE_KEPT:
            self.gone.popitem(last=False)

    def tenant(self, tenant: str) -> tuple[int, int, list[str]]:
        if tenant in self.loaded:
            walk = [c for c, (owner, u) in self.usage.items() if owner == tenant and u is None]
        else:
            walk = list(self.listing.get(tenant, []))
        for cell in walk:
            known = self.usage.get(cell)
            if known is None or known[1] is None:
                self.record(tenant, cell, self.disk.get(cell))
        self.loaded.add(tenant)
        mine = [(c, u) for c, (owner, u) in self.usage.items() if owner == tenant]
        return (sum(u.bytes for _, u in mine if u is not None), sum(u.entries for _, u in mine if u is not None),
                [c for c, u in mine if u is None])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_t_disk_1_running_totals_match_a_brute_force_sum(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of random records, forgets, unmeasured walks and owner changes
    over several tenants: after each, the tenant's totals and its unmeasured
    cells (in order: the refusal names the first) are what a sum over every
    cell gives. Unknown is never zero."""
    monkeypatch.setattr(quota_module, "GONE_KEPT", 16)  # forgotten ids fall out of the tombstones and come back
    rng = random.Random(seed)
    tenants = [f"t{i}" for i in range(6)]
    cells = [f"c{i}" for i in range(80)]

    def usage() -> Usage | None:
        if rng.random() < 0.3:
            return None
        return Usage(rng.randrange(0, 10 ** 6), rng.randrange(0, 50), rng.random() < 0.9)

    disk: dict[str, Usage | None] = {c: usage() for c in cells}  # what a walk of each cell finds now
    listing = {t: rng.sample(cells, 8) for t in tenants}  # a tenant's first check lists these
    ref = _Reference(disk, listing)
    limits = (10 ** 12, 10 ** 9)  # only an unmeasured cell refuses, so check() answers on every tenant
    quota = DiskQuota(limits=lambda: limits, measure=lambda tenant, cell, bound: disk[cell],
                      cells=lambda tenant: listing.get(tenant, []))
    home = {c: rng.choice(tenants) for c in cells}
    for _ in range(3000):
        op, cell = rng.random(), rng.choice(cells)
        if op < 0.55:
            # a walk or "measure again" (None), mostly under the cell's tenant, sometimes under another
            tenant, value = home[cell] if op < 0.45 else rng.choice(tenants), usage()
            quota.record(tenant, cell, value)
            ref.record(tenant, cell, value)
        elif op < 0.7:
            quota.forget(cell)
            ref.forget(cell)
        elif op < 0.8:
            quota.start_cell(home[cell], cell)
            ref.record(home[cell], cell, Usage(0, 0))
        else:
            disk[cell] = usage()  # what the next walk of the cell finds
        for tenant in rng.sample(tenants, 2):
            expected = ref.tenant(tenant)  # the same walks the ledger is about to make
            if rng.random() < 0.5:
                assert quota.tenant(tenant) == expected
            elif expected[2]:
                assert cell_named(quota, tenant) == expected[2][0]
            else:
                assert quota.check(tenant) == Allowance(limits[0] - expected[0], limits[1] - expected[1])
    for tenant in tenants:
        assert quota.tenant(tenant) == ref.tenant(tenant)


def cell_named(quota: DiskQuota, tenant: str) -> str:
    """The cell an unmeasured-volume refusal names."""
    with pytest.raises(PayloadTooLarge) as info:
        quota.check(tenant)
    assert info.value.code == "quota_exceeded"
    return str(info.value).split("cell ")[1].split(" ")[0]
