"""Trusted release keys: the embedded production key, and the test/vendor override.

The production key is a constant in this module (not read from the
``appliance`` package) so the installer works when run on its own, before any
Cell code is on the machine. ``tests/installer/test_keys.py`` pins it to
``appliance/data/trusted_keys.json``.

The override (``--trusted-keys FILE`` or ``CELL_INSTALLER_TRUSTED_KEYS``) is for
tests and for the vendor's own pre-release checks. It *replaces* the trust
root; it never switches verification off, so a bundle must still carry a valid
signature by a key in that file (threat T-SUPPLY-2).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from installer import ed25519
from installer.errors import InstallError

ROLE = "release"
ENV_OVERRIDE = "CELL_INSTALLER_TRUSTED_KEYS"

EMBEDDED_RELEASE_KEYS: dict[str, str] = {
    "8f02fd6f7a105ee4": "92abf50730383400f1f9a22fe1d9d247dc64b29eed7201b4f882b3de947a729e",
}


def key_id_for(public_key: bytes) -> str:
    """Same convention as trusted_keys.json: first 16 hex of sha256(public key)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def parse_trusted_keys(text: str, role: str = ROLE) -> dict[str, bytes]:
    try:
        doc: Any = json.loads(text)
        entries = doc[role]
        keys: dict[str, bytes] = {}
        for entry in entries:
            public = bytes.fromhex(entry["ed25519_public_key"])
            key_id = str(entry["key_id"])
            if len(public) != 32 or key_id != key_id_for(public):
                raise ValueError(f"key {key_id} does not match its public key")
            keys[key_id] = public
    except (ValueError, KeyError, TypeError) as exc:
        raise InstallError("bad_trusted_keys", f"trusted keys file is malformed: {exc}") from None
    if not keys:
        raise InstallError("bad_trusted_keys", f"trusted keys file has no '{role}' key")
    return keys


def embedded_keys() -> dict[str, bytes]:
    return {k: bytes.fromhex(v) for k, v in EMBEDDED_RELEASE_KEYS.items()}


def resolve_trusted_keys(path: str | None) -> tuple[dict[str, bytes], str]:
    """(keys, description). ``path`` comes from the flag, else the env override, else None."""
    if not path:
        return embedded_keys(), "embedded production release key"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InstallError("bad_trusted_keys", f"cannot read trusted keys {path}: {exc}") from None
    return parse_trusted_keys(text), f"OVERRIDE trust root {path} (test/vendor use only)"


def load_signing_key(path: Path) -> tuple[bytes, str]:
    """Vendor side: a JSON {"ed25519_seed": hex} (optional "key_id"), or 64 hex chars."""
    text = path.read_text(encoding="utf-8").strip()
    try:
        if text.startswith("{"):
            doc = json.loads(text)
            seed = bytes.fromhex(doc.get("ed25519_seed") or doc["ed25519_private_key"])
        else:
            seed = bytes.fromhex(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise InstallError("bad_signing_key", f"signing key {path} is malformed: {exc}") from None
    if len(seed) != 32:
        raise InstallError("bad_signing_key", "an Ed25519 seed is 32 bytes")
    return seed, key_id_for(ed25519.public_key(seed))
