"""Cells: the service behind the v1 API (no Flask here).

Owns the mapping of cells to worker processes, runs code through the pool,
and writes the receipt of every run before the answer leaves (DESIGN §7).
"""
from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

from appliance.config import Settings
from appliance.errors import BadRequest, CellError, Conflict, Forbidden, NotFound, PayloadTooLarge
from appliance.receipts import v1
from appliance.receipts.store import ReceiptStore
from appliance.runtime import protocol, scratch, templates
from appliance.runtime.pool import ChunkCallback, WorkerLost, WorkerPool, WorkerReplaced
from appliance.storage import CellRecord, Store, Tenant

log = logging.getLogger("cell.cells")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Binding:
    worker: int
    generation: int


class CellService:
    def __init__(self, settings: Settings, store: Store, pool: WorkerPool, receipts: ReceiptStore,
                 egress: dict[str, Any] | None = None, pro_allowed: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool
        self.receipts = receipts
        self.egress = egress
        self.pro_allowed = pro_allowed
        self._bindings: dict[str, Binding] = {}
        # After a restart no interpreter state survives: each persistent cell
        # says so once (409 cell_lost), exactly as after a worker was replaced.
        self._lost: set[str] = {c.id for c in store.list_cells() if templates.get(c.template).interpreter}
        self._records: dict[str, CellRecord] = {}  # cells this process has looked up (it is their only writer)
        self._lock = threading.Lock()
        self._expiry: dict[str, tuple[int, int]] = {}  # cell -> (expires_at, when written to the DB)
        self.runs = 0
        self._usage: dict[str, tuple[str, int]] = {}  # cell -> (tenant, bytes in its volume as last measured)
        self._usage_loaded: set[str] = set()  # tenants whose every cell has been measured once
        # (rate, max_cells, max_memory_mb) in force; the service wires the license in.
        self.limits: Callable[[], tuple[float, int, int]] = lambda: (
            settings.rate_limit_rps, settings.max_cells_per_worker * settings.workers, settings.memory_ceiling_mb)
        # Called after every run with a summary (no code, no output): metrics, logs.
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    # -- helpers ---------------------------------------------------------
    def volume_path(self, tenant_id: str, cell_id: str) -> str:
        return str(self.settings.volumes_dir / tenant_id / cell_id)

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
        ceiling = self.limits()[2]
        if memory_mb > ceiling:
            raise BadRequest(f"memory_mb {memory_mb} is above the {ceiling} MB allowed by this appliance's license and "
                             "configuration", code="out_of_range")

    def create(self, tenant: Tenant, template: str, timeout_ms: int, persistent: bool, metadata: dict[str, str],
               envs: dict[str, str], memory_mb: int) -> CellRecord:
        self.check_memory(memory_mb)
        max_cells = self.limits()[1]
        if self.store.count_all_cells() >= max_cells:
            raise Forbidden(f"this appliance already runs its maximum of {max_cells} cells (license and configuration); "
                            "delete a cell or raise the limit", code="cell_limit")
        created = now_ms()
        record = CellRecord(self.new_cell_id(), tenant.id, template, created, timeout_ms, created + timeout_ms,
                            persistent, metadata, envs, memory_mb)
        volume = self.volume_path(tenant.id, record.id)
        if templates.get(template).interpreter:
            handle = self.pool.pick_for_cell()
            bind = protocol.BindRequest(0, cell_id=record.id, template=template, volume=volume, envs=dict(envs), memory_mb=memory_mb)
            reply = self._call(handle, bind, None)
            if not isinstance(reply, protocol.OkReply):
                raise _refusal(reply, "could not start the cell")
            self.pool.assign(handle, record.id)
            with self._lock:
                self._bindings[record.id] = Binding(handle.index, handle.generation)
        else:
            from appliance.confine import create_volume

            create_volume(self.settings.volumes_dir, tenant.id, record.id)
        with self._lock:
            self._usage[record.id] = (tenant.id, 0)
        try:
            self.store.add_cell(record)
            with self._lock:
                self._records[record.id] = record
        except Exception:
            self._drop(record)  # no session or volume may outlive a cell that was never recorded
            raise
        return record

    def delete(self, tenant: Tenant, cell_id: str) -> None:
        record = self.cell(tenant, cell_id)
        self._drop(record)

    def _drop(self, record: CellRecord) -> None:
        with self._lock:
            binding = self._bindings.pop(record.id, None)
            self._lost.discard(record.id)
            self._expiry.pop(record.id, None)
            self._usage.pop(record.id, None)
            self._records.pop(record.id, None)
        if binding is not None:
            self.pool.release(binding.worker, record.id)
            handle = self.pool.worker(binding.worker)
            if handle.generation == binding.generation:
                try:
                    self._call(handle, protocol.DropRequest(0, cell_id=record.id), None)
                except (WorkerLost, CellError):
                    pass
        self.store.delete_cell(record.id)
        shutil.rmtree(self.volume_path(record.tenant_id, record.id), ignore_errors=True)
        scratch.remove_tmp_dir(self.volume_path(record.tenant_id, record.id))  # the cell's /tmp goes with it

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
            self._drop(record)
            dropped += 1
        return dropped

    # -- disk quota (T-DOS-1) ------------------------------------------------
    def quota_bytes(self) -> int:
        return self.settings.tenant_quota_mb * 1024 * 1024

    def cell_usage(self, record: CellRecord) -> int:
        with self._lock:
            known = self._usage.get(record.id)
        if known is not None:
            return known[1]
        from appliance.confine import ConfinementError, open_volume

        try:
            with open_volume(self.settings.volumes_dir, record.tenant_id, record.id) as vol:
                used = vol.usage_bytes()
            used += scratch.tmp_usage(self.volume_path(record.tenant_id, record.id))  # its /tmp counts too
        except (ConfinementError, OSError):
            used = 0
        with self._lock:
            self._usage[record.id] = (record.tenant_id, used)
        return used

    def tenant_usage(self, tenant: Tenant) -> int:
        """Sum of the tenant's volumes, from memory (each cell measured once, then
        after every run or file change): no disk walk on the hot path."""
        with self._lock:
            loaded = tenant.id in self._usage_loaded
        if not loaded:
            for record in self.store.list_cells(tenant.id):
                self.cell_usage(record)
            with self._lock:
                self._usage_loaded.add(tenant.id)
        with self._lock:
            return sum(used for owner, used in self._usage.values() if owner == tenant.id)

    def plus_tmp(self, tenant_id: str, cell_id: str, data_bytes: int) -> int | None:
        """A cell's /data bytes plus its /tmp (scratch.py); None when /tmp cannot be measured."""
        from appliance.confine import ConfinementError

        try:
            return data_bytes + scratch.tmp_usage(self.volume_path(tenant_id, cell_id))
        except (ConfinementError, OSError):
            return None

    def note_usage(self, tenant_id: str, cell_id: str, used: int | None) -> None:
        if used is not None:
            with self._lock:
                self._usage[cell_id] = (tenant_id, used)

    def check_quota(self, tenant: Tenant, adding: int = 0) -> int:
        """Bytes the tenant may still add; refuses when it is already over."""
        left = self.quota_bytes() - self.tenant_usage(tenant)
        if left < adding or left < 0:
            raise PayloadTooLarge(f"tenant disk quota of {self.settings.tenant_quota_mb} MB exceeded; delete files to continue",
                                  code="quota_exceeded")
        return left

    # -- runs ------------------------------------------------------------
    def _call(self, handle: Any, msg: protocol.Request, deadline_s: float | None,
              on_chunk: ChunkCallback | None = None) -> protocol.Reply:
        try:
            return self.pool.call(handle, msg, deadline_s=deadline_s, on_chunk=on_chunk)
        except WorkerLost:
            self._mark_lost(handle.index)
            raise

    def _mark_lost(self, index: int) -> None:
        with self._lock:
            for cell_id, binding in list(self._bindings.items()):
                if binding.worker == index and binding.generation != self.pool.generation_of(index):
                    self._lost.add(cell_id)
                    del self._bindings[cell_id]

    def exec_in_cell(self, tenant: Tenant, cell_id: str, code: bytes, is_text: bool, language: str | None,
                     on_chunk: ChunkCallback | None = None, timeout_ms: int | None = None) -> dict[str, Any]:
        record = self.cell(tenant, cell_id)
        tmpl = templates.get(record.template)
        if language is not None and language not in tmpl.languages:
            raise BadRequest(f"this cell runs {record.template}, not {language!r}", code="language_mismatch")
        with self._lock:
            if cell_id in self._lost:
                # State is gone with the worker that held it; say so once.
                self._lost.discard(cell_id)
                lost = True
            else:
                lost = False
            binding = self._bindings.get(cell_id)
        if lost:
            raise Conflict("the worker holding this cell's interpreter was replaced; its variables are gone, its files are kept. "
                           "The next run starts a fresh interpreter.", code="cell_lost")
        if binding is None or self.pool.generation_of(binding.worker) != binding.generation:
            handle = self.pool.pick_for_cell() if tmpl.interpreter else self.pool.pick_for_run()
            if tmpl.interpreter:
                self.pool.assign(handle, cell_id)
                with self._lock:
                    self._bindings[cell_id] = Binding(handle.index, handle.generation)
        else:
            handle = self.pool.worker(binding.worker)
        msg = self._exec_request(
            tenant, record.template, code, is_text, timeout_ms, record.memory_mb, on_chunk,
            cell_id=cell_id if tmpl.interpreter else None, volume=self.volume_path(tenant.id, cell_id),
            envs=record.envs, persistent=record.persistent, known_session=binding is not None,
            quota_left=self.check_quota(tenant))
        answer = self._run(handle, msg, tenant, cell_id, on_chunk)
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
                     timeout_ms: int | None, memory_mb: int | None, on_chunk: ChunkCallback | None = None) -> dict[str, Any]:
        self.check_memory(memory_mb or self.settings.memory_mb)
        handle = self.pool.pick_for_run()
        msg = self._exec_request(tenant, template, code, is_text, timeout_ms, memory_mb or self.settings.memory_mb,
                                 on_chunk, stdin=stdin)
        return self._run(handle, msg, tenant, None, on_chunk)

    def _exec_request(self, tenant: Tenant, template: str, code: bytes, is_text: bool, timeout_ms: int | None,
                      memory_mb: int, on_chunk: ChunkCallback | None, *, cell_id: str | None = None,
                      volume: str | None = None, envs: dict[str, str] | None = None, persistent: bool = True,
                      known_session: bool = False, quota_left: int | None = None,
                      stdin: bytes | None = None) -> protocol.ExecRequest:
        """The one place a run request is built, for cells and one-shot runs alike."""
        egress = None
        if self.egress is not None:
            egress = protocol.EgressSpec(enabled=bool(self.egress["enabled"]), allow_hosts=list(self.egress["allow_hosts"]),
                                         hosts=self.egress.get("hosts"))
        return protocol.ExecRequest(
            0, template=template, code=code, is_text=is_text,
            timeout_ms=min(timeout_ms or self.settings.run_timeout_ms, self.settings.run_timeout_ceiling_ms),
            memory_mb=memory_mb, tenant_id=tenant.id, cell_id=cell_id, volume=volume, stream=on_chunk is not None,
            envs=dict(envs or {}), persistent=persistent, known_session=known_session, egress=egress,
            pro=self.pro_allowed(), quota_left=quota_left, stdin=stdin)

    def _run(self, handle: Any, msg: protocol.ExecRequest, tenant: Tenant, cell_id: str | None,
             on_chunk: ChunkCallback | None) -> dict[str, Any]:
        template, code, run_timeout_ms = msg.template, msg.code, msg.timeout_ms
        started = time.perf_counter()
        execution_id = str(uuid.uuid4())
        guest_ms: float | None = None
        try:
            try:
                reply = self._call(handle, msg, run_timeout_ms / 1000, on_chunk)
            except WorkerReplaced:
                if cell_id is not None and templates.get(template).interpreter:
                    with self._lock:
                        self._lost.discard(cell_id)
                    raise Conflict("the worker holding this cell's interpreter was replaced; its variables are gone, "
                                   "its files are kept. The next run starts a fresh interpreter.", code="cell_lost") from None
                handle = self.pool.pick_for_run()  # nothing ran: safe to send once more
                reply = self._call(handle, msg, run_timeout_ms / 1000, on_chunk)
        except WorkerLost as e:
            overran = "deadline" in str(e)
            outcome: dict[str, Any] = {"exit_code": -1, "status": "timeout" if overran else "killed", "stdout": "", "stderr": "",
                       "truncated": False, "restarted": False, "note": str(e), "denials": []}
            if cell_id is not None:
                with self._lock:
                    self._lost.discard(cell_id)  # this answer already says the state is gone
        else:
            if not isinstance(reply, protocol.RunReply):
                raise _refusal(reply, "run failed")
            outcome = asdict(reply.outcome)
            guest_ms = reply.guest_ms
            if cell_id is not None:
                self.note_usage(tenant.id, cell_id, reply.volume_bytes)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self.runs += 1
        receipt = self.receipts.append(
            execution_id=execution_id, tenant_id=tenant.id, cell_id=cell_id, template=template,
            code_hash=v1.code_hash(code),
            result_hash=v1.result_hash(exit_code=outcome["exit_code"], status=outcome["status"],
                                       stderr=outcome["stderr"], stdout=outcome["stdout"]),
            timestamp_ms=now_ms(),
        )
        answer = {
            "execution_id": execution_id,
            "stdout": outcome["stdout"],
            "stderr": outcome["stderr"],
            "exit_code": outcome["exit_code"],
            "status": outcome["status"],
            "latency_ms": latency_ms,
            "truncated": outcome["truncated"],
            "receipt": receipt,
        }
        if cell_id is not None:
            answer["cell_id"] = cell_id
            answer["restarted"] = bool(outcome.get("restarted"))
        if outcome.get("note"):
            answer["note"] = outcome["note"]
        if outcome.get("denials"):
            answer["denials"] = outcome["denials"]
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


def _refusal(reply: protocol.Reply, default: str) -> CellError:
    """A worker's refusal as the client's error; any other answer is a bug."""
    if isinstance(reply, protocol.ErrorReply):
        return CellError(reply.message or default, code=reply.code).with_status(reply.status)
    return CellError(f"{default}: the worker answered {type(reply).__name__}", code="internal")
