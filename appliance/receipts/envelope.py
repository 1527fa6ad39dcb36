"""Signed receipt envelope and export seal (threat T-RCPT-2). PURE: no IO.

The v1 hashes (``v1.receipt_hash``, ``v1.chain_hash``) are kept exactly; what
changes is *what the node signs*. Before, the signature covered the bare
chain_hash, so ``tenant_id`` and ``cell_id`` could be rewritten without
breaking anything. Now the node signs the canonical JSON of an envelope:

    {"cell_id": str|null, "chain_hash": hex64, "envelope": "cell-receipt-envelope/1",
     "extensions": {...}, "key_id": hex16, "receipt_hash": hex64, "schema": "v1",
     "seq": int, "tenant_id": str}

canonical JSON = sorted keys, separators (",", ":"), ensure_ascii=False,
UTF-8. The object is versioned (``envelope``) and carries an ``extensions``
object keyed by versioned names ("name/N"), so a later extension is added
under the same signature without another envelope format; a verifier refuses
an extension it does not know (unknown means denied). A signed envelope
starts with ``{``, so it can never be confused with a legacy signature over a
64-hex chain_hash or a ``cell-checkpoint/v1|`` message.

An export ends with a *seal*: a signed statement of how many receipts the
export holds, the last chain_hash and the RFC 6962 tree head. Cutting rows
off the end of an export is then detected without relying on anything the
header may or may not carry.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping, Sequence

from appliance.receipts import v1

ENVELOPE = "cell-receipt-envelope/1"
SEAL = "cell-export-seal/1"
# Extension names the verifier understands. A receipt carrying any other
# name is refused. "results/1": {"results_hash": hex64}, the SHA-256 of the
# canonical JSON of the run's rich results (docs/receipts.md), present only
# when a run returned results; the v1 result_hash is unchanged by it.
RESULTS_EXTENSION = "results/1"
KNOWN_EXTENSIONS: frozenset[str] = frozenset({RESULTS_EXTENSION})

# Tenant and cell ids as appliance.confine accepts them.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN/Infinity: one object, one byte string."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def results_hash(results: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 (hex) of the canonical JSON of a run's ``results`` list, as the answer carries it."""
    body = json.dumps(list(results), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def results_extension(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The receipt extensions for a run's rich results: none when it has none."""
    return {RESULTS_EXTENSION: {"results_hash": results_hash(results)}} if results else {}


def check_tenant_id(value: object) -> str:
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise v1.ReceiptFieldError("tenant_id", "must match ^[A-Za-z0-9_-]{1,64}$")
    return value


def check_cell_id(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or _ID.fullmatch(value) is None):
        raise v1.ReceiptFieldError("cell_id", "must be null or match ^[A-Za-z0-9_-]{1,64}$")
    return value


def check_extensions(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise v1.ReceiptFieldError("extensions", "must be an object")
    if not value:  # the usual run: nothing to look at
        return value
    unknown = sorted(k for k in value if k not in KNOWN_EXTENSIONS)
    if unknown:
        raise v1.ReceiptFieldError("extensions", f"unknown extension(s) {', '.join(map(repr, unknown))}")
    if RESULTS_EXTENSION in value:
        ext = value[RESULTS_EXTENSION]
        if not isinstance(ext, dict) or set(ext) != {"results_hash"}:
            raise v1.ReceiptFieldError("extensions", f"{RESULTS_EXTENSION} must be {{\"results_hash\": hex64}}")
        v1.check_hex64("results_hash", ext["results_hash"])
    return value


def _check_head(seq: int, receipt_hash: str, chain_hash: str, key_id: str) -> None:
    """The envelope's own fields, checked (T-RCPT-2); ids and extensions are checked by their own functions."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise v1.ReceiptFieldError("seq", "must be a positive integer")
    v1.check_hex64("receipt_hash", receipt_hash)
    v1.check_hex64("chain_hash", chain_hash)
    if not isinstance(key_id, str) or _KEY_ID.fullmatch(key_id) is None:
        raise v1.ReceiptFieldError("key_id", "must be 16 lowercase hex characters")


def envelope(*, seq: int, receipt_hash: str, chain_hash: str, tenant_id: str, cell_id: str | None,
             key_id: str, extensions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The object the node signs for one receipt; every field validated (T-RCPT-2)."""
    _check_head(seq, receipt_hash, chain_hash, key_id)
    return {
        "envelope": ENVELOPE, "schema": v1.SCHEMA, "seq": seq, "receipt_hash": receipt_hash,
        "chain_hash": chain_hash, "tenant_id": check_tenant_id(tenant_id), "cell_id": check_cell_id(cell_id),
        "key_id": key_id, "extensions": check_extensions(dict(extensions or {})),
    }


def envelope_message(*, seq: int, receipt_hash: str, chain_hash: str, tenant_id: str, cell_id: str | None,
                     key_id: str, extensions: Mapping[str, Any] | None = None) -> bytes:
    """Bytes the node signs for one receipt: canonical JSON of :func:`envelope`.

    Written out in the sorted key order rather than through json.dumps (run
    path): every field is checked as :func:`envelope` checks it, and a checked
    id, hash or key id is plain ASCII with nothing to escape, so the bytes are
    those of ``canonical_json(envelope(...))``; a test pins this over a table.
    """
    _check_head(seq, receipt_hash, chain_hash, key_id)
    tenant = check_tenant_id(tenant_id)
    cell = check_cell_id(cell_id)
    cell_json = "null" if cell is None else '"' + cell + '"'
    return (f'{{"cell_id":{cell_json},"chain_hash":"{chain_hash}",'
            f'"envelope":"{ENVELOPE}","extensions":{extensions_json(extensions)},"key_id":"{key_id}",'
            f'"receipt_hash":"{receipt_hash}","schema":"{v1.SCHEMA}","seq":{int.__repr__(seq)},'
            f'"tenant_id":"{tenant}"}}').encode("utf-8")


def extensions_json(extensions: Mapping[str, Any] | None) -> str:
    """Canonical JSON text of a receipt's extensions, checked (:func:`check_extensions`).
    None or empty is ``{}``; a lone "results/1" (its one hex field checked) is
    written out directly, anything else goes through :func:`canonical_json`."""
    ext = check_extensions(dict(extensions or {}))
    if not ext:
        return "{}"
    if len(ext) == 1 and RESULTS_EXTENSION in ext:
        return f'{{"{RESULTS_EXTENSION}":{{"results_hash":"{ext[RESULTS_EXTENSION]["results_hash"]}"}}}}'
    return canonical_json(ext).decode("utf-8")


def seal(*, count: int, last_chain_hash: str, root_hash: str, timestamp: int, key_id: str) -> dict[str, Any]:
    """The signed statement at the end of an export (T-RCPT-2: truncation)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise v1.ReceiptFieldError("count", "must be a non-negative integer")
    v1.check_hex64("last_chain_hash", last_chain_hash)
    v1.check_hex64("root_hash", root_hash)
    v1.check_timestamp(timestamp)
    if not isinstance(key_id, str) or _KEY_ID.fullmatch(key_id) is None:
        raise v1.ReceiptFieldError("key_id", "must be 16 lowercase hex characters")
    return {"seal": SEAL, "count": count, "last_chain_hash": last_chain_hash, "root_hash": root_hash,
            "timestamp": timestamp, "key_id": key_id}


def seal_message(**fields: Any) -> bytes:
    return canonical_json(seal(**fields))
