"""T-LIC-1: forged, altered, replayed, misbound or time-shifted licenses are refused.

Every rejection below is made with a REAL Ed25519 signature from a test key,
so each test proves its own guard, not an earlier signature failure.
"""
from __future__ import annotations

import base64
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from appliance.license.issue import encode_document
from appliance.license.machine import fingerprint_from_machine_id, machine_fingerprint
from appliance.license.manager import embedded_license_keys
from appliance.license.verify import (
    MAX_FILE_BYTES,
    LicenseRejected,
    Limits,
    canonical_json,
    effective_limits,
    key_id_for,
    load_trusted_keys,
    tier_allows,
    verify_license,
    warnings_for,
)
from tests.factories import DROP, NOW, compact, make_document, make_keypair, make_license, make_payload, stamp

REPO = Path(__file__).resolve().parents[2]
KP = make_keypair("license-primary")
ATTACKER = make_keypair("license-attacker")
MACHINE = fingerprint_from_machine_id("0123456789abcdef0123456789abcdef")
OTHER_MACHINE = fingerprint_from_machine_id("fedcba9876543210fedcba9876543210")


def verify(data: bytes, **kw: Any) -> Any:
    args: dict[str, Any] = {"keys": KP.keys, "now": NOW, "machine_id": MACHINE}
    args.update(kw)
    return verify_license(data, **args)


def rejected(data: bytes, **kw: Any) -> LicenseRejected:
    with pytest.raises(LicenseRejected) as info:
        verify(data, **kw)
    assert info.value.reason.endswith("."), "reasons are sentences an operator reads"
    return info.value


def signed(**overrides: Any) -> bytes:
    return make_license(KP.signing_key, KP.key_id, **overrides)


# -- the good path ------------------------------------------------------------


def test_valid_license_accepted_with_every_field() -> None:
    lic = verify(signed(machine_id=MACHINE))
    assert (lic.tier, lic.licensee, lic.license_id) == ("pro", "Example Labs GmbH", "lic-test-0001")
    assert lic.features == ("load_weights", "host_mcp_call")
    assert lic.limits == Limits(rate_limit_rps=50.0, max_cells=100, max_memory_mb=1024)
    assert lic.expires_at == NOW + timedelta(days=365)
    assert lic.machine_id == MACHINE and lic.key_id == KP.key_id


def test_canonical_json_known_answer() -> None:
    # Pinned bytes: sorted keys, no spaces, raw UTF-8 (not \u escapes).
    assert canonical_json({"b": "é", "a": [1, 2.5], "c": {"z": True, "y": None}}) == (
        '{"a":[1,2.5],"b":"é","c":{"y":null,"z":true}}'.encode("utf-8")
    )


def test_signature_made_without_project_helpers_verifies() -> None:
    # Guards against issue.py and verify.py agreeing on a wrong canonical form.
    key = SigningKey(bytes(range(32)))
    payload = make_payload(licensee="Zürich AG")
    message = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    doc = {
        "payload": payload,
        "key_id": key_id_for(bytes(key.verify_key)),
        "signature": base64.b64encode(key.sign(message).signature).decode(),
    }
    keys = {doc["key_id"]: bytes(key.verify_key)}
    assert verify(json.dumps(doc).encode(), keys=keys).licensee == "Zürich AG"


def test_embedded_production_keys_load_and_match_their_ids() -> None:
    keys = embedded_license_keys()
    assert keys == {"72ae1d732b9f48e7": bytes.fromhex("aeefeb2dfead3aef78f2225a86b588f7bb9c020f2a3d531ff118c28a190185a0")}


def test_trusted_keys_file_with_mismatched_key_id_refused() -> None:
    text = json.dumps({"license": [{"key_id": "0000000000000000", "ed25519_public_key": KP.public_key.hex()}]})
    with pytest.raises(ValueError):
        load_trusted_keys(text)


def test_test_license_not_accepted_by_production_keys() -> None:
    assert rejected(signed(), keys=embedded_license_keys()).code == "unknown_key"


# -- forgery and tampering ----------------------------------------------------


def test_T_LIC_1_forged_with_wrong_key_rejected() -> None:
    forged = make_license(ATTACKER.signing_key, KP.key_id, tier="hub")
    assert rejected(forged).code == "bad_signature"


def test_T_LIC_1_unknown_key_id_rejected() -> None:
    assert rejected(make_license(ATTACKER.signing_key, ATTACKER.key_id)).code == "unknown_key"


