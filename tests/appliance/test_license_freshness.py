"""T-LIC-3: revocation cannot be sidestepped by a stale registry or a tampered clock mark.

(a) The license check asks the trust registry whether the license (and its
signing key) is revoked. A registry whose signed metadata has expired, or to
which no update was ever imported (a fresh node, or a mirror directory wiped
to forget a revocation), cannot say "not revoked": the license is refused
with ``registry_expired`` / ``registry_missing`` and the node runs free.
Registries here are real TUF repositories built by ``tests.factories``.

(b) The clock high-water mark is signed by the node key. Deleting it while the
node has history, lowering it, re-signing it with another key or dropping its
table is detected: the service refuses every license (``clock_tampered``),
``cell doctor`` fails, and only a restore or ``cell license clock-reset``
(never below the newest receipt) repairs it.
"""
from __future__ import annotations

import argparse
import base64
import io
import shutil
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

from appliance.config import Settings
from appliance.license.cli import register
from appliance.license.manager import LicenseManager, mark_message, read_high_water
from appliance.license.verify import HOST_FUNCTION_FEATURES
from appliance.ops.doctor import FAIL, OK, Context, run_checks
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from mirror.registry import Mirror
from tests.factories import make_keypair, make_license, make_registry, stamp
from tests.mirror import Vendor

KP = make_keypair("license-freshness")
T0 = datetime.now(timezone.utc).replace(microsecond=0)  # python-tuf checks expiry on the real clock at import


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Tick:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path / "root", config_dir=tmp_path / "etc", license_path=tmp_path / "etc" / "license.json")


def install_license(settings: Settings, **overrides: Any) -> None:
    settings.license_path.parent.mkdir(parents=True, exist_ok=True)
    settings.license_path.write_bytes(make_license(
        KP.signing_key, KP.key_id, issued_at=stamp(T0 - timedelta(days=1)), not_before=stamp(T0 - timedelta(days=1)),
        expires_at=stamp(T0 + timedelta(days=365)), **overrides))


def with_registry(settings: Settings, clock: Callable[[], datetime], tick: Tick | None = None,
                  mirror: Mirror | None = None) -> LicenseManager:
    """The manager exactly as the service wires it: revocations from the mirror."""
    m = mirror if mirror is not None else Mirror(settings.mirror_dir)
    kw: dict[str, Any] = {"monotonic": tick} if tick is not None else {}
    return LicenseManager(settings, keys=KP.keys, clock=clock, machine_id=None,
                          revocations=m.is_license_revoked, revoked_keys=m.is_key_revoked, **kw)


# ======================================================================================
# (a) stale or missing registry
# ======================================================================================

def _fresh(tmp: Path, settings: Settings, clock: Clock) -> Mirror:
    return make_registry(tmp, mirror_dir=settings.mirror_dir, clock=clock)


def _timestamp_expired(tmp: Path, settings: Settings, clock: Clock) -> Mirror:
    m = make_registry(tmp, mirror_dir=settings.mirror_dir, clock=clock, expires={"timestamp": T0 + timedelta(hours=1)})
    clock.now = T0 + timedelta(hours=2)  # an hour after the timestamp metadata expired
    return m


def _snapshot_expired(tmp: Path, settings: Settings, clock: Clock) -> Mirror:
    m = make_registry(tmp, mirror_dir=settings.mirror_dir, clock=clock,
                      expires={"timestamp": T0 + timedelta(days=30), "snapshot": T0 + timedelta(hours=1)})
    clock.now = T0 + timedelta(days=2)
    return m


def _never_imported(tmp: Path, settings: Settings, clock: Clock) -> Mirror:
    root = make_registry(tmp, mirror_dir=tmp / "elsewhere", clock=clock).trusted_root
    return Mirror(settings.mirror_dir, trusted_root=root, clock=clock)  # only the trust root installed


