"""Builders for signed test artefacts: licenses, installed trust registries and pre-envelope receipts.

Every key here is made on the spot (or from a fixed, public, test-only seed
for reproducible parametrization); no vendor private key exists in this
repository, and production verification is never weakened to accept these:
tests inject the matching public keys instead.
"""
from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nacl.signing import SigningKey

from appliance.license.issue import encode_document, sign_payload
from appliance.license.verify import key_id_for
from appliance.receipts import v1
from appliance.receipts.nodekey import NodeKey

if TYPE_CHECKING:
    from mirror.registry import Mirror

# The instant license tests pretend it is; licenses below are valid around it.
NOW = datetime(2027, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
DROP = object()  # pass as an override value to remove a payload field


@dataclass(frozen=True)
class KeyPair:
    signing_key: SigningKey
    public_key: bytes
    key_id: str

    @property
    def keys(self) -> dict[str, bytes]:
        """The trusted-keys mapping a verifier under test receives."""
        return {self.key_id: self.public_key}


def make_keypair(seed: bytes | str | None = None) -> KeyPair:
    """A throw-away Ed25519 key pair; a seed label makes it reproducible."""
    if seed is None:
        signing_key = SigningKey.generate()
    else:
        label = seed.encode() if isinstance(seed, str) else seed
        signing_key = SigningKey(hashlib.sha256(b"cell-test-key/" + label).digest())
    public = bytes(signing_key.verify_key)
    return KeyPair(signing_key, public, key_id_for(public))


def stamp(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_payload(**overrides: Any) -> dict[str, Any]:
    """A valid cell-license/1 payload around NOW; overrides replace fields (DROP removes)."""
    payload: dict[str, Any] = {
        "schema": "cell-license/1",
        "license_id": "lic-test-0001",
        "licensee": "Example Labs GmbH",
        "tier": "pro",
        "features": ["load_weights", "host_mcp_call"],
        "limits": {"rate_limit_rps": 50, "max_cells": 100, "max_memory_mb": 1024},
        "issued_at": stamp(NOW - timedelta(days=1)),
        "not_before": stamp(NOW - timedelta(days=1)),
        "expires_at": stamp(NOW + timedelta(days=365)),
    }
    for key, value in overrides.items():
        if value is DROP:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


def make_document(signing_key: SigningKey, key_id: str, **payload_overrides: Any) -> dict[str, Any]:
    return sign_payload(make_payload(**payload_overrides), signing_key, key_id)


def make_license(signing_key: SigningKey, key_id: str, **payload_overrides: Any) -> bytes:
    """License file bytes signed by ``signing_key``; no validation, so tests can sign bad payloads."""
    return encode_document(make_document(signing_key, key_id, **payload_overrides))


def compact(doc: dict[str, Any]) -> bytes:
    """Whitespace-free file bytes, so every byte of the file is significant."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_registry(
    tmp: Path,
    *,
    expires: Mapping[str, datetime] | None = None,
    licenses: Sequence[str] = (),
    revoked_keys: Sequence[str] = (),
    clock: Callable[[], datetime] | None = None,
    mirror_dir: Path | None = None,
) -> Mirror:
    """An appliance mirror (``tmp/mirror`` unless ``mirror_dir``) with one real TUF update imported.

    The vendor repository is signed with throw-away keys and the mirror is
    told to trust its root (``Mirror.trusted_root``). ``expires`` sets the
    role expiries (timestamp, snapshot, targets); python-tuf refuses to
    import metadata that has already expired by the real clock, so an
    "expired registry" is built by importing one that expires soon and
    giving the mirror a ``clock`` past that instant.
    """
    from tests.mirror import Vendor

    work = tmp / "registry-vendor"
    work.mkdir(parents=True, exist_ok=True)
    vendor = Vendor(work)
    from mirror.registry import Mirror

    mirror = Mirror(mirror_dir or tmp / "mirror", trusted_root=vendor.trusted_root, clock=clock)
    mirror.import_path(vendor.publish(licenses=tuple(licenses), revoked_keys=tuple(revoked_keys),
                                      expires=dict(expires or {})))
    return mirror


def make_legacy_receipts(key: NodeKey, n: int) -> list[dict[str, Any]]:
    """Receipts as a node wrote them before signed envelopes: the signature is
    over the chain hash alone, and tenant/cell are outside every signature."""
    rows, prev = [], v1.GENESIS
    for i in range(n):
        fields = {"execution_id": str(uuid.uuid4()), "code_hash": "a" * 64, "result_hash": "b" * 64,
                  "template": "python3", "timestamp": 1700000000000 + i}
        rh = v1.receipt_hash(**fields)
        ch = v1.chain_hash(prev, rh)
        rows.append({"schema": "v1", **fields, "receipt_hash": rh, "seq": i + 1, "prev_chain_hash": prev,
                     "chain_hash": ch, "signature": base64.b64encode(key.sign(ch.encode())).decode(),
                     "key_id": key.key_id, "cell_id": f"cell-{i}"})
        prev = ch
    return rows
