"""Signed receipt envelopes and export seals (threat T-RCPT-2).

A receipt's signature now covers an envelope that binds tenant_id and cell_id
to the v1 chain hash (the v1 formulas themselves are unchanged: their vectors
in test_receipts_v1.py still pass as they were). An export ends with a signed
seal, so cutting rows off its end is caught without any header. Pre-envelope
receipts and exports still verify, and the report says what they leave
unbound.
"""
from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from appliance.receipts import envelope, merkle, v1, verify
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from tests.appliance.test_receipts_v1 import (
    VECTOR_CHAIN_HASH,
    VECTOR_KEY_ID,
    VECTOR_RECEIPT_HASH,
    VECTOR_SEED,
)
from tests.factories import make_legacy_receipts

REPO = Path(__file__).resolve().parents[2]
N = 9

# --- the published envelope vector (also in docs/receipts.md) -----------------
VECTOR_TENANT = "default"
VECTOR_CELL = "cell-0a1b2c3d"
VECTOR_ENVELOPE = (
    '{"cell_id":"cell-0a1b2c3d","chain_hash":"528df492d6451de65ad06a913085535d95abe2d47f6cc0ce3980f6d027ff16d7",'
    '"envelope":"cell-receipt-envelope/1","extensions":{},"key_id":"56475aa75463474c",'
    '"receipt_hash":"f24859c1148588f584485e9a6a8b422ed05cd49de6d5e3598ec6ab30c17feb2e","schema":"v1","seq":1,'
    '"tenant_id":"default"}'
)
VECTOR_ENVELOPE_SIGNATURE = "k/vlMGxrk8OcPsaYfAASZIbYHyOvxNyAFOwOxJZtkKJrKg7eeh+5FbC9LFau76J+kH7vYmtIXfugx1Chbs08CQ=="
VECTOR_SEAL = (
    '{"count":1,"key_id":"56475aa75463474c",'
    '"last_chain_hash":"528df492d6451de65ad06a913085535d95abe2d47f6cc0ce3980f6d027ff16d7",'
    '"root_hash":"84a998ba44cd986b9d168622848aa67ec778dc6936627bd037fb0d98dd3b3a86",'
    '"seal":"cell-export-seal/1","timestamp":1764300000500}'
)
VECTOR_SEAL_SIGNATURE = "plwE0UmRpaCz1lpmcYaVzMsMsNVjzZlrmB4ftjJEd1z3tRovJraWf8ISIfnpACKxa89tFTwqVEOwL67n200xBA=="


def test_T_RCPT_2_envelope_vector_built_independently() -> None:
    # Built with json + hashlib alone from the documented rule; the v1 hashes inside are the v1 vector's.
    env = {"envelope": "cell-receipt-envelope/1", "schema": "v1", "seq": 1, "receipt_hash": VECTOR_RECEIPT_HASH,
           "chain_hash": VECTOR_CHAIN_HASH, "tenant_id": VECTOR_TENANT, "cell_id": VECTOR_CELL,
           "key_id": VECTOR_KEY_ID, "extensions": {}}
    assert json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == VECTOR_ENVELOPE
    ours = envelope.envelope_message(seq=1, receipt_hash=VECTOR_RECEIPT_HASH, chain_hash=VECTOR_CHAIN_HASH,
                                     tenant_id=VECTOR_TENANT, cell_id=VECTOR_CELL, key_id=VECTOR_KEY_ID)
    assert ours == VECTOR_ENVELOPE.encode() == verify.envelope_message(env)
    key = NodeKey.from_seed(VECTOR_SEED)
    assert base64.b64encode(key.sign(ours)).decode() == VECTOR_ENVELOPE_SIGNATURE


def test_T_RCPT_2_seal_vector() -> None:
    root = hashlib.sha256(b"\x00" + bytes.fromhex(VECTOR_RECEIPT_HASH)).hexdigest()
    assert root == merkle.root([VECTOR_RECEIPT_HASH])
    fields = {"count": 1, "last_chain_hash": VECTOR_CHAIN_HASH, "root_hash": root, "timestamp": 1764300000500,
              "key_id": VECTOR_KEY_ID}
    assert envelope.seal_message(**fields) == VECTOR_SEAL.encode() == verify.seal_message({"seal": envelope.SEAL, **fields})
    assert base64.b64encode(NodeKey.from_seed(VECTOR_SEED).sign(VECTOR_SEAL.encode())).decode() == VECTOR_SEAL_SIGNATURE


