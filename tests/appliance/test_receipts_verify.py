"""Offline verifier: every tampering of an export or a database is detected and named.

Threat T-RCPT-1 (receipt tampering/deletion). Each test is named after the
attack it stops. The verifier must run with only Python and PyNaCl, so one
test runs a lone copy of verify.py with appliance and sqlite-utils blocked.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from appliance.receipts import cli, envelope, merkle, v1, verify
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore

REPO = Path(__file__).resolve().parents[2]
N = 12


@pytest.fixture
def key() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def db_path(tmp_path: Path, key: NodeKey) -> Iterator[Path]:
    path = tmp_path / "cell.sqlite"
    with ReceiptStore(path, key, checkpoint_every=5) as store:
        for i in range(N):
            store.append(execution_id=str(uuid.uuid4()), tenant_id="t", cell_id=f"c{i % 3}", template="python3",
                         code_hash=v1.code_hash(f"print({i})".encode()),
                         result_hash=v1.result_hash(exit_code=0, status="ok", stderr="", stdout=f"{i}\n"),
                         timestamp_ms=1764300000000 + i)
    yield path


@pytest.fixture
def export(tmp_path: Path, db_path: Path, key: NodeKey) -> Path:
    out = tmp_path / "export.jsonl"
    with ReceiptStore(db_path, key) as store:
        store.export_to(out)
    return out


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, objs: list[dict[str, Any]]) -> None:
    path.write_text("".join(verify.dumps_line(o) for o in objs))


def tamper(export: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    objs = read_lines(export)
    edit(objs)
    write_lines(export, objs)
    return export


def check(path: Path, key: NodeKey, kind: str, seq: int | None = None) -> verify.Report:
    report = verify.verify_export(path, public_keys=[key.public_key_hex])
    assert not report.ok
    assert report.first_problem is not None
    assert report.first_problem.kind == kind, report.first_problem
    if seq is not None:
        assert report.first_problem.seq == seq
    return report


def resign(r: dict[str, Any], prev: str, key: NodeKey) -> None:
    r["receipt_hash"] = v1.receipt_hash(**{f: r[f] for f in ("execution_id", "code_hash", "result_hash", "template", "timestamp")})
    r["prev_chain_hash"] = prev
    r["chain_hash"] = v1.chain_hash(prev, r["receipt_hash"])
    r["key_id"] = key.key_id
    r["signature"] = base64.b64encode(key.sign(verify.envelope_message(r))).decode()


# --- the clean case ---------------------------------------------------------

def test_clean_export_verifies(export: Path, key: NodeKey) -> None:
    lines = read_lines(export)
    header, receipts, trailer = lines[0], lines[1:-1], lines[-1]
    assert header["type"] == "header" and header["node_public_key"] == key.public_key_hex
    assert header["key_id"] == key.key_id and header["schemas"] == ["v1"]
    assert header["checkpoint"]["count"] == N and header["format"] == "cell-receipts-export/2"
    root = merkle.root([r["receipt_hash"] for r in receipts])
    sealed = {"seal": "cell-export-seal/1", "count": N, "last_chain_hash": receipts[-1]["chain_hash"],
              "root_hash": root, "timestamp": trailer["timestamp"], "key_id": key.key_id}
    assert trailer == {"type": "trailer", **sealed, "signature": trailer["signature"]}
    key.verify_key.verify(envelope.canonical_json(sealed), base64.b64decode(trailer["signature"]))
    assert [r["seq"] for r in receipts] == list(range(1, N + 1))
    assert {r["tenant_id"] for r in receipts} == {"t"} and {r["envelope"] for r in receipts} == {envelope.ENVELOPE}
    report = verify.verify_export(export, public_keys=[key.public_key_hex])
    assert report.ok and report.count == N and report.first_problem is None and not report.notes
    assert report.root_hash == root and report.unbound == 0


def test_unpinned_key_verifies_with_a_note(export: Path) -> None:
    report = verify.verify_export(export)
    assert report.ok and any("--public-key" in n for n in report.notes)


def test_clean_database_verifies(db_path: Path, key: NodeKey) -> None:
    report = verify.verify_db(db_path, key.public_key_hex)
    assert report.ok and report.count == N


# --- attacks on an export -----------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("template", "javascript"),
    ("timestamp", 1764300009999),
    ("code_hash", "0" * 64),
    ("result_hash", hashlib.sha256(b"forged").hexdigest()),
    ("execution_id", "00000000-0000-4000-8000-000000000000"),
])
def test_T_RCPT_1_edited_field_detected(export: Path, key: NodeKey, field: str, value: Any) -> None:
    tamper(export, lambda o: o[5].__setitem__(field, value))
    check(export, key, "receipt_hash_mismatch", seq=5)


def test_T_RCPT_1_edited_field_with_recomputed_receipt_hash_detected(export: Path, key: NodeKey) -> None:
    def edit(o: list[dict[str, Any]]) -> None:
        o[5]["template"] = "javascript"
        o[5]["receipt_hash"] = v1.receipt_hash(**{f: o[5][f] for f in ("execution_id", "code_hash", "result_hash", "template", "timestamp")})
    check(tamper(export, edit), key, "chain_hash_mismatch", seq=5)


def test_T_RCPT_1_edited_field_rechained_without_the_key_detected(export: Path, key: NodeKey) -> None:
    attacker = NodeKey.generate()

    def edit(o: list[dict[str, Any]]) -> None:
        o[5]["template"] = "javascript"
        resign(o[5], o[4]["chain_hash"], attacker)
        o[5]["key_id"] = key.key_id  # claims to be the node
    check(tamper(export, edit), key, "bad_signature", seq=5)


def test_T_RCPT_1_v1_hash_mismatch_detected(export: Path, key: NodeKey) -> None:
    tamper(export, lambda o: o[3].__setitem__("receipt_hash", hashlib.sha256(b"other").hexdigest()))
    check(export, key, "receipt_hash_mismatch", seq=3)


def test_T_RCPT_1_pipe_in_field_detected(export: Path, key: NodeKey) -> None:
    tamper(export, lambda o: o[2].__setitem__("template", "python3|1"))
    report = check(export, key, "field_format", seq=2)
    assert "template" in str(report.first_problem)


@pytest.mark.parametrize("index", [1, 6, N])
def test_T_RCPT_1_deleted_row_detected(export: Path, key: NodeKey, index: int) -> None:
    if index == N:  # deleting the last row is a truncated tail: the trailer/checkpoint catch it
        tamper(export, lambda o: o.pop(index))
        check(export, key, "truncated")
    else:
        tamper(export, lambda o: o.pop(index))
        check(export, key, "deleted_row", seq=index + 1)


def test_T_RCPT_1_deleted_row_with_renumbered_seqs_detected(export: Path, key: NodeKey) -> None:
    def edit(o: list[dict[str, Any]]) -> None:
        o.pop(6)
        for r in o[6:-1]:
            r["seq"] -= 1
    check(tamper(export, edit), key, "chain_break", seq=6)


def test_T_RCPT_1_reordering_detected(export: Path, key: NodeKey) -> None:
    def edit(o: list[dict[str, Any]]) -> None:
        o[4], o[7] = o[7], o[4]
    check(tamper(export, edit), key, "reordered", seq=7)


def test_T_RCPT_1_reordering_with_swapped_seqs_detected(export: Path, key: NodeKey) -> None:
    def edit(o: list[dict[str, Any]]) -> None:
        o[4], o[5] = o[5], o[4]
        o[4]["seq"], o[5]["seq"] = 4, 5
    check(tamper(export, edit), key, "chain_break", seq=4)


def test_T_RCPT_1_duplicated_row_detected(export: Path, key: NodeKey) -> None:
    tamper(export, lambda o: o.insert(4, dict(o[3])))
    check(export, key, "duplicate_row", seq=3)


@pytest.mark.parametrize("cut", ["rows_and_trailer", "trailer_only", "rows_keep_trailer", "mid_line"])
def test_T_RCPT_1_truncated_tail_detected(export: Path, key: NodeKey, cut: str) -> None:
    lines = export.read_text().splitlines(keepends=True)
    if cut == "rows_and_trailer":
        kept = lines[:-4]
    elif cut == "trailer_only":
        kept = lines[:-1]
    elif cut == "rows_keep_trailer":
        kept = lines[:-4] + lines[-1:]
    else:
        kept = lines[:-1] + [lines[-1][:15]]
    export.write_text("".join(kept))
    check(export, key, "truncated")


def test_T_RCPT_1_truncated_tail_with_forged_trailer_caught(export: Path, key: NodeKey) -> None:
    def edit(o: list[dict[str, Any]]) -> None:
        del o[-4:-1]
        o[-1] = {"type": "trailer", "count": N - 3, "last_chain_hash": o[-2]["chain_hash"]}
    report = check(tamper(export, edit), key, "truncated")
    assert "signed cell-export-seal/1" in str(report.first_problem)


def test_T_RCPT_1_bad_signature_detected(export: Path, key: NodeKey) -> None:
    def edit(o: list[dict[str, Any]]) -> None:
        sig = bytearray(base64.b64decode(o[8]["signature"]))
        sig[0] ^= 1
        o[8]["signature"] = base64.b64encode(bytes(sig)).decode()
    check(tamper(export, edit), key, "bad_signature", seq=8)


def test_T_RCPT_1_unknown_schema_refused(export: Path, key: NodeKey) -> None:
    tamper(export, lambda o: o[2].__setitem__("schema", "v2"))
    check(export, key, "unknown_schema", seq=2)


def test_T_RCPT_1_unknown_schema_in_header_refused(export: Path, key: NodeKey) -> None:
    tamper(export, lambda o: o[0].__setitem__("schemas", ["v1", "v2"]))
    check(export, key, "unknown_schema")


def test_T_RCPT_1_whole_log_resigned_by_another_key_refused(export: Path, key: NodeKey) -> None:
    attacker = NodeKey.generate()

    def edit(o: list[dict[str, Any]]) -> None:
        o[0]["node_public_key"], o[0]["key_id"], o[0]["keys"] = attacker.public_key_hex, attacker.key_id, {}
        prev = v1.GENESIS
        for r in o[1:-1]:
            resign(r, prev, attacker)
            prev = r["chain_hash"]
    check(tamper(export, edit), key, "untrusted_key")


def test_T_RCPT_1_forged_checkpoint_signature_detected(export: Path, key: NodeKey) -> None:
    tamper(export, lambda o: o[0]["checkpoint"].__setitem__("count", 3))
    check(export, key, "bad_checkpoint_signature")


def test_T_RCPT_1_duplicate_json_keys_refused(export: Path, key: NodeKey) -> None:
    lines = export.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"template":"python3"', '"template":"python3","template":"wasm"')
    export.write_text("".join(lines))
    check(export, key, "malformed")


def test_T_RCPT_1_data_after_trailer_refused(export: Path, key: NodeKey) -> None:
    with export.open("a") as fh:
        fh.write(json.dumps({"note": "smuggled"}) + "\n")
    check(export, key, "malformed")


# --- checkpoint consistency (auditor holds an older checkpoint) -----------------

def test_T_RCPT_1_older_checkpoint_is_prefix_of_newer_log(tmp_path: Path, db_path: Path, key: NodeKey) -> None:
    old = tmp_path / "old.json"
    with ReceiptStore(db_path, key) as store:
        old.write_text(json.dumps(store.checkpoint()))
        for i in range(4):
            store.append(execution_id=str(uuid.uuid4()), tenant_id="t", cell_id=None, template="wasm",
                         code_hash="a" * 64, result_hash="b" * 64, timestamp_ms=i)
        store.export_to(tmp_path / "new.jsonl")
    report = verify.verify_export(tmp_path / "new.jsonl", public_keys=[key.public_key_hex], checkpoints=[old])
    assert report.ok and report.count == N + 4
    assert verify.verify_db(db_path, key.public_key_hex, checkpoints=[old]).ok


def test_T_RCPT_1_rewritten_history_fails_older_checkpoint(tmp_path: Path, key: NodeKey) -> None:
    # The node (or whoever holds its key) rebuilds the log without receipt 2:
    # everything verifies on its own, but not against the auditor's old head.
    def build(path: Path, skip: int | None) -> None:
        with ReceiptStore(path, key) as store:
            for i in range(6):
                if i != skip:
                    store.append(execution_id=f"00000000-0000-4000-8000-00000000000{i}", tenant_id="t",
                                 cell_id=None, template="wasm", code_hash="a" * 64, result_hash="b" * 64, timestamp_ms=i)
    build(tmp_path / "a.sqlite", None)
    build(tmp_path / "b.sqlite", 2)
    conn = sqlite3.connect(tmp_path / "a.sqlite")
    cp = dict(zip(("count", "root_hash", "timestamp", "key_id", "signature"), conn.execute(
        "SELECT count, root_hash, timestamp, key_id, signature FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()))
    conn.close()
    old = tmp_path / "old.json"
    old.write_text(json.dumps(cp))
    assert verify.verify_db(tmp_path / "b.sqlite", key.public_key_hex).ok
    report = verify.verify_db(tmp_path / "b.sqlite", key.public_key_hex, checkpoints=[old])
    assert not report.ok and report.first_problem is not None
    assert report.first_problem.kind == "truncated"  # old head counted 6, the rewrite holds 5
    with ReceiptStore(tmp_path / "b.sqlite", key) as store:
        store.append(execution_id="00000000-0000-4000-8000-000000000009", tenant_id="t", cell_id=None,
                     template="wasm", code_hash="a" * 64, result_hash="b" * 64, timestamp_ms=9)
    report = verify.verify_db(tmp_path / "b.sqlite", key.public_key_hex, checkpoints=[old])
    assert report.first_problem is not None and report.first_problem.kind == "not_append_only"


# --- attacks on the database ------------------------------------------------------

def _db_exec(db: Path, *sql: str) -> None:
    conn = sqlite3.connect(db)
    for trig in ("receipts_no_update", "receipts_no_delete", "checkpoints_no_update", "checkpoints_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trig}")  # an attacker with the file drops the guards
    for s in sql:
        conn.execute(s)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("sql,kind,seq", [
    ("DELETE FROM receipts WHERE seq = 4", "deleted_row", 5),
    ("UPDATE receipts SET result_hash = '" + "f" * 64 + "' WHERE seq = 7", "receipt_hash_mismatch", 7),
    ("UPDATE receipts SET signature = 'AAAA' WHERE seq = 2", "bad_signature", 2),
    ("UPDATE receipts SET schema = 'v9' WHERE seq = 1", "unknown_schema", 1),
    ("DELETE FROM receipts WHERE seq > 9", "truncated", None),
])
def test_T_RCPT_1_database_tampering_detected(db_path: Path, key: NodeKey, sql: str, kind: str, seq: int | None) -> None:
    _db_exec(db_path, sql)
    report = verify.verify_db(db_path, key.public_key_hex)
    assert not report.ok and report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq) == (kind, seq)


def test_T_RCPT_1_database_checkpoint_rollback_detected(db_path: Path, key: NodeKey) -> None:
    with ReceiptStore(db_path, key) as store:
        store.checkpoint()
    _db_exec(db_path, "INSERT INTO checkpoints (count, root_hash, timestamp, key_id, signature) "
                      "SELECT count, root_hash, timestamp, key_id, signature FROM checkpoints WHERE count = 5")
    report = verify.verify_db(db_path, key.public_key_hex)
    assert report.first_problem is not None and report.first_problem.kind == "checkpoint_mismatch"


# --- the standalone verifier --------------------------------------------------------

def test_verifier_copy_agrees_with_v1_module() -> None:
    from tests.appliance.test_receipts_v1 import GOOD, VECTOR_RECEIPT_HASH

    assert verify.v1_receipt_hash(GOOD) == v1.receipt_hash(**GOOD) == VECTOR_RECEIPT_HASH
    assert verify.chain_hash(v1.GENESIS, VECTOR_RECEIPT_HASH) == v1.chain_hash(v1.GENESIS, VECTOR_RECEIPT_HASH)
    cp = {"count": 3, "root_hash": VECTOR_RECEIPT_HASH, "timestamp": 9, "key_id": "0123456789abcdef"}
    assert verify.checkpoint_message(cp) == v1.checkpoint_message(**cp)
    leaves = [hashlib.sha256(bytes([i])).hexdigest() for i in range(40)]
    tree = verify._Merkle()
    for n in range(41):
        assert tree.root() == merkle.root(leaves[:n])
        if n < 40:
            tree.push(leaves[n])


def test_verifier_copy_agrees_with_v1_validation_table() -> None:
    from tests.appliance import test_receipts_v1 as t

    marks = t.test_T_RCPT_1_field_format_rejected.pytestmark  # type: ignore[attr-defined]
    table = next(m.args[1] for m in marks if m.name == "parametrize")
    assert verify._v1_field_error(t.GOOD) is None
    for field, value in table:
        assert verify._v1_field_error({**t.GOOD, field: value}) == field, (field, value)


def test_cli_main_exit_codes(export: Path, key: NodeKey, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify.main([str(export), "--public-key", key.public_key_hex]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {N} receipts")
    tamper(export, lambda o: o.pop(3))
    assert verify.main([str(export), "--public-key", key.public_key_hex]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL:") and "deleted_row" in out
    assert verify.main([str(export), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_problem"]["kind"] == "deleted_row"


def test_python_dash_m_entry_point(export: Path, db_path: Path, key: NodeKey) -> None:
    ok = subprocess.run([sys.executable, "-m", "appliance.receipts.verify", str(export)], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    db = subprocess.run([sys.executable, "-m", "appliance.receipts.verify", "--db", str(db_path),
                         "--public-key", key.public_key_hex], cwd=REPO, capture_output=True, text=True)
    assert db.returncode == 0, db.stdout + db.stderr
    missing = subprocess.run([sys.executable, "-m", "appliance.receipts.verify", str(export) + ".nope"],
                             cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 1 and "unreadable" in missing.stdout


AUDITOR = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"appliance", "sqlite_utils", "flask", "wasmtime", "tests"}:
                raise ImportError(f"auditor machine has no {name}")
            return None

    sys.meta_path.insert(0, Block())
    spec = importlib.util.spec_from_file_location("verify", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["verify"] = mod  # as `import verify` would (dataclasses look it up)
    spec.loader.exec_module(mod)
    sys.exit(mod.main(sys.argv[2:]))
    """
)


