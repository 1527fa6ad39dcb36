"""License verification: a pure function from file bytes to a verdict.

No I/O and no clock reads happen here: the caller passes the file's bytes,
the trusted keys, ``now``, this machine's fingerprint, the revocation
predicates and the clock high-water mark. The adapter that reads files,
persists the high-water mark and re-reads on SIGHUP is
``appliance.license.manager``.

Every guard below stops part of threat T-LIC-1 (a forged, altered, replayed,
misbound or time-shifted license unlocking Pro features). Each rejection is a
:class:`LicenseRejected` with its own ``code`` and a sentence an operator can
act on; ``docs/licenses.md`` lists the codes.

Order matters: the file is authenticated (size, encoding, duplicate keys,
shape, key, signature) before any field of the payload is interpreted, so an
attacker's bytes never reach the payload validation unsigned.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Collection, Mapping

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

SCHEMA = "cell-license/1"
MAX_FILE_BYTES = 64 * 1024
TIERS = ("free", "pro", "hub")
# Tolerated disagreement between clocks: the vendor's and this appliance's
# (issued_at / not_before slightly ahead), and NTP steps backwards under the
# high-water mark. Ten minutes covers a badly drifting RTC, not a rollback.
CLOCK_SKEW = timedelta(minutes=10)
EXPIRY_WARNING = timedelta(days=30)
# Features only the hub tier may use, even when a pro license lists them.
HUB_ONLY_FEATURES = frozenset({"multi_tenant"})
# Pro host functions, each unlocked by the feature of the same name (T-LIC-2);
# appliance.runtime.profuncs.FUNCTIONS is the same tuple (checked by a test).
HOST_FUNCTION_FEATURES = ("load_weights", "host_mcp_call")
# Codes a trust-registry lookup may raise through ``registry_code`` when it
# refuses to answer because its signed state is stale or absent (T-LIC-3).
REGISTRY_CODES = frozenset({"registry_expired", "registry_missing"})

_FILE_KEYS = frozenset({"payload", "key_id", "signature"})
_REQUIRED = frozenset(
    {"schema", "license_id", "licensee", "tier", "features", "limits",
     "issued_at", "not_before", "expires_at"}
)
_OPTIONAL = frozenset({"machine_id"})
_LIMIT_KEYS = ("rate_limit_rps", "max_cells", "max_memory_mb")
_TIMESTAMP = re.compile(
    r"\A([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?Z\Z"
)
_LICENSE_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
_KEY_ID = re.compile(r"\A[0-9a-f]{16}\Z")
_FEATURE = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,63}\Z")
_MACHINE_ID = re.compile(r"\A[0-9a-f]{32}\Z")
_MAX_FEATURES = 64
_MAX_LICENSEE = 256
_MAX_LIMIT = 1e9  # far above any real limit; keeps arithmetic on them sane


class LicenseRejected(Exception):
    """The license is not honoured. ``code`` is stable; ``reason`` is for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    rate_limit_rps: float
    max_cells: int
    max_memory_mb: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rate_limit_rps": self.rate_limit_rps,
            "max_cells": self.max_cells,
            "max_memory_mb": self.max_memory_mb,
        }


def config_limits(settings: Any) -> Limits:
    """The limits the configuration alone allows (no license in force)."""
    return Limits(float(settings.rate_limit_rps), int(settings.max_cells_per_worker * settings.workers),
                  int(settings.memory_ceiling_mb))


@dataclass(frozen=True)
class License:
    """A license whose signature verified and whose payload is well-formed.

    Field names are the payload's (docs/licenses.md). Time validity, machine binding
    and revocation are checked separately by :func:`check_license`, because
    they change with the clock and the trust registry while the file does not.
    """

    schema: str
    license_id: str
    licensee: str
    tier: str
    features: tuple[str, ...]
    limits: Limits
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    machine_id: str | None
    key_id: str
    payload: Mapping[str, Any]


