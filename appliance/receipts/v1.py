"""Receipt schema v1: the hash composition fixed by the threat model (docs/receipts.md).

PURE: no IO, no clock, no sqlite3 or nacl. The store, the runner and the web
layer call these functions; the standalone auditor verifier
(``appliance.receipts.verify``) carries a few-line copy of the same rules, and
``tests/appliance/test_receipts_verify.py`` pins that both agree.

    receipt_hash = hex(SHA-256(utf8(f"{execution_id}|{code_hash}|{result_hash}|{template}|{timestamp}")))

Every field is validated before it is hashed so that no field can contain
``|``: two different receipts can then never produce the same pre-image
(threat T-RCPT-1, receipt forgery by field-boundary shifting). Any change to
this composition is a new, explicitly versioned schema, never an edit here.
"""
from __future__ import annotations

import hashlib
import json
import json.encoder
import re

SCHEMA = "v1"
STATUSES = ("ok", "error", "timeout", "memory_limit", "output_limit", "killed")
GENESIS = "0" * 64

# Lowercase canonical UUID4 only: version nibble 4, RFC 4122 variant (8, 9, a, b).
# Uppercase or braced forms are refused rather than normalised, so one run has
# exactly one textual id and therefore exactly one receipt_hash.
_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEMPLATE = re.compile(r"[a-z0-9_-]{1,64}")
# SQLite stores INTEGER as signed 64-bit; a larger timestamp could not be kept.
_MAX_TIMESTAMP = 2**63 - 1
# JSON text of a str exactly as json.dumps(..., ensure_ascii=False) writes it.
_json_str = json.encoder.encode_basestring


class ReceiptFieldError(ValueError):
    """A receipt field failed validation. ``args[0]`` and ``.field`` name the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_execution_id(value: object) -> str:
    if not isinstance(value, str) or _UUID4.fullmatch(value) is None:
        raise ReceiptFieldError("execution_id", "must be a lowercase canonical UUID4")
    return value


def check_hex64(field: str, value: object) -> str:
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise ReceiptFieldError(field, "must be 64 lowercase hex characters")
    return value


def check_template(value: object) -> str:
    if not isinstance(value, str) or _TEMPLATE.fullmatch(value) is None:
        raise ReceiptFieldError("template", "must match ^[a-z0-9_-]+$ (at most 64 characters)")
    return value


def check_timestamp(value: object) -> int:
    # bool is an int subclass: True would hash as "True", not "1".
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TIMESTAMP:
        raise ReceiptFieldError("timestamp", "must be a non-negative integer (Unix ms)")
    return value


def code_hash(code: bytes) -> str:
    """SHA-256 of the code bytes exactly as submitted (UTF-8 of ``code`` or decoded ``code_b64``)."""
    if not isinstance(code, (bytes, bytearray, memoryview)):
        raise TypeError("code_hash() takes the submitted bytes; encode text as UTF-8 first")
    return _sha256_hex(bytes(code))


def canonical_result(*, exit_code: int, status: str, stderr: str, stdout: str) -> bytes:
    """The exact bytes hashed into ``result_hash``: sorted keys, no spaces, UTF-8.

    Built by hand from the four fixed keys in sorted order, the same bytes as
    :func:`canonical_result_json` (the json.dumps definition), which a test
    pins over a table of inputs; that definition also gives every error, so a
    bad field is refused exactly as before (run path: one JSON string escape
    per text and one UTF-8 encode, not an encoder per call and three encodes).
    """
    if (isinstance(exit_code, int) and not isinstance(exit_code, bool) and isinstance(status, str)
            and status in STATUSES and isinstance(stderr, str) and isinstance(stdout, str)):
        # The json module writes an int as int.__repr__ and a str with encode_basestring (ensure_ascii=False).
        body = (f'{{"exit_code":{int.__repr__(exit_code)},"status":{_json_str(status)},'
                f'"stderr":{_json_str(stderr)},"stdout":{_json_str(stdout)}}}')
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: the definition below names the field
    return canonical_result_json(exit_code=exit_code, status=status, stderr=stderr, stdout=stdout)


def canonical_result_json(*, exit_code: int, status: str, stderr: str, stdout: str) -> bytes:
    """The definition of :func:`canonical_result`, through json.dumps; every field checked."""
    if isinstance(exit_code, bool) or not isinstance(exit_code, int):
        raise ReceiptFieldError("exit_code", "must be an integer")
    if status not in STATUSES:
        raise ReceiptFieldError("status", f"must be one of {', '.join(STATUSES)}")
    for name, text in (("stderr", stderr), ("stdout", stdout)):
        if not isinstance(text, str):
            raise ReceiptFieldError(name, "must be a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8; the runner must decode guest
            # output with errors="replace" so what is hashed is what is returned.
            raise ReceiptFieldError(name, "is not valid Unicode (lone surrogate)") from None
    body = {"exit_code": exit_code, "status": status, "stderr": stderr, "stdout": stdout}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def result_hash(*, exit_code: int, status: str, stderr: str, stdout: str) -> str:
    return _sha256_hex(canonical_result(exit_code=exit_code, status=status, stderr=stderr, stdout=stdout))


def receipt_preimage(
    *, execution_id: str, code_hash: str, result_hash: str, template: str, timestamp: int
) -> bytes:
    """Validate all five fields (T-RCPT-1: no '|' can sneak in) and build the hashed bytes."""
    check_execution_id(execution_id)
    check_hex64("code_hash", code_hash)
    check_hex64("result_hash", result_hash)
    check_template(template)
    check_timestamp(timestamp)
    return f"{execution_id}|{code_hash}|{result_hash}|{template}|{timestamp}".encode("utf-8")


def receipt_hash(
    *, execution_id: str, code_hash: str, result_hash: str, template: str, timestamp: int
) -> str:
    return _sha256_hex(
        receipt_preimage(
            execution_id=execution_id,
            code_hash=code_hash,
            result_hash=result_hash,
            template=template,
            timestamp=timestamp,
        )
    )


def chain_hash(prev: str, receipt_hash: str) -> str:
    """hex(SHA-256(prev_chain_hash + "|" + receipt_hash)); GENESIS is the first prev."""
    check_hex64("prev_chain_hash", prev)
    check_hex64("receipt_hash", receipt_hash)
    return _sha256_hex(f"{prev}|{receipt_hash}".encode("ascii"))


def checkpoint_message(*, count: int, root_hash: str, timestamp: int, key_id: str) -> bytes:
    """Bytes the node signs for a checkpoint (signed tree head).

    The "cell-checkpoint/v1|" prefix keeps these signatures apart from the
    per-receipt signatures, which are over a bare 64-hex chain_hash: a
    checkpoint signature can never be replayed as a receipt signature.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ReceiptFieldError("count", "must be a non-negative integer")
    check_hex64("root_hash", root_hash)
    check_timestamp(timestamp)
    if not isinstance(key_id, str) or re.fullmatch(r"[0-9a-f]{16}", key_id) is None:
        raise ReceiptFieldError("key_id", "must be 16 lowercase hex characters")
    return f"cell-checkpoint/v1|{count}|{root_hash}|{timestamp}|{key_id}".encode("ascii")
