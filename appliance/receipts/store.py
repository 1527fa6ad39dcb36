"""Durable, append-only, hash-chained receipt log in the node database.

One writer connection behind a lock this store owns; each append is one
``BEGIN IMMEDIATE`` transaction (read tail, insert, commit) so neither two
threads nor two processes can extend the same tail (threat T-RCPT-1: a
forked or broken chain). WAL with ``synchronous=FULL``: when ``append``
returns, the receipt survives a power cut, so the run's answer may be sent.
Readers use their own read-only connections and never wait for the writer.
"""
from __future__ import annotations

import base64
import logging
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping

from appliance.receipts import envelope, merkle, v1
from appliance.receipts import verify as _verify
from appliance.receipts.nodekey import NodeKey

if TYPE_CHECKING:  # start-up: sqlite_utils loads only when a migration is pending (_migrated)
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

log = logging.getLogger(__name__)

EXPORT_FORMAT = _verify.EXPORT_FORMAT
RECEIPT_FIELDS = _verify.RECEIPT_FIELDS
# A receipt as stored, exported and answered: the v1 fields plus what the
# signed envelope binds (tenant_id, the envelope version, extensions).
ROW_FIELDS = (*RECEIPT_FIELDS, *_verify.BINDING_FIELDS)
_COLUMNS = ", ".join(ROW_FIELDS)
_INSERT_RECEIPT = f"INSERT INTO receipts ({_COLUMNS}) VALUES ({', '.join('?' * len(ROW_FIELDS))})"
# One receipt on a tail this store wrote last, in one autocommit statement: the
# row goes in only if that tail is still the last row (seq and chain hash), read
# and written under the same write lock, so it can never fork the chain (T-RCPT-1).
# Else nothing is written and the full transaction (tail read, insert) is used.
_INSERT_ON_TAIL = (f"INSERT INTO receipts ({_COLUMNS}) SELECT {', '.join('?' * len(ROW_FIELDS))} "
                   "WHERE (SELECT MAX(seq) FROM receipts) = ? AND (SELECT chain_hash FROM receipts WHERE seq = ?) = ?")
_CHECKPOINT_FIELDS = ("count", "root_hash", "timestamp", "key_id", "signature")
BUSY_TIMEOUT_S = 30.0
# WAL upkeep off the answering thread: the writer connection never checkpoints
# on its own (wal_autocheckpoint=0, SQLite's default would run one inside the
# COMMIT of whichever run crosses 1,000 WAL pages). Every WAL_WAKE_RECEIPTS
# receipts (~6.6 pages each: under SQLite's 1,000-page default, so the other
# connections on this file seldom cross it either) the maintenance thread runs
# a PASSIVE checkpoint on its own connection. If that thread falls behind by
# WAL_WRITER_RECEIPTS receipts, the writer checkpoints itself once, so a stuck
# thread can never let the WAL grow without bound.
WAL_WAKE_RECEIPTS = 100
WAL_WRITER_RECEIPTS = 4000
# A background checkpoint races the writer, so under steady appends the WAL
# seldom restarts from the top by itself; once it holds this many frames
# (SQLite's own autocheckpoint default) the thread finishes the backfill under
# the writer lock (short: the frames written meanwhile) so the next commit restarts it.
WAL_RESTART_FRAMES = 1000


class DuplicateReceipt(ValueError):
    """An execution_id gets exactly one receipt."""


class StoreClosed(RuntimeError):
    pass


MIGRATION_SET = "cell.receipts"
# The names of _migrations()'s steps, in order (a test keeps the two equal).
MIGRATIONS = ("0001_receipts", "0002_checkpoints", "0003_receipt_keys", "0004_append_only_triggers",
              "0005_receipt_envelopes")