def test_T_LIC_1_revoked_signing_key_rejected() -> None:
    err = rejected(signed(), is_key_revoked=lambda key_id: key_id == KP.key_id)
    assert err.code == "key_revoked"


def test_T_LIC_1_payload_edited_after_signing_rejected() -> None:
    doc = make_document(KP.signing_key, KP.key_id, tier="free")
    doc["payload"]["tier"] = "hub"
    assert rejected(encode_document(doc)).code == "bad_signature"


def test_T_LIC_1_payload_limits_raised_after_signing_rejected() -> None:
    doc = make_document(KP.signing_key, KP.key_id)
    doc["payload"]["limits"]["max_memory_mb"] = 4096
    assert rejected(encode_document(doc)).code == "bad_signature"


_COMPACT = compact(make_document(KP.signing_key, KP.key_id, machine_id=MACHINE))


def test_compact_fixture_is_valid() -> None:
    assert verify(_COMPACT).tier == "pro"


@pytest.mark.parametrize("position", range(len(_COMPACT)))
def test_T_LIC_1_any_flipped_byte_rejected(position: int) -> None:
    # Every byte of a whitespace-free file matters: payload, key_id, signature, syntax.
    for mask in (0x01, 0x02, 0x20, 0x80):
        tampered = bytearray(_COMPACT)
        tampered[position] ^= mask
        with pytest.raises(LicenseRejected):
            verify(bytes(tampered))


@pytest.mark.parametrize("index", range(0, 64, 3))
def test_T_LIC_1_flipped_signature_byte_rejected(index: int) -> None:
    doc = make_document(KP.signing_key, KP.key_id)
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[index] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(raw)).decode()
    assert rejected(encode_document(doc)).code == "bad_signature"


def test_T_LIC_1_signature_with_non_canonical_base64_padding_rejected() -> None:
    doc = make_document(KP.signing_key, KP.key_id)
    sig = doc["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[-3])
    doc["signature"] = sig[:-3] + alphabet[last ^ 0x01] + "=="  # low bits are unused padding
    assert base64.b64decode(doc["signature"]) == base64.b64decode(sig), "same bytes, different text"
    assert rejected(encode_document(doc)).code == "bad_signature_encoding"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s.rstrip("="),  # missing padding
        lambda s: s[:40] + "\n" + s[40:],  # whitespace inside
        lambda s: s.replace("+", "-").replace("/", "_") if ("+" in s or "/" in s) else s[:-3] + "-==",
        lambda s: s[:-4] + "====",
        lambda s: base64.b64encode(base64.b64decode(s)[:63]).decode(),  # 63 bytes
        lambda s: base64.b64encode(base64.b64decode(s) + b"\x00").decode(),  # 65 bytes
        lambda s: "é" + s,
        lambda s: 12345,
        lambda s: None,
        lambda s: "",
    ],
    ids=["no-padding", "newline", "urlsafe", "extra-padding", "63-bytes", "65-bytes", "non-ascii", "int", "null", "empty"],
)
def test_T_LIC_1_bad_base64_signature_rejected(mangle: Any) -> None:
    doc = make_document(KP.signing_key, KP.key_id)
    doc["signature"] = mangle(doc["signature"])
    assert rejected(encode_document(doc)).code == "bad_signature_encoding"


# -- duplicate keys: one file, two readings -----------------------------------


def _signed_compact_payload(**overrides: Any) -> tuple[bytes, str]:
    payload = make_payload(**overrides)
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    sig = base64.b64encode(KP.signing_key.sign(canonical_json(payload)).signature).decode()
    return body.encode(), sig


def _wrap(payload_text: str, sig: str) -> bytes:
    return f'{{"payload":{payload_text},"key_id":"{KP.key_id}","signature":"{sig}"}}'.encode()


def test_T_LIC_1_duplicate_tier_key_refused() -> None:
    # Signed over the last-wins reading ("pro"); a first-wins reader would see "free".
    body, sig = _signed_compact_payload(tier="pro")
    text = '{"tier":"free",' + body.decode()[1:]
    data = _wrap(text, sig)
    last_wins = json.loads(data)["payload"]
    KP.signing_key.verify_key.verify(canonical_json(last_wins), base64.b64decode(sig))  # the signature is real
    err = rejected(data)
    assert err.code == "duplicate_key" and '"tier"' in err.reason


def test_T_LIC_1_nested_duplicate_limit_key_refused() -> None:
    body, sig = _signed_compact_payload(limits={"max_cells": 1000, "rate_limit_rps": 50, "max_memory_mb": 1024})
    text = body.decode().replace('"limits":{', '"limits":{"max_cells":1,', 1)
    err = rejected(_wrap(text, sig))
    assert err.code == "duplicate_key" and '"max_cells"' in err.reason


