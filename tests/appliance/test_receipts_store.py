"""ReceiptStore and NodeKey: durability, one linear chain under concurrency, checkpoints.

Threat T-RCPT-1 (receipt tampering/deletion): the chain never forks — not
under threads, not under two processes, not after a SIGKILL mid-append — and
the node key is refused when others could read or replace it.
"""
from __future__ import annotations

import base64
import multiprocessing
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from appliance.receipts import envelope, merkle, v1
from appliance.receipts.nodekey import KEY_FILE, NodeKey, NodeKeyError
from appliance.receipts.store import DuplicateReceipt, ReceiptStore

REPO = Path(__file__).resolve().parents[2]
CODE_HASH = v1.code_hash(b"print(1+1)")
RESULT_HASH = v1.result_hash(exit_code=0, status="ok", stderr="", stdout="2\n")


def append_one(store: ReceiptStore, *, tenant: str = "tenant-a", cell: str | None = "cell-1",
               ts: int = 1764300000000) -> dict[str, Any]:
    return store.append(execution_id=str(uuid.uuid4()), tenant_id=tenant, cell_id=cell, template="python3",
                        code_hash=CODE_HASH, result_hash=RESULT_HASH, timestamp_ms=ts)


def assert_linear(receipts: list[dict[str, Any]]) -> None:
    prev = v1.GENESIS
    for n, r in enumerate(sorted(receipts, key=lambda r: r["seq"]), start=1):
        assert r["seq"] == n
        assert r["prev_chain_hash"] == prev
        assert r["chain_hash"] == v1.chain_hash(prev, r["receipt_hash"])
        prev = r["chain_hash"]


def all_rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM receipts ORDER BY seq")]
    finally:
        conn.close()


@pytest.fixture
def key() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "cell.sqlite"


@pytest.fixture
def store(db_path: Path, key: NodeKey) -> Iterator[ReceiptStore]:
    s = ReceiptStore(db_path, key, checkpoint_every=0)
    yield s
    s.close()


# --- append -----------------------------------------------------------------

def test_append_returns_full_signed_receipt(store: ReceiptStore, key: NodeKey) -> None:
    r = append_one(store)
    assert set(r) == {"schema", "execution_id", "code_hash", "result_hash", "template", "timestamp",
                      "receipt_hash", "seq", "prev_chain_hash", "chain_hash", "signature", "key_id", "cell_id",
                      "tenant_id", "envelope", "extensions"}
    assert r["schema"] == "v1" and r["seq"] == 1 and r["prev_chain_hash"] == v1.GENESIS
    assert r["receipt_hash"] == v1.receipt_hash(execution_id=r["execution_id"], code_hash=CODE_HASH,
                                                result_hash=RESULT_HASH, template="python3", timestamp=r["timestamp"])
    assert r["key_id"] == key.key_id
    assert (r["tenant_id"], r["cell_id"], r["envelope"], r["extensions"]) == (
        "tenant-a", "cell-1", "cell-receipt-envelope/1", {})
    # T-RCPT-2: the signature is over the envelope, not the bare chain hash.
    signed = envelope.envelope_message(seq=1, receipt_hash=r["receipt_hash"], chain_hash=r["chain_hash"],
                                       tenant_id="tenant-a", cell_id="cell-1", key_id=key.key_id)
    key.verify_key.verify(signed, base64.b64decode(r["signature"]))
    assert store.get(r["execution_id"]) == r
    second = append_one(store)
    assert second["prev_chain_hash"] == r["chain_hash"] and second["seq"] == 2


def test_append_is_committed_before_it_returns(store: ReceiptStore, db_path: Path) -> None:
    r = append_one(store)
    # A fresh connection (another process's view) already sees the row.
    assert [row["execution_id"] for row in all_rows(db_path)] == [r["execution_id"]]


