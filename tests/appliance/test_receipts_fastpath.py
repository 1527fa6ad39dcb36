"""The receipt run path builds the same bytes as the receipt definitions (T-RCPT-1, T-RCPT-2).

``v1.canonical_result``, ``envelope.envelope_message`` and ``NodeKey.sign``
write their bytes by hand on the run path (no json encoder per call, no
PyNaCl SignedMessage). Each is compared here with its definition — json.dumps
of the documented object, ``canonical_json(envelope(...))``, PyNaCl's
``SigningKey.sign`` — over a table of inputs: unicode, escapes, large
integers, empty output, every status, errors. A bad field is refused with
the same error as by the definition. A receipt the store appends is then
rebuilt from the definitions and compared byte for byte (signature, row).
"""
from __future__ import annotations

import base64
import enum
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import nacl.signing
import pytest

from appliance.receipts import envelope, v1, verify
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ROW_FIELDS, ReceiptStore

HEX_A, HEX_B = "a" * 64, "0123456789abcdef" * 4
KEY_ID = "0123456789abcdef"


class Code(enum.IntEnum):
    FAIL = 3


class Text(str):
    pass


RESULTS: list[dict[str, Any]] = [
    {"exit_code": 0, "status": "ok", "stderr": "", "stdout": "2\n"},
    {"exit_code": 0, "status": "ok", "stderr": "", "stdout": ""},
    {"exit_code": 1, "status": "error", "stderr": "Fehler: ü ✓ 中文 😀", "stdout": "naïve"},
    {"exit_code": -1, "status": "killed", "stderr": "", "stdout": ""},
    {"exit_code": 2**70, "status": "timeout", "stderr": "x", "stdout": "y"},
    {"exit_code": -(2**70), "status": "memory_limit", "stderr": "", "stdout": ""},
    {"exit_code": 137, "status": "output_limit", "stderr": "", "stdout": "z" * 100_000},
    {"exit_code": 0, "status": "ok", "stderr": "\"quoted\" \\ back\\slash /", "stdout": "\t\r\n\b\f"},
    {"exit_code": 0, "status": "ok", "stderr": "".join(map(chr, range(32))) + "\x7f\x80\x9f", "stdout": "\u2028\u2029"},
    {"exit_code": 0, "status": "ok", "stderr": "\ufeff\ufffd", "stdout": "\U0010ffff"},
    {"exit_code": Code.FAIL, "status": "error", "stderr": Text("sub"), "stdout": Text("class")},
]

BAD_RESULTS: list[dict[str, Any]] = [
    {"exit_code": True, "status": "ok", "stderr": "", "stdout": ""},
    {"exit_code": 1.0, "status": "ok", "stderr": "", "stdout": ""},
    {"exit_code": None, "status": "ok", "stderr": "", "stdout": ""},
    {"exit_code": 0, "status": "OK", "stderr": "", "stdout": ""},
    {"exit_code": 0, "status": None, "stderr": "", "stdout": ""},
    {"exit_code": 0, "status": "ok", "stderr": b"bytes", "stdout": ""},
    {"exit_code": 0, "status": "ok", "stderr": "", "stdout": None},
    {"exit_code": 0, "status": "ok", "stderr": "lone \ud800", "stdout": ""},
    {"exit_code": 0, "status": "ok", "stderr": "", "stdout": "lone \udfff"},
    {"exit_code": 0, "status": "ok", "stderr": "lone \ud800", "stdout": 5},  # the first bad field is named
]


def _same_failure(fast: Callable[[], object], definition: Callable[[], object]) -> None:
    with pytest.raises(Exception) as want:
        definition()
    with pytest.raises(Exception) as got:
        fast()
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)


