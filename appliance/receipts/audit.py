"""Live, incremental check of this node's receipt chain, for ``GET /v1/receipts/verify``.

Before, every call re-walked the whole chain (one Ed25519 check per row) on
the request thread, uncached, and answered with the node-wide count and the
first bad row's execution_id, whoever owned it. Now (threats T-DOS-2 and
T-TENANT-1):

* one thread of its own walks the chain; request threads only read the
  result, and at most ``MAX_WAITERS`` of them wait (``WAIT_S`` at most) for it
  to catch up with the tail — the others answer at once from the cache;
* the walk is incremental: each row is checked once per process. At start it
  resumes from the latest signed checkpoint: rows that checkpoint covers are
  checked by hash (v1 receipt hash, chain link, RFC 6962 tree head equal to the
  signed one) without a signature check each, rows after it fully, signature
  included. ``rows_checked`` and ``signatures_checked`` count the work
  (exported as metrics), so "a second call checks only new rows" is visible;
* a tenant is told about its own receipts only (``tenant_status``): how many
  are verified, how many not yet, and whether the log is broken — with the
  seq and execution_id of the first bad row only when that row is its own.

The thorough check — every signature, duplicate ids, every checkpoint — stays
``cell receipts verify --db`` / ``ReceiptStore.verify()`` for the operator.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterable

import nacl.signing

from appliance.receipts import verify as _verify
from appliance.receipts.store import ReceiptStore

log = logging.getLogger(__name__)

# T-DOS-2: per-tenant budget for the verify endpoint (on top of the request limiter).
VERIFY_RATE_PER_S = 0.5
VERIFY_BURST = 5
# T-DOS-2: request threads that may wait for the auditor at once, and for how long.
MAX_WAITERS = 2
WAIT_S = 2.0
BATCH = 500
# Problems about the log's signed heads rather than one row: nobody's own.
_HEAD_KINDS = frozenset({"checkpoint_mismatch", "bad_checkpoint", "bad_checkpoint_signature", "truncated",
                         "not_append_only"})


def _no_lookahead() -> Iterable[int]:
    return ()


class ReceiptAuditor:
    def __init__(self, store: ReceiptStore, *, batch: int = BATCH, max_waiters: int = MAX_WAITERS,
                 wait_s: float = WAIT_S) -> None:
        self._store = store
        self._batch = batch
        self._wait_s = wait_s
        self._waiters = threading.BoundedSemaphore(max_waiters)
        self._cond = threading.Condition()
        # Shared with request threads, guarded by _cond:
        self._target = 0  # the worker walks until its log reaches this seq
        self._walked = 0  # rows the worker has walked (published or not)
        self._verified = 0  # rows 1.._verified are checked and published
        self._own: dict[str, int] = {}  # tenant -> its rows among 1.._verified
        self._problem: dict[str, Any] | None = None  # the first failure; the walk stops there
        self._closed = False
        self._thread: threading.Thread | None = None
        self.rows_checked = 0
        self.signatures_checked = 0
        # The worker's own state (only its thread touches these):
        self._log: _verify.ChainWalker | None = None
        self._trusted_through = 0  # rows the start-up checkpoint vouches for
        self._cp_count = 0  # highest checkpoint count handed to the log
        self._staged: dict[str, int] = {}  # per-tenant rows walked but not yet published
        self._rows = 0  # rows handed to the log so far
        self._current: dict[str, Any] = {}  # the row being checked (names a failure)

    # -- request side ------------------------------------------------------------

    def tenant_status(self, tenant_id: str) -> dict[str, Any]:
        """This tenant's view: its own receipts only (T-TENANT-1), from the cache (T-DOS-2)."""
        tail = self._store.count()
        self._want(tail)
        if self._waiters.acquire(blocking=False):  # T-DOS-2: a bounded number of threads wait, briefly
            try:
                with self._cond:
                    self._cond.wait_for(lambda: self._verified >= tail or self._problem is not None
                                        or self._target < tail or self._closed, timeout=self._wait_s)
            finally:
                self._waiters.release()
        with self._cond:
            through, verified, problem = self._verified, self._own.get(tenant_id, 0), self._problem
        unverified = self._store.tenant_count(tenant_id, after=through)
        status = "failed" if problem is not None else ("verified" if unverified == 0 else "pending")
        answer: dict[str, Any] = {"ok": status == "verified", "status": status, "receipts": verified + unverified,
                                  "verified": verified, "unverified": unverified, "first_problem": None}
        if problem is not None:
            # The log is broken for everyone; which row, only if it is this tenant's (T-TENANT-1).
            mine = problem["tenant_id"] == tenant_id
            answer["first_problem"] = {"kind": problem["kind"], "yours": mine}
            if mine:
                answer["first_problem"].update(seq=problem["seq"], execution_id=problem["execution_id"])
        return answer

    def stats(self) -> dict[str, int]:
        """Operator figures (metrics): node-wide, never shown to a tenant."""
        with self._cond:
            return {"verified_through": self._verified, "rows_checked": self.rows_checked,
                    "signatures_checked": self.signatures_checked, "failed": int(self._problem is not None)}

    def catch_up(self, timeout: float) -> bool:
        """Ask for the current tail and wait for it (tests, operator tools); True if reached."""
        tail = self._store.count()
        self._want(tail)
        with self._cond:
            return self._cond.wait_for(lambda: self._verified >= tail or self._problem is not None, timeout=timeout)

    def _want(self, tail: int) -> None:
        with self._cond:
            if self._closed:
                return
            if tail > self._target:
                self._target = tail
                self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="receipt-audit", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    # -- the auditor's thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._problem is None and self._walked < self._target))
                if self._closed:
                    return
                target = self._target
            try:
                self._catch_up(target)
            except Exception:  # a read error: give this round up, the next request retries
                log.exception("receipt audit could not read the log")
                with self._cond:
                    self._target = self._walked
                    self._cond.notify_all()

    def _start(self) -> _verify.ChainWalker:
        keys = {kid: nacl.signing.VerifyKey(bytes.fromhex(pk)) for kid, pk in self._store.public_keys().items()}
        walker = _verify.ChainWalker(keys, [], track_ids=False)
        self._log = walker
        return walker

    def _add_checkpoints(self, walker: _verify.ChainWalker) -> None:
        fresh = [cp for cp in self._store.checkpoints_after(self._cp_count) if cp["count"] > walker.count]
        if fresh:
            self._cp_count = max(cp["count"] for cp in fresh)
            walker.add_checkpoints([(f"checkpoint at {cp['count']}", cp) for cp in fresh])  # signatures checked here

    def _catch_up(self, target: int) -> None:
        first = self._log is None
        walker = self._log or self._start()
        try:
            self._add_checkpoints(walker)
            if first:
                # Resume from the latest signed checkpoint: its tree head vouches for the rows it counts.
                self._trusted_through = self._cp_count
            while walker.count < target:
                rows = self._store.rows_after(walker.count, self._batch)
                if not rows:
                    break
                for r in rows:
                    self._current = r
                    self._rows += 1
                    walker.add(r, None, _no_lookahead, check_signature=r["seq"] > self._trusted_through)
                    tenant = str(r.get("tenant_id"))
                    self._staged[tenant] = self._staged.get(tenant, 0) + 1
                self._publish(walker)
            if walker.pending and not self._store.rows_after(walker.count, 1):
                # T-RCPT-1: a signed checkpoint counts rows the log no longer has.
                self._fail(walker, _verify.Problem("truncated", "a signed checkpoint counts more receipts than the log holds"))
                return
        except _verify.VerificationFailed as failed:
            self._fail(walker, failed.problem)
            return
        with self._cond:
            if self._walked < target:  # fewer rows than the count said (read in between): wait for the next ask
                self._target = self._walked
            self._cond.notify_all()

    def _publish(self, walker: _verify.ChainWalker) -> None:
        with self._cond:
            self.rows_checked = self._rows
            self.signatures_checked = walker.signatures
            self._walked = walker.count
            # Rows under the start-up checkpoint count only once its tree head matched.
            if walker.count >= self._trusted_through:
                for tenant, n in self._staged.items():
                    self._own[tenant] = self._own.get(tenant, 0) + n
                self._staged.clear()
                self._verified = walker.count
            self._cond.notify_all()

    def _fail(self, walker: _verify.ChainWalker, problem: _verify.Problem) -> None:
        row = self._current
        own_row = problem.kind not in _HEAD_KINDS and problem.seq is not None and problem.seq == row.get("seq")
        log.error("receipt audit: %s", problem)
        with self._cond:
            self.rows_checked = self._rows
            # Rows before a bad row are still good; a tree head that does not match vouches for none.
            if problem.kind not in _HEAD_KINDS and walker.count >= self._trusted_through:
                for tenant, n in self._staged.items():
                    self._own[tenant] = self._own.get(tenant, 0) + n
                self._verified = walker.count
            self._staged.clear()
            self.signatures_checked = walker.signatures
            self._walked = walker.count
            self._problem = {"kind": problem.kind, "seq": problem.seq if own_row else None,
                             "tenant_id": row.get("tenant_id") if own_row else None,
                             "execution_id": row.get("execution_id") if own_row else None}
            self._cond.notify_all()