def test_T_RCPT_1_lone_copy_runs_with_only_stdlib_and_nacl(tmp_path: Path, export: Path, db_path: Path,
                                                            key: NodeKey) -> None:
    auditor = tmp_path / "auditor"
    auditor.mkdir()
    shutil.copy(REPO / "appliance" / "receipts" / "verify.py", auditor / "verify.py")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-I", "-c", AUDITOR, str(auditor / "verify.py"), *args],
                              cwd=auditor, capture_output=True, text=True)

    good = run(str(export), "--public-key", key.public_key_hex)
    assert good.returncode == 0, good.stdout + good.stderr
    assert run("--db", str(db_path), "--public-key", key.public_key_hex).returncode == 0
    tamper(export, lambda o: o[4].__setitem__("template", "wasm"))
    bad = run(str(export), "--public-key", key.public_key_hex)
    assert bad.returncode == 1 and "receipt_hash_mismatch" in bad.stdout


def test_verify_module_imports_nothing_from_appliance() -> None:
    source = (REPO / "appliance" / "receipts" / "verify.py").read_text()
    imports = [line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))]
    allowed = {"argparse", "base64", "binascii", "hashlib", "json", "re", "sys", "dataclasses", "pathlib",
               "typing", "sqlite3", "__future__", "nacl.exceptions", "nacl.signing"}
    for line in imports:
        module = line.split()[1]
        assert module in allowed, line


