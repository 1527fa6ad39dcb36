"""Tenants and cells in SQLite (sqlite-utils, WAL).

API keys are stored only as SHA-256 digests: they are 256-bit random tokens,
so a plain digest is enough, and a stolen database reveals no usable key.
One writer lock per store; readers use their own connection per thread.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_PREFIX = "cell_"
# Named, so a column added by a migration never shifts the fields of a row.
_CELL_COLUMNS = "id, tenant_id, template, created_at, timeout_ms, expires_at, persistent, metadata, envs, memory_mb, internet"
AUTH_CACHE_S = 2.0


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: int
    revoked: bool


@dataclass
class CellRecord:
    id: str
    tenant_id: str
    template: str
    created_at: int
    timeout_ms: int
    expires_at: int
    persistent: bool
    metadata: dict[str, str]
    envs: dict[str, str]
    memory_mb: int
    # False: this cell's runs get no egress whatever the node allows (T-SSRF-1);
    # True: the node's egress policy applies (it can never be widened per cell).
    internet: bool = True

    def public(self) -> dict[str, Any]:
        return {
            "cell_id": self.id,
            "template": self.template,
            "created_at": self.created_at,
            "timeout_ms": self.timeout_ms,
            "expires_at": self.expires_at,
            "persistent": self.persistent,
            "metadata": self.metadata,
            "allow_internet_access": self.internet,
            "status": "running",
        }


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives any process crash; only the last commits
    # before a power cut can be lost, which is acceptable for tenants and cell
    # expiry times (receipts use FULL in their own store).
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class Store:
    """One writer connection behind a lock; one reader connection per thread.

    A shared connection used by several threads at once interleaves its
    statements, and a connection that still holds a read snapshot cannot
    upgrade to write in WAL mode ("database is locked" without waiting), so
    reads never run on the writer and every read statement is drained.
    """

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._path = db_path
        self._conn = _connect(db_path)  # the writer: only under self._lock
        self._lock = threading.Lock()
        self._local = threading.local()  # a thread's reader lives and dies with the thread
        # Key digest -> (tenant or None, expiry): one DB read per key per AUTH_CACHE_S
        # instead of one per request. A revocation from this process clears it;
        # one from another process (the CLI) applies within AUTH_CACHE_S.
        self._auth_cache: dict[str, tuple[Tenant | None, float]] = {}
        self._conn.execute("PRAGMA recursive_triggers = on")  # as sqlite_utils.Database(conn) set it (start-up: not loaded)
        with self._lock:
            self._migrate()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self._path)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
        cur = conn.execute(sql, params)
        try:
            return cur.fetchall()
        finally:
            cur.close()

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        with self._lock:
            cur = self._conn.execute(sql, params)
            try:
                return int(cur.rowcount)
            finally:
                cur.close()

    def _migrate(self) -> None:
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,"
            " created_at INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)"
        )
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS cells (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id),"
            " template TEXT NOT NULL, created_at INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, expires_at INTEGER NOT NULL,"
            " persistent INTEGER NOT NULL, metadata TEXT NOT NULL, envs TEXT NOT NULL, memory_mb INTEGER NOT NULL)"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS cells_tenant ON cells(tenant_id)")
        # Added after the first release: a database from then gains the column,
        # and its cells keep following the node's egress policy (internet = 1).
        if not self._has_cell_column("internet"):
            try:
                self._conn.execute("ALTER TABLE cells ADD COLUMN internet INTEGER NOT NULL DEFAULT 1")
            except sqlite3.OperationalError:
                if not self._has_cell_column("internet"):  # not another process adding it at the same moment
                    raise

    def _has_cell_column(self, name: str) -> bool:
        return any(row[1] == name for row in self._conn.execute("PRAGMA table_info(cells)").fetchall())

    # -- tenants ---------------------------------------------------------
    def add_tenant(self, name: str, now_ms: int, tenant_id: str | None = None) -> tuple[Tenant, str]:
        tid = tenant_id or ("t" + secrets.token_hex(6))
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        self._write("INSERT INTO tenants (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
                    (tid, name, hash_key(api_key), now_ms))
        return Tenant(tid, name, now_ms, False), api_key

    def tenant_for_key(self, api_key: str) -> Tenant | None:
        digest = hash_key(api_key)
        now = time.monotonic()
        cached = self._auth_cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        tenant = self._lookup_key(digest)
        if len(self._auth_cache) > 10_000:  # bounded: unknown keys must not grow it forever
            self._auth_cache.clear()
        self._auth_cache[digest] = (tenant, now + AUTH_CACHE_S)
        return tenant

    def _lookup_key(self, digest: str) -> Tenant | None:
        rows = self._read("SELECT id, name, created_at, revoked, key_hash FROM tenants WHERE key_hash = ?", (digest,))
        row = rows[0] if rows else None
        if row is None or not hmac.compare_digest(row[4], digest) or row[3]:
            return None
        return Tenant(row[0], row[1], row[2], bool(row[3]))

    def list_tenants(self) -> list[Tenant]:
        rows = self._read("SELECT id, name, created_at, revoked FROM tenants ORDER BY created_at")
        return [Tenant(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def revoke_tenant(self, tenant_id: str) -> bool:
        done = self._write("UPDATE tenants SET revoked = 1 WHERE id = ?", (tenant_id,)) > 0
        self._auth_cache.clear()
        return done

    # -- the cluster's shared tenant table (appliance/cluster/node.py) ------
    def tenant_rows(self) -> list[tuple[str, str, str, int, bool]]:
        """(id, name, key_hash, created_at, revoked) of every tenant, for the cluster copy."""
        rows = self._read("SELECT id, name, key_hash, created_at, revoked FROM tenants ORDER BY created_at")
        return [(r[0], r[1], r[2], int(r[3]), bool(r[4])) for r in rows]

    def put_tenant_row(self, tenant_id: str, name: str, key_hash: str, created_at: int, revoked: bool) -> None:
        """Insert or update one tenant as the cluster has it. Revocation is
        sticky: a revoked row never becomes active here (T-CLUSTER-1)."""
        self._write("INSERT INTO tenants (id, name, key_hash, created_at, revoked) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET name = excluded.name, key_hash = excluded.key_hash,"
                    " created_at = excluded.created_at, revoked = MAX(tenants.revoked, excluded.revoked)",
                    (tenant_id, name, key_hash, created_at, int(revoked)))
        self._auth_cache.clear()  # a key refused a moment ago may be valid now, and the reverse

    # -- cells -----------------------------------------------------------
    def add_cell(self, cell: CellRecord) -> None:
        self._write("INSERT INTO cells (id, tenant_id, template, created_at, timeout_ms, expires_at, persistent, metadata,"
                    " envs, memory_mb, internet) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cell.id, cell.tenant_id, cell.template, cell.created_at, cell.timeout_ms, cell.expires_at,
                     int(cell.persistent), json.dumps(cell.metadata), json.dumps(cell.envs), cell.memory_mb,
                     int(cell.internet)))

    def _cell(self, row: tuple[Any, ...]) -> CellRecord:
        return CellRecord(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), json.loads(row[7]), json.loads(row[8]), row[9],
                          bool(row[10]))

    def get_cell(self, cell_id: str, tenant_id: str) -> CellRecord | None:
        rows = self._read(f"SELECT {_CELL_COLUMNS} FROM cells WHERE id = ? AND tenant_id = ?", (cell_id, tenant_id))
        return self._cell(rows[0]) if rows else None

    def list_cells(self, tenant_id: str | None = None) -> list[CellRecord]:
        if tenant_id is None:
            rows = self._read(f"SELECT {_CELL_COLUMNS} FROM cells ORDER BY created_at")
        else:
            rows = self._read(f"SELECT {_CELL_COLUMNS} FROM cells WHERE tenant_id = ? ORDER BY created_at", (tenant_id,))
        return [self._cell(r) for r in rows]

    def room_counts(self, tenant_id: str) -> tuple[int, int, int]:
        """Cells on the node, cells of ``tenant_id``, tenants not revoked: one
        read (one snapshot) for a create's limit checks instead of three, and
        no row of either table is built."""
        row = self._read("SELECT (SELECT COUNT(*) FROM cells), (SELECT COUNT(*) FROM cells WHERE tenant_id = ?),"
                         " (SELECT COUNT(*) FROM tenants WHERE revoked = 0)", (tenant_id,))[0]
        return int(row[0]), int(row[1]), int(row[2])

    def touch_cell(self, cell_id: str, expires_at: int, timeout_ms: int | None = None) -> None:
        if timeout_ms is None:
            self._write("UPDATE cells SET expires_at = ? WHERE id = ?", (expires_at, cell_id))
        else:
            self._write("UPDATE cells SET expires_at = ?, timeout_ms = ? WHERE id = ?", (expires_at, timeout_ms, cell_id))

    def delete_cell(self, cell_id: str) -> None:
        self._write("DELETE FROM cells WHERE id = ?", (cell_id,))

    def expired_cells(self, now_ms: int) -> list[CellRecord]:
        rows = self._read(f"SELECT {_CELL_COLUMNS} FROM cells WHERE expires_at <= ?", (now_ms,))
        return [self._cell(r) for r in rows]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._lock:
            self._conn.close()
