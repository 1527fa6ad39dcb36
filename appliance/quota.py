"""Per-tenant disk limits: bytes and files (threat T-DISK-1).

A tenant's usage is the sum over its cells' volumes of what the last walk
measured (``confine.Volume.usage``): bytes of regular files and entries
(every name costs an inode, so millions of empty files are refused like a
huge one). Walks happen once per cell, then after every run and file change;
a check reads memory (running sums per tenant, so its cost does not grow with
the cells on the node), except that it walks again a volume it could not measure.

Fail closed: a volume that could not be measured (walk error, volume not
ours) counts as over quota until a later walk succeeds; a walk stopped at its
entry bound counts as over the file limit. Unknown is never zero.

While a guest runs, the worker's ``runtime/volume_watch.py`` bounds the WASI
writes the host cannot meter one by one (``host_fs_write`` is metered per
call in hostfuncs.py).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from appliance.confine import ConfinementError, Usage, Volume, open_volume
from appliance.errors import PayloadTooLarge


@dataclass(frozen=True)
class Allowance:
    """What a tenant may still add: bytes and new entries."""

    bytes_left: int
    files_left: int


def measure_volume(volumes_dir: Path, tenant_id: str, cell_id: str, max_entries: int) -> Usage | None:
    """Walk one cell's volume; None when it cannot be measured (counts as over quota)."""
    try:
        with open_volume(volumes_dir, tenant_id, cell_id) as vol:
            return vol.usage(max_entries=max_entries)
    except (ConfinementError, OSError):
        return None


class _Tally:
    """One tenant's share of the ledger: sums over its measured cells, and the unmeasured ones."""

    __slots__ = ("bytes", "entries", "cells", "unmeasured")

    def __init__(self) -> None:
        self.bytes = 0
        self.entries = 0
        self.cells = 0  # entries of ``_usage`` owned by the tenant; the tally goes with the last
        self.unmeasured: set[str] = set()


GONE_KEPT = 4096  # deleted cells remembered, so a late "measure again" of one is dropped