def _wiped(tmp: Path, settings: Settings, clock: Clock) -> Mirror:
    m = make_registry(tmp, mirror_dir=settings.mirror_dir, clock=clock, licenses=["lic-test-0001"])
    shutil.rmtree(settings.mirror_dir)  # forget the revocation: the mirror starts again from its root
    return Mirror(settings.mirror_dir, trusted_root=m.trusted_root, clock=clock)


def _expired_and_revoking(tmp: Path, settings: Settings, clock: Clock) -> Mirror:
    m = make_registry(tmp, mirror_dir=settings.mirror_dir, clock=clock, licenses=["lic-test-0001"],
                      expires={"timestamp": T0 + timedelta(hours=1)})
    clock.now = T0 + timedelta(hours=2)
    return m


def _fresh_revoking(tmp: Path, settings: Settings, clock: Clock) -> Mirror:
    return make_registry(tmp, mirror_dir=settings.mirror_dir, clock=clock, licenses=["lic-test-0001"])


# (registry builder, tier honoured, reason code, words the operator's message must carry)
REGISTRIES = [
    pytest.param(_fresh, "pro", None, (), id="fresh-registry-honoured"),
    pytest.param(_timestamp_expired, "free", "registry_expired", ("timestamp", "expired", "import"), id="timestamp-expired"),
    pytest.param(_snapshot_expired, "free", "registry_expired", ("snapshot", "expired"), id="snapshot-expired"),
    pytest.param(_never_imported, "free", "registry_missing", ("No trust registry update", "import"), id="never-imported"),
    pytest.param(_wiped, "free", "registry_missing", ("No trust registry update",), id="mirror-wiped-to-forget-revocation"),
    pytest.param(_expired_and_revoking, "free", "registry_expired", ("expired",), id="expired-registry-that-revokes"),
    pytest.param(_fresh_revoking, "free", "revoked", ("revoked",), id="fresh-registry-that-revokes"),
]


@pytest.mark.parametrize("build,tier,code,words", REGISTRIES)
def test_t_lic_3_stale_or_missing_registry_fails_closed(tmp_path: Path, settings: Settings, build: Any, tier: str,
                                                        code: str | None, words: tuple[str, ...]) -> None:
    install_license(settings)
    clock = Clock(T0)
    mirror = build(tmp_path, settings, clock)
    m = with_registry(settings, clock, mirror=mirror)
    summary = m.summary()
    assert (summary["tier"], summary["reason_code"]) == (tier, code), summary
    for word in words:
        assert word in summary["reason"], (word, summary["reason"])
    assert m.granted(HOST_FUNCTION_FEATURES) == (frozenset(HOST_FUNCTION_FEATURES) if tier == "pro" else frozenset())
    if code == "registry_expired":
        # Only licenses fail closed: the runtimes the expired registry vouches for keep working.
        assert "python3" in mirror.trusted_template_hashes()
        assert mirror.status()["expiry_state"] == "expired"


def test_t_lic_3_registry_expiring_while_the_service_runs_stops_pro_at_once(tmp_path: Path, settings: Settings) -> None:
    install_license(settings)
    clock, tick = Clock(T0), Tick()
    vendor = Vendor(tmp_path)
    mirror = Mirror(settings.mirror_dir, trusted_root=vendor.trusted_root, clock=clock)
    mirror.import_path(vendor.publish(expires={"timestamp": T0 + timedelta(hours=1)}))
    m = with_registry(settings, clock, tick, mirror=mirror)
    assert m.current().tier == "pro"
    clock.now = T0 + timedelta(hours=1, seconds=1)
    tick.value += 1.01
    assert (m.current().tier, m.current().reason_code) == ("free", "registry_expired")
    # Importing a fresh update brings Pro back without a restart.
    mirror.import_path(vendor.publish(expires={"timestamp": T0 + timedelta(days=7)}))
    tick.value += 1.01
    assert m.current().tier == "pro", m.current().reason


