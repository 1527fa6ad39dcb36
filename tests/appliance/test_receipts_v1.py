"""Receipt schema v1: the published test vector, field validation, chain and tree heads.

Threat T-RCPT-1 (receipt tampering/deletion): every field is validated so no
field can carry '|', and the hash composition is pinned by an independent
computation below — a change to it fails here before any auditor notices.
"""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from typing import Any

import pytest

from appliance.receipts import merkle, v1
from appliance.receipts.nodekey import NodeKey

# --- the published test vector (also in docs/receipts.md) -------------------
VECTOR_EXECUTION_ID = "3f0c2a4e-8b1d-4c7a-9e2f-5a6b7c8d9e0f"
VECTOR_CODE = "print(1+1)"
VECTOR_RESULT: dict[str, Any] = {"exit_code": 0, "status": "ok", "stderr": "", "stdout": "2\n"}
VECTOR_TEMPLATE = "python3"
VECTOR_TIMESTAMP = 1764300000000
VECTOR_CODE_HASH = "df5db25436cb819bec6de11301829284c56ab24fb6738ca0268c53245daa0346"
VECTOR_RESULT_HASH = "c23157f67a22bb2565d25d120baa5fa5028fe3eae3723a50e28a689b082c8d9d"
VECTOR_RECEIPT_HASH = "f24859c1148588f584485e9a6a8b422ed05cd49de6d5e3598ec6ab30c17feb2e"
VECTOR_CHAIN_HASH = "528df492d6451de65ad06a913085535d95abe2d47f6cc0ce3980f6d027ff16d7"  # first receipt: prev = GENESIS
VECTOR_SEED = bytes(range(32))  # test-only signing seed 00 01 .. 1f
VECTOR_PUBLIC_KEY = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
VECTOR_KEY_ID = "56475aa75463474c"
VECTOR_SIGNATURE = "RUpCMpvjCjsqcZ+HGqM8Tk80dEc3e6zsv/Up1h4eLGzAdpSA6QtLUWAKwgRw0kKxciy4UbVjdJShi8FYlIaDAA=="

GOOD: dict[str, Any] = {
    "execution_id": VECTOR_EXECUTION_ID,
    "code_hash": VECTOR_CODE_HASH,
    "result_hash": VECTOR_RESULT_HASH,
    "template": VECTOR_TEMPLATE,
    "timestamp": VECTOR_TIMESTAMP,
}


def test_T_RCPT_1_published_vector_computed_independently() -> None:
    # Recomputed with hashlib alone, straight from docs/receipts.md, then pinned as constants.
    code_h = hashlib.sha256(VECTOR_CODE.encode("utf-8")).hexdigest()
    result_json = '{"exit_code":0,"status":"ok","stderr":"","stdout":"2\\n"}'
    result_h = hashlib.sha256(result_json.encode("utf-8")).hexdigest()
    pre = f"{VECTOR_EXECUTION_ID}|{code_h}|{result_h}|{VECTOR_TEMPLATE}|{VECTOR_TIMESTAMP}"
    receipt_h = hashlib.sha256(pre.encode("utf-8")).hexdigest()
    chain_h = hashlib.sha256(("0" * 64 + "|" + receipt_h).encode("ascii")).hexdigest()
    assert (code_h, result_h, receipt_h, chain_h) == (
        VECTOR_CODE_HASH, VECTOR_RESULT_HASH, VECTOR_RECEIPT_HASH, VECTOR_CHAIN_HASH)


def test_v1_module_reproduces_the_vector() -> None:
    assert v1.code_hash(VECTOR_CODE.encode()) == VECTOR_CODE_HASH
    assert v1.result_hash(**VECTOR_RESULT) == VECTOR_RESULT_HASH
    assert v1.receipt_hash(**GOOD) == VECTOR_RECEIPT_HASH
    assert v1.chain_hash(v1.GENESIS, VECTOR_RECEIPT_HASH) == VECTOR_CHAIN_HASH
    assert v1.GENESIS == "0" * 64 and v1.SCHEMA == "v1"


def test_signature_vector_is_deterministic_ed25519_over_chain_hash_text() -> None:
    key = NodeKey.from_seed(VECTOR_SEED)
    assert key.public_key_hex == VECTOR_PUBLIC_KEY
    assert key.key_id == hashlib.sha256(bytes.fromhex(VECTOR_PUBLIC_KEY)).hexdigest()[:16] == VECTOR_KEY_ID
    sig = key.sign(VECTOR_CHAIN_HASH.encode("ascii"))
    assert base64.b64encode(sig).decode() == VECTOR_SIGNATURE
    key.verify_key.verify(VECTOR_CHAIN_HASH.encode("ascii"), sig)


