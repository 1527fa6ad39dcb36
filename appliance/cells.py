"""Cells: the service behind the v1 API (no Flask here).

Owns the mapping of cells to worker processes, runs code through the pool,
and writes the receipt of every run before the answer leaves (docs/receipts.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import secrets
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from appliance.confine import ConfinementError, Usage, create_volume, remove_volume
from appliance.config import Settings
from appliance.errors import BadRequest, CellError, Conflict, Forbidden, NotFound, PayloadTooLarge
from appliance.license.verify import Limits, config_limits
from appliance.quota import Allowance, DiskQuota, measure_volume
from appliance.policy.fairness import tenant_cell_cap
from appliance.receipts import envelope, v1
from appliance.receipts.store import ReceiptStore
from appliance.runtime import protocol, scratch, snapshot_file, templates
from appliance.runtime.pool import ChunkCallback, ResultCallback, WorkerLost, WorkerOverran, WorkerPool, WorkerReplaced
from appliance.storage import CellRecord, Store, Tenant

log = logging.getLogger("cell.cells")

_VOLUME_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _ExecutionIds:
    """Random (version 4) UUIDs, as ``uuid.uuid4`` makes them, from entropy
    drawn 256 at a time: one getrandom call per 256 runs instead of one per
    run (each call lets go of the GIL, and under load getting it back costs
    the request thread a wake-up)."""

    BATCH = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entropy = b""
        self._next = 0

    def __call__(self) -> str:
        with self._lock:
            if self._next >= len(self._entropy):
                self._entropy, self._next = os.urandom(16 * self.BATCH), 0
            raw = self._entropy[self._next:self._next + 16]
            self._next += 16
        return str(uuid.UUID(bytes=raw, version=4))


new_execution_id = _ExecutionIds()


@dataclass
class Binding:
    worker: int
    generation: int


class _SnapshotSize:
    """A cell's snapshot size as remembered (T-DISK-1), told apart by identity:
    once forgotten, a size learnt again is another object. ``bytes`` None:
    being stat'ed."""

    __slots__ = ("bytes",)

    def __init__(self, size: int | None) -> None:
        self.bytes = size