@pytest.mark.parametrize("key", ["payload", "key_id", "signature"])
def test_T_LIC_1_duplicate_top_level_key_refused(key: str) -> None:
    doc = make_document(KP.signing_key, KP.key_id)
    text = compact(doc).decode()
    data = ("{" + f'"{key}":{json.dumps(doc[key])},' + text[1:]).encode()
    assert rejected(data).code == "duplicate_key"


def test_T_LIC_1_duplicate_key_deep_in_features_list_refused() -> None:
    body, sig = _signed_compact_payload()
    text = body.decode().replace('"features":[', '"features":[{"a":1,"a":2},', 1)
    assert rejected(_wrap(text, sig)).code == "duplicate_key"


# -- schema and payload types -------------------------------------------------


@pytest.mark.parametrize("schema", ["cell-license/2", "cell-license/1 ", "", 1, None, DROP])
def test_T_LIC_1_unknown_schema_rejected(schema: Any) -> None:
    assert rejected(signed(schema=schema)).code == "unknown_schema"


INVALID_PAYLOADS: list[tuple[str, dict[str, Any]]] = [
    ("tier-unknown", {"tier": "enterprise"}),
    ("tier-case", {"tier": "Pro"}),
    ("tier-int", {"tier": 1}),
    ("features-string", {"features": "load_weights"}),
    ("features-int", {"features": [1]}),
    ("features-duplicate", {"features": ["a", "a"]}),
    ("features-uppercase", {"features": ["Load"]}),
    ("limits-list", {"limits": [1, 2, 3]}),
    ("limits-missing", {"limits": {"rate_limit_rps": 1, "max_cells": 1}}),
    ("limits-extra", {"limits": {"rate_limit_rps": 1, "max_cells": 1, "max_memory_mb": 1, "gpus": 8}}),
    ("limits-zero", {"limits": {"rate_limit_rps": 0, "max_cells": 1, "max_memory_mb": 1}}),
    ("limits-negative", {"limits": {"rate_limit_rps": 1, "max_cells": -5, "max_memory_mb": 1}}),
    ("limits-bool", {"limits": {"rate_limit_rps": 1, "max_cells": True, "max_memory_mb": 1}}),
    ("limits-string", {"limits": {"rate_limit_rps": "20", "max_cells": 1, "max_memory_mb": 1}}),
    ("limits-float-cells", {"limits": {"rate_limit_rps": 1, "max_cells": 1.5, "max_memory_mb": 1}}),
    ("limits-huge", {"limits": {"rate_limit_rps": 1, "max_cells": 10**12, "max_memory_mb": 1}}),
    ("time-offset", {"expires_at": "2028-01-01T00:00:00+00:00"}),
    ("time-lowercase-z", {"expires_at": "2028-01-01T00:00:00z"}),
    ("time-no-zone", {"expires_at": "2028-01-01T00:00:00"}),
    ("time-date-only", {"expires_at": "2028-01-01"}),
    ("time-feb-30", {"expires_at": "2028-02-30T00:00:00Z"}),
    ("time-space", {"expires_at": "2028-01-01 00:00:00Z"}),
    ("time-unix", {"expires_at": 1830000000}),
    ("time-arabic-digits", {"expires_at": "٢٠٢٨-01-01T00:00:00Z"}),
    ("window-inverted", {"not_before": stamp(NOW + timedelta(days=400))}),
    ("issued-after-expiry", {"issued_at": stamp(NOW + timedelta(days=400))}),
    ("license-id-empty", {"license_id": ""}),
    ("license-id-slash", {"license_id": "../x"}),
    ("licensee-empty", {"licensee": "  "}),
    ("licensee-control", {"licensee": "ACME\x1b[31m"}),
    ("licensee-list", {"licensee": ["ACME"]}),
    ("machine-id-short", {"machine_id": "abc"}),
    ("machine-id-upper", {"machine_id": MACHINE.upper()}),
    ("unknown-field", {"seats": 5}),
    ("missing-licensee", {"licensee": DROP}),
    ("missing-expires", {"expires_at": DROP}),
]


@pytest.mark.parametrize("overrides", [o for _, o in INVALID_PAYLOADS], ids=[i for i, _ in INVALID_PAYLOADS])
def test_T_LIC_1_ill_typed_payload_rejected(overrides: dict[str, Any]) -> None:
    assert rejected(signed(**overrides)).code == "invalid_payload"