def canonical_json(payload: Mapping[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def key_id_for(public_key: bytes) -> str:
    """The key id convention of trusted_keys.json: first 16 hex of sha256(public key)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with a Z, the only form the payload accepts."""
    text = value.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
    return text + "Z"


def parse_timestamp(text: object) -> datetime:
    """Strict RFC 3339 in UTC ending in Z; raises ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("must be a string")
    m = _TIMESTAMP.match(text)
    if m is None:
        raise ValueError("must be an RFC 3339 UTC time like 2027-01-31T00:00:00Z")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or "0").ljust(6, "0"))
    # datetime() refuses Feb 30, hour 24, second 60 and so on.
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=timezone.utc)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # T-LIC-1: a file with two "tier" keys reads as "pro" here (last wins) and
    # as "free" to a first-wins parser; whichever the signer meant, refuse it.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 would parse as inf and re-sign as "Infinity"
        raise ValueError(f"number {text} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a license")


def decode_document(data: bytes) -> dict[str, Any]:
    # T-LIC-1: cap before parsing, so a huge file costs nothing to refuse.
    if len(data) > MAX_FILE_BYTES:
        raise LicenseRejected(
            "too_large",
            f"The license file is {len(data)} bytes, over the {MAX_FILE_BYTES // 1024} KiB limit; "
            "a genuine license is about 1 KiB, so this is not a license file.",
        )
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise LicenseRejected(
            "not_utf8", "The license file is not UTF-8 text; it is damaged or not a license file."
        ) from None
    try:
        doc = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_finite_float,
            parse_constant=_reject_constant,
        )
    except _DuplicateKey as exc:
        raise LicenseRejected(
            "duplicate_key",
            f'The license file repeats the key "{exc.key}" inside one object; such a file can be '
            "read two ways, so it is refused.",
        ) from None
    except RecursionError:
        raise LicenseRejected("malformed_json", "The license file is not valid JSON: nested too deeply.") from None
    except ValueError as exc:  # JSONDecodeError, int digit limit, non-finite numbers
        raise LicenseRejected("malformed_json", f"The license file is not valid JSON: {exc}.") from None
    if not isinstance(doc, dict) or set(doc) != _FILE_KEYS:
        raise LicenseRejected(
            "bad_structure",
            "The license file must be one JSON object with exactly the keys payload, key_id and signature.",
        )
    if not isinstance(doc["payload"], dict) or not isinstance(doc["key_id"], str):
        raise LicenseRejected(
            "bad_structure", "The license file's payload must be an object and its key_id a string."
        )
    return doc


def _signature_bytes(value: object) -> bytes:
    # T-LIC-1: strict base64 only. b64decode(validate=True) still accepts
    # non-zero padding bits, so several strings decode to the same signature;
    # requiring the canonical re-encoding makes the file's bytes unique.
    error = LicenseRejected(
        "bad_signature_encoding", "The license signature is not strict base64 of a 64-byte Ed25519 signature."
    )
    if not isinstance(value, str) or not value.isascii():
        raise error
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise error from None
    if len(raw) != 64 or base64.b64encode(raw).decode("ascii") != value:
        raise error
    return raw


def authenticate(
    data: bytes,
    keys: Mapping[str, bytes],
    *,
    is_key_revoked: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], str]:
    """Return (payload, key_id) if the file is well-formed and signed by a trusted key."""
    doc = decode_document(data)
    key_id: str = doc["key_id"]
    public = keys.get(key_id)
    # T-LIC-1: only the vendor's license keys sign; an unknown id is refused
    # before any signature work, whatever the file claims about itself.
    if public is None:
        shown = key_id if _KEY_ID.match(key_id) else repr(key_id[:40])
        raise LicenseRejected(
            "unknown_key",
            f"The license was signed with key {shown}, which this appliance does not trust.",
        )
    # T-LIC-1: a key the trust registry revoked (leaked vendor key) signs nothing.
    if is_key_revoked is not None and _ask(is_key_revoked, key_id, "signing key"):
        raise LicenseRejected(
            "key_revoked", f"The key {key_id} that signed this license has been revoked in the trust registry."
        )
    signature = _signature_bytes(doc["signature"])
    try:
        message = canonical_json(doc["payload"])
    except (ValueError, UnicodeEncodeError):  # lone surrogates cannot be UTF-8
        raise LicenseRejected("malformed_json", "The license payload holds text that is not valid Unicode.") from None
    # T-LIC-1: Ed25519 over the canonical payload bytes; forged, altered or
    # re-signed-by-someone-else files stop here.
    try:
        VerifyKey(public).verify(message, signature)
    except (BadSignatureError, ValueError):
        raise LicenseRejected(
            "bad_signature",
            "The license signature does not match its contents: the file was altered or was not issued by the vendor.",
        ) from None
    return doc["payload"], key_id


def _ask(predicate: Callable[[str], bool], value: str, what: str) -> bool:
    # Fail closed: if the registry cannot answer, the license is not honoured.
    try:
        return bool(predicate(value))
    except Exception as exc:  # noqa: BLE001 - any failure of the registry lookup
        code = getattr(exc, "registry_code", None)
        if code in REGISTRY_CODES:
            # T-LIC-3: the registry is stale or was never imported; revocations
            # cannot be shown current, so the license is not honoured.
            raise LicenseRejected(
                str(code), f"{exc} The license is not honoured until a current trust registry is imported."
            ) from None
        raise LicenseRejected(
            "revocation_unavailable",
            f"Could not check whether the {what} is revoked ({type(exc).__name__}); "
            "the license is not honoured until the trust registry answers.",
        ) from None


def _invalid(field: str, why: str) -> LicenseRejected:
    return LicenseRejected("invalid_payload", f'The license field "{field}" is invalid: {why}.')


def _text(payload: Mapping[str, Any], field: str, limit: int) -> str:
    value = payload[field]
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise _invalid(field, f"must be a non-empty string of at most {limit} characters")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value):
        raise _invalid(field, "must not contain control characters")  # keeps logs and TUI honest
    return value


def _positive(limits: Mapping[str, Any], name: str, *, integer: bool) -> Any:
    value = limits[name]
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not 0 < value <= _MAX_LIMIT:
        kind = "a positive integer" if integer else "a positive number"
        raise _invalid(f"limits.{name}", f"must be {kind} no larger than {int(_MAX_LIMIT)}")
    return value


def _validate(payload: Mapping[str, Any], key_id: str) -> License:
    # T-LIC-1: an unknown schema may mean fields this version would misread.
    schema = payload.get("schema")
    if schema != SCHEMA:
        shown = schema if isinstance(schema, str) and len(schema) <= 64 else type(schema).__name__
        raise LicenseRejected(
            "unknown_schema",
            f'The license has schema "{shown}"; this appliance understands only "{SCHEMA}". '
            "Ask the vendor for a license in that format.",
        )
    # T-LIC-1: strict types: a signed but ill-typed payload is a vendor bug
    # that must not turn into a looser reading here.
    missing = sorted(_REQUIRED - set(payload))
    if missing:
        raise _invalid(missing[0], "is missing")
    unknown = sorted(set(payload) - _REQUIRED - _OPTIONAL)
    if unknown:
        raise _invalid(unknown[0][:64], "is not a cell-license/1 field")
    license_id = payload["license_id"]
    if not isinstance(license_id, str) or not _LICENSE_ID.match(license_id):
        raise _invalid("license_id", "must be 1-128 characters of letters, digits and . _ : -")
    licensee = _text(payload, "licensee", _MAX_LICENSEE)
    tier = payload["tier"]
    if tier not in TIERS:
        raise _invalid("tier", "must be one of free, pro, hub")
    features = payload["features"]
    if (
        not isinstance(features, list)
        or len(features) > _MAX_FEATURES
        or not all(isinstance(f, str) and _FEATURE.match(f) for f in features)
        or len(set(features)) != len(features)
    ):
        raise _invalid("features", "must be a list of distinct lowercase names like load_weights")
    limits = payload["limits"]
    if not isinstance(limits, dict) or set(limits) != set(_LIMIT_KEYS):
        raise _invalid("limits", "must be an object with exactly rate_limit_rps, max_cells and max_memory_mb")
    parsed_limits = Limits(
        rate_limit_rps=float(_positive(limits, "rate_limit_rps", integer=False)),
        max_cells=_positive(limits, "max_cells", integer=True),
        max_memory_mb=_positive(limits, "max_memory_mb", integer=True),
    )
    times: dict[str, datetime] = {}
    for field in ("issued_at", "not_before", "expires_at"):
        try:
            times[field] = parse_timestamp(payload[field])
        except ValueError as exc:
            raise _invalid(field, str(exc)) from None
    if not times["not_before"] < times["expires_at"]:
        raise _invalid("expires_at", "must be later than not_before")
    if times["issued_at"] > times["expires_at"]:
        raise _invalid("issued_at", "must not be later than expires_at")
    machine_id = payload.get("machine_id")
    if machine_id is not None and (not isinstance(machine_id, str) or not _MACHINE_ID.match(machine_id)):
        raise _invalid("machine_id", "must be a 32-character lowercase hex machine fingerprint")
    return License(
        schema=SCHEMA,
        license_id=license_id,
        licensee=licensee,
        tier=tier,
        features=tuple(features),
        limits=parsed_limits,
        issued_at=times["issued_at"],
        not_before=times["not_before"],
        expires_at=times["expires_at"],
        machine_id=machine_id,
        key_id=key_id,
        payload=payload,
    )


def parse_license(
    data: bytes,
    keys: Mapping[str, bytes],
    *,
    is_key_revoked: Callable[[str], bool] | None = None,
) -> License:
    """Authenticate and validate a license file; time and binding are not checked."""
    payload, key_id = authenticate(data, keys, is_key_revoked=is_key_revoked)
    return _validate(payload, key_id)


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


def check_clock(now: datetime, high_water: datetime | None, skew: timedelta = CLOCK_SKEW) -> None:
    """Refuse a clock that went back past the latest time this appliance saw."""
    _require_aware(now)
    # T-LIC-1: winding the clock back would revive an expired license; the
    # persisted high-water mark remembers how late it has already been.
    if high_water is not None and now < high_water - skew:
        raise LicenseRejected(
            "clock_rollback",
            f"The system clock ({format_time(now)}) is behind the latest time this appliance has seen "
            f"({format_time(high_water)}) by more than {int(skew.total_seconds() // 60)} minutes; "
            "licenses are not honoured until the clock is corrected.",
        )


def check_license(
    lic: License,
    *,
    now: datetime,
    machine_id: str | None,
    is_revoked: Callable[[str], bool] | None = None,
    is_key_revoked: Callable[[str], bool] | None = None,
    high_water: datetime | None = None,
    skew: timedelta = CLOCK_SKEW,
) -> None:
    """The checks that depend on the clock, this machine and the trust registry.

    ``is_key_revoked`` is asked again here (``parse_license`` asked it first)
    because a long-running service must drop a license whose signing key the
    registry revokes later, without waiting for the file to change.
    """
    check_clock(now, high_water, skew)
    # T-LIC-1: a license dated after "now" means the clock or the file lies.
    if lic.issued_at > now + skew:
        raise LicenseRejected(
            "issued_in_future",
            f"The license says it was issued at {format_time(lic.issued_at)}, after this appliance's "
            f"clock ({format_time(now)}); check the system clock.",
        )
    # T-LIC-1: validity window.
    if lic.not_before > now + skew:
        raise LicenseRejected(
            "not_yet_valid",
            f"The license is not valid before {format_time(lic.not_before)}; the clock says {format_time(now)}.",
        )
    if now >= lic.expires_at:
        raise LicenseRejected(
            "expired",
            f"The license {lic.license_id} expired at {format_time(lic.expires_at)}; ask the vendor for a renewal.",
        )
    # T-LIC-1: a machine-bound license copied to another appliance.
    if lic.machine_id is not None and lic.machine_id != machine_id:
        ours = machine_id or "unknown (no /etc/machine-id)"
        raise LicenseRejected(
            "wrong_machine",
            f"The license is bound to machine {lic.machine_id}, but this appliance's fingerprint is {ours}; "
            "ask the vendor for a license issued to this fingerprint.",
        )
    # T-LIC-1: revoked in the trust registry (refund, leak, abuse).
    if is_key_revoked is not None and _ask(is_key_revoked, lic.key_id, "signing key"):
        raise LicenseRejected(
            "key_revoked", f"The key {lic.key_id} that signed this license has been revoked in the trust registry."
        )
    if is_revoked is not None and _ask(is_revoked, lic.license_id, "license"):
        raise LicenseRejected(
            "revoked", f"The license {lic.license_id} has been revoked by the vendor in the trust registry."
        )


def verify_license(
    data: bytes,
    *,
    keys: Mapping[str, bytes],
    now: datetime,
    machine_id: str | None,
    is_revoked: Callable[[str], bool] | None = None,
    is_key_revoked: Callable[[str], bool] | None = None,
    high_water: datetime | None = None,
    skew: timedelta = CLOCK_SKEW,
) -> License:
    """Every T-LIC-1 check in one call; returns the license or raises LicenseRejected."""
    _require_aware(now)
    lic = parse_license(data, keys, is_key_revoked=is_key_revoked)
    check_license(lic, now=now, machine_id=machine_id, is_revoked=is_revoked, high_water=high_water, skew=skew)
    return lic


def days_left(lic: License, now: datetime) -> int:
    """Whole days until expiry, never negative."""
    return max(0, (lic.expires_at - now) // timedelta(days=1))


def warnings_for(lic: License, now: datetime) -> list[str]:
    if lic.expires_at - now <= EXPIRY_WARNING:
        days = days_left(lic, now)
        when = "today" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"
        return [f"The license {lic.license_id} expires {when} ({format_time(lic.expires_at)}); renew it to keep the {lic.tier} tier."]
    return []


def tier_allows(tier: str, features: Collection[str], feature: str) -> bool:
    """Free allows nothing; pro what it lists except hub-only features; hub what it lists."""
    if tier == "free" or feature not in features:
        return False
    return tier == "hub" or feature not in HUB_ONLY_FEATURES


def effective_limits(config: Limits, license_limits: Limits | None, hard: Limits) -> Limits:
    """min(config, license, hard ceilings), field by field (threat T-DOS-1)."""
    sources = [config, hard] + ([license_limits] if license_limits is not None else [])
    return Limits(
        rate_limit_rps=min(s.rate_limit_rps for s in sources),
        max_cells=min(s.max_cells for s in sources),
        max_memory_mb=min(s.max_memory_mb for s in sources),
    )


def load_trusted_keys(text: str, role: str = "license") -> dict[str, bytes]:
    """Parse trusted_keys.json for one role; inconsistent entries are refused loudly."""
    doc = json.loads(text, object_pairs_hook=_no_duplicates)
    keys: dict[str, bytes] = {}
    for entry in doc[role]:
        public = bytes.fromhex(entry["ed25519_public_key"])
        key_id = entry["key_id"]
        if len(public) != 32 or key_id != key_id_for(public) or key_id in keys:
            raise ValueError(f"trusted key {key_id!r} for role {role!r} is malformed")
        keys[key_id] = public
    return keys