class CellService:
    def __init__(self, settings: Settings, store: Store, pool: WorkerPool, receipts: ReceiptStore,
                 egress: dict[str, Any] | None = None,
                 pro_features: Callable[[], Collection[str]] = lambda: ()) -> None:
        self.settings = settings
        self._dir_strs: tuple[Settings, str, str] | None = None
        self._dir_objs: tuple[Settings, Path, Path] | None = None
        self.store = store
        self.pool = pool
        self.receipts = receipts
        self.egress = egress
        # T-LIC-2: the Pro features the license in force grants, asked per run.
        self.pro_features = pro_features
        self._bindings: dict[str, Binding] = {}
        # After a restart no interpreter state survives: each persistent cell
        # says so once (409 cell_lost), exactly as after a worker was replaced.
        self._lost: set[str] = {c.id for c in store.list_cells() if templates.get(c.template).interpreter}
        self._records: dict[str, CellRecord] = {}  # cells this process has looked up (it is their only writer)
        self._used: dict[str, float] = {}  # cell -> when a run of it last ended (monotonic): pausing idle cells
        self._paused: set[str] = set()  # cells whose state is only in their snapshot file
        # T-IMAGE-2: per cell, runs answered with its interpreter alive since its
        # last capture (what a restore from that capture would lose); counted here,
        # from the worker's replies, never from anything the guest wrote. Absent: unknown.
        self._since_capture: dict[str, int] = {}
        self._uncapturable: set[str] = set()  # cells whose worker could not capture them since their last run
        # T-DISK-1 / T-IMAGE-2: per cell, the size of its snapshot file as this
        # process last learnt it (a stat, or none for a cell it just created),
        # so that a run does not stat the file. Only host code changes the file,
        # each time in a request about the cell: every request that may have
        # changed it forgets the size (_call, _forget_snapshot_size), and a cell
        # absent here is stat'ed. Empty at start: nothing is assumed.
        self._snap_sizes: dict[str, _SnapshotSize] = {}
        self._lock = threading.Lock()
        self._expiry: dict[str, tuple[int, int]] = {}  # cell -> (expires_at, when written to the DB)
        self.runs = 0
        self.quota = DiskQuota(
            limits=lambda: (self.quota_bytes(), self.settings.tenant_file_limit),
            measure=lambda tenant_id, cell_id, bound: measure_volume(self.settings.volumes_dir, tenant_id, cell_id, bound),
            cells=lambda tenant_id: [c.id for c in self.store.list_cells(tenant_id)],
            extra=self._beside_volume)
        # The limits in force; the service wires the license in.
        self.limits: Callable[[], Limits] = lambda: config_limits(settings)
        # Called after every run with a summary (no code, no output): metrics, logs.
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    # -- helpers ---------------------------------------------------------
    def _dirs(self) -> tuple[str, str]:
        """The volumes and snapshots directories as strings, worked out once per
        settings object: every run joins paths under them, and pathlib costs
        more there than the rest of the join."""
        s = self.settings
        known = self._dir_strs
        if known is None or known[0] is not s:
            known = self._dir_strs = (s, str(s.volumes_dir), str(s.snapshots_dir))
        return known[1], known[2]

    def _dir_paths(self) -> tuple[Path, Path]:
        """The volumes directory and the cells' /tmp root under it (scratch.py)
        as paths, made once per settings object (a delete removes under both)."""
        s = self.settings
        known = self._dir_objs
        if known is None or known[0] is not s:
            volumes = s.volumes_dir
            known = self._dir_objs = (s, volumes, volumes / scratch.TMP_ROOT)
        return known[1], known[2]

    def volume_path(self, tenant_id: str, cell_id: str) -> str:
        return os.path.join(self._dirs()[0], tenant_id, cell_id)

    def _beside_volume(self, tenant_id: str, cell_id: str, bound: int) -> Usage:
        """What a cell holds beside its volume, counted in the quota (T-DISK-1):
        its /tmp and its snapshot file (one entry, T-IMAGE-2)."""
        tmp = scratch.tmp_usage(self.volume_path(tenant_id, cell_id), bound)
        snap = snapshot_file.size(self.settings.snapshots_dir, tenant_id, cell_id)
        return Usage(tmp.bytes + snap, tmp.entries + (1 if snap else 0), tmp.complete)

    def _snapshot_exists(self, tenant_id: str, cell_id: str) -> bool:
        try:
            return snapshot_file.exists(self.settings.snapshots_dir, tenant_id, cell_id)
        except OSError:
            return False

    def new_cell_id(self) -> str:
        return f"c{self.settings.node_id}-{secrets.token_hex(10)}"

    def cell(self, tenant: Tenant, cell_id: str) -> CellRecord:
        if not isinstance(cell_id, str) or len(cell_id) > 64:
            raise NotFound("no such cell", code="cell_not_found")
        with self._lock:
            record = self._records.get(cell_id)
        if record is None:
            record = self.store.get_cell(cell_id, tenant.id)
            if record is not None:
                with self._lock:
                    self._records[cell_id] = record
        # T-TENANT-1: another tenant's cell is indistinguishable from no cell.
        if record is None or record.tenant_id != tenant.id:
            raise NotFound("no such cell", code="cell_not_found")
        with self._lock:
            live = self._expiry.get(record.id)
        if live is not None and live[0] > record.expires_at:
            record.expires_at = live[0]
        return record

    # -- lifecycle -------------------------------------------------------
    def check_memory(self, memory_mb: int) -> None:
        ceiling = self.limits().max_memory_mb
        if memory_mb > ceiling:
            raise BadRequest(f"memory_mb {memory_mb} is above the {ceiling} MB allowed by this appliance's license and "
                             "configuration", code="out_of_range")

    def create(self, tenant: Tenant, template: str, timeout_ms: int, persistent: bool, metadata: dict[str, str],
               envs: dict[str, str], memory_mb: int, allow_internet_access: bool | None = None) -> CellRecord:
        self.check_memory(memory_mb)
        if allow_internet_access and self.egress is None:
            # T-SSRF-1: a cell can narrow the node's egress policy, never widen it.
            raise Forbidden("allow_internet_access=true: this node has egress off, and a cell cannot turn it on",
                            code="egress_disabled")
        self._check_room(tenant)
        created = now_ms()
        record = CellRecord(self.new_cell_id(), tenant.id, template, created, timeout_ms, created + timeout_ms,
                            persistent, metadata, envs, memory_mb, internet=allow_internet_access is not False)
        volume = self.volume_path(tenant.id, record.id)
        if templates.get(template).interpreter:
            handle = self.pool.pick_for_cell(tenant.id)  # T-TENANT-1: a worker bound to this tenant
            bind = protocol.BindRequest(0, cell_id=record.id, template=template, volume=volume, envs=dict(envs), memory_mb=memory_mb)
            self.pool.assign(handle, record.id)  # counted at once: a worker holding a cell is never reclaimed
            try:
                reply = self._call(handle, bind, None, tenant=tenant.id, cell_id=record.id)
            except BaseException:
                self.pool.release(handle.index, record.id)
                raise
            if not isinstance(reply, protocol.OkReply):
                self.pool.release(handle.index, record.id)
                raise _refusal(reply, "could not start the cell")
            with self._lock:
                self._bindings[record.id] = Binding(handle.index, handle.generation)
        else:
            create_volume(self.settings.volumes_dir, tenant.id, record.id)
        self.quota.start_cell(tenant.id, record.id)
        try:
            self.store.add_cell(record)
            with self._lock:
                self._records[record.id] = record
                # The row just written holds this expiry: the first run's touch
                # is throttled like any later one's (no second write per cell).
                self._expiry[record.id] = (record.expires_at, created)
                # T-DISK-1: no snapshot of an id drawn just now exists: only a capture
                # writes one, a request about the cell (which forgets this).
                self._snap_sizes[record.id] = _SnapshotSize(0)
        except Exception:
            self._drop(record)  # no session or volume may outlive a cell that was never recorded
            raise
        return record

    def _check_room(self, tenant: Tenant) -> None:
        max_cells = self.limits().max_cells
        on_node, of_tenant, tenants = self.store.room_counts(tenant.id)
        if on_node >= max_cells:
            raise Forbidden(f"this appliance already runs its maximum of {max_cells} cells (license and configuration); "
                            "delete a cell or raise the limit", code="cell_limit")
        # T-FAIR-1: one tenant may not take every cell of a shared node.
        tenant_cap = tenant_cell_cap(max_cells, self.settings.tenant_max_cells, tenants)
        if of_tenant >= tenant_cap:
            raise Forbidden(f"this tenant already holds its maximum of {tenant_cap} cells on this appliance; delete a cell "
                            "or ask the operator to raise SYNAPSE_TENANT_MAX_CELLS", code="tenant_cell_limit")

    def delete(self, tenant: Tenant, cell_id: str) -> None:
        record = self.cell(tenant, cell_id)
        self._cancel_run(record)
        self._drop(record)

    def _cancel_run(self, record: CellRecord) -> None:
        """A run in flight in a cell being deleted is stopped now, not at its
        own deadline; it is answered ``killed`` with its receipt, and says
        ``cell_deleted``."""
        with self._lock:
            binding = self._bindings.get(record.id)
        if binding is None:
            return
        handle = self.pool.worker(binding.worker)
        if handle.generation == binding.generation:
            self.pool.cancel(handle, record.id)

    def _drop(self, record: CellRecord) -> None:
        with self._lock:
            binding = self._bindings.pop(record.id, None)
            self._lost.discard(record.id)
            self._paused.discard(record.id)
            self._used.pop(record.id, None)
            self._since_capture.pop(record.id, None)
            self._uncapturable.discard(record.id)
            self._expiry.pop(record.id, None)
            self._records.pop(record.id, None)
            # T-DISK-1: its snapshot is removed below; not remembered again (_snapshot_size) unless looked up anew.
            self._snap_sizes.pop(record.id, None)
        if binding is not None:
            self.pool.release(binding.worker, record.id)
            if self.pool.generation_of(binding.worker) == binding.generation:
                try:
                    handle = self.pool.worker(binding.worker)
                    self._call(handle, protocol.DropRequest(0, cell_id=record.id), None, tenant=record.tenant_id,
                               cell_id=record.id)
                except (WorkerLost, CellError):
                    pass
        self.pool.forget_cell(record.id)
        # T-DOS-1 / T-DISK-1: the volume goes first (iterative, bounded; any depth),
        # then the row. A failure or a crash in between leaves the row, so the
        # volume still counts against the quota and a repeated DELETE (or the
        # reaper) finishes the job: a volume is never orphaned.
        volumes, tmp_root = self._dir_paths()
        try:
            remove_volume(volumes, record.tenant_id, record.id)
            _remove_tmp(tmp_root, record.tenant_id, record.id)  # its /tmp goes with it
        except ConfinementError as exc:
            self.quota.refresh(record.tenant_id, record.id)  # partly removed: measured again
            log.error("could not remove the volume of cell %s: %s", record.id, exc.message)
            raise CellError("the cell's volume could not be removed; the cell is kept, retry the delete",
                            code="delete_failed") from None
        try:
            snapshot_file.remove(self._dirs()[1], record.tenant_id, record.id)  # T-IMAGE-2: gone with its cell
        except OSError as exc:
            log.error("could not remove the snapshot of cell %s: %s", record.id, exc)
            raise CellError("the cell's snapshot could not be removed; the cell is kept, retry the delete",
                            code="delete_failed") from None
        self.store.delete_cell(record.id)
        self.quota.forget(record.id)

    def sweep_orphan_volumes(self) -> int:
        """Remove volumes that have no cell row (a crash between making a volume
        and recording its cell, or an older release's delete). Run once at start,
        before the server takes requests (a create makes its volume before its
        row). Returns how many were removed."""
        known = {(c.tenant_id, c.id) for c in self.store.list_cells()}
        removed = self._sweep(self.settings.volumes_dir, known)
        # Cells' /tmp scratch directories live under their own root (scratch.py).
        removed += self._sweep(self.settings.volumes_dir / scratch.TMP_ROOT, known)
        return removed + self._sweep_snapshots(known)

    def _sweep_snapshots(self, known: set[tuple[str, str]]) -> int:
        """Snapshot files whose cell is gone (T-IMAGE-2)."""
        removed = 0
        try:
            tenants = [e.name for e in os.scandir(self.settings.snapshots_dir) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for tenant_id in tenants:
            try:
                names = [e.name for e in os.scandir(self.settings.snapshots_dir / tenant_id)]
            except OSError:
                continue
            for name in names:
                if (tenant_id, name) not in known and _VOLUME_ID.fullmatch(name):
                    try:
                        removed += snapshot_file.remove(self.settings.snapshots_dir, tenant_id, name)
                    except OSError as exc:
                        log.error("could not remove orphan snapshot %s/%s: %s", tenant_id, name, exc)
                    self._forget_snapshot_size(name)
        return removed

    def _sweep(self, root: Path, known: set[tuple[str, str]]) -> int:
        removed = 0
        try:
            tenants = [e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return 0
        for tenant_id in tenants:
            try:
                cells = [e.name for e in os.scandir(root / tenant_id) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for cell_id in cells:
                if (tenant_id, cell_id) in known or not _VOLUME_ID.fullmatch(tenant_id) or not _VOLUME_ID.fullmatch(cell_id):
                    continue  # ".pool" and anything that is not a volume name is left alone
                try:
                    removed += remove_volume(root, tenant_id, cell_id)
                except ConfinementError as exc:
                    log.error("could not remove orphan volume %s/%s: %s", tenant_id, cell_id, exc.message)
        return removed

    def set_timeout(self, tenant: Tenant, cell_id: str, timeout_ms: int) -> CellRecord:
        record = self.cell(tenant, cell_id)
        record.timeout_ms = timeout_ms
        record.expires_at = now_ms() + timeout_ms
        self.store.touch_cell(record.id, record.expires_at, timeout_ms)
        with self._lock:
            self._expiry[record.id] = (record.expires_at, now_ms())
        return record

    def reap_expired(self) -> int:
        now = now_ms()
        dropped = 0
        for record in self.store.expired_cells(now):
            with self._lock:
                live_expiry = self._expiry.get(record.id, (0, 0))[0]
            if live_expiry > now:  # used since the DB copy was written
                self.store.touch_cell(record.id, live_expiry)
                continue
            try:
                self._drop(record)
            except CellError:
                continue  # the row stays; the next pass retries the volume
            dropped += 1
        return dropped

    # -- snapshots: fork and capture (T-IMAGE-2) -------------------------------
    def _restorable(self, tmpl: templates.Template, tenant_id: str, cell_id: str) -> bool:
        return tmpl.interpreter and "python" in tmpl.languages and self._snapshot_exists(tenant_id, cell_id)

    def fork(self, tenant: Tenant, cell_id: str) -> CellRecord:
        """A new cell of the same tenant and template from ``cell_id``'s state
        between runs: its variables (the interpreter captured and restored on
        the same worker) and its files (copied within the tenant's quota). A
        cell running code is refused at once (409 cell_busy)."""
        source = self.cell(tenant, cell_id)
        tmpl = templates.get(source.template)
        if not (tmpl.interpreter and "python" in tmpl.languages):
            raise Conflict(f"only Python cells can be forked; this cell runs {source.template}", code="fork_unsupported")
        self._check_room(tenant)
        with self._lock:
            lost = cell_id in self._lost
            paused = cell_id in self._paused
            binding = self._bindings.get(cell_id)
        if binding is not None and self.pool.generation_of(binding.worker) != binding.generation:
            lost, binding = True, None
        restore = (binding is None or paused) and self._restorable(tmpl, tenant.id, cell_id)
        if lost and not restore:
            raise Conflict("the worker holding this cell's interpreter was replaced and no snapshot of its state was "
                           "taken; there is nothing to fork. Run code in it first.", code="cell_lost")
        if binding is None:
            handle = self.pool.pick_for_cell(tenant.id)
            self.pool.assign(handle, cell_id)
        else:
            handle = self.pool.worker(binding.worker)
        allowance = self.check_quota(tenant)
        created = now_ms()
        record = CellRecord(self.new_cell_id(), tenant.id, source.template, created, source.timeout_ms,
                            created + source.timeout_ms, source.persistent, dict(source.metadata), dict(source.envs),
                            source.memory_mb, internet=source.internet)
        msg = protocol.ForkRequest(0, cell_id=cell_id, new_cell_id=record.id, template=source.template,
                                   volume=self.volume_path(tenant.id, cell_id),
                                   new_volume=self.volume_path(tenant.id, record.id), memory_mb=source.memory_mb,
                                   volume_limit=protocol.VolumeLimit(allowance.bytes_left, allowance.files_left),
                                   envs=dict(source.envs), restore=restore)
        self.pool.assign(handle, record.id)
        try:
            reply = self._call(handle, msg, None, tenant=tenant.id, cell_id=cell_id, cell_wait_s=0)
        except BaseException:
            self.pool.release(handle.index, record.id)
            raise
        if restore or binding is None:
            # The source's interpreter now lives there (restored), or its snapshot was discarded.
            with self._lock:
                self._bindings[cell_id] = Binding(handle.index, handle.generation)
                self._lost.discard(cell_id)
                self._paused.discard(cell_id)
                self._used[cell_id] = time.monotonic()
        if not isinstance(reply, protocol.OkReply):
            self.pool.release(handle.index, record.id)
            self._remove_dirs(tenant.id, record.id)
            raise _refusal(reply, "could not fork the cell")
        with self._lock:
            self._bindings[record.id] = Binding(handle.index, handle.generation)
        self.quota.refresh(tenant.id, record.id)  # T-DISK-1: the copy measured by the service's own walk
        try:
            self.store.add_cell(record)
            with self._lock:
                self._records[record.id] = record
        except Exception:
            self._drop(record)
            raise
        return record

    def _remove_dirs(self, tenant_id: str, cell_id: str) -> None:
        """A failed fork's volume and /tmp, if the worker left any."""
        try:
            remove_volume(self.settings.volumes_dir, tenant_id, cell_id)
            scratch.remove_tmp_dir(self.volume_path(tenant_id, cell_id))
        except ConfinementError as exc:
            log.error("could not remove the volume of a failed fork %s: %s", cell_id, exc.message)

    def capture_cells(self) -> int:
        """On SIGTERM drain: write the state of every idle persistent Python
        cell to its snapshot file, so that it continues after the restart
        (T-IMAGE-2). Workers in parallel, and in each as many cells at a time
        as it has lanes (a capture runs on a request thread of its own there);
        returns how many were captured."""
        with self._lock:
            bound = list(self._bindings.items())
        records = {c.id: c for c in self.store.list_cells()}
        by_worker: dict[int, list[tuple[CellRecord, Binding]]] = {}
        for cell_id, binding in bound:
            record = records.get(cell_id)
            if record is None or not record.persistent or "python" not in templates.get(record.template).languages:
                continue
            if self.pool.generation_of(binding.worker) == binding.generation:
                by_worker.setdefault(binding.worker, []).append((record, binding))
        done = [0]
        count_lock = threading.Lock()
        quota_lock = threading.Lock()  # T-DISK-1: captures landing at once are counted one after another

        def over_quota(record: CellRecord) -> str | None:
            """T-DISK-1, under ``quota_lock``: why the tenant is over its quota
            (a cell whose walk failed counts as over it), or None."""
            try:
                self.quota.check(record.tenant_id)
                return None
            except PayloadTooLarge as exc:
                return str(exc)

        def capture(items: queue.SimpleQueue[tuple[CellRecord, Binding]]) -> None:
            while True:
                try:
                    record, binding = items.get_nowait()
                except queue.Empty:
                    return
                with quota_lock:
                    refused = over_quota(record)  # T-DISK-1: a tenant already at its quota gets no capture
                if refused is not None:
                    _log_not_kept(record, refused)
                    continue
                try:
                    handle = self.pool.worker(binding.worker)
                    reply = self._call(handle, protocol.CaptureRequest(0, cell_id=record.id), None,
                                       tenant=record.tenant_id, cell_id=record.id)
                except Exception as exc:
                    log.warning("could not capture cell %s: %s", record.id, exc)
                    continue
                if isinstance(reply, protocol.OkReply):
                    with quota_lock:
                        # T-DISK-1: as an idle capture, one that puts the tenant over its quota is not kept.
                        self.quota.refresh(record.tenant_id, record.id)
                        refused = over_quota(record)
                        if refused is not None:
                            self._discard_capture(record, refused)
                            continue
                    with count_lock:
                        done[0] += 1
                elif isinstance(reply, protocol.ErrorReply) and reply.code != "not_capturable":
                    log.warning("could not capture cell %s: %s", record.id, reply.message)

        threads = []
        for items in by_worker.values():
            todo: queue.SimpleQueue[tuple[CellRecord, Binding]] = queue.SimpleQueue()
            for item in items:
                todo.put(item)
            threads += [threading.Thread(target=capture, args=(todo,), name="cell-capture", daemon=True)
                        for _ in range(min(len(items), max(1, self.settings.lanes_per_worker)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return done[0]

    def pause_idle(self, now: float | None = None) -> int:
        """Pause persistent Python cells idle for ``SYNAPSE_CELL_PAUSE_IDLE_S``:
        their state goes to their snapshot file and their interpreter is closed
        (RAM given back); the next run restores it. A cell running code is
        skipped. Returns how many were paused."""
        idle_s = self.settings.cell_pause_idle_s
        if idle_s <= 0:
            return 0
        moment = time.monotonic() if now is None else now
        with self._lock:
            due = [(c, b, self._used[c]) for c, b in self._bindings.items()
                   if c not in self._paused and moment - self._used.setdefault(c, moment) >= idle_s]
        paused = 0
        for cell_id, binding, used in due:
            record = self._records.get(cell_id) or next((c for c in self.store.list_cells() if c.id == cell_id), None)
            if record is None or not record.persistent or "python" not in templates.get(record.template).languages:
                continue
            if self.pool.generation_of(binding.worker) != binding.generation:
                continue
            try:
                reply = self._call(self.pool.worker(binding.worker), protocol.CaptureRequest(0, cell_id, release=True),
                                   None, tenant=record.tenant_id, cell_id=cell_id, cell_wait_s=0)
            except Exception as exc:  # busy, or its worker is gone: another time
                log.info("cell %s not paused: %s", cell_id, exc)
                continue
            if isinstance(reply, protocol.OkReply):
                with self._lock:
                    # T-IMAGE-2: a run that came in meanwhile (it notes its start) goes on
                    # from the file, restored by its worker: the cell is not marked paused.
                    if self._used.get(cell_id) == used:
                        self._paused.add(cell_id)
                        self._since_capture[cell_id] = 0
                self.quota.refresh(record.tenant_id, cell_id)  # T-DISK-1: measured again, its snapshot with it
                paused += 1
            else:
                with self._lock:
                    self._used[cell_id] = moment  # not capturable (a plain-started cell): not asked again soon
        return paused

    def capture_idle(self, now: float | None = None, budget_s: float = 1.0) -> int:
        """Capture persistent Python cells that ran and then stayed idle for
        ``SYNAPSE_CELL_CAPTURE_IDLE_S``, keeping their interpreter (unlike a
        pause), so that a run that crashes it rolls back to that capture and a
        cell whose worker is replaced continues from it (T-IMAGE-2). Off the
        request path: a cell running code is skipped (asked again next time);
        at most ``budget_s`` of captures per call. A capture that would put the
        tenant over its quota is not kept (T-DISK-1). Returns how many were taken."""
        idle_s = self.settings.cell_capture_idle_s
        if idle_s <= 0:
            return 0
        moment = time.monotonic() if now is None else now
        with self._lock:
            due = [(c, b, self._since_capture.get(c, 1)) for c, b in self._bindings.items()
                   if c not in self._paused and c not in self._uncapturable and self._since_capture.get(c, 1) > 0
                   and c in self._used and moment - self._used[c] >= idle_s]
        started = time.monotonic()
        taken = 0
        for cell_id, binding, seen in due:
            if time.monotonic() - started >= budget_s:
                break
            with self._lock:
                record = self._records.get(cell_id)
            if record is None or not record.persistent or "python" not in templates.get(record.template).languages:
                continue
            if self.pool.generation_of(binding.worker) != binding.generation:
                continue
            began = time.monotonic()
            try:
                self.quota.check(record.tenant_id)  # T-DISK-1: a tenant already at its quota gets no capture
                reply = self._call(self.pool.worker(binding.worker), protocol.CaptureRequest(0, cell_id), None,
                                   tenant=record.tenant_id, cell_id=cell_id, cell_wait_s=0)
            except Exception as exc:  # busy, over quota, or its worker is gone: another time
                log.debug("cell %s not captured: %s", cell_id, exc)
                continue
            if not isinstance(reply, protocol.OkReply):
                with self._lock:
                    if isinstance(reply, protocol.ErrorReply) and reply.code == "not_capturable":
                        self._uncapturable.add(cell_id)  # e.g. started without the image: not asked again
                        continue
                    self._used[cell_id] = moment  # another failure (disk?): asked again after the idle time
                log.warning("cell %s not captured: %s", cell_id, getattr(reply, "message", type(reply).__name__))
                continue
            with self._lock:
                # Runs that landed between the count read above and the capture
                # stay counted: the capture is never thought newer than it is.
                self._since_capture[cell_id] = max(0, self._since_capture.get(cell_id, seen) - seen)
            self.quota.refresh(record.tenant_id, cell_id)  # measured again, its snapshot with it
            try:
                self.quota.check(record.tenant_id)
            except PayloadTooLarge as exc:
                self._discard_capture(record, str(exc))
                continue
            log.debug("cell %s captured while idle in %.0f ms", cell_id, (time.monotonic() - began) * 1000)
            taken += 1
        return taken

    def _discard_capture(self, record: CellRecord, reason: str) -> None:
        """A capture (idle, or at a stop) that put the tenant over its quota goes
        (T-DISK-1): the tenant's runs stay possible; a crash then starts a fresh
        interpreter, and after a restart the cell answers ``cell_lost``."""
        _log_not_kept(record, reason)
        try:
            snapshot_file.remove(self.settings.snapshots_dir, record.tenant_id, record.id)
        except OSError as exc:
            log.error("could not remove the capture of cell %s: %s", record.id, exc)
        self._forget_snapshot_size(record.id)
        with self._lock:
            self._since_capture.pop(record.id, None)
        self.quota.refresh(record.tenant_id, record.id)

    def _keep_restored_capture(self, record: CellRecord) -> None:
        """The file a run restored from stays, what a crash of the cell's next
        run rolls back to (T-IMAGE-2), counted in the quota; when the tenant is
        over its quota with it, it goes, as an idle capture would (T-DISK-1)."""
        try:
            self.quota.check(record.tenant_id)
        except PayloadTooLarge as exc:
            self._discard_capture(record, str(exc))

    # -- disk quota (T-DISK-1): appliance/quota.py --------------------------
    def quota_bytes(self) -> int:
        return self.settings.tenant_quota_mb * 1024 * 1024

    def cell_usage(self, record: CellRecord) -> int | None:
        """Bytes in the cell's volume; None when it could not be measured."""
        usage = self.quota.cell(record.tenant_id, record.id)
        return None if usage is None else usage.bytes

    def tenant_usage(self, tenant: Tenant) -> int:
        """Bytes in the tenant's volumes, from memory (each cell measured once,
        then after every run or file change): no disk walk on the hot path."""
        return self.quota.tenant(tenant.id)[0]

    def tenant_files(self, tenant: Tenant) -> int:
        return self.quota.tenant(tenant.id)[1]

    def note_usage(self, tenant_id: str, cell_id: str, usage: Usage | None) -> None:
        """A fresh walk of one volume; None (a failed walk) counts as over quota."""
        self.quota.record(tenant_id, cell_id, usage)

    def check_quota(self, tenant: Tenant, adding: int = 0, adding_files: int = 0) -> Allowance:
        """What the tenant may still add; 413 quota_exceeded / file_limit_exceeded past a limit."""
        return self.quota.check(tenant.id, adding, adding_files)

    def _volume_limit(self, tenant: Tenant, cell_id: str | None, allowance: Allowance) -> protocol.VolumeLimit:
        """What one volume may hold while a run writes to it (the worker stops the run past it)."""
        current = self.quota.cell(tenant.id, cell_id) if cell_id is not None else Usage(0, 0)
        held = current or Usage(0, 0)
        return protocol.VolumeLimit(held.bytes + allowance.bytes_left, held.entries + allowance.files_left)

    # -- runs ------------------------------------------------------------
    def _call(self, handle: Any, msg: protocol.Request, deadline_s: float | None,
              on_chunk: ChunkCallback | None = None, *, tenant: str = "", cell_id: str | None = None,
              on_result: ResultCallback | None = None, cell_wait_s: float = 30.0) -> protocol.Reply:
        try:
            reply = self.pool.call(handle, msg, deadline_s=deadline_s, on_chunk=on_chunk, tenant=tenant, cell_id=cell_id,
                                   on_result=on_result, cell_wait_s=cell_wait_s)
        except BaseException as exc:
            self._snapshot_may_have_changed(msg)  # T-DISK-1: whatever the worker did before it failed
            if isinstance(exc, WorkerLost):
                self._mark_lost(handle.index)
            raise
        if not _keeps_snapshot(msg, reply):
            self._snapshot_may_have_changed(msg)
        return reply

    def _mark_lost(self, index: int) -> None:
        with self._lock:
            for cell_id, binding in list(self._bindings.items()):
                if binding.worker == index and binding.generation != self.pool.generation_of(index):
                    self._lost.add(cell_id)
                    del self._bindings[cell_id]

    # -- roll-back and restore from idle captures (T-IMAGE-2) ---------------------
    def _rebind_restoring(self, tenant: Tenant, cell_id: str, template: str) -> Any:
        """A new worker for a cell whose worker is gone, when its capture can
        bring it back (the run then says ``restored``); None when it cannot."""
        if not self._restorable(templates.get(template), tenant.id, cell_id):
            return None
        handle = self.pool.pick_for_cell(tenant.id)
        self.pool.assign(handle, cell_id)
        with self._lock:
            self._lost.discard(cell_id)
            self._bindings[cell_id] = Binding(handle.index, handle.generation)
        return handle

    def _lost_in_run(self, tenant_id: str, cell_id: str, template: str, outcome: dict[str, Any]) -> None:
        """The worker was killed during this run (it overran, died, broke the
        protocol). With a capture, the cell's next run restores it: taken before
        this run, that is a roll-back; else its state is gone, as this answer says."""
        if not self._restorable(templates.get(template), tenant_id, cell_id):
            with self._lock:
                self._lost.discard(cell_id)  # this answer already says the state is gone
            return
        with self._lock:
            self._lost.add(cell_id)  # restored on its next run
            behind = self._since_capture.get(cell_id)
        if behind == 0:
            outcome["rolled_back"] = True
            outcome["note"] = (f"{outcome['note']}; the cell is rolled back to its capture from before this run: its "
                               "next run has the variables from before this one (files are as the run left them)")
        else:
            outcome["note"] = f"{outcome['note']}; {_behind_words(behind, 'its next run restores')}"

    def _count_run(self, cell_id: str, outcome: dict[str, Any]) -> None:
        """Keep the count of runs since the cell's capture, and say in the
        answer how far behind a capture it was restored from was."""
        with self._lock:
            before = self._since_capture.get(cell_id)
            self._uncapturable.discard(cell_id)  # asked again: a new interpreter may be capturable
            if outcome.get("rolled_back"):
                self._since_capture[cell_id] = 0  # the interpreter is the capture again
            elif not outcome.get("session_alive", True):
                self._since_capture.pop(cell_id, None)  # no interpreter; the worker dropped a capture that was behind
            elif outcome.get("restored"):
                self._since_capture[cell_id] = 1  # restored from the capture, which stays; this run is counted
            elif before is not None:
                self._since_capture[cell_id] = before + 1
            else:
                self._since_capture[cell_id] = 1
        if outcome.get("restored") and before:  # unknown (a capture from before a restart): nothing said
            words = _behind_words(before, "this run was restored from")
            outcome["note"] = f"{outcome['note']}; {words}" if outcome.get("note") else words

    def _with_capture(self, tenant_id: str, cell_id: str, template: str, usage: Usage | None,
                      fresh: bool = False) -> tuple[Usage | None, _SnapshotSize | None]:
        """A Python cell's volume as the worker walked it, plus its snapshot
        file, which counts in the tenant's quota too (T-DISK-1, T-IMAGE-2);
        and the remembered size used (None: stat'ed, ``fresh``)."""
        if usage is None or "python" not in templates.get(template).languages:
            return usage, None
        try:
            if fresh:
                snap, known = snapshot_file.size(self._dirs()[1], tenant_id, cell_id), None
            else:
                snap, known = self._snapshot_size(tenant_id, cell_id)
        except OSError:
            return None, None  # unknown is never zero
        return (Usage(usage.bytes + snap, usage.entries + (1 if snap else 0), usage.complete) if snap else usage), known

    def _note_run_usage(self, tenant_id: str, cell_id: str, template: str, usage: Usage | None) -> None:
        """Record a cell's usage after a run: the worker's walk plus its snapshot
        (T-DISK-1). When the file was noted as changed while this was worked
        out (a capture landing right after the run), it is stat'ed again and
        recorded once more, as every run did before sizes were remembered."""
        counted, known = self._with_capture(tenant_id, cell_id, template, usage)
        self.note_usage(tenant_id, cell_id, counted)
        if known is not None:
            with self._lock:
                current = self._snap_sizes.get(cell_id) is known
            if not current:
                self.note_usage(tenant_id, cell_id, self._with_capture(tenant_id, cell_id, template, usage, True)[0])

    def _snapshot_size(self, tenant_id: str, cell_id: str) -> tuple[int, _SnapshotSize]:
        """The cell's snapshot size (0: none) and the remembered entry it came
        from: from memory when known, else a stat, remembered only when no
        change was noted while it ran (T-DISK-1). A stat error raises OSError
        and nothing is remembered."""
        with self._lock:
            known = self._snap_sizes.get(cell_id)
            if known is not None and known.bytes is not None:
                return known.bytes, known
            mark = _SnapshotSize(None)
            if cell_id in self._records:  # a cell being dropped is not remembered again
                self._snap_sizes[cell_id] = mark
        size = snapshot_file.size(self._dirs()[1], tenant_id, cell_id)
        with self._lock:
            if self._snap_sizes.get(cell_id) is mark:  # not forgotten since the stat began
                mark.bytes = size
        return size, mark

    def _forget_snapshot_size(self, *cell_ids: str | None) -> None:
        """The host changed, or may have changed, these cells' snapshot files
        (T-DISK-1): their next use stats them. Called after the change."""
        with self._lock:
            for cell_id in cell_ids:
                if cell_id is not None:
                    self._snap_sizes.pop(cell_id, None)

    def _snapshot_may_have_changed(self, msg: protocol.Request) -> None:
        """After a worker request that may have written or removed the snapshot
        of the cell it is about (captures, pauses, forks, restores, drops,
        roll-backs, and any request that failed): its size is stat'ed again."""
        cell_id, new_cell_id = getattr(msg, "cell_id", None), getattr(msg, "new_cell_id", None)
        if cell_id is not None or new_cell_id is not None:  # a one-shot run is about no cell
            self._forget_snapshot_size(cell_id, new_cell_id)

    def exec_in_cell(self, tenant: Tenant, cell_id: str, code: bytes, is_text: bool, language: str | None,
                     on_chunk: ChunkCallback | None = None, timeout_ms: int | None = None,
                     run_envs: dict[str, str] | None = None,
                     on_result: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        record = self.cell(tenant, cell_id)
        tmpl = templates.get(record.template)
        if language is not None and language not in tmpl.languages:
            raise BadRequest(f"this cell runs {record.template}, not {language!r}", code="language_mismatch")
        if run_envs and not tmpl.interpreter:
            raise BadRequest("envs: a wasm module gets no environment variables", code="invalid_field")
        with self._lock:
            if cell_id in self._lost:
                # State is gone with the worker that held it; say so once.
                self._lost.discard(cell_id)
                lost = True
            else:
                lost = False
            binding = self._bindings.get(cell_id)
        if not lost and binding is not None and tmpl.interpreter \
                and self.pool.generation_of(binding.worker) != binding.generation:
            # Its worker was stopped (died, overran, broke the protocol) before any
            # run noticed: the same answer, whichever noticed first.
            with self._lock:
                self._bindings.pop(cell_id, None)
            lost = True
        # T-IMAGE-2: a cell captured before it was lost (SIGTERM drain) is
        # restored from its snapshot by the worker that takes it.
        with self._lock:
            paused = cell_id in self._paused
            self._paused.discard(cell_id)
            self._used[cell_id] = time.monotonic()  # a pause under way sees this run (T-IMAGE-2)
        restore = (lost or paused) and self._restorable(tmpl, tenant.id, cell_id)
        if restore:
            with self._lock:
                self._since_capture.setdefault(cell_id, 0)  # T-IMAGE-2: restored, the file is its state before this run
        if lost and not restore:
            raise Conflict("the worker holding this cell's interpreter was replaced and no snapshot of its state was "
                           "taken (a cell is captured once it has been idle after a run and at a stop, and a capture "
                           "is not kept when it would put the tenant over its disk quota); its variables are gone, its "
                           "files are kept. The next run starts a fresh interpreter.",
                           code="cell_lost")
        if restore and lost:
            binding = None
        if binding is None or self.pool.generation_of(binding.worker) != binding.generation:
            handle = self.pool.pick_for_cell(tenant.id) if tmpl.interpreter else self.pool.pick_for_run(tenant.id)
            if tmpl.interpreter:
                self.pool.assign(handle, cell_id)
                with self._lock:
                    self._bindings[cell_id] = Binding(handle.index, handle.generation)
        else:
            handle = self.pool.worker(binding.worker)
        try:
            allowance = self.check_quota(tenant)
        except PayloadTooLarge:
            if not restore:
                raise
            # T-DISK-1: the snapshot this run consumes may be what puts the tenant
            # over; it is restored, but the run may add nothing to the volume.
            allowance = Allowance(0, 0)
        msg = self._exec_request(
            tenant, record.template, code, is_text, timeout_ms, record.memory_mb, on_chunk,
            cell_id=cell_id if tmpl.interpreter else None, volume=self.volume_path(tenant.id, cell_id),
            envs=record.envs, persistent=record.persistent, known_session=binding is not None, internet=record.internet,
            quota_left=allowance.bytes_left, files_left=allowance.files_left,
            volume_limit=self._volume_limit(tenant, cell_id, allowance))
        if run_envs:
            msg = dataclasses.replace(msg, run_envs=dict(run_envs))  # never logged: values may be secrets
        if restore:
            msg = dataclasses.replace(msg, restore=True)
        try:
            answer = self._run(handle, msg, tenant, cell_id, on_chunk, on_result)
        finally:
            with self._lock:
                self._used[cell_id] = time.monotonic()
        if answer.get("restored"):
            with self._lock:
                self._paused.discard(cell_id)  # T-IMAGE-2: restored by its worker, as after a pause it raced
            self._keep_restored_capture(record)
        self._touch(record)
        return answer

    def _touch(self, record: CellRecord) -> None:
        """Push the idle expiry forward; the DB write is throttled (a write per
        run would cost a disk sync on the hot path), memory is authoritative."""
        now = now_ms()
        expires = now + record.timeout_ms
        with self._lock:
            _, written = self._expiry.get(record.id, (0, 0))
            self._expiry[record.id] = (expires, written)
            due = now - written >= min(5000, record.timeout_ms // 4)
            if due:
                self._expiry[record.id] = (expires, now)
        if due:
            try:
                self.store.touch_cell(record.id, expires)
            except Exception:
                # The run already happened and has its receipt: never turn its
                # answer into an error; memory keeps the expiry meanwhile.
                log.exception("could not persist the expiry of cell %s", record.id)

    def execute_once(self, tenant: Tenant, template: str, code: bytes, is_text: bool, stdin: bytes | None,
                     timeout_ms: int | None, memory_mb: int | None, on_chunk: ChunkCallback | None = None,
                     on_result: Callable[[int, dict[str, Any]], None] | None = None,
                     run_envs: dict[str, str] | None = None) -> dict[str, Any]:
        """A run in a throw-away session. ``run_envs`` (validate.run_envs) are
        set for this run over the session's own environment, as an exec's are
        over its cell's (worker.run_prepared): a name given replaces the default
        of that name (HOME, TMPDIR, ...), the others stay."""
        if run_envs and not templates.get(template).interpreter:  # T-ENV-1: as exec_in_cell refuses them
            raise BadRequest("envs: a wasm module gets no environment variables", code="invalid_field")
        if stdin and "javascript" in templates.get(template).languages:
            # A JavaScript session's stdin carries the host's commands; a run's
            # data there would be read as one (sessions.py, JS_FOREIGN_READ).
            raise BadRequest("stdin: a JavaScript run reads no stdin; pass the data in the code or in a file",
                             code="invalid_field")
        self.check_memory(memory_mb or self.settings.memory_mb)
        handle = self.pool.pick_for_run(tenant.id)  # T-TENANT-1: only a worker bound to this tenant
        # T-DISK-1: a throw-away volume is not charged to the tenant, but while the run
        # lasts it may hold no more than the tenant's whole quota and file limit.
        msg = self._exec_request(tenant, template, code, is_text, timeout_ms, memory_mb or self.settings.memory_mb,
                                 on_chunk, stdin=stdin, quota_left=self.quota_bytes(),
                                 files_left=self.settings.tenant_file_limit,
                                 volume_limit=protocol.VolumeLimit(self.quota_bytes(), self.settings.tenant_file_limit))
        if run_envs:
            msg = dataclasses.replace(msg, run_envs=dict(run_envs))  # never logged: values may be secrets
        return self._run(handle, msg, tenant, None, on_chunk, on_result)

    def _exec_request(self, tenant: Tenant, template: str, code: bytes, is_text: bool, timeout_ms: int | None,
                      memory_mb: int, on_chunk: ChunkCallback | None, *, cell_id: str | None = None,
                      volume: str | None = None, envs: dict[str, str] | None = None, persistent: bool = True,
                      known_session: bool = False, quota_left: int | None = None, files_left: int | None = None,
                      volume_limit: protocol.VolumeLimit | None = None,
                      stdin: bytes | None = None, internet: bool = True) -> protocol.ExecRequest:
        """The one place a run request is built, for cells and one-shot runs alike."""
        egress = None
        # T-SSRF-1: a cell created with allow_internet_access=false runs without egress.
        if self.egress is not None and internet:
            egress = protocol.EgressSpec(enabled=bool(self.egress["enabled"]), allow_hosts=list(self.egress["allow_hosts"]),
                                         deny=list(self.egress["deny"]), hosts=self.egress.get("hosts"))
        return protocol.ExecRequest(
            0, template=template, code=code, is_text=is_text,
            timeout_ms=min(timeout_ms or self.settings.run_timeout_ms, self.settings.run_timeout_ceiling_ms),
            memory_mb=memory_mb, tenant_id=tenant.id, cell_id=cell_id, volume=volume, stream=on_chunk is not None,
            envs=dict(envs or {}), persistent=persistent, known_session=known_session, egress=egress,
            features=sorted(self.pro_features()), quota_left=quota_left, files_left=files_left,
            volume_limit=volume_limit, stdin=stdin)

    def _run(self, handle: Any, msg: protocol.ExecRequest, tenant: Tenant, cell_id: str | None,
             on_chunk: ChunkCallback | None,
             on_result: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        template, code, run_timeout_ms = msg.template, msg.code, msg.timeout_ms
        # The run's rich results as the client sees them: streamed ones the moment
        # they arrive, in order; the answer and its receipt list exactly these.
        shown: list[dict[str, Any]] = []

        def show(bundle: protocol.ResultBundle) -> None:
            result = {**bundle.data, "is_main_result": bundle.is_main_result}
            shown.append(result)
            if on_result is not None:
                on_result(len(shown) - 1, result)

        def take(_index: int, bundle: protocol.ResultBundle) -> None:
            show(bundle)

        started = time.perf_counter()
        execution_id = new_execution_id()
        guest_ms: float | None = None
        try:
            try:
                reply = self._call(handle, msg, run_timeout_ms / 1000, on_chunk, tenant=tenant.id, cell_id=cell_id,
                                   on_result=take)
            except WorkerReplaced:
                if cell_id is not None and templates.get(template).interpreter:
                    # T-IMAGE-2: its worker was gone before the run was sent (nothing
                    # ran); with a capture, the run goes to a new worker that restores it.
                    handle = self._rebind_restoring(tenant, cell_id, template)
                    if handle is None:
                        with self._lock:
                            self._lost.discard(cell_id)
                        raise Conflict("the worker holding this cell's interpreter was replaced; its variables are "
                                       "gone, its files are kept. The next run starts a fresh interpreter.",
                                       code="cell_lost") from None
                    msg = dataclasses.replace(msg, restore=True, known_session=False)
                else:
                    handle = self.pool.pick_for_run(tenant.id)  # nothing ran: safe to send once more
                reply = self._call(handle, msg, run_timeout_ms / 1000, on_chunk, tenant=tenant.id, cell_id=cell_id,
                                   on_result=take)
        except WorkerLost as e:
            overran = isinstance(e, WorkerOverran)
            outcome: dict[str, Any] = {"exit_code": -1, "status": "timeout" if overran else "killed", "stdout": "", "stderr": "",
                       "truncated": False, "restarted": False, "note": str(e), "denials": [],
                       "results": shown, "results_truncated": bool(shown)}
            if cell_id is not None:
                self._lost_in_run(tenant.id, cell_id, template, outcome)
        else:
            if not isinstance(reply, protocol.RunReply):
                raise _refusal(reply, "run failed")
            outcome = _outcome_fields(reply.outcome)
            # Rich results as the answer carries them: each bundle's MIME keys and is_main_result.
            # A streamed run sent them one by one (above); any in the reply come after, in order.
            for bundle in reply.outcome.results:
                show(bundle)
            outcome["results"] = shown
            guest_ms = reply.guest_ms
            if cell_id is not None:
                self._note_run_usage(tenant.id, cell_id, template, _usage(reply.volume_usage))
                self._count_run(cell_id, outcome)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self.runs += 1
        receipt = self.receipts.append(
            execution_id=execution_id, tenant_id=tenant.id, cell_id=cell_id, template=template,
            code_hash=v1.code_hash(code),
            result_hash=v1.result_hash(exit_code=outcome["exit_code"], status=outcome["status"],
                                       stderr=outcome["stderr"], stdout=outcome["stdout"]),
            timestamp_ms=now_ms(),
            # The results are signed in a versioned extension; result_hash above stays the v1 one.
            extensions=envelope.results_extension(outcome.get("results") or []),
        )
        answer = {
            "execution_id": execution_id,
            "stdout": outcome["stdout"],
            "stderr": outcome["stderr"],
            "exit_code": outcome["exit_code"],
            "status": outcome["status"],
            "latency_ms": latency_ms,
            "truncated": outcome["truncated"],
            "results": outcome.get("results") or [],
            "receipt": receipt,
        }
        if outcome.get("results_truncated"):
            answer["results_truncated"] = True
        if cell_id is not None:
            answer["cell_id"] = cell_id
            answer["restarted"] = bool(outcome.get("restarted"))
        if outcome.get("note"):
            answer["note"] = outcome["note"]
        if outcome.get("denials"):
            answer["denials"] = outcome["denials"]
        if outcome.get("restored"):
            answer["restored"] = True  # the interpreter came back from the cell's snapshot (T-IMAGE-2)
        if outcome.get("rolled_back"):
            answer["rolled_back"] = True  # the run crashed it; back to the capture from before the run (T-IMAGE-2)
        if outcome.get("cancelled"):
            answer["cell_deleted"] = True  # stopped by DELETE of its cell (E2B: kill() during run_code)
        event = {"execution_id": execution_id, "tenant_id": tenant.id, "cell_id": cell_id, "template": template,
                 "status": outcome["status"], "exit_code": outcome["exit_code"], "latency_ms": latency_ms,
                 "guest_ms": guest_ms,
                 "code_bytes": len(code), "stdout_bytes": len(outcome["stdout"]), "stderr_bytes": len(outcome["stderr"]),
                 "truncated": outcome["truncated"], "denials": outcome.get("denials") or [], "receipt_seq": receipt.get("seq")}
        for observe in self.observers:
            try:
                observe(event)
            except Exception:
                pass  # an observer must never fail a run that already has its receipt
        return answer


def _log_not_kept(record: CellRecord, reason: str) -> None:
    """One line per capture given up for the quota (T-DISK-1), with the check's own reason."""
    log.info("cell %s: its capture was not kept: it would put tenant %s over its disk quota (%s)",
             record.id, record.tenant_id, reason)


def _refusal(reply: protocol.Reply, default: str) -> CellError:
    """A worker's refusal as the client's error; any other answer is a bug."""
    if isinstance(reply, protocol.ErrorReply):
        return CellError(reply.message or default, code=reply.code).with_status(reply.status)
    return CellError(f"{default}: the worker answered {type(reply).__name__}", code="internal")


def _behind_words(behind: int | None, lead: str) -> str:
    """How old the capture a cell is restored from is, in runs (T-IMAGE-2)."""
    if behind is None:
        return (f"{lead} its last capture, which may be older than its last run (how much older is not known to "
                "this process): variables set since are gone (files are kept)")
    runs = "run" if behind == 1 else f"{behind} runs"
    return (f"{lead} its last capture, taken before its last {runs} that completed: what "
            f"{'that run' if behind == 1 else 'those runs'} did to its variables is gone (files are kept)")


_OUTCOME_FIELDS = tuple(f.name for f in fields(protocol.RunOutcome))


def _outcome_fields(outcome: protocol.RunOutcome) -> dict[str, Any]:
    """A run's outcome as a dict, as ``dataclasses.asdict`` gives it but without
    its recursive deep copy (a hot-path cost): the fields are plain values, the
    denials are copied one level (string to string), and ``results`` is left
    for the caller, which replaces it with the bundles as the client sees them."""
    out = {name: getattr(outcome, name) for name in _OUTCOME_FIELDS}
    out["denials"] = [dict(d) for d in outcome.denials]
    out["results"] = []
    return out


def _remove_tmp(tmp_root: Path, tenant_id: str, cell_id: str) -> None:
    """Remove a deleted cell's /tmp (``<volumes>/.tmp/<tenant>/<cell>``, scratch.py)
    as its volume is removed, from the root down by descriptors, no link
    followed (T-DOS-1, T-PATH-2); the start-up sweep removes orphans the same
    way. Nothing there is fine; ConfinementError when it is left in place."""
    try:
        remove_volume(tmp_root, tenant_id, cell_id)
    except OSError:  # e.g. no /tmp root yet; anything else that leaves it there is a failure
        if os.path.lexists(os.path.join(tmp_root, tenant_id, cell_id)):
            raise ConfinementError("io", "the cell's /tmp could not be removed") from None


def _keeps_snapshot(msg: protocol.Request, reply: protocol.Reply) -> bool:
    """True when the worker cannot have written or removed the cell's snapshot
    file in answering ``msg`` (T-DISK-1): a run answered with its interpreter
    alive, neither restored nor rolled back. A worker writes the file only in
    a capture, and removes it in a run only when a restore refuses it (an
    error answer) or a roll-back drops a capture that is behind (the
    interpreter not alive); a restore that succeeds reads it and keeps it.
    Anything else may have changed it."""
    if not isinstance(msg, protocol.ExecRequest) or not isinstance(reply, protocol.RunReply):
        return False
    outcome = reply.outcome
    return outcome.session_alive and not outcome.restored and not outcome.rolled_back


def _usage(reported: protocol.VolumeUsage | None) -> Usage | None:
    """A worker's walk of a volume; a failed or missing one counts as over quota (T-DISK-1)."""
    if reported is None or not reported.measured:
        return None
    return Usage(reported.bytes, reported.entries, reported.complete)
