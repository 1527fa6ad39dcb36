"""What a verified registry says, as plain values, and how two of them differ.

Pure: the importer and the Mirror hand in bytes and dicts that python-tuf has
already verified; nothing here reads files or the clock (pass ``now``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

REVOCATIONS_TARGET = "revocations.json"
REVOCATIONS_SCHEMA = "cell-revocations/1"
MAX_REVOCATIONS_BYTES = 4 * 1024 * 1024
EXPIRY_WARN_DAYS = 14

_TEMPLATE = re.compile(r"[a-z0-9_-]{1,64}")
_LICENSE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KEY_ID = re.compile(r"[0-9a-f]{16,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BadRegistryContent(ValueError):
    """Signed, but not a registry Cell can use: the vendor is at fault."""


@dataclass(frozen=True)
class Template:
    """One trusted guest runtime blob, from its TUF target entry."""

    target: str
    template: str
    version: str
    abi: str
    sha256: str
    length: int


@dataclass(frozen=True)
class Revocations:
    licenses: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Changes:
    """What an import changed, for the operator and the audit log."""

    templates_added: tuple[str, ...] = ()
    templates_replaced: tuple[str, ...] = ()
    templates_removed: tuple[str, ...] = ()
    licenses_revoked: tuple[str, ...] = ()
    licenses_unrevoked: tuple[str, ...] = ()
    keys_revoked: tuple[str, ...] = ()
    keys_unrevoked: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(
            (self.templates_added, self.templates_replaced, self.templates_removed,
             self.licenses_revoked, self.licenses_unrevoked, self.keys_revoked, self.keys_unrevoked)
        )

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "templates_added": list(self.templates_added),
            "templates_replaced": list(self.templates_replaced),
            "templates_removed": list(self.templates_removed),
            "licenses_revoked": list(self.licenses_revoked),
            "licenses_unrevoked": list(self.licenses_unrevoked),
            "keys_revoked": list(self.keys_revoked),
            "keys_unrevoked": list(self.keys_unrevoked),
        }


def template_from_target(target: str, length: int, hashes: Mapping[str, str], custom: Mapping[str, Any]) -> Template | None:
    """The template a target describes, or None for a non-template target.

    A target is a template when its custom fields name one; its sha256 must be
    signed, because the runtime loader pins blobs by sha256 (T-SUPPLY-1).
    """
    if target == REVOCATIONS_TARGET:
        return None
    name = custom.get("template")
    if name is None:
        return None
    sha = hashes.get("sha256")
    if not isinstance(name, str) or not _TEMPLATE.fullmatch(name):
        raise BadRegistryContent(f"target {target!r}: template name {name!r} is not [a-z0-9_-]+")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise BadRegistryContent(f"target {target!r} has no sha256")
    version = custom.get("version", "")
    abi = custom.get("abi", "")
    if not isinstance(version, str) or not isinstance(abi, str):
        raise BadRegistryContent(f"target {target!r}: version and abi must be strings")
    return Template(target, name, version, abi, sha, length)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two readers could disagree on which value wins; refuse both.
            raise BadRegistryContent(f"revocations.json repeats the key {key!r}")
        out[key] = value
    return out


def parse_revocations(data: bytes) -> Revocations:
    """Strict parse of revocations.json (already hash-verified by TUF)."""
    if len(data) > MAX_REVOCATIONS_BYTES:
        raise BadRegistryContent("revocations.json is too large")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRegistryContent(f"revocations.json is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != REVOCATIONS_SCHEMA:
        raise BadRegistryContent(f"revocations.json must be an object with schema {REVOCATIONS_SCHEMA!r}")
    unknown = set(doc) - {"schema", "licenses", "keys"}
    if unknown:
        raise BadRegistryContent(f"revocations.json has unknown fields {sorted(unknown)}")
    return Revocations(
        licenses=_ids(doc.get("licenses", []), _LICENSE_ID, "licenses"),
        keys=_ids(doc.get("keys", []), _KEY_ID, "keys"),
    )


def _ids(raw: Any, pattern: re.Pattern[str], what: str) -> frozenset[str]:
    if not isinstance(raw, list) or not all(isinstance(i, str) and pattern.fullmatch(i) for i in raw):
        raise BadRegistryContent(f"revocations.json {what} must be a list of ids matching {pattern.pattern}")
    return frozenset(raw)


def encode_revocations(licenses: list[str] | frozenset[str], keys: list[str] | frozenset[str]) -> bytes:
    """The canonical bytes of a revocation list (vendor side); parse_revocations accepts them."""
    doc = {"schema": REVOCATIONS_SCHEMA, "licenses": sorted(licenses), "keys": sorted(keys)}
    data = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    parse_revocations(data)  # the vendor never signs a list the appliance would refuse
    return data


def diff(old_templates: Mapping[str, Template], new_templates: Mapping[str, Template],
         old_rev: Revocations, new_rev: Revocations) -> Changes:
    """Templates keyed by target name; replaced = same name, different bytes."""
    added = sorted(set(new_templates) - set(old_templates))
    removed = sorted(set(old_templates) - set(new_templates))
    replaced = sorted(
        n for n in set(old_templates) & set(new_templates)
        if (old_templates[n].sha256, old_templates[n].length) != (new_templates[n].sha256, new_templates[n].length)
    )
    return Changes(
        templates_added=tuple(added),
        templates_replaced=tuple(replaced),
        templates_removed=tuple(removed),
        licenses_revoked=tuple(sorted(new_rev.licenses - old_rev.licenses)),
        licenses_unrevoked=tuple(sorted(old_rev.licenses - new_rev.licenses)),
        keys_revoked=tuple(sorted(new_rev.keys - old_rev.keys)),
        keys_unrevoked=tuple(sorted(old_rev.keys - new_rev.keys)),
    )


def days_until(expires: datetime, now: datetime) -> float:
    return (expires - now).total_seconds() / 86400.0


def expiry_state(expires: datetime, now: datetime, warn_days: int = EXPIRY_WARN_DAYS) -> str:
    """'ok', 'warn' (less than warn_days left) or 'expired'."""
    left = days_until(expires, now)
    if left <= 0:
        return "expired"
    return "warn" if left < warn_days else "ok"