@pytest.mark.parametrize("result", RESULTS, ids=range(len(RESULTS)))
def test_T_RCPT_1_canonical_result_is_the_json_definition(result: dict[str, Any]) -> None:
    want = json.dumps(dict(result), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert v1.canonical_result(**result) == v1.canonical_result_json(**result) == want
    assert v1.result_hash(**result) == verify.v1_result_hash(result)  # the auditor's copy agrees


@pytest.mark.parametrize("result", BAD_RESULTS, ids=range(len(BAD_RESULTS)))
def test_T_RCPT_1_canonical_result_refuses_as_the_definition(result: dict[str, Any]) -> None:
    _same_failure(lambda: v1.canonical_result(**result), lambda: v1.canonical_result_json(**result))
    with pytest.raises(v1.ReceiptFieldError):
        v1.result_hash(**result)


def _fields(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"seq": 1, "receipt_hash": HEX_A, "chain_hash": HEX_B, "tenant_id": "default",
                            "cell_id": "cell-0a1b2c3d", "key_id": KEY_ID, "extensions": {}}
    return {**base, **over}


ENVELOPES: list[dict[str, Any]] = [
    _fields(),
    _fields(cell_id=None),
    _fields(extensions=None),
    _fields(extensions={envelope.RESULTS_EXTENSION: {"results_hash": HEX_B}}),
    _fields(extensions=envelope.results_extension([{"text/plain": "ü", "is_main_result": True}])),
    _fields(seq=2**63 - 1),
    _fields(seq=10**30),
    _fields(tenant_id="A" * 64, cell_id="z_-9" * 16),
    _fields(tenant_id="-", cell_id="_"),
]

BAD_ENVELOPES: list[dict[str, Any]] = [
    _fields(seq=0), _fields(seq=-1), _fields(seq=True), _fields(seq="1"), _fields(seq=1.0),
    _fields(receipt_hash=HEX_A.upper()), _fields(chain_hash=HEX_B[:-1]), _fields(chain_hash=None),
    _fields(key_id="0123456789ABCDEF"), _fields(key_id="01234567"),
    _fields(tenant_id='a"b'), _fields(tenant_id=""), _fields(tenant_id="a" * 65), _fields(tenant_id=None),
    _fields(cell_id="c\u00fc"), _fields(cell_id='c","x'), _fields(cell_id=5),
    _fields(extensions={"results/2": {}}), _fields(extensions={envelope.RESULTS_EXTENSION: {"results_hash": "x"}}),
    _fields(extensions={envelope.RESULTS_EXTENSION: {"results_hash": HEX_A, "more": 1}}),
    _fields(extensions=[("results/1", {})]),
]


@pytest.mark.parametrize("fields", ENVELOPES, ids=range(len(ENVELOPES)))
def test_T_RCPT_2_envelope_message_is_canonical_json_of_the_envelope(fields: dict[str, Any]) -> None:
    want = envelope.canonical_json(envelope.envelope(**fields))
    assert envelope.envelope_message(**fields) == want
    as_stored = {**envelope.envelope(**fields), "envelope": envelope.ENVELOPE, "schema": v1.SCHEMA}
    assert verify.envelope_message(as_stored) == want  # the auditor's copy agrees
    ext = envelope.envelope(**fields)["extensions"]
    assert envelope.extensions_json(fields["extensions"]) == envelope.canonical_json(ext).decode("utf-8")


@pytest.mark.parametrize("fields", BAD_ENVELOPES, ids=range(len(BAD_ENVELOPES)))
def test_T_RCPT_2_envelope_message_refuses_as_the_envelope(fields: dict[str, Any]) -> None:
    _same_failure(lambda: envelope.envelope_message(**fields), lambda: envelope.envelope(**fields))


@pytest.mark.parametrize("message", [b"", b"x", b"{}" * 5000, bytes(range(256))])
def test_T_RCPT_2_node_key_signs_as_pynacl(message: bytes) -> None:
    seed = bytes(range(32))
    assert NodeKey.from_seed(seed).sign(message) == nacl.signing.SigningKey(seed).sign(message).signature


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReceiptStore]:
    s = ReceiptStore(tmp_path / "cell.sqlite", NodeKey.from_seed(bytes(range(32))), checkpoint_every=0)
    yield s
    s.close()


def test_T_RCPT_2_appended_receipts_are_the_definitions_bytes(store: ReceiptStore, tmp_path: Path) -> None:
    seed_key = nacl.signing.SigningKey(bytes(range(32)))
    appended = []
    for n, (result, fields) in enumerate(zip(RESULTS * 2, ENVELOPES * 3), start=1):
        r = store.append(execution_id=str(uuid.uuid4()), tenant_id=fields["tenant_id"], cell_id=fields["cell_id"],
                         template="python3", code_hash=v1.code_hash(b"print(1+1)"),
                         result_hash=v1.result_hash(**result), timestamp_ms=1764300000000 + n,
                         extensions=fields["extensions"])
        appended.append(r)
        # Rebuilt from the definitions: json.dumps of the result, the envelope object, PyNaCl's signature.
        want_result = json.dumps(dict(result), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert r["result_hash"] == v1._sha256_hex(want_result.encode("utf-8"))
        env = envelope.envelope(seq=r["seq"], receipt_hash=r["receipt_hash"], chain_hash=r["chain_hash"],
                                tenant_id=r["tenant_id"], cell_id=r["cell_id"], key_id=r["key_id"],
                                extensions=fields["extensions"])
        signature = seed_key.sign(envelope.canonical_json(env)).signature
        assert r["signature"] == base64.b64encode(signature).decode("ascii")
        assert r["extensions"] == env["extensions"] and r["envelope"] == envelope.ENVELOPE
        assert list(r) == list(ROW_FIELDS)  # the answer's receipt keeps its key order
    conn = sqlite3.connect(tmp_path / "cell.sqlite")
    try:
        rows = conn.execute(f"SELECT {', '.join(ROW_FIELDS)} FROM receipts ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert len(rows) == len(appended)
    for row, r in zip(rows, appended):
        want_row = tuple(envelope.canonical_json(r[f]).decode("utf-8") if f == "extensions" else r[f]
                         for f in ROW_FIELDS)
        assert row == want_row
        assert store.get(r["execution_id"]) == r
    assert store.verify() == {"ok": True, "count": len(appended), "first_problem": None}