def test_result_hash_is_canonical_json_utf8_not_ascii_escaped() -> None:
    result = {"exit_code": 1, "status": "error", "stderr": "Fehler: ü ✓", "stdout": ""}
    expected = hashlib.sha256(
        json.dumps(result, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert v1.result_hash(**result) == expected
    assert b"\\u" not in v1.canonical_result(**result)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("execution_id", VECTOR_EXECUTION_ID + "|x"),
        ("execution_id", VECTOR_EXECUTION_ID.upper()),
        ("execution_id", "3f0c2a4e-8b1d-1c7a-9e2f-5a6b7c8d9e0f"),  # version 1, not 4
        ("execution_id", "3f0c2a4e-8b1d-4c7a-ce2f-5a6b7c8d9e0f"),  # variant c, not RFC 4122
        ("execution_id", "3f0c2a4e8b1d4c7a9e2f5a6b7c8d9e0f"),  # not canonical (no dashes)
        ("execution_id", "{" + VECTOR_EXECUTION_ID + "}"),
        ("execution_id", VECTOR_EXECUTION_ID + "\n"),
        ("execution_id", 12345),
        ("code_hash", VECTOR_CODE_HASH.upper()),
        ("code_hash", VECTOR_CODE_HASH[:-1]),
        ("code_hash", VECTOR_CODE_HASH[:-1] + "|"),
        ("result_hash", "g" * 64),
        ("result_hash", VECTOR_RESULT_HASH + "|"),
        ("template", "python3|1764300000000"),
        ("template", "Python3"),
        ("template", "python 3"),
        ("template", "python.3"),
        ("template", ""),
        ("template", "a" * 65),
        ("template", "python3\n"),
        ("timestamp", True),
        ("timestamp", -1),
        ("timestamp", 1764300000000.0),
        ("timestamp", "1764300000000"),
        ("timestamp", 2**63),
    ],
)
def test_T_RCPT_1_field_format_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        v1.receipt_hash(**{**GOOD, field: value})
    assert isinstance(info.value, v1.ReceiptFieldError)
    assert info.value.field == field == info.value.args[0]


def test_T_RCPT_1_pipe_cannot_shift_field_boundaries() -> None:
    # Without validation these two distinct receipts would hash the same pre-image.
    with pytest.raises(ValueError, match="template"):
        v1.receipt_hash(**{**GOOD, "template": "python3|1"})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"status": "crashed"}, "status"),
        ({"exit_code": True}, "exit_code"),
        ({"exit_code": "0"}, "exit_code"),
        ({"stdout": b"2\n"}, "stdout"),
        ({"stderr": "\udcff"}, "stderr"),  # lone surrogate: not UTF-8
    ],
)
def test_result_hash_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(v1.ReceiptFieldError) as info:
        v1.result_hash(**{**VECTOR_RESULT, **kwargs})
    assert info.value.field == field


def test_every_status_is_accepted() -> None:
    assert v1.STATUSES == ("ok", "error", "timeout", "memory_limit", "output_limit", "killed")
    assert len({v1.result_hash(**{**VECTOR_RESULT, "status": s}) for s in v1.STATUSES}) == 6


def test_code_hash_takes_bytes_only() -> None:
    with pytest.raises(TypeError):
        v1.code_hash("print(1+1)")  # type: ignore[arg-type]
    assert v1.code_hash(bytearray(b"print(1+1)")) == VECTOR_CODE_HASH


def test_chain_hash_validates_both_inputs() -> None:
    with pytest.raises(v1.ReceiptFieldError, match="prev_chain_hash"):
        v1.chain_hash("0" * 63, VECTOR_RECEIPT_HASH)
    with pytest.raises(v1.ReceiptFieldError, match="receipt_hash"):
        v1.chain_hash(v1.GENESIS, VECTOR_RECEIPT_HASH.upper())


# --- RFC 6962 tree heads ----------------------------------------------------

# Leaves and heads of the RFC 6962 reference tree used by certificate-transparency's tests.
CT_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.mark.parametrize("n", range(1, 9))
def test_merkle_matches_rfc6962_reference_tree(n: int) -> None:
    assert merkle._mth([bytes.fromhex(x) for x in CT_LEAVES[:n]]).hex() == CT_ROOTS[n - 1]


def test_merkle_empty_tree_is_sha256_of_nothing() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").hexdigest() == merkle.Frontier().root()


def _independent_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _independent_root(leaves[:k]) + _independent_root(leaves[k:])).digest()


def test_merkle_frontier_equals_recursive_definition_for_every_size() -> None:
    leaves = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(70)]
    frontier = merkle.Frontier()
    for n in range(1, 71):
        frontier.push(leaves[n - 1])
        expected = _independent_root([bytes.fromhex(x) for x in leaves[:n]]).hex()
        assert frontier.root() == merkle.root(leaves[:n]) == expected
        assert frontier.count == n


def test_checkpoint_message_is_domain_separated() -> None:
    msg = v1.checkpoint_message(count=3, root_hash=VECTOR_CHAIN_HASH, timestamp=5, key_id=VECTOR_KEY_ID)
    assert msg == f"cell-checkpoint/v1|3|{VECTOR_CHAIN_HASH}|5|{VECTOR_KEY_ID}".encode()
    with pytest.raises(v1.ReceiptFieldError, match="count"):
        v1.checkpoint_message(count=-1, root_hash=VECTOR_CHAIN_HASH, timestamp=5, key_id=VECTOR_KEY_ID)


def test_pure_modules_import_no_io_libraries() -> None:
    # Receipt rules are pure — no sqlite3, nacl, flask, sockets or clocks.
    code = (
        "import sys, appliance.receipts.v1, appliance.receipts.merkle, appliance.receipts;"
        "bad = {'sqlite3', 'sqlite_utils', 'nacl', 'flask', 'wasmtime', 'socket', 'appliance.config'};"
        "print(sorted(bad & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
