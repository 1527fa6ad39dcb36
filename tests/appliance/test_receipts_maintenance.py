"""WAL checkpoints and due tree heads run off the answering thread (issue 18),
without weakening durability or the chain (T-RCPT-1)."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from appliance.receipts import merkle, store as store_mod
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from tests.appliance.test_receipts_store import append_one, db_path, key  # noqa: F401 (the store tests' fixtures)


def wal_frames(db: Path) -> int:
    """Frames in the WAL file, from its size (header 32 bytes, each frame 24 + page size)."""
    wal = Path(f"{db}-wal")
    conn = sqlite3.connect(db)
    try:
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()
    return max(0, (wal.stat().st_size - 32) // (24 + page)) if wal.exists() else 0


def live_frames(db: Path) -> int:
    """Frames written since the WAL last restarted: a PASSIVE checkpoint from a
    fresh connection reports them (and backfills them; harmless here)."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        conn.close()


def wait_for(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def stuck(db_path: Path, key: NodeKey) -> Iterator[ReceiptStore]:
    """A store whose maintenance thread is stuck: it wakes but does nothing."""
    s = ReceiptStore(db_path, key, checkpoint_every=0)
    s.maintain = lambda **_: None  # type: ignore[method-assign]
    try:
        yield s
    finally:
        s.close()


def test_appends_never_checkpoint_the_wal_on_the_appending_thread(stuck: ReceiptStore, db_path: Path) -> None:
    # 400 receipts is ~2,600 WAL pages: SQLite's default autocheckpoint (1,000
    # pages) would have run inside some append's COMMIT and restarted the WAL.
    for _ in range(400):
        append_one(stuck)
    assert wal_frames(db_path) > 1500
    assert stuck.wal_checkpoints["writer"] == 0
    ReceiptStore.maintain(stuck)  # what the maintenance thread does once it can
    append_one(stuck)  # the WAL was fully backfilled: this commit restarts it from the top
    assert live_frames(db_path) < 50


def test_maintenance_thread_keeps_the_wal_bounded(db_path: Path, key: NodeKey) -> None:
    with ReceiptStore(db_path, key, checkpoint_every=0) as s:
        for _ in range(1000):
            append_one(s)
        wait_for(lambda: s.wal_checkpoints["maintenance"] >= 5, "background WAL checkpoints")
        assert s.wal_checkpoints["writer"] == 0
        # The WAL restarted from the top along the way: its file never held 1,000
        # receipts' pages (~6,500), only about WAL_RESTART_FRAMES plus what one wake adds.
        assert wal_frames(db_path) < 4 * store_mod.WAL_RESTART_FRAMES
        assert s.verify()["ok"]


def test_a_stuck_maintenance_thread_cannot_let_the_wal_grow_forever(stuck: ReceiptStore, db_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "WAL_WRITER_RECEIPTS", 60)
    for _ in range(400):
        append_one(stuck)
    assert stuck.wal_checkpoints["writer"] >= 5
    # The writer's own PASSIVE checkpoints restart the WAL: the file stays near 60 receipts' pages, not 400's.
    assert wal_frames(db_path) < 1500
    assert stuck.verify()["ok"]


def test_T_RCPT_1_due_tree_head_is_signed_off_the_appending_thread(db_path: Path, key: NodeKey) -> None:
    signers: list[str] = []

    def clock() -> float:
        signers.append(threading.current_thread().name)  # called once per signed head (and at start)
        return 1_764_300_000.0

    with ReceiptStore(db_path, key, checkpoint_every=1000, clock=clock) as s:
        signers.clear()
        hashes = [append_one(s)["receipt_hash"] for _ in range(1000)]
        wait_for(lambda: (s.latest_checkpoint() or {}).get("count") == 1000, "a head at 1,000")
        cp = s.latest_checkpoint()
        assert cp is not None and cp["root_hash"] == merkle.root(hashes)
        assert signers and set(signers) == {"receipt-maintenance"}
        assert threading.current_thread().name not in signers


def test_T_RCPT_1_a_head_owed_before_a_crash_is_signed_at_the_next_tick(db_path: Path, key: NodeKey) -> None:
    crashed = ReceiptStore(db_path, key, checkpoint_every=0)  # never closed: no final head, as after kill -9
    hashes = [append_one(crashed)["receipt_hash"] for _ in range(25)]
    with ReceiptStore(db_path, key, checkpoint_every=10) as s:
        assert s.latest_checkpoint() is None
        s.maintain()  # the service's maintenance tick
        cp = s.latest_checkpoint()
        assert cp is not None and cp["count"] == 20 and cp["root_hash"] == merkle.root(hashes[:20])
        assert s.verify()["ok"]
    crashed._stop_maintenance()