def test_t_lic_3_doctor_fails_on_expired_registry(tmp_path: Path, settings: Settings) -> None:
    install_license(settings)
    clock = Clock(T0)
    mirror = make_registry(tmp_path, mirror_dir=settings.mirror_dir, clock=clock, expires={"timestamp": T0 + timedelta(hours=1)})
    NodeKey.load_or_create(settings.keys_dir)
    checks = {c.name: c for c in run_checks(settings, Context(now=T0 + timedelta(hours=2), license_keys=KP.keys, machine_id="m",
                                                              registry_root=mirror.trusted_root, meminfo=lambda: 2**36))}
    assert checks["license"].level == FAIL and "registry_expired" in checks["license"].message
    assert checks["registry"].level == FAIL and "registry_expired" in checks["registry"].message


# ======================================================================================
# (b) the signed clock high-water mark
# ======================================================================================

def add_receipt(settings: Settings, when: datetime) -> None:
    with ReceiptStore(settings.db_path, NodeKey.load_or_create(settings.keys_dir)) as store:
        store.append(execution_id=str(uuid.uuid4()), tenant_id="t", cell_id=None, template="wasm",
                     code_hash="0" * 64, result_hash="1" * 64, timestamp_ms=int(when.timestamp() * 1000))


def sql(settings: Settings, statement: str, *args: Any) -> None:
    conn = sqlite3.connect(settings.db_path)
    try:
        conn.execute(statement, args)
        conn.commit()
    finally:
        conn.close()


def _delete(settings: Settings) -> None:
    sql(settings, "DELETE FROM license_clock")


def _lower(settings: Settings) -> None:
    sql(settings, "UPDATE license_clock SET high_water_ms = high_water_ms - 86400000")


def _resign_with_other_key(settings: Settings) -> None:
    other = NodeKey.generate()
    conn = sqlite3.connect(settings.db_path)
    try:
        (ms,) = conn.execute("SELECT high_water_ms FROM license_clock").fetchone()
        ms -= 86_400_000
        sig = base64.b64encode(other.sign(mark_message(ms, other.key_id))).decode()
        conn.execute("UPDATE license_clock SET high_water_ms = ?, key_id = ?, signature = ?", (ms, other.key_id, sig))
        conn.commit()
    finally:
        conn.close()


def _forge_signature_keep_key_id(settings: Settings) -> None:
    sql(settings, "UPDATE license_clock SET high_water_ms = high_water_ms - 1, signature = ?",
        base64.b64encode(bytes(64)).decode())


def _drop_table(settings: Settings) -> None:
    sql(settings, "DROP TABLE license_clock")


def _replace_with_old_style_row(settings: Settings) -> None:
    sql(settings, "DELETE FROM license_clock")
    sql(settings, "INSERT INTO license_state (key, value) VALUES ('high_water_ms', ?)", int(T0.timestamp() * 1000) - 86_400_000)


TAMPERING = [
    pytest.param(_delete, "deleted", id="row-deleted"),
    pytest.param(_lower, "does not match", id="value-lowered"),
    pytest.param(_resign_with_other_key, "does not match", id="re-signed-by-another-key"),
    pytest.param(_forge_signature_keep_key_id, "does not match", id="signature-forged"),
    pytest.param(_drop_table, "deleted", id="table-dropped"),
    pytest.param(_replace_with_old_style_row, "deleted", id="replaced-by-unsigned-old-style-row"),
]