def _migrations() -> Migrations:
    """Small named steps, recorded under the "cell.receipts" set in _sqlite_migrations."""
    from sqlite_utils.migrations import Migrations  # start-up: see _migrated

    m = Migrations(MIGRATION_SET)

    @m(name="0001_receipts")
    def receipts(db: sqlite_utils.Database) -> None:
        # UNIQUE(prev_chain_hash): the database itself refuses two rows that
        # extend the same tail — a fork cannot be committed (T-RCPT-1).
        db.execute(
            """CREATE TABLE IF NOT EXISTS receipts (
                seq INTEGER PRIMARY KEY CHECK (seq >= 1),
                schema TEXT NOT NULL,
                execution_id TEXT NOT NULL UNIQUE,
                tenant_id TEXT NOT NULL,
                cell_id TEXT,
                template TEXT NOT NULL,
                code_hash TEXT NOT NULL CHECK (length(code_hash) = 64),
                result_hash TEXT NOT NULL CHECK (length(result_hash) = 64),
                timestamp INTEGER NOT NULL CHECK (timestamp >= 0),
                receipt_hash TEXT NOT NULL CHECK (length(receipt_hash) = 64),
                prev_chain_hash TEXT NOT NULL UNIQUE,
                chain_hash TEXT NOT NULL UNIQUE,
                signature TEXT NOT NULL,
                key_id TEXT NOT NULL
            )"""
        )
        db.execute("CREATE INDEX IF NOT EXISTS receipts_tenant_seq ON receipts (tenant_id, seq)")

    @m(name="0002_checkpoints")
    def checkpoints(db: sqlite_utils.Database) -> None:
        db.execute(
            """CREATE TABLE IF NOT EXISTS checkpoints (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                count INTEGER NOT NULL CHECK (count >= 0),
                root_hash TEXT NOT NULL,
                timestamp INTEGER NOT NULL,
                key_id TEXT NOT NULL,
                signature TEXT NOT NULL
            )"""
        )

    @m(name="0003_receipt_keys")
    def receipt_keys(db: sqlite_utils.Database) -> None:
        # Every key that ever signed here, so a verifier can follow a key rotation.
        db.execute(
            """CREATE TABLE IF NOT EXISTS receipt_keys (
                key_id TEXT PRIMARY KEY,
                public_key TEXT NOT NULL,
                first_used INTEGER NOT NULL
            )"""
        )

    @m(name="0004_append_only_triggers")
    def append_only(db: sqlite_utils.Database) -> None:
        # Defence in depth against an appliance bug rewriting history (T-RCPT-1);
        # someone with the file can drop these, which is what verify() is for.
        for table in ("receipts", "checkpoints"):
            for op in ("UPDATE", "DELETE"):
                db.execute(
                    f"""CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()}
                        BEFORE {op} ON {table}
                        BEGIN SELECT RAISE(ABORT, '{table} are append-only (T-RCPT-1)'); END"""
                )

    @m(name="0005_receipt_envelopes")
    def receipt_envelopes(db: sqlite_utils.Database) -> None:
        # T-RCPT-2: rows written from here on are signed over an envelope that
        # binds tenant_id and cell_id. Older rows keep NULL here: they were
        # signed over chain_hash alone, and the verifier says so.
        have = {row[1] for row in db.execute("PRAGMA table_info(receipts)").fetchall()}
        if "envelope" not in have:
            db.execute("ALTER TABLE receipts ADD COLUMN envelope TEXT")
        if "extensions" not in have:
            db.execute("ALTER TABLE receipts ADD COLUMN extensions TEXT")

    return m


def _migrated(conn: sqlite3.Connection) -> bool:
    """True when every step of _migrations() is recorded as sqlite_utils
    records it (in _sqlite_migrations, keyed by an ``id`` column), so a
    restart has nothing to apply and need not load sqlite_utils (start-up:
    ~50 ms of imports). Anything else, and the migrations run as before."""
    try:
        keys = [row[1] for row in conn.execute("PRAGMA table_info(_sqlite_migrations)") if row[5]]
        done = {row[0] for row in conn.execute("SELECT name FROM _sqlite_migrations WHERE migration_set = ?",
                                               (MIGRATION_SET,))}
    except sqlite3.Error:
        return False
    return keys == ["id"] and done.issuperset(MIGRATIONS)


