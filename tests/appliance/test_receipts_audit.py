"""The live receipt auditor behind GET /v1/receipts/verify (threats T-DOS-2, T-TENANT-1).

Incremental and cached: each row is checked once per process, rows under the
start-up checkpoint by hash only; counted by ``rows_checked`` and
``signatures_checked``, so these tests need no timing. A tenant's answer
describes its own receipts only. The live-server side (rate limit, a
concurrent run staying fast) is in test_api_receipts_verify.py.
"""
from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from appliance.receipts.audit import ReceiptAuditor
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore


@pytest.fixture
def key() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cell.sqlite"


@pytest.fixture
def store(db_path: Path, key: NodeKey) -> Iterator[ReceiptStore]:
    s = ReceiptStore(db_path, key, checkpoint_every=0)
    yield s
    s.close()


def append(store: ReceiptStore, tenant: str, n: int = 1) -> list[str]:
    ids = []
    for _ in range(n):
        eid = str(uuid.uuid4())
        store.append(execution_id=eid, tenant_id=tenant, cell_id=None, template="python3", code_hash="a" * 64,
                     result_hash="b" * 64, timestamp_ms=1764300000000)
        ids.append(eid)
    return ids


def auditor_for(store: ReceiptStore) -> ReceiptAuditor:
    return ReceiptAuditor(store, batch=7)  # a small batch: several rounds per walk


def caught_up(auditor: ReceiptAuditor) -> dict[str, int]:
    assert auditor.catch_up(timeout=60)
    return auditor.stats()


def tamper(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS receipts_no_update")  # what an attacker with the file does
    conn.execute("DROP TRIGGER IF EXISTS receipts_no_delete")
    conn.execute(sql)
    conn.commit()
    conn.close()


def test_T_DOS_2_second_check_walks_only_new_rows(store: ReceiptStore) -> None:
    append(store, "acme", 10)
    auditor = auditor_for(store)
    try:
        assert caught_up(auditor) == {"verified_through": 10, "rows_checked": 10, "signatures_checked": 10, "failed": 0}
        append(store, "acme", 3)
        assert caught_up(auditor) == {"verified_through": 13, "rows_checked": 13, "signatures_checked": 13, "failed": 0}
        for _ in range(3):  # asking again with nothing new costs nothing
            assert auditor.tenant_status("acme")["status"] == "verified"
        assert caught_up(auditor)["rows_checked"] == 13
    finally:
        auditor.close()


def test_T_DOS_2_resumes_from_the_latest_signed_checkpoint(store: ReceiptStore) -> None:
    append(store, "acme", 20)
    store.checkpoint()
    append(store, "globex", 5)
    auditor = auditor_for(store)
    try:
        # 25 rows hashed, but only the 5 after the signed head need a signature check.
        assert caught_up(auditor) == {"verified_through": 25, "rows_checked": 25, "signatures_checked": 5, "failed": 0}
        assert auditor.tenant_status("acme")["verified"] == 20
    finally:
        auditor.close()


def test_T_TENANT_1_status_describes_only_the_callers_receipts(store: ReceiptStore) -> None:
    mine = append(store, "acme", 3)
    theirs = append(store, "globex", 8)
    auditor = auditor_for(store)
    try:
        answer = auditor.tenant_status("acme")
        assert answer == {"ok": True, "status": "verified", "receipts": 3, "verified": 3, "unverified": 0,
                          "first_problem": None}
        text = json.dumps(answer)
        assert not any(eid in text for eid in theirs + mine)
        assert "11" not in text and store.count() == 11  # the node-wide count is not in the answer
        assert auditor.tenant_status("nobody")["receipts"] == 0
    finally:
        auditor.close()


@pytest.mark.parametrize("where", ["after_checkpoint", "under_checkpoint"])
def test_T_TENANT_1_broken_row_named_only_to_its_owner(store: ReceiptStore, db_path: Path, where: str) -> None:
    append(store, "acme", 4)
    victim = append(store, "globex", 1)[0]  # seq 5
    append(store, "acme", 4)
    if where == "under_checkpoint":
        store.checkpoint()  # row 5 is then checked by hash against the signed head
        tamper(db_path, f"UPDATE receipts SET result_hash = '{'f' * 64}' WHERE seq = 5")
        kind = "receipt_hash_mismatch"
    else:
        tamper(db_path, "UPDATE receipts SET cell_id = 'cell-x' WHERE seq = 5")  # T-RCPT-2: bound by the envelope
        kind = "bad_signature"
    auditor = auditor_for(store)
    try:
        caught_up(auditor)
        owner = auditor.tenant_status("globex")
        assert owner["ok"] is False and owner["status"] == "failed"
        assert owner["first_problem"] == {"kind": kind, "yours": True, "seq": 5, "execution_id": victim}
        other = auditor.tenant_status("acme")
        assert other["ok"] is False and other["first_problem"] == {"kind": kind, "yours": False}
        assert victim not in json.dumps(other)
        # Rows before the break are verified unless they sit under a head that could not be confirmed.
        assert other["verified"] == (4 if where == "after_checkpoint" else 0) and other["receipts"] == 8
    finally:
        auditor.close()


def test_T_DOS_2_truncated_log_is_reported_to_everyone_without_a_row(store: ReceiptStore, db_path: Path) -> None:
    append(store, "acme", 6)
    store.checkpoint()
    tamper(db_path, "DELETE FROM receipts WHERE seq > 4")
    auditor = auditor_for(store)
    try:
        caught_up(auditor)
        answer = auditor.tenant_status("acme")
        assert answer["status"] == "failed" and answer["first_problem"] == {"kind": "truncated", "yours": False}
    finally:
        auditor.close()


def test_new_checkpoints_are_matched_as_the_log_grows(store: ReceiptStore, db_path: Path) -> None:
    append(store, "acme", 3)
    auditor = auditor_for(store)
    try:
        caught_up(auditor)
        append(store, "acme", 4)
        store.checkpoint()  # a head over 7 rows, beyond what the auditor has walked
        append(store, "acme", 2)
        stats = caught_up(auditor)
        assert stats["failed"] == 0 and stats["verified_through"] == 9 and stats["signatures_checked"] == 9
    finally:
        auditor.close()


def test_auditor_thread_ends_on_close(store: ReceiptStore) -> None:
    append(store, "acme", 2)
    auditor = auditor_for(store)
    auditor.tenant_status("acme")
    thread = auditor._thread
    auditor.close()
    assert thread is not None and not thread.is_alive()
    assert auditor.tenant_status("acme")["receipts"] == 2  # still answers from the cache