def test_database_is_wal_with_full_sync(store: ReceiptStore, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_T_RCPT_1_invalid_field_writes_nothing(store: ReceiptStore) -> None:
    with pytest.raises(ValueError, match="template"):
        store.append(execution_id=str(uuid.uuid4()), tenant_id="t", cell_id=None, template="py|thon",
                     code_hash=CODE_HASH, result_hash=RESULT_HASH, timestamp_ms=1)
    with pytest.raises(ValueError, match="tenant_id"):
        store.append(execution_id=str(uuid.uuid4()), tenant_id="", cell_id=None, template="python3",
                     code_hash=CODE_HASH, result_hash=RESULT_HASH, timestamp_ms=1)
    assert store.count() == 0


def test_T_RCPT_1_duplicate_execution_id_refused_and_chain_intact(store: ReceiptStore) -> None:
    r = append_one(store)
    with pytest.raises(DuplicateReceipt):
        store.append(execution_id=r["execution_id"], tenant_id="t", cell_id=None, template="python3",
                     code_hash=CODE_HASH, result_hash=RESULT_HASH, timestamp_ms=2)
    assert append_one(store)["seq"] == 2
    assert store.verify()["ok"]


def _slot(store: ReceiptStore, execution_id: str) -> dict[str, Any]:
    """One group-commit slot as ``append`` queues it (the fields it validated)."""
    rh = v1.receipt_hash(execution_id=execution_id, code_hash=CODE_HASH, result_hash=RESULT_HASH,
                         template="python3", timestamp=5)
    return {"item": {"execution_id": execution_id, "code_hash": CODE_HASH, "result_hash": RESULT_HASH,
                     "template": "python3", "timestamp": 5, "receipt_hash": rh, "cell_id": None,
                     "tenant_id": "tenant-a", "extensions": {}}, "done": threading.Event()}


@pytest.mark.parametrize("batch_ids", [["dup"], ["new1", "dup"], ["dup", "new1"], ["new1", "dup", "new2"]])
def test_T_RCPT_1_duplicate_in_a_group_commit_fails_alone(store: ReceiptStore, batch_ids: list[str]) -> None:
    # A failed INSERT backs itself out (SQLite's ABORT), with no savepoint around
    # each item: in a batch of any size only the duplicate fails and the chain
    # the others extend stays linear.
    first = append_one(store)
    ids = {name: (first["execution_id"] if name == "dup" else str(uuid.uuid4())) for name in batch_ids}
    batch = [_slot(store, ids[name]) for name in batch_ids]
    store._commit_batch(batch)
    for name, slot in zip(batch_ids, batch):
        assert slot["done"].is_set()
        if name == "dup":
            assert isinstance(slot.get("error"), DuplicateReceipt) and "receipt" not in slot
        else:
            assert "error" not in slot and slot["receipt"]["execution_id"] == ids[name]
    assert store.count() == len(batch_ids)  # the first receipt and the new ones; the duplicate wrote nothing
    assert_linear([first, *(s["receipt"] for s in batch if "receipt" in s)])
    assert append_one(store)["seq"] == len(batch_ids) + 1
    assert store.verify()["ok"]


@pytest.mark.parametrize("batch_ids", [["boom"], ["new1", "boom"], ["new1", "boom", "new2"]])
def test_T_RCPT_1_an_error_that_ends_the_transaction_fails_the_whole_batch(store: ReceiptStore,
                                                                          batch_ids: list[str]) -> None:
    # RAISE(ROLLBACK) is a constraint error that also rolls the transaction
    # back: the items before it are gone, so no caller may be told it has a
    # receipt and no later item may be written outside the transaction.
    first = append_one(store)
    ids = {name: str(uuid.uuid4()) for name in batch_ids}
    store._conn.execute(f"CREATE TEMP TRIGGER boom BEFORE INSERT ON main.receipts WHEN NEW.execution_id = "
                        f"'{ids['boom']}' BEGIN SELECT RAISE(ROLLBACK, 'boom'); END")
    batch = [_slot(store, ids[name]) for name in batch_ids]
    store._commit_batch(batch)
    for slot in batch:
        assert slot["done"].is_set() and isinstance(slot.get("error"), sqlite3.IntegrityError) and "receipt" not in slot
    assert store.count() == 1 and not store._conn.in_transaction
    store._conn.execute("DROP TRIGGER temp.boom")
    assert append_one(store)["seq"] == 2
    assert_linear([first, *store.page(tenant_id=None, after=1, limit=10)])
    assert store.verify()["ok"]


def test_get_hides_other_tenants_receipts(store: ReceiptStore) -> None:
    r = append_one(store, tenant="tenant-a")
    assert store.get(r["execution_id"]) == r
    assert store.get(r["execution_id"], "tenant-a") == r
    assert store.get(r["execution_id"], "tenant-b") is None
    assert store.get(str(uuid.uuid4())) is None


def test_page_by_seq_with_tenant_filter_and_clamped_limit(store: ReceiptStore) -> None:
    for i in range(6):
        append_one(store, tenant="a" if i % 2 == 0 else "b")
    assert [r["seq"] for r in store.page(tenant_id=None, after=None, limit=100)] == [1, 2, 3, 4, 5, 6]
    assert [r["seq"] for r in store.page(tenant_id="a", after=1, limit=100)] == [3, 5]
    assert [r["seq"] for r in store.page(tenant_id=None, after=2, limit=2)] == [3, 4]
    assert len(store.page(tenant_id=None, after=None, limit=0)) == 1
    assert len(store.page(tenant_id=None, after=None, limit=10**6)) == 6
    assert store.count() == 6


def test_migrations_are_named_and_idempotent(db_path: Path, key: NodeKey) -> None:
    ReceiptStore(db_path, key).close()
    ReceiptStore(db_path, key).close()
    conn = sqlite3.connect(db_path)
    names = [r[0] for r in conn.execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = 'cell.receipts' ORDER BY id")]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert names == ["0001_receipts", "0002_checkpoints", "0003_receipt_keys", "0004_append_only_triggers",
                     "0005_receipt_envelopes"]
    assert {"receipts", "checkpoints", "receipt_keys"} <= tables


def test_migration_names_are_the_steps_of_the_set() -> None:
    from appliance.receipts import store as store_module

    assert [m.name for m in store_module._migrations()._migrations] == list(store_module.MIGRATIONS)


def test_a_migrated_database_opens_without_sqlite_utils(db_path: Path, key: NodeKey) -> None:
    # Start-up: a restart has no migration to apply, so sqlite_utils (~50 ms of
    # imports) is not loaded; the writer's settings are those it always had.
    from appliance.storage import Store

    ReceiptStore(db_path, key).close()
    Store(db_path).close()
    code = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from appliance.receipts.nodekey import NodeKey
        from appliance.receipts.store import ReceiptStore
        from appliance.storage import Store
        store = ReceiptStore(Path({str(db_path)!r}), NodeKey.generate())
        tenants = Store(Path({str(db_path)!r}))
        pragmas = [c.execute("PRAGMA " + p).fetchone()[0] for c in (store._conn, tenants._conn)
                   for p in ("recursive_triggers", "journal_mode", "synchronous")]
        store.close(); tenants.close()
        print(json.dumps(["sqlite_utils" in sys.modules, pragmas]))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded, pragmas = __import__("json").loads(done.stdout)
    assert not loaded
    assert pragmas[:3] == [1, "wal", 2]  # receipts: recursive triggers, WAL, synchronous FULL
    assert pragmas[3:5] == [1, "wal"]


def test_t_rcpt_1_a_pending_migration_is_applied_on_open(db_path: Path, key: NodeKey) -> None:
    ReceiptStore(db_path, key).close()
    conn = sqlite3.connect(db_path)
    conn.execute("DROP TRIGGER receipts_no_delete")
    conn.execute("DELETE FROM _sqlite_migrations WHERE name = '0004_append_only_triggers'")
    conn.commit()
    conn.close()
    store = ReceiptStore(db_path, key)
    append_one(store)
    store.close()
    conn = sqlite3.connect(db_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM receipts")
    names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations WHERE migration_set = 'cell.receipts'")]
    conn.close()
    assert sorted(names) == ["0001_receipts", "0002_checkpoints", "0003_receipt_keys", "0004_append_only_triggers",
                             "0005_receipt_envelopes"]


@pytest.mark.parametrize("sql", ["UPDATE receipts SET template = 'wasm'", "DELETE FROM receipts",
                                 "UPDATE checkpoints SET count = 0", "DELETE FROM checkpoints"])
def test_T_RCPT_1_tables_are_append_only(store: ReceiptStore, db_path: Path, sql: str) -> None:
    append_one(store)
    store.checkpoint()
    conn = sqlite3.connect(db_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(sql)
    conn.close()


# --- concurrency ------------------------------------------------------------

def test_T_RCPT_1_an_append_commits_at_most_one_batch_however_busy(store: ReceiptStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit under four busy threads: the appends queued during a commit
    go together in the next one, committed by one of them; the thread that
    committed a batch returns after it (it once went on committing for the
    others until nobody queued: 200-740 ms for its own, long durable, receipt).
    The chain stays one line and every caller gets its own receipt."""
    commits = threading.local()
    sizes: list[int] = []
    most: list[int] = []
    real = store._commit_batch

    def commit_batch(batch: list[dict[str, Any]]) -> None:
        commits.n = getattr(commits, "n", 0) + 1
        sizes.append(len(batch))
        time.sleep(0.002)  # a slow fsync: the other threads queue meanwhile
        real(batch)

    monkeypatch.setattr(store, "_commit_batch", commit_batch)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        for _ in range(60):
            commits.n = 0
            r = append_one(store)
            with lock:
                results.append(r)
                most.append(commits.n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 240 and max(most) == 1
    assert max(sizes) > 1 and sum(sizes) == 240  # grouped, and each receipt committed once
    assert len({r["execution_id"] for r in results}) == 240
    assert_linear(results)
    assert store.verify()["ok"] is True


def test_T_RCPT_1_eight_threads_by_200_appends_stay_linear(store: ReceiptStore) -> None:
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        try:
            for _ in range(200):
                r = append_one(store)
                with lock:
                    results.append(r)
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 1600
    assert_linear(results)
    assert_linear(store.page(tenant_id=None, after=None, limit=1000) + store.page(tenant_id=None, after=1000, limit=1000))
    assert store.verify() == {"ok": True, "count": 1600, "first_problem": None}


def test_T_RCPT_1_single_receipt_on_a_moved_tail_is_not_forked(db_path: Path, key: NodeKey) -> None:
    # A receipt after the tail this store wrote last is one statement guarded by
    # that tail; when another writer extended the chain meanwhile, the guard
    # writes nothing and the full transaction chains onto the real tail.
    a = ReceiptStore(db_path, key, checkpoint_every=0)
    b = ReceiptStore(db_path, key, checkpoint_every=0)
    try:
        written = [append_one(a), append_one(a)]  # a now knows its tail
        written.append(append_one(b))  # moves the tail under a
        written += [append_one(a), append_one(b), append_one(a)]
        assert [r["seq"] for r in written] == [1, 2, 3, 4, 5, 6]
        assert_linear(written)
        assert a.verify() == {"ok": True, "count": 6, "first_problem": None}
        dup = written[-1]["execution_id"]
        with pytest.raises(DuplicateReceipt):  # on a known tail too
            a.append(execution_id=dup, tenant_id="t", cell_id=None, template="python3",
                     code_hash=CODE_HASH, result_hash=RESULT_HASH, timestamp_ms=2)
        assert append_one(a)["seq"] == 7
    finally:
        a.close()
        b.close()


def _process_appender(db: str, seed_hex: str, n: int, go: Any) -> None:
    """Child process body (spawned): its own ReceiptStore on the same file."""
    go.wait()
    s = ReceiptStore(Path(db), NodeKey.from_seed(bytes.fromhex(seed_hex)), checkpoint_every=50)
    try:
        for _ in range(n):
            append_one(s, tenant=f"pid-{os.getpid()}")
    finally:
        s.close()


def test_T_RCPT_1_two_processes_appending_do_not_fork_the_chain(db_path: Path) -> None:
    seed = os.urandom(32)
    ReceiptStore(db_path, NodeKey.from_seed(seed)).close()  # migrate once, before the race
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_process_appender, args=(str(db_path), seed.hex(), 150, go)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = all_rows(db_path)
    assert len(rows) == 300 and len({r["tenant_id"] for r in rows}) == 2
    assert_linear(rows)
    with ReceiptStore(db_path, NodeKey.from_seed(seed)) as s:
        assert s.verify() == {"ok": True, "count": 300, "first_problem": None}


CRASH_CHILD = textwrap.dedent(
    """
    import sys, uuid
    from pathlib import Path
    from appliance.receipts import v1
    from appliance.receipts.nodekey import NodeKey
    from appliance.receipts.store import ReceiptStore
    s = ReceiptStore(Path(sys.argv[1]), NodeKey.from_seed(bytes.fromhex(sys.argv[2])), checkpoint_every=25)
    ch = v1.code_hash(b"x"); rh = v1.result_hash(exit_code=0, status="ok", stderr="", stdout="")
    print("ready", flush=True)
    while True:
        s.append(execution_id=str(uuid.uuid4()), tenant_id="t", cell_id=None, template="python3",
                 code_hash=ch, result_hash=rh, timestamp_ms=1764300000000)
    """
)


def test_T_RCPT_1_sigkill_mid_append_leaves_no_half_written_row(db_path: Path) -> None:
    seed = os.urandom(32)
    ReceiptStore(db_path, NodeKey.from_seed(seed)).close()
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(db_path), seed.hex()],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(all_rows(db_path)) < 60:
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with ReceiptStore(db_path, NodeKey.from_seed(seed)) as s:
        conn = sqlite3.connect(db_path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        report = s.verify()
        assert report["ok"], report
        assert report["count"] >= 60
        assert_linear(all_rows(db_path))
        # the store keeps appending onto the surviving tail
        assert append_one(s)["seq"] == report["count"] + 1


# --- checkpoints ------------------------------------------------------------

def test_checkpoint_every_n_and_on_close(db_path: Path, key: NodeKey) -> None:
    clock = iter(range(1000, 10_000)).__next__
    s = ReceiptStore(db_path, key, checkpoint_every=10, clock=lambda: float(clock()))
    hashes = [append_one(s)["receipt_hash"] for _ in range(25)]
    # The head at 20 is signed by the maintenance thread, off the run path: wait for it.
    deadline = time.monotonic() + 30
    while (cp := s.latest_checkpoint()) is None or cp["count"] < 20:
        assert time.monotonic() < deadline, cp
        time.sleep(0.01)
    assert cp["count"] == 20
    assert cp["root_hash"] == merkle.root(hashes[:20])
    s.close()
    with ReceiptStore(db_path, key, checkpoint_every=10) as s2:
        final = s2.latest_checkpoint()
        assert final is not None and final["count"] == 25 and final["root_hash"] == merkle.root(hashes)
        assert final["timestamp"] % 1000 == 0  # from the injected clock, in ms
        key.verify_key.verify(v1.checkpoint_message(**{k: final[k] for k in ("count", "root_hash", "timestamp", "key_id")}),
                              base64.b64decode(final["signature"]))


def test_checkpoint_without_new_receipts_adds_no_row(store: ReceiptStore) -> None:
    append_one(store)
    first = store.checkpoint()
    assert store.checkpoint() == first


def test_T_RCPT_1_old_checkpoint_is_a_prefix_of_new(store: ReceiptStore) -> None:
    hashes = [append_one(store)["receipt_hash"] for _ in range(7)]
    old = store.checkpoint()
    hashes += [append_one(store)["receipt_hash"] for _ in range(6)]
    new = store.checkpoint()
    assert (old["count"], new["count"]) == (7, 13)
    assert merkle.root(hashes[: old["count"]]) == old["root_hash"]
    assert merkle.root(hashes) == new["root_hash"]


def test_T_RCPT_1_verify_names_a_tampered_row(store: ReceiptStore, db_path: Path) -> None:
    for _ in range(5):
        append_one(store)
    conn = sqlite3.connect(db_path)
    conn.execute("DROP TRIGGER receipts_no_update")  # what an attacker with the file would do
    conn.execute("UPDATE receipts SET template = 'wasm' WHERE seq = 3")
    conn.commit()
    conn.close()
    report = store.verify()
    assert report["ok"] is False and report["count"] == 2
    assert report["first_problem"]["seq"] == 3
    assert report["first_problem"]["kind"] == "receipt_hash_mismatch"


# --- node key ---------------------------------------------------------------

def test_node_key_created_private_and_reloaded(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    k1 = NodeKey.load_or_create(keys)
    assert stat.S_IMODE((keys / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    k2 = NodeKey.load_or_create(keys)
    assert (k1.public_key_hex, k1.key_id) == (k2.public_key_hex, k2.key_id)
    assert len(k1.key_id) == 16 and NodeKey.load(keys).key_id == k1.key_id
    assert k1.public_key_hex not in repr(k1) and (keys / KEY_FILE).read_text().strip() not in repr(k1)


def test_node_key_raw_seed_file_accepted(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / KEY_FILE).write_bytes(bytes(range(32)))
    os.chmod(keys / KEY_FILE, 0o600)
    assert NodeKey.load_or_create(keys).public_key_hex == NodeKey.from_seed(bytes(range(32))).public_key_hex


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_T_RCPT_1_group_or_world_accessible_key_refused(tmp_path: Path, mode: int) -> None:
    keys = tmp_path / "keys"
    NodeKey.load_or_create(keys)
    os.chmod(keys / KEY_FILE, mode)
    with pytest.raises(NodeKeyError, match="chmod 600"):
        NodeKey.load_or_create(keys)


def test_T_RCPT_1_symlinked_key_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    NodeKey.load_or_create(keys)
    (keys / KEY_FILE).rename(tmp_path / "elsewhere")
    (keys / KEY_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NodeKeyError, match="safely"):
        NodeKey.load_or_create(keys)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another user")
def test_T_RCPT_1_key_owned_by_someone_else_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    NodeKey.load_or_create(keys)
    os.chown(keys / KEY_FILE, 65534, 65534)
    with pytest.raises(NodeKeyError, match="not owned"):
        NodeKey.load_or_create(keys)


def test_garbage_key_file_refused_not_replaced(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / KEY_FILE).write_text("not a key\n")
    os.chmod(keys / KEY_FILE, 0o600)
    with pytest.raises(NodeKeyError, match="32-byte"):
        NodeKey.load_or_create(keys)
    assert (keys / KEY_FILE).read_text() == "not a key\n"


def test_missing_key_is_not_created_by_load(tmp_path: Path) -> None:
    with pytest.raises(NodeKeyError, match="does not exist"):
        NodeKey.load(tmp_path / "keys")


def test_concurrent_first_start_agrees_on_one_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(NodeKey.load_or_create(keys).key_id)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert sorted(p.name for p in keys.iterdir()) == [KEY_FILE]