def _done(slot: dict[str, Any]) -> None:
    """Wake the append waiting on ``slot`` (the leader's own slot has no event: it does not wait)."""
    done: threading.Event | None = slot.get("done")
    if done is not None:
        done.set()


def _connect(db_path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True,
                               timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    else:
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn


class ReceiptStore:
    def __init__(
        self,
        db_path: Path,
        key: NodeKey,
        *,
        checkpoint_every: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError("checkpoint_every must be a non-negative integer (0 disables)")
        self._path = Path(db_path)
        self._key = key
        self._checkpoint_every = checkpoint_every
        self._clock = clock
        self._lock = threading.Lock()  # the one writer (a lock the store owns)
        self._queue_lock = threading.Lock()  # group commit: appends waiting for the next transaction
        self._pending: list[dict[str, Any]] = []
        self._leading = False
        self._tail: tuple[int, str] | None = None  # (seq, chain_hash) of the last row this store committed
        self._frontier = merkle.Frontier()
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._closed = False
        # Maintenance (WAL checkpoint, due tree heads), off the run path. The
        # counters below are guarded by _queue_lock, which the group-commit
        # leader takes after every batch anyway.
        self._since_wal = 0  # receipts committed since the last WAL checkpoint was started
        self._head_due = 0  # the highest seq (a multiple of checkpoint_every) still owed a signed head
        self._wake = threading.Event()
        self._stopping = False
        self._maint_thread: threading.Thread | None = None
        self._maint_conn: sqlite3.Connection | None = None
        self._maint_lock = threading.Lock()  # the maintenance connection: one thread at a time
        self._start_checked = False
        self.wal_checkpoints = {"maintenance": 0, "writer": 0}  # PASSIVE checkpoints run, by whom
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect(self._path, read_only=False)
        # What sqlite_utils.Database(conn) and enable_wal() did here: recursive
        # triggers (a row REPLACE deletes fires the append-only DELETE trigger),
        # then WAL, set outside any transaction.
        self._conn.execute("PRAGMA recursive_triggers = on")
        if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._conn.execute("PRAGMA journal_mode = wal")
        # FULL: the WAL is fsynced at every commit — a receipt that was
        # answered is never lost to a power cut (issue: durable BEFORE the answer).
        self._conn.execute("PRAGMA synchronous = FULL")
        # The maintenance thread checkpoints the WAL, never a run's COMMIT (see WAL_WAKE_RECEIPTS).
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        def setup() -> None:
            if not _migrated(self._conn):
                import sqlite_utils  # start-up: only when a migration is pending (_migrated)

                _migrations().apply(sqlite_utils.Database(self._conn, execute_plugins=False))
            self._register_key()

        self._write(setup)

    # -- writer ---------------------------------------------------------------

    def _write(self, body: Callable[[], Any]) -> Any:
        """Run body in one BEGIN IMMEDIATE transaction, holding the writer lock."""
        with self._lock:
            if self._closed:
                raise StoreClosed("receipt store is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = body()
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            return result

    def _register_key(self) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO receipt_keys (key_id, public_key, first_used) VALUES (?, ?, ?)",
            (self._key.key_id, self._key.public_key_hex, int(self._clock() * 1000)),
        )

    def append(
        self,
        *,
        execution_id: str,
        tenant_id: str,
        cell_id: str | None,
        template: str,
        code_hash: str,
        result_hash: str,
        timestamp_ms: int,
        extensions: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one receipt; it is committed and fsynced when this returns.
        ``extensions`` (e.g. "results/1") are signed with the envelope; the v1
        hashes never see them."""
        # Validation happens before the lock: a bad field never costs the writer (T-RCPT-1).
        rh = v1.receipt_hash(execution_id=execution_id, code_hash=code_hash, result_hash=result_hash,
                             template=template, timestamp=timestamp_ms)
        # T-RCPT-2: both ids go into the signed envelope, so they are checked here.
        envelope.check_tenant_id(tenant_id)
        envelope.check_cell_id(cell_id)
        ext = envelope.check_extensions(dict(extensions or {}))

        receipt = self._commit_grouped({
            "execution_id": execution_id, "code_hash": code_hash, "result_hash": result_hash,
            "template": template, "timestamp": timestamp_ms, "receipt_hash": rh, "cell_id": cell_id,
            "tenant_id": tenant_id, "extensions": ext,
        })
        if self._checkpoint_every and receipt["seq"] % self._checkpoint_every == 0:
            # The run only notes that a head is owed; the maintenance thread signs it
            # (T-RCPT-1: the receipt itself is already chained, signed and durable).
            with self._queue_lock:
                self._head_due = max(self._head_due, receipt["seq"])
            self._wake_maintenance()
        return receipt

    def _commit_grouped(self, item: dict[str, Any]) -> dict[str, Any]:
        """Group commit: appends that arrive while a commit is in flight are
        written together in the next transaction, with one fsync for all of
        them. Each caller returns only once its own batch is durable, so the
        rule "receipt on disk before the answer" holds; the chain order is
        the commit order (T-RCPT-1).

        The thread that commits a batch commits only that one: the appends
        that queued meanwhile are handed, as the next batch, to the first of
        them, which wakes to commit it and wakes the others. A leader that
        went on committing until nobody queued kept its own (long answered)
        append waiting 200-740 ms under four busy threads."""
        slot: dict[str, Any] = {"item": item}
        with self._queue_lock:
            lead = not self._leading
            if lead:  # nothing is pending while no one leads: this receipt goes first
                self._leading = True
            else:  # only a follower waits, so only a follower needs an event (run path: one less per receipt)
                slot["done"] = threading.Event()
                self._pending.append(slot)
        if lead:
            batch: list[dict[str, Any]] | None = [slot]
        else:
            slot["done"].wait()
            batch = slot.pop("lead", None)  # set when this append is handed the next batch to commit
        if batch is not None:
            self._commit_batch(batch)  # never raises: each slot gets its receipt or its error
            with self._queue_lock:
                self._since_wal += len(batch)
                since_wal = self._since_wal
                queued, self._pending = self._pending, []
                if queued:
                    queued[0]["lead"] = queued  # the lead passes on; _leading stays set
                else:
                    self._leading = False
            try:
                self._note_wal(since_wal)  # before the hand-off: one committing thread at a time calls it
            finally:
                if queued:  # even if it raised: the queued appends must not wait forever
                    queued[0]["done"].set()
        if "error" in slot:
            raise slot["error"]
        result: dict[str, Any] = slot["receipt"]
        return result

    def _seal(self, seq: int, prev: str, it: dict[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...]]:
        """The receipt of ``it`` as row ``seq`` after chain hash ``prev``, signed,
        and its INSERT parameters."""
        rh, ext, key_id = it["receipt_hash"], it["extensions"], self._key.key_id
        ch = v1.chain_hash(prev, rh)
        # T-RCPT-2: sign the envelope (tenant, cell, chain hash), not the bare chain hash.
        signed = envelope.envelope_message(seq=seq, receipt_hash=rh, chain_hash=ch, tenant_id=it["tenant_id"],
                                           cell_id=it["cell_id"], key_id=key_id, extensions=ext)
        signature = base64.b64encode(self._key.sign(signed)).decode("ascii")
        receipt = {
            "schema": v1.SCHEMA, "execution_id": it["execution_id"], "code_hash": it["code_hash"],
            "result_hash": it["result_hash"], "template": it["template"], "timestamp": it["timestamp"],
            "receipt_hash": rh, "seq": seq, "prev_chain_hash": prev, "chain_hash": ch,
            "signature": signature, "key_id": key_id, "cell_id": it["cell_id"],
            "tenant_id": it["tenant_id"], "envelope": envelope.ENVELOPE, "extensions": ext,
        }
        # In ROW_FIELDS order (RECEIPT_FIELDS, then tenant_id, envelope, extensions as canonical JSON).
        params = (v1.SCHEMA, it["execution_id"], it["code_hash"], it["result_hash"], it["template"], it["timestamp"],
                  rh, seq, prev, ch, signature, key_id, it["cell_id"],
                  it["tenant_id"], envelope.ENVELOPE, envelope.extensions_json(ext))
        return receipt, params

    def _commit_on_tail(self, slot: dict[str, Any]) -> bool:
        """The usual case, one receipt after the last one this store wrote: one
        autocommit statement (FULL sync: durable when it returns) instead of four
        (BEGIN, tail read, INSERT, COMMIT), each of which lets go of the GIL.
        False when the tail is unknown or moved (another writer): nothing was
        written and the caller takes the full transaction."""
        it = slot["item"]
        with self._lock:
            if self._closed:
                raise StoreClosed("receipt store is closed")
            tail = self._tail
            if tail is None:
                return False
            receipt, params = self._seal(tail[0] + 1, tail[1], it)
            try:
                written = self._conn.execute(_INSERT_ON_TAIL, (*params, tail[0], tail[0], tail[1])).rowcount
            except sqlite3.IntegrityError as exc:
                if "execution_id" not in str(exc):
                    self._tail = None
                    return False
                slot["error"] = DuplicateReceipt(f"execution_id {it['execution_id']} already has a receipt")
                return True
            if written != 1:
                self._tail = None  # another writer extended the chain: read it again
                return False
            self._tail = (receipt["seq"], receipt["chain_hash"])
        slot["receipt"] = receipt
        return True

    def _commit_batch(self, batch: list[dict[str, Any]]) -> None:
        if len(batch) == 1:
            try:
                if self._commit_on_tail(batch[0]):
                    _done(batch[0])
                    return
            except BaseException as exc:
                batch[0].pop("receipt", None)
                batch[0].setdefault("error", exc)
                _done(batch[0])
                return
        last: list[tuple[int, str]] = []

        def body() -> list[dict[str, Any]]:
            # Tail read and inserts in one IMMEDIATE transaction: no other
            # thread or process can chain onto the same tail (T-RCPT-1 fork).
            tail = self._conn.execute("SELECT seq, chain_hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (tail[0], tail[1]) if tail else (0, v1.GENESIS)
            out: list[dict[str, Any]] = []
            # A failed INSERT backs out its own changes and leaves the transaction
            # and the items before it in place (SQLite's default ABORT; the schema
            # declares no other conflict resolution), so no savepoint is needed
            # around each item: two statements (and GIL round trips) less per item.
            for slot in batch:
                it = slot["item"]
                receipt, params = self._seal(seq + 1, prev, it)
                try:
                    self._conn.execute(_INSERT_RECEIPT, params)
                except sqlite3.IntegrityError as exc:
                    if not self._conn.in_transaction:
                        raise  # the transaction itself is gone: the whole batch fails (T-RCPT-1)
                    # Only this item fails (e.g. a duplicate execution_id); the rest of the batch goes on.
                    if "execution_id" in str(exc):
                        slot["error"] = DuplicateReceipt(f"execution_id {it['execution_id']} already has a receipt")
                    else:
                        slot["error"] = exc
                    continue
                seq, prev = seq + 1, receipt["chain_hash"]
                slot["receipt"] = receipt
                out.append(receipt)
            last.append((seq, prev))
            return out

        try:
            self._write(body)
            self._tail = last[-1]  # committed: the next single receipt chains onto it
        except BaseException as exc:  # the whole batch failed: every caller hears why
            self._tail = None
            for slot in batch:
                slot.pop("receipt", None)
                slot.setdefault("error", exc)
        finally:
            for slot in batch:
                _done(slot)

    def checkpoint(self, upto: int | None = None) -> dict[str, Any]:
        """Sign a tree head over every receipt so far, or over the first ``upto``
        (no new row if nothing changed, or a head already counts ``upto``)."""

        def body() -> dict[str, Any]:
            latest = self._conn.execute(
                "SELECT count, root_hash, timestamp, key_id, signature FROM checkpoints ORDER BY id DESC LIMIT 1"
            ).fetchone()
            count = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM receipts").fetchone()[0]
            if upto is not None:
                if latest is not None and latest[0] >= upto:
                    return dict(zip(_CHECKPOINT_FIELDS, latest))  # heads only grow (T-RCPT-1)
                count = min(count, upto)
            if latest is not None and latest[0] == count:
                return dict(zip(_CHECKPOINT_FIELDS, latest))
            if self._frontier.count > count:
                self._frontier = merkle.Frontier()  # the file was replaced under us: start over
            # Only the rows since the last checkpoint are hashed (rows are append-only).
            for (rh,) in self._conn.execute(
                "SELECT receipt_hash FROM receipts WHERE seq > ? AND seq <= ? ORDER BY seq",
                (self._frontier.count, count),
            ):
                self._frontier.push(rh)
            if self._frontier.count != count:
                raise RuntimeError(f"receipt seqs are not contiguous up to {count} (T-RCPT-1)")
            cp: dict[str, Any] = {"count": count, "root_hash": self._frontier.root(),
                                  "timestamp": int(self._clock() * 1000), "key_id": self._key.key_id}
            cp["signature"] = base64.b64encode(self._key.sign(v1.checkpoint_message(**cp))).decode("ascii")
            self._conn.execute(
                "INSERT INTO checkpoints (count, root_hash, timestamp, key_id, signature) VALUES (?, ?, ?, ?, ?)",
                tuple(cp[f] for f in _CHECKPOINT_FIELDS),
            )
            return cp

        result: dict[str, Any] = self._write(body)
        return result

    # -- maintenance (off the answering thread) -------------------------------

    def _note_wal(self, since_wal: int) -> None:
        """Called by the group-commit leader after a batch: wake the maintenance
        thread when the WAL has grown; checkpoint here only if it fell far behind."""
        if since_wal >= WAL_WRITER_RECEIPTS:
            # Bound: the thread is stuck or starved; one PASSIVE checkpoint here keeps the WAL finite.
            log.warning("receipt WAL maintenance is %s receipts behind; the writer checkpoints", since_wal)
            self._checkpoint_wal(self._conn, since_wal, lock=self._lock)
        elif since_wal >= WAL_WAKE_RECEIPTS:
            self._wake_maintenance()

    def _checkpoint_wal(self, conn: sqlite3.Connection, since_wal: int,
                        lock: threading.Lock | None = None) -> tuple[int, int, int] | None:
        """One PASSIVE checkpoint (never waits on, nor blocks, the writer);
        the receipts it started from no longer count towards the next one."""
        with self._queue_lock:
            self._since_wal = max(0, self._since_wal - since_wal)
            self.wal_checkpoints["maintenance" if conn is not self._conn else "writer"] += 1
        try:
            if lock is None:
                row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            else:
                with lock:
                    if self._closed:
                        return None
                    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("receipt WAL checkpoint failed: %s", exc)
            return None
        return (int(row[0]), int(row[1]), int(row[2]))

    def _wake_maintenance(self) -> None:
        if self._maint_thread is None:
            with self._queue_lock:
                if self._maint_thread is None and not self._stopping:
                    t = threading.Thread(target=self._maintenance_loop, name="receipt-maintenance", daemon=True)
                    self._maint_thread = t
                    t.start()
        self._wake.set()

    def _owed_since_start(self) -> None:
        """A head owed from before a crash or restart (checkpoint_every rows or
        more since the last signed head): noted once, signed by ``maintain``."""
        self._start_checked = True
        try:
            latest = self.latest_checkpoint()
            total = self.count()
        except (sqlite3.Error, StoreClosed) as exc:
            log.warning("receipt maintenance start-up check failed: %s", exc)
            return
        if self._checkpoint_every and total - (latest["count"] if latest else 0) >= self._checkpoint_every:
            with self._queue_lock:
                self._head_due = max(self._head_due, total - total % self._checkpoint_every)

    def _maintenance_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                # Wakes that arrived while the last pass ran are spent unless WAL_WAKE_RECEIPTS more receipts came.
                self.maintain(min_receipts=WAL_WAKE_RECEIPTS)
            except Exception:  # the thread outlives one bad pass; the writer's bound still holds
                log.exception("receipt maintenance failed")

    def maintain(self, *, min_receipts: int = 1) -> None:
        """One maintenance step: sign the tree head that is owed, and run a PASSIVE
        WAL checkpoint on this store's maintenance connection. Runs on the
        maintenance thread and on the service's maintenance tick; safe from any thread."""
        if not self._start_checked:
            self._owed_since_start()
        with self._queue_lock:
            due, since_wal = self._head_due, self._since_wal
        if due:
            try:
                self.checkpoint(upto=due)
                with self._queue_lock:
                    if self._head_due == due:
                        self._head_due = 0
            except (sqlite3.Error, StoreClosed, RuntimeError) as exc:
                # The receipts are durable; the head is retried at the next wake or by the service's interval.
                log.warning("receipt checkpoint at seq %s failed: %s", due, exc)
        if since_wal >= min_receipts:
            with self._lock:
                if self._closed:
                    return
                if self._maint_conn is None:
                    self._maint_conn = _connect(self._path, read_only=False)
                    self._maint_conn.execute("PRAGMA synchronous = FULL")
                    self._maint_conn.execute("PRAGMA wal_autocheckpoint = 0")
                    self._reader_conns.append(self._maint_conn)  # closed with the others
                conn = self._maint_conn
            done = self._checkpoint_wal(conn, since_wal, lock=self._maint_lock)
            if done is not None and done[0] == 0 and done[1] >= WAL_RESTART_FRAMES:
                # Under steady appends the bulk copy above races the writer (an
                # append in flight lands after it), so the WAL would seldom restart
                # from the top and would only grow. Backfill what was written since
                # while holding the writer lock: short (those frames and one fsync,
                # none if there are none), and the next commit restarts the WAL.
                with self._lock:
                    if self._closed:
                        return
                    self._checkpoint_wal(conn, 0, lock=self._maint_lock)

    def _stop_maintenance(self) -> None:
        with self._queue_lock:
            self._stopping = True
            t = self._maint_thread
        self._wake.set()
        if t is not None and t is not threading.current_thread():
            t.join()

    # -- readers --------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosed("receipt store is closed")
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = _connect(self._path, read_only=True)
            self._readers.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    def get(self, execution_id: str, tenant_id: str | None = None) -> dict[str, Any] | None:
        sql, args = f"SELECT {_COLUMNS} FROM receipts WHERE execution_id = ?", [execution_id]
        if tenant_id is not None:  # another tenant's receipt looks exactly like a missing one
            sql, args = sql + " AND tenant_id = ?", [*args, tenant_id]
        row = self._reader().execute(sql, args).fetchone()
        return _verify.db_row(row) if row else None

    def page(self, *, tenant_id: str | None, after: int | None, limit: int) -> list[dict[str, Any]]:
        limit = max(1, min(1000, int(limit)))
        sql = f"SELECT {_COLUMNS} FROM receipts WHERE seq > ?"
        args: list[int | str] = [int(after or 0)]
        if tenant_id is not None:
            sql, args = sql + " AND tenant_id = ?", [*args, tenant_id]
        rows = self._reader().execute(sql + " ORDER BY seq LIMIT ?", [*args, limit]).fetchall()
        return [_verify.db_row(row) for row in rows]

    def rows_after(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Every tenant's rows with seq > after, in order (the live auditor's feed)."""
        rows = self._reader().execute(f"SELECT {_COLUMNS} FROM receipts WHERE seq > ? ORDER BY seq LIMIT ?",
                                      (int(after), int(limit))).fetchall()
        return [_verify.db_row(row) for row in rows]

    def tenant_count(self, tenant_id: str, *, after: int = 0) -> int:
        """This tenant's receipts with seq > after (index on tenant_id, seq)."""
        return int(self._reader().execute("SELECT COUNT(*) FROM receipts WHERE tenant_id = ? AND seq > ?",
                                          (tenant_id, int(after))).fetchone()[0])

    def checkpoints_after(self, count: int) -> list[dict[str, Any]]:
        rows = self._reader().execute(
            "SELECT count, root_hash, timestamp, key_id, signature FROM checkpoints WHERE count > ? ORDER BY id",
            (int(count),)).fetchall()
        return [dict(zip(_CHECKPOINT_FIELDS, row)) for row in rows]

    def count(self) -> int:
        # seqs are contiguous from 1, so MAX is the count without a full scan.
        return int(self._reader().execute("SELECT COALESCE(MAX(seq), 0) FROM receipts").fetchone()[0])

    def latest_checkpoint(self) -> dict[str, Any] | None:
        row = self._reader().execute(
            "SELECT count, root_hash, timestamp, key_id, signature FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return dict(zip(_CHECKPOINT_FIELDS, row)) if row else None

    def public_keys(self) -> dict[str, str]:
        rows = self._reader().execute("SELECT key_id, public_key FROM receipt_keys ORDER BY first_used").fetchall()
        return {**{k: p for k, p in rows}, self._key.key_id: self._key.public_key_hex}

    def verify(self) -> dict[str, Any]:
        """Re-check the whole chain, every signature and every checkpoint (T-RCPT-1)."""
        report = _verify.verify_connection(self._reader(), list(self.public_keys().values()))
        return {"ok": report.ok, "count": report.count,
                "first_problem": report.first_problem.as_dict() if report.first_problem else None}

    def export(self, out: IO[str]) -> dict[str, Any]:
        """Write a JSON Lines export: header, receipts up to a fresh checkpoint, signed trailer."""
        cp = self.checkpoint()  # the header's signed head then covers every exported row
        conn = self._reader()
        header = {
            "type": "header", "format": EXPORT_FORMAT, "node_public_key": self._key.public_key_hex,
            "key_id": self._key.key_id, "keys": self.public_keys(), "schemas": [v1.SCHEMA],
            "envelopes": [envelope.ENVELOPE], "checkpoint": cp, "exported_at": int(self._clock() * 1000),
        }
        out.write(_verify.dumps_line(header))
        head, tree = v1.GENESIS, merkle.Frontier()
        for row in conn.execute(f"SELECT {_COLUMNS} FROM receipts WHERE seq <= ? ORDER BY seq", (cp["count"],)):
            receipt = _verify.db_row(row)
            head = receipt["chain_hash"]
            tree.push(receipt["receipt_hash"])
            out.write(_verify.dumps_line(receipt))
        # T-RCPT-2: the last line is signed, so rows cut off the end (with the
        # trailer rewritten or not) are detected without the header's help.
        sealed = envelope.seal(count=cp["count"], last_chain_hash=head, root_hash=tree.root(),
                               timestamp=int(self._clock() * 1000), key_id=self._key.key_id)
        signature = base64.b64encode(self._key.sign(envelope.canonical_json(sealed))).decode("ascii")
        out.write(_verify.dumps_line({"type": "trailer", **sealed, "signature": signature}))
        return {"count": cp["count"], "checkpoint": cp, "last_chain_hash": head}

    def export_to(self, path: Path) -> dict[str, Any]:
        """Export atomically: a reader never sees half a file that looks truncated."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                summary = self.export(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return summary

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Sign a final checkpoint (shutdown), then close every connection."""
        if self._closed:
            return
        self._stop_maintenance()
        try:
            self.checkpoint()
        except sqlite3.Error as exc:
            log.warning("final receipt checkpoint failed: %s", exc)
        with self._lock, self._maint_lock:  # never under a maintenance checkpoint in flight
            self._closed = True
            for conn in [*self._reader_conns, self._conn]:
                conn.close()
            self._reader_conns.clear()

    def __enter__(self) -> ReceiptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