@pytest.mark.parametrize("tamper,words", TAMPERING)
def test_t_lic_3_tampered_clock_mark_is_detected_at_start(tmp_path: Path, settings: Settings,
                                                          tamper: Callable[[Settings], None], words: str) -> None:
    install_license(settings)
    clock = Clock(T0)
    mirror = make_registry(tmp_path, mirror_dir=settings.mirror_dir, clock=clock)
    assert with_registry(settings, clock, mirror=mirror).current().tier == "pro"
    add_receipt(settings, T0)  # the node has history
    tamper(settings)
    m = with_registry(settings, clock, mirror=mirror)  # the service restarts
    summary = m.summary()
    assert (summary["tier"], summary["reason_code"]) == ("free", "clock_tampered"), summary
    assert words in summary["reason"] and "clock-reset" in summary["reason"]
    assert m.granted(HOST_FUNCTION_FEATURES) == frozenset()
    # cell doctor says so too, in the license and the clock checks.
    checks = {c.name: c for c in run_checks(settings, Context(now=T0, license_keys=KP.keys, machine_id="m",
                                                              registry_root=mirror.trusted_root, meminfo=lambda: 2**36))}
    assert checks["clock"].level == FAIL and words in checks["clock"].message
    assert checks["license"].level == FAIL and "clock_tampered" in checks["license"].message
    # Re-signing over a tampered mark would launder it: the manager never does.
    clock.now = T0 + timedelta(hours=3)
    assert with_registry(settings, clock, mirror=mirror).current().reason_code == "clock_tampered"


@pytest.mark.parametrize("tamper,words", TAMPERING[:4])
def test_t_lic_3_tampering_while_the_service_runs_is_detected_at_the_next_write(
        tmp_path: Path, settings: Settings, tamper: Callable[[Settings], None], words: str) -> None:
    install_license(settings)
    clock, tick = Clock(T0), Tick()
    mirror = make_registry(tmp_path, mirror_dir=settings.mirror_dir, clock=clock)
    m = with_registry(settings, clock, tick, mirror=mirror)
    assert m.current().tier == "pro"
    tamper(settings)
    clock.now = T0 + timedelta(seconds=61)  # the mark is written at most once a minute, and checked then
    tick.value += 1.01
    m.current()
    tick.value += 1.01
    assert (m.current().tier, m.current().reason_code) == ("free", "clock_tampered")


LEGITIMATE = [
    pytest.param("fresh-node", id="fresh-node-no-history"),
    pytest.param("upgrade", id="upgrade-from-unsigned-mark"),
    pytest.param("restore", id="older-but-validly-signed-mark"),
]


@pytest.mark.parametrize("case", LEGITIMATE)
def test_t_lic_3_legitimate_marks_are_not_tampering(tmp_path: Path, settings: Settings, case: str) -> None:
    install_license(settings)
    clock = Clock(T0)
    mirror = make_registry(tmp_path, mirror_dir=settings.mirror_dir, clock=clock)
    old = int((T0 - timedelta(hours=1)).timestamp() * 1000)
    if case == "upgrade":
        NodeKey.load_or_create(settings.keys_dir)
        add_receipt(settings, T0 - timedelta(hours=2))
        sql(settings, "CREATE TABLE license_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        sql(settings, "INSERT INTO license_state (key, value) VALUES ('high_water_ms', ?)", old)
    elif case == "restore":
        with_registry(settings, clock, mirror=mirror)
        key = NodeKey.load(settings.keys_dir)
        sig = base64.b64encode(key.sign(mark_message(old, key.key_id))).decode()
        sql(settings, "UPDATE license_clock SET high_water_ms = ?, signature = ?", old, sig)
    m = with_registry(settings, clock, mirror=mirror)
    assert m.current().tier == "pro", m.current().reason
    if case == "upgrade":  # the old mark was taken over, signed, and the unsigned row removed
        assert read_high_water(settings.db_path) == T0
        conn = sqlite3.connect(settings.db_path)
        try:
            assert conn.execute("SELECT COUNT(*) FROM license_state").fetchone() == (0,)
        finally:
            conn.close()
        clock.now = T0 - timedelta(hours=1)  # ...and still stops a rollback below it
        assert with_registry(settings, clock, mirror=mirror).current().reason_code == "clock_rollback"


def cli(settings: Settings, now: datetime, *argv: str, **deps: Any) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="cell")
    out = io.StringIO()
    register(parser.add_subparsers(dest="command", required=True), settings=settings, keys=KP.keys,
             clock=lambda: now, machine_id=None, out=out, **deps)
    args = parser.parse_args(["license", *argv])
    return args.func(args), out.getvalue()