class DiskQuota:
    """Usage per cell, as last measured, and the tenant checks built on it.

    ``limits()`` returns (bytes, files) in force (read on every check, so a
    config reload applies at once); ``measure(tenant, cell, max_entries)``
    walks one volume. ``cells(tenant)`` lists a tenant's cell ids.
    """

    def __init__(self, limits: Callable[[], tuple[int, int]],
                 measure: Callable[[str, str, int], Usage | None],
                 cells: Callable[[str], Iterable[str]],
                 extra: Callable[[str, str, int], Usage] | None = None) -> None:
        self.limits = limits
        self._measure = measure
        self._cells = cells
        self._extra = extra  # what a cell holds beside its volume (its /tmp); raises when it cannot be walked
        self._lock = threading.Lock()
        self._usage: dict[str, tuple[str, Usage | None]] = {}  # cell -> (tenant, usage or None = unmeasured)
        # Running sums of ``_usage`` per tenant, kept by ``_put``/``_drop`` under
        # the lock, so a check costs the same on a node of ten cells or ten
        # thousand: it never walks the other tenants' entries.
        self._tallies: dict[str, _Tally] = {}
        self._order: dict[str, int] = {}  # cell -> when it entered ``_usage`` (unmeasured cells listed in that order)
        self._next = 0
        self._loaded: set[str] = set()  # tenants whose every cell has been measured once
        # Cells deleted lately. A capture or pause that ends while its cell is
        # deleted asks for a new walk after the delete forgot the cell: that
        # walk can never succeed, and the tenant would stay over quota (an
        # unmeasurable cell counts as over it) until a restart. Ids are never
        # reused, so a record for one of these is late and is dropped.
        self._gone: OrderedDict[str, None] = OrderedDict()

    def _walk(self, tenant_id: str, cell_id: str) -> Usage | None:
        # A single volume over the tenant's file limit is over it already: stop there.
        return self._plus_extra(tenant_id, cell_id, self._measure(tenant_id, cell_id, self.limits()[1] + 1))

    def _plus_extra(self, tenant_id: str, cell_id: str, usage: Usage | None) -> Usage | None:
        """The volume's usage plus what else the cell holds (its /tmp); None if any walk failed."""
        if usage is None or self._extra is None:
            return usage
        try:
            extra = self._extra(tenant_id, cell_id, self.limits()[1] + 1)
        except (ConfinementError, OSError):
            return None
        return Usage(usage.bytes + extra.bytes, usage.entries + extra.entries, usage.complete and extra.complete)

    def start_cell(self, tenant_id: str, cell_id: str) -> None:
        """A new, empty volume."""
        self.record(tenant_id, cell_id, Usage(0, 0))

    def forget(self, cell_id: str) -> None:
        """A deleted cell: no longer counted, and any later record of it dropped."""
        with self._lock:
            self._drop(cell_id)
            self._gone[cell_id] = None
            if len(self._gone) > GONE_KEPT:
                self._gone.popitem(last=False)

    def record(self, tenant_id: str, cell_id: str, usage: Usage | None) -> None:
        with self._lock:
            if cell_id not in self._gone:
                self._put(tenant_id, cell_id, usage)

    def _put(self, tenant_id: str, cell_id: str, usage: Usage | None) -> None:
        """Set one cell's entry and keep the tallies in step; the lock is held."""
        old = self._usage.get(cell_id)
        if old is None:
            self._order[cell_id] = self._next
            self._next += 1
        else:
            self._untally(cell_id, *old)  # a cell recorded again, or under another tenant: the old owner loses it
        self._usage[cell_id] = (tenant_id, usage)
        tally = self._tallies.get(tenant_id)
        if tally is None:
            tally = self._tallies[tenant_id] = _Tally()
        tally.cells += 1
        if usage is None:
            tally.unmeasured.add(cell_id)
        else:
            tally.bytes += usage.bytes
            tally.entries += usage.entries

    def _drop(self, cell_id: str) -> None:
        """Remove one cell's entry and its share of the tallies; the lock is held."""
        old = self._usage.pop(cell_id, None)
        if old is not None:
            self._untally(cell_id, *old)
            del self._order[cell_id]

    def _untally(self, cell_id: str, owner: str, usage: Usage | None) -> None:
        tally = self._tallies[owner]
        tally.cells -= 1
        if usage is None:
            tally.unmeasured.discard(cell_id)
        else:
            tally.bytes -= usage.bytes
            tally.entries -= usage.entries
        if tally.cells == 0:
            del self._tallies[owner]

    def _unmeasured(self, tenant_id: str) -> list[str]:
        """A tenant's unmeasured cells, in the order they entered the ledger; the lock is held."""
        tally = self._tallies.get(tenant_id)
        if tally is None or not tally.unmeasured:
            return []
        return sorted(tally.unmeasured, key=self._order.__getitem__)

    def refresh(self, tenant_id: str, cell_id: str) -> Usage | None:
        """Walk one cell again now, after something beside a run changed it (a
        capture or pause wrote its snapshot, a delete removed part of it), and
        record what the walk found; None when it failed (over quota).

        Until the walk is done the cell keeps its last figure. Marking it
        unmeasured instead would make every check of the tenant made meanwhile
        on another thread see an unmeasured cell, and refuse: during a drain
        that captures cells on four workers at once this dropped 1-3 captures
        in 500 of a tenant at a quarter of its quota (T-DISK-1 fails closed, so
        such a mark must only ever mean a walk that failed)."""
        usage = self._walk(tenant_id, cell_id)
        self.record(tenant_id, cell_id, usage)
        return usage

    def remeasure(self, tenant_id: str, cell_id: str, vol: Volume) -> None:
        """Walk an open volume after a file change; a failed walk is recorded as unmeasured."""
        try:
            usage: Usage | None = vol.usage(max_entries=self.limits()[1] + 1)
        except ConfinementError:
            usage = None
        self.record(tenant_id, cell_id, self._plus_extra(tenant_id, cell_id, usage))

    def cell(self, tenant_id: str, cell_id: str) -> Usage | None:
        """A cell's usage; walks it when unknown or unmeasured."""
        with self._lock:
            known = self._usage.get(cell_id)
        if known is not None and known[1] is not None:
            return known[1]
        usage = self._walk(tenant_id, cell_id)
        self.record(tenant_id, cell_id, usage)
        return usage

    def tenant(self, tenant_id: str) -> tuple[int, int, list[str]]:
        """(bytes, entries, cells that could not be measured) for a tenant."""
        with self._lock:
            loaded = tenant_id in self._loaded
            retry = self._unmeasured(tenant_id)
        for cell_id in (retry if loaded else list(self._cells(tenant_id))):
            self.cell(tenant_id, cell_id)  # T-DISK-1: an unmeasured volume is walked again, never taken as zero
        with self._lock:
            self._loaded.add(tenant_id)
            tally = self._tallies.get(tenant_id)
            used, entries = (tally.bytes, tally.entries) if tally is not None else (0, 0)
            # T-DISK-1: an unmeasured cell is listed (over quota), never summed as zero.
            unknown = self._unmeasured(tenant_id)
        # A walk stopped at its bound counted more entries than the limit allows,
        # so ``entries`` alone already puts the tenant over its file limit.
        return used, entries, unknown

    def check(self, tenant_id: str, adding_bytes: int = 0, adding_files: int = 0) -> Allowance:
        """What the tenant may still add; PayloadTooLarge (413) when this would cross a limit."""
        quota, file_limit = self.limits()
        used, entries, unknown = self.tenant(tenant_id)
        if unknown:
            # T-DISK-1: a walk that failed is over quota, never zero.
            raise PayloadTooLarge(f"the disk usage of cell {unknown[0]} could not be measured, so this tenant is "
                                  "treated as over its quota; delete files or ask the operator", code="quota_exceeded")
        bytes_left, files_left = quota - used, file_limit - entries
        if bytes_left < adding_bytes or bytes_left < 0:
            raise PayloadTooLarge(f"tenant disk quota of {quota // (1024 * 1024)} MB exceeded; delete files to continue",
                                  code="quota_exceeded")
        if files_left < adding_files or files_left < 0:
            raise PayloadTooLarge(f"tenant file limit of {file_limit} files and directories reached; delete some to continue",
                                  code="file_limit_exceeded")
        return Allowance(bytes_left, files_left)