def test_fractional_seconds_and_float_rps_accepted() -> None:
    lic = verify(signed(expires_at="2028-01-01T00:00:00.250Z", limits={"rate_limit_rps": 2.5, "max_cells": 1, "max_memory_mb": 64}))
    assert lic.expires_at.microsecond == 250_000 and lic.limits.rate_limit_rps == 2.5


# -- time, machine, revocation ------------------------------------------------


def test_T_LIC_1_not_yet_valid_rejected() -> None:
    assert rejected(signed(not_before=stamp(NOW + timedelta(days=2)))).code == "not_yet_valid"


def test_T_LIC_1_not_before_within_skew_tolerated() -> None:
    assert verify(signed(not_before=stamp(NOW + timedelta(minutes=5)))).tier == "pro"


def test_T_LIC_1_expired_rejected() -> None:
    data = signed(issued_at=stamp(NOW - timedelta(days=40)), not_before=stamp(NOW - timedelta(days=40)),
                  expires_at=stamp(NOW - timedelta(seconds=1)))
    assert rejected(data).code == "expired"


def test_T_LIC_1_expired_exactly_at_expiry_rejected() -> None:
    assert rejected(signed(expires_at=stamp(NOW))).code == "expired"


def test_T_LIC_1_issued_in_the_future_rejected() -> None:
    data = signed(issued_at=stamp(NOW + timedelta(days=1)), not_before=stamp(NOW - timedelta(days=1)))
    assert rejected(data).code == "issued_in_future"


def test_T_LIC_1_wrong_machine_rejected() -> None:
    err = rejected(signed(machine_id=OTHER_MACHINE))
    assert err.code == "wrong_machine" and MACHINE in err.reason, "tells the operator its own fingerprint"


def test_T_LIC_1_machine_bound_license_on_host_without_machine_id_rejected() -> None:
    assert rejected(signed(machine_id=MACHINE), machine_id=None).code == "wrong_machine"


def test_unbound_license_accepted_on_any_machine() -> None:
    assert verify(signed(), machine_id=None).tier == "pro"


def test_T_LIC_1_revoked_license_id_rejected() -> None:
    revoked = {"lic-test-0001"}
    assert rejected(signed(), is_revoked=revoked.__contains__).code == "revoked"
    assert verify(signed(license_id="lic-test-0002"), is_revoked=revoked.__contains__).tier == "pro"


def test_T_LIC_1_revocation_lookup_failure_fails_closed() -> None:
    def broken(_: str) -> bool:
        raise OSError("registry unavailable")

    assert rejected(signed(), is_revoked=broken).code == "revocation_unavailable"


def test_T_LIC_1_clock_rollback_past_high_water_rejected() -> None:
    err = rejected(signed(), high_water=NOW + timedelta(hours=3))
    assert err.code == "clock_rollback"


def test_T_LIC_1_clock_small_skew_below_high_water_tolerated() -> None:
    assert verify(signed(), high_water=NOW + timedelta(minutes=9)).tier == "pro"


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        verify(signed(), now=NOW.replace(tzinfo=None))


# -- encoding and size --------------------------------------------------------


def test_T_LIC_1_oversize_file_rejected_even_if_signed() -> None:
    data = signed()
    padded = data + b" " * (MAX_FILE_BYTES + 1 - len(data))
    assert rejected(padded).code == "too_large"
    assert verify(padded[:MAX_FILE_BYTES]).tier == "pro", "exactly 64 KiB is still read"


def test_T_LIC_1_non_utf8_file_rejected() -> None:
    data = signed(licensee="Muller AG").replace(b"Muller", b"M\xfcller")  # Latin-1 u-umlaut
    assert rejected(data).code == "not_utf8"


def test_T_LIC_1_lone_surrogate_rejected() -> None:
    data = signed(licensee="ACME").replace(b'"ACME"', b'"AC\\ud800ME"')
    assert rejected(data).code == "malformed_json"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xef\xbb\xbf{}",  # UTF-8 BOM
        b"[" * 100_000,
        b"[" * 30_000 + b"]" * 30_000,
        b'{"payload":{"n":NaN},"key_id":"x","signature":"x"}',
        b'{"payload":{"n":1e999},"key_id":"x","signature":"x"}',
        b'{"payload":{"n":' + b"9" * 5000 + b'},"key_id":"x","signature":"x"}',
    ],
    ids=["empty", "text", "bom", "deep-unclosed", "deep-closed", "nan", "inf", "huge-int"],
)
def test_T_LIC_1_malformed_json_rejected(data: bytes) -> None:
    assert rejected(data).code in {"malformed_json", "too_large"}


