"""Vendor-side license signing, used by `cell license issue` and by the tests.

The appliance never holds a license private key; this module exists so the
vendor's signing box and the test suite produce files with exactly the code
path the verifier checks. Every file it writes is verified with the matching
public key before it is returned, so a malformed payload fails here, at the
vendor, and not at the customer.
"""
from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

from nacl.signing import SigningKey

from appliance.license.verify import (
    SCHEMA,
    canonical_json,
    format_time,
    key_id_for,
    parse_license,
)

# Defaults when the vendor gives no limits: the appliance's own hard memory
# ceiling and generous rate/cell counts; config and hard ceilings still cap them.
DEFAULT_LIMITS: dict[str, float | int] = {"rate_limit_rps": 100, "max_cells": 200, "max_memory_mb": 4096}


def load_signing_key(path: Path) -> SigningKey:
    """A signing key file holds the 32-byte Ed25519 seed as 64 hex characters."""
    text = path.read_text(encoding="ascii").strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: a signing key file holds 64 hexadecimal characters") from None
    if len(seed) != 32:
        raise ValueError(f"{path}: a signing key file holds 64 hexadecimal characters")
    return SigningKey(seed)


def signing_key_hex(key: SigningKey) -> str:
    return bytes(key).hex()


def public_key_of(key: SigningKey) -> bytes:
    return bytes(key.verify_key)


def build_payload(
    *,
    licensee: str,
    tier: str,
    features: Iterable[str],
    expires_at: datetime,
    issued_at: datetime,
    not_before: datetime | None = None,
    license_id: str | None = None,
    machine_id: str | None = None,
    limits: Mapping[str, float | int] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "schema": SCHEMA,
        "license_id": license_id or f"lic-{uuid.uuid4()}",
        "licensee": licensee,
        "tier": tier,
        "features": list(features),
        "limits": dict(limits if limits is not None else DEFAULT_LIMITS),
        "issued_at": format_time(issued_at),
        "not_before": format_time(not_before or issued_at),
        "expires_at": format_time(expires_at),
    }
    if machine_id is not None:
        payload["machine_id"] = machine_id
    return payload


def sign_payload(payload: Mapping[str, Any], signing_key: SigningKey, key_id: str) -> dict[str, Any]:
    """The license document: payload, key_id, base64 Ed25519 over canonical payload bytes."""
    signature = signing_key.sign(canonical_json(payload)).signature
    return {"payload": dict(payload), "key_id": key_id, "signature": base64.b64encode(signature).decode("ascii")}


def encode_document(doc: Mapping[str, Any]) -> bytes:
    """Readable, stable file bytes (the signature covers the payload, not this layout)."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def issue_license(payload: Mapping[str, Any], signing_key: SigningKey, key_id: str) -> bytes:
    """Sign, encode and self-check one license; raises ValueError if it would be refused."""
    if key_id != key_id_for(public_key_of(signing_key)):
        raise ValueError(
            f"key id {key_id} does not belong to this signing key (expected {key_id_for(public_key_of(signing_key))})"
        )
    data = encode_document(sign_payload(payload, signing_key, key_id))
    # Raises LicenseRejected (a ValueError-free Exception) for any shape error;
    # time, machine and revocation are the customer's to check.
    parse_license(data, {key_id: public_key_of(signing_key)})
    return data