@pytest.mark.parametrize("state,code", [
    pytest.param("no-registry", "registry_missing", id="no-registry-installed"),
    pytest.param("expired", "registry_expired", id="timestamp-expired"),
    pytest.param("tampered", "clock_tampered", id="clock-mark-deleted"),
    pytest.param("fresh", None, id="fresh-registry"),
])
def test_t_lic_3_license_cli_refuses_what_the_service_would(tmp_path: Path, settings: Settings, state: str,
                                                            code: str | None) -> None:
    """`cell license verify/install` ask the node's registry and clock mark like the service (no injected lookup)."""
    install_license(settings)
    candidate = tmp_path / "new.json"
    candidate.write_bytes(settings.license_path.read_bytes())
    settings.license_path.unlink()
    clock = Clock(T0)
    if state != "no-registry":
        vendor = Vendor(tmp_path)
        expires = {"timestamp": T0 + timedelta(hours=1)} if state == "expired" else {}
        Mirror(settings.mirror_dir, trusted_root=vendor.trusted_root).import_path(vendor.publish(expires=expires))
        root = vendor.trusted_root
    else:
        root = None
    if state == "tampered":
        with_registry(settings, clock, mirror=Mirror(settings.mirror_dir, trusted_root=root))
        add_receipt(settings, T0)
        _delete(settings)
    now = T0 + timedelta(hours=2) if state == "expired" else T0
    code_v, out_v = cli(settings, now, "verify", str(candidate), registry_root=root)
    code_i, out_i = cli(settings, now, "install", str(candidate), registry_root=root)
    if code is None:
        assert (code_v, code_i) == (0, 0), out_v + out_i
        assert settings.license_path.read_bytes() == candidate.read_bytes()
    else:
        assert code_v == 1 and f"REJECTED ({code})" in out_v, out_v
        assert code_i == 1 and "not installed" in out_i and not settings.license_path.exists()


def test_t_lic_3_clock_reset_repairs_only_a_tampered_mark_and_never_below_the_receipts(tmp_path: Path,
                                                                                       settings: Settings) -> None:
    install_license(settings)
    clock, tick = Clock(T0), Tick()
    mirror = make_registry(tmp_path, mirror_dir=settings.mirror_dir, clock=clock)
    m = with_registry(settings, clock, tick, mirror=mirror)
    code, out = cli(settings, T0, "clock-reset")
    assert code == 1 and "intact" in out  # a good mark is never rewritten
    add_receipt(settings, T0 + timedelta(hours=5))
    _delete(settings)
    m2 = with_registry(settings, clock, mirror=mirror)
    assert m2.current().reason_code == "clock_tampered"
    # Winding the clock back and resetting is refused: the receipt log is ahead of the clock.
    code, out = cli(settings, T0, "clock-reset")
    assert code == 1 and "behind the newest receipt" in out
    assert with_registry(settings, clock, mirror=mirror).current().reason_code == "clock_tampered"
    # With the clock right, the reset re-signs the mark; SIGHUP (a forced reload) lifts the refusal.
    clock.now = T0 + timedelta(hours=5, minutes=1)
    code, out = cli(settings, clock.now, "clock-reset")
    assert code == 0 and "re-signed" in out
    m2.reload(force=True)
    assert m2.current().tier == "pro"
    assert read_high_water(settings.db_path) == clock.now
    checks = {c.name: c for c in run_checks(settings, Context(now=clock.now, license_keys=KP.keys, machine_id="m",
                                                              registry_root=mirror.trusted_root, meminfo=lambda: 2**36))}
    assert checks["clock"].level == OK and checks["license"].level == OK, [c.line() for c in checks.values()]
    del m