def test_T_RCPT_2_signed_messages_never_collide_with_legacy_ones() -> None:
    # Legacy receipt signatures are over 64 hex, checkpoints over "cell-checkpoint/v1|…";
    # envelopes and seals are JSON objects with different version keys.
    assert VECTOR_ENVELOPE.startswith("{") and VECTOR_SEAL.startswith("{")
    assert '"envelope":' in VECTOR_ENVELOPE and '"seal":' not in VECTOR_ENVELOPE
    assert '"seal":' in VECTOR_SEAL and '"envelope":' not in VECTOR_SEAL


def test_verifier_copy_agrees_with_envelope_module() -> None:
    assert verify.ENVELOPE == envelope.ENVELOPE and verify.SEAL == envelope.SEAL
    assert verify.KNOWN_EXTENSIONS == envelope.KNOWN_EXTENSIONS
    assert verify.canonical_json({"b": "ü", "a": [1, None]}) == envelope.canonical_json({"b": "ü", "a": [1, None]})


@pytest.mark.parametrize(("field", "value"), [
    ("tenant_id", ""), ("tenant_id", "a|b"), ("tenant_id", "a" * 65), ("tenant_id", "t\n"), ("tenant_id", None),
    ("tenant_id", "t\u00e9"), ("cell_id", ""), ("cell_id", "c/../d"), ("cell_id", 5), ("cell_id", "c" * 65),
])
def test_T_RCPT_2_store_refuses_ids_the_envelope_cannot_carry(tmp_path: Path, field: str, value: Any) -> None:
    args: dict[str, Any] = {"execution_id": str(uuid.uuid4()), "tenant_id": "t", "cell_id": None,
                            "template": "python3", "code_hash": "a" * 64, "result_hash": "b" * 64, "timestamp_ms": 1}
    with ReceiptStore(tmp_path / "db.sqlite", NodeKey.generate(), checkpoint_every=0) as store:
        with pytest.raises(v1.ReceiptFieldError) as info:
            store.append(**{**args, field: value})
        assert info.value.field == field and store.count() == 0


# --- exports: swapping tenant or cell, cutting the tail ------------------------------

@pytest.fixture
def key() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def db_path(tmp_path: Path, key: NodeKey) -> Path:
    path = tmp_path / "cell.sqlite"
    with ReceiptStore(path, key, checkpoint_every=4) as store:
        for i in range(N):
            store.append(execution_id=str(uuid.uuid4()), tenant_id="acme" if i % 2 else "globex",
                         cell_id=None if i % 3 == 0 else f"cell-{i % 3}", template="python3",
                         code_hash=v1.code_hash(f"print({i})".encode()),
                         result_hash=v1.result_hash(exit_code=0, status="ok", stderr="", stdout=f"{i}\n"),
                         timestamp_ms=1764300000000 + i)
    return path