# --- the operator CLI -------------------------------------------------------------

def _cell(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cell")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    result: int = args.func(args)
    return result


def test_cell_receipts_export_then_verify(tmp_path: Path, db_path: Path, key: NodeKey,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    seed_key = NodeKey.load_or_create(tmp_path / "k2")
    with ReceiptStore(tmp_path / "node.sqlite", seed_key) as store:
        store.append(execution_id=str(uuid.uuid4()), tenant_id="t", cell_id=None, template="wasm",
                     code_hash="a" * 64, result_hash="b" * 64, timestamp_ms=1)
    out = tmp_path / "out.jsonl"
    assert _cell("receipts", "export", "--out", str(out), "--db", str(tmp_path / "node.sqlite"),
                 "--keys-dir", str(tmp_path / "k2")) == 0
    assert seed_key.public_key_hex in capsys.readouterr().out
    assert _cell("receipts", "verify", str(out), "--public-key", seed_key.public_key_hex) == 0
    assert _cell("receipts", "verify", "--db", str(tmp_path / "node.sqlite"),
                 "--public-key", seed_key.public_key_hex) == 0
    # a database signed by another node's key fails against this pin
    assert _cell("receipts", "verify", "--db", str(db_path), "--public-key", seed_key.public_key_hex) == 1
    assert "unknown_key" in capsys.readouterr().out


def test_cell_receipts_defaults_come_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.config import load_settings

    monkeypatch.setenv("SYNAPSE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("SYNAPSE_CONFIG_DIR", str(tmp_path / "etc"))
    settings = load_settings()
    node_key = NodeKey.load_or_create(settings.keys_dir)
    with ReceiptStore(settings.db_path, node_key) as store:
        store.append(execution_id=str(uuid.uuid4()), tenant_id="t", cell_id=None, template="wasm",
                     code_hash="a" * 64, result_hash="b" * 64, timestamp_ms=1)
    out = tmp_path / "out.jsonl"
    assert _cell("receipts", "export", "--out", str(out)) == 0
    assert _cell("receipts", "verify", "--db", str(settings.db_path)) == 0  # pinned to this node's key
    assert _cell("receipts", "verify", str(out), "--public-key", node_key.public_key_hex) == 0
    assert capsys.readouterr().out.count("OK: 1 receipts") == 2