@pytest.mark.parametrize(
    "doc",
    [
        [],
        "license",
        {"payload": {}, "key_id": "k"},
        {"payload": {}, "key_id": "k", "signature": "s", "extra": 1},
        {"payload": "{}", "key_id": "k", "signature": "s"},
        {"payload": {}, "key_id": 7, "signature": "s"},
    ],
    ids=["array", "string", "missing-signature", "extra-key", "payload-string", "key-id-int"],
)
def test_T_LIC_1_wrong_file_structure_rejected(doc: Any) -> None:
    assert rejected(json.dumps(doc).encode()).code == "bad_structure"


# -- policy helpers -----------------------------------------------------------


def test_expiry_warning_within_30_days() -> None:
    lic = verify(signed(expires_at=stamp(NOW + timedelta(days=12, hours=1))))
    (warning,) = warnings_for(lic, NOW)
    assert "in 12 days" in warning
    assert warnings_for(verify(signed()), NOW) == []


@pytest.mark.parametrize(
    "tier, feature, allowed",
    [
        ("free", "load_weights", False),
        ("pro", "load_weights", True),
        ("pro", "gpu", False),  # not listed
        ("pro", "multi_tenant", False),  # hub only, even if listed
        ("hub", "multi_tenant", True),
        ("hub", "load_weights", True),
    ],
)
def test_tier_allows(tier: str, feature: str, allowed: bool) -> None:
    assert tier_allows(tier, ("load_weights", "multi_tenant"), feature) is allowed


def test_effective_limits_never_exceed_hard_ceilings() -> None:
    config = Limits(20.0, 500, 2048)
    license_limits = Limits(1000.0, 100, 100_000)
    hard = Limits(100_000.0, 100_000, 4096)
    assert effective_limits(config, license_limits, hard) == Limits(20.0, 100, 2048)
    assert effective_limits(Limits(1e9, 10**9, 10**9), Limits(1e9, 10**9, 10**9), hard) == hard
    assert effective_limits(config, None, hard) == config


# -- machine fingerprint ------------------------------------------------------


def test_fingerprint_definition_known_answer() -> None:
    import hashlib

    raw = "0123456789abcdef0123456789abcdef"
    expected = hashlib.sha256(b"cell-license-machine/1\n" + raw.encode()).hexdigest()[:32]
    assert fingerprint_from_machine_id(raw + "\n") == expected == MACHINE
    assert re.fullmatch(r"[0-9a-f]{32}", MACHINE)


def test_fingerprint_from_files(tmp_path: Path) -> None:
    empty, good = tmp_path / "empty", tmp_path / "good"
    empty.write_text("uninitialized\n")
    good.write_text("fedcba9876543210fedcba9876543210\n")
    assert machine_fingerprint([tmp_path / "missing", empty, good]) == OTHER_MACHINE
    assert machine_fingerprint([tmp_path / "missing", empty]) is None


# -- layering and speed -------------------------------------------------------


def test_verify_module_is_pure() -> None:
    code = (
        "import sys, appliance.license, appliance.license.verify\n"
        "bad = [m for m in ('sqlite3', 'flask', 'wasmtime', 'socket', 'sqlite_utils', 'appliance.license.manager')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
    source = (REPO / "appliance/license/verify.py").read_text()
    for clock_read in ("datetime.now", "datetime.utcnow", "time.time", "date.today", "open("):
        assert clock_read not in source


def test_verify_speed_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    data = signed(machine_id=MACHINE)
    for _ in range(50):
        verify(data)
    samples = []
    for _ in range(2000):
        start = time.perf_counter_ns()
        verify(data, high_water=NOW, is_revoked=lambda _: False)
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    p50, p99 = statistics.median(samples) / 1000, samples[int(len(samples) * 0.99)] / 1000
    with capsys.disabled():
        print(f"\n[benchmark] verify_license: p50 {p50:.1f} us, p99 {p99:.1f} us over {len(samples)} runs (target < 1000 us)")


def test_every_rejection_code_is_documented() -> None:
    source = "".join((REPO / "appliance/license" / f).read_text() for f in ("verify.py", "manager.py"))
    codes = set(re.findall(r'LicenseRejected\(\s*"([a-z_]+)"', source)) | {"no_license"}
    documented = set(re.findall(r"^\|[^|]*\| `([a-z_]+)` \|", (REPO / "docs/licenses.md").read_text(), re.M))
    assert len(codes) >= 19 and codes <= documented, sorted(codes - documented)