@pytest.fixture
def export(tmp_path: Path, db_path: Path, key: NodeKey) -> Path:
    out = tmp_path / "export.jsonl"
    with ReceiptStore(db_path, key) as store:
        store.export_to(out)
    return out


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rewrite(path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    objs = lines_of(path)
    edit(objs)
    path.write_text("".join(verify.dumps_line(o) for o in objs))
    return path


def verify_cli(path: Path, key: NodeKey) -> tuple[int, str]:
    """The auditor's command, in a child process: python -m appliance.receipts.verify FILE."""
    done = subprocess.run([sys.executable, "-m", "appliance.receipts.verify", str(path), "--public-key",
                           key.public_key_hex, "--json"], cwd=REPO, capture_output=True, text=True)
    report = json.loads(done.stdout)
    return done.returncode, (report["first_problem"] or {}).get("kind", "")


def failure(path: Path, key: NodeKey) -> verify.Problem:
    report = verify.verify_export(path, public_keys=[key.public_key_hex])
    assert not report.ok and report.first_problem is not None
    return report.first_problem


def test_clean_export_binds_tenant_and_cell(export: Path, key: NodeKey) -> None:
    rows = lines_of(export)[1:-1]
    assert {r["tenant_id"] for r in rows} == {"acme", "globex"} and None in {r["cell_id"] for r in rows}
    assert verify_cli(export, key) == (0, "")


def _swap(field: str, value: Any) -> Callable[[list[dict[str, Any]]], None]:
    return lambda o: o[4].__setitem__(field, value)


@pytest.mark.parametrize("edit,what", [
    (lambda o: o[4].__setitem__("cell_id", o[5]["cell_id"]), "cell_id moved to another cell of the log"),
    (lambda o: o[5].__setitem__("cell_id", None), "cell_id dropped (claims a one-shot run)"),
    (lambda o: o[3].__setitem__("cell_id", "cell-9"), "one-shot run claimed by a cell"),
    (lambda o: o[4].__setitem__("tenant_id", o[5]["tenant_id"]), "receipt moved to the other tenant"),
    (lambda o: o[4].__setitem__("tenant_id", "mallory"), "receipt moved to an unknown tenant"),
    (lambda o: (o[4].__setitem__("tenant_id", o[5]["tenant_id"]), o[5].__setitem__("tenant_id", o[4]["tenant_id"])),
     "tenants of two receipts swapped"),
])
def test_T_RCPT_2_tenant_or_cell_swap_in_export_detected(export: Path, key: NodeKey,
                                                        edit: Callable[[list[dict[str, Any]]], None], what: str) -> None:
    before = lines_of(export)
    rewrite(export, edit)
    assert lines_of(export) != before, what
    problem = failure(export, key)
    assert problem.kind == "bad_signature" and problem.seq in (3, 4, 5), (what, problem)
    assert "envelope" in problem.detail
    assert verify_cli(export, key) == (1, "bad_signature")


@pytest.mark.parametrize("seq,kind", [(1, "bad_signature"), (6, "downgrade")])
def test_T_RCPT_2_stripping_the_envelope_is_detected(export: Path, key: NodeKey, seq: int, kind: str) -> None:
    # Claiming a row is pre-envelope (so its ids would be unbound) needs a signature over the
    # bare chain hash, and no pre-envelope row may follow an enveloped one.
    rewrite(export, lambda o: (o[seq].__setitem__("envelope", None), o[seq].__setitem__("cell_id", "cell-9")))
    problem = failure(export, key)
    assert (problem.kind, problem.seq) == (kind, seq)


def test_T_RCPT_2_legacy_row_after_enveloped_rows_is_a_downgrade(export: Path, key: NodeKey) -> None:
    # Even a genuine chain-hash signature (the key holder, or an old binary) may not follow an envelope.
    def edit(o: list[dict[str, Any]]) -> None:
        o[6]["envelope"], o[6]["extensions"] = None, None
        o[6]["signature"] = base64.b64encode(key.sign(o[6]["chain_hash"].encode())).decode()
    problem = failure(rewrite(export, edit), key)
    assert (problem.kind, problem.seq) == ("downgrade", 6)


@pytest.mark.parametrize("edit,kind", [
    (lambda o: o[2].__setitem__("envelope", "cell-receipt-envelope/2"), "unknown_envelope"),
    (lambda o: o[2].__setitem__("extensions", {"results/9": {}}), "unknown_extension"),
    (lambda o: o[2].__setitem__("extensions", []), "field_format"),
    (lambda o: o[2].__setitem__("tenant_id", "a|b"), "field_format"),
    (lambda o: o[2].pop("tenant_id"), "missing_field"),
])
def test_T_RCPT_2_unknown_or_malformed_envelope_refused(export: Path, key: NodeKey,
                                                        edit: Callable[[list[dict[str, Any]]], None], kind: str) -> None:
    problem = failure(rewrite(export, edit), key)
    assert (problem.kind, problem.seq) == (kind, 2)


@pytest.mark.parametrize("drop", [1, 3, N])
@pytest.mark.parametrize("trailer", ["kept", "rewritten", "removed"])
def test_T_RCPT_2_truncated_export_detected_without_header(export: Path, key: NodeKey, drop: int, trailer: str) -> None:
    def edit(o: list[dict[str, Any]]) -> None:
        o[0]["checkpoint"] = None  # the header's signed count is optional: do without it
        end = o.pop()
        del o[len(o) - drop:]
        if trailer == "rewritten":  # make the unsigned-looking parts agree with what is left
            tree = merkle.root([r["receipt_hash"] for r in o[1:]])
            end.update(count=N - drop, last_chain_hash=o[-1]["chain_hash"] if len(o) > 1 else v1.GENESIS, root_hash=tree)
        if trailer != "removed":
            o.append(end)
    rewrite(export, edit)
    expected = {"kept": "truncated", "rewritten": "bad_seal_signature", "removed": "truncated"}[trailer]
    assert failure(export, key).kind == expected
    assert verify_cli(export, key) == (1, expected)


def test_T_RCPT_2_export_without_header_checkpoint_still_verifies(export: Path, key: NodeKey) -> None:
    rewrite(export, lambda o: o[0].__setitem__("checkpoint", None))
    report = verify.verify_export(export, public_keys=[key.public_key_hex])
    assert report.ok and report.count == N


@pytest.mark.parametrize("edit", [
    lambda o: o[-1].pop("signature"),
    lambda o: o[-1].__setitem__("seal", "cell-export-seal/0"),
    lambda o: o[-1].__setitem__("extra", 1),
    lambda o: o[-1].__setitem__("timestamp", o[-1]["timestamp"] + 1),
])
def test_T_RCPT_2_edited_seal_refused(export: Path, key: NodeKey, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    assert failure(rewrite(export, edit), key).kind in ("truncated", "bad_seal_signature")


def test_T_RCPT_2_seal_from_another_key_refused(export: Path, key: NodeKey) -> None:
    other = NodeKey.generate()

    def edit(o: list[dict[str, Any]]) -> None:
        fields = {k: o[-1][k] for k in ("count", "last_chain_hash", "root_hash", "timestamp")}
        o[-1]["signature"] = base64.b64encode(other.sign(envelope.seal_message(**fields, key_id=key.key_id))).decode()
    assert failure(rewrite(export, edit), key).kind == "bad_seal_signature"


# --- pre-envelope receipts and exports --------------------------------------------------

LEGACY_SCHEMA = """
CREATE TABLE receipts (seq INTEGER PRIMARY KEY, schema TEXT NOT NULL, execution_id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL, cell_id TEXT, template TEXT NOT NULL, code_hash TEXT NOT NULL, result_hash TEXT NOT NULL,
    timestamp INTEGER NOT NULL, receipt_hash TEXT NOT NULL, prev_chain_hash TEXT NOT NULL UNIQUE,
    chain_hash TEXT NOT NULL UNIQUE, signature TEXT NOT NULL, key_id TEXT NOT NULL);
CREATE TABLE checkpoints (id INTEGER PRIMARY KEY AUTOINCREMENT, count INTEGER NOT NULL, root_hash TEXT NOT NULL,
    timestamp INTEGER NOT NULL, key_id TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE receipt_keys (key_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, first_used INTEGER NOT NULL);
"""


def make_legacy_db(path: Path, key: NodeKey, n: int) -> list[dict[str, Any]]:
    rows = make_legacy_receipts(key, n)
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SCHEMA)
    conn.execute("INSERT INTO receipt_keys VALUES (?, ?, 0)", (key.key_id, key.public_key_hex))
    for r in rows:
        conn.execute(f"INSERT INTO receipts ({', '.join(verify.RECEIPT_FIELDS)}, tenant_id) "
                     f"VALUES ({', '.join('?' * len(verify.RECEIPT_FIELDS))}, 'old')",
                     [r[f] for f in verify.RECEIPT_FIELDS])
    cp = {"count": n, "root_hash": merkle.root([r["receipt_hash"] for r in rows]), "timestamp": 5, "key_id": key.key_id}
    cp["signature"] = base64.b64encode(key.sign(v1.checkpoint_message(**cp))).decode()
    conn.execute("INSERT INTO checkpoints (count, root_hash, timestamp, key_id, signature) VALUES (?, ?, ?, ?, ?)",
                 (cp["count"], cp["root_hash"], cp["timestamp"], cp["key_id"], cp["signature"]))
    conn.commit()
    conn.close()
    return rows


def test_T_RCPT_2_pre_envelope_database_verifies_as_unbound_then_upgrades(tmp_path: Path, key: NodeKey) -> None:
    db = tmp_path / "old.sqlite"
    make_legacy_db(db, key, 4)
    report = verify.verify_db(db, key.public_key_hex)  # no envelope columns at all
    assert report.ok and report.count == 4 and report.unbound == 4
    assert any("not covered by any signature" in n for n in report.notes)
    with ReceiptStore(db, key, checkpoint_every=0) as store:  # migration 0005 adds the columns
        store.append(execution_id=str(uuid.uuid4()), tenant_id="acme", cell_id=None, template="python3",
                     code_hash="c" * 64, result_hash="d" * 64, timestamp_ms=9)
        assert store.verify()["ok"]
        store.export_to(tmp_path / "mixed.jsonl")
    mixed = verify.verify_db(db, key.public_key_hex)
    assert mixed.ok and (mixed.count, mixed.unbound) == (5, 4)
    exported = verify.verify_export(tmp_path / "mixed.jsonl", public_keys=[key.public_key_hex])
    assert exported.ok and (exported.count, exported.unbound) == (5, 4)
    rows = lines_of(tmp_path / "mixed.jsonl")[1:-1]
    assert [r["envelope"] for r in rows] == [None] * 4 + [envelope.ENVELOPE]
    # What "unbound" means, pinned: a pre-envelope row's cell can be edited undetected…
    rewrite(tmp_path / "mixed.jsonl", lambda o: o[2].__setitem__("cell_id", "cell-other"))
    assert verify.verify_export(tmp_path / "mixed.jsonl", public_keys=[key.public_key_hex]).ok
    # …an enveloped one's cannot.
    rewrite(tmp_path / "mixed.jsonl", lambda o: o[5].__setitem__("cell_id", "cell-other"))
    assert failure(tmp_path / "mixed.jsonl", key).kind == "bad_signature"


def write_legacy_export(path: Path, key: NodeKey, rows: list[dict[str, Any]], *, checkpoint: bool = True) -> Path:
    cp: dict[str, Any] | None = None
    if checkpoint:
        cp = {"count": len(rows), "root_hash": merkle.root([r["receipt_hash"] for r in rows]), "timestamp": 7,
              "key_id": key.key_id}
        cp["signature"] = base64.b64encode(key.sign(v1.checkpoint_message(**cp))).decode()
    header = {"type": "header", "format": "cell-receipts-export/1", "node_public_key": key.public_key_hex,
              "key_id": key.key_id, "keys": {key.key_id: key.public_key_hex}, "schemas": ["v1"],
              "checkpoint": cp, "exported_at": 8}
    trailer = {"type": "trailer", "count": len(rows), "last_chain_hash": rows[-1]["chain_hash"]}
    path.write_text("".join(verify.dumps_line(o) for o in [header, *rows, trailer]))
    return path


def test_T_RCPT_2_pre_envelope_export_verifies_with_explicit_notes(tmp_path: Path, key: NodeKey) -> None:
    path = write_legacy_export(tmp_path / "v1.jsonl", key, make_legacy_receipts(key, 5))
    report = verify.verify_export(path, public_keys=[key.public_key_hex])
    assert report.ok and (report.count, report.unbound) == (5, 5)
    assert any("cell-receipts-export/1" in n for n in report.notes)
    assert any("not covered by any signature" in n for n in report.notes)


def test_T_RCPT_2_pre_envelope_export_cut_short_detected_by_its_checkpoint(tmp_path: Path, key: NodeKey) -> None:
    rows = make_legacy_receipts(key, 5)
    path = write_legacy_export(tmp_path / "v1.jsonl", key, rows)
    rewrite(path, lambda o: (o.pop(-2), o.pop(-2), o[-1].update(count=3, last_chain_hash=o[-2]["chain_hash"])))
    assert failure(path, key).kind == "truncated"


def test_T_RCPT_2_pre_envelope_export_without_checkpoint_refused(tmp_path: Path, key: NodeKey) -> None:
    # Its trailer is unsigned, so without the header checkpoint a cut tail could not be seen.
    path = write_legacy_export(tmp_path / "v1.jsonl", key, make_legacy_receipts(key, 5), checkpoint=False)
    assert failure(path, key).kind == "truncated"
