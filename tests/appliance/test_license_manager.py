"""T-LIC-1 at the adapter: hot reload, last-good fallback, persisted clock high-water mark."""
from __future__ import annotations

import base64
import os
import signal
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest

from appliance.config import HARD_MEMORY_MB, Settings
from appliance.license.machine import fingerprint_from_machine_id
from appliance.license.manager import HARD_CEILINGS, LicenseManager, mark_message, read_high_water
from appliance.receipts.nodekey import NodeKey
from appliance.license.verify import Limits
from tests.factories import NOW, make_keypair, make_license, stamp

KP = make_keypair("license-primary")
ATTACKER = make_keypair("license-attacker")
MACHINE = fingerprint_from_machine_id("0123456789abcdef0123456789abcdef")


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeMonotonic:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path / "root", config_dir=tmp_path / "etc", license_path=tmp_path / "etc" / "license.json")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def tick() -> FakeMonotonic:
    return FakeMonotonic()


def write(path: Path, data: bytes, *, bump: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if bump:  # make the change visible even on coarse-mtime filesystems
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def signed(**overrides: Any) -> bytes:
    return make_license(KP.signing_key, KP.key_id, **overrides)


def manager(settings: Settings, clock: FakeClock, tick: FakeMonotonic | None = None, **kw: Any) -> LicenseManager:
    args: dict[str, Any] = {"keys": KP.keys, "clock": clock, "machine_id": MACHINE}
    if tick is not None:
        args["monotonic"] = tick
    args.update(kw)
    return LicenseManager(settings, **args)


# -- start-up -----------------------------------------------------------------


def test_no_license_file_is_free_tier(settings: Settings, clock: FakeClock) -> None:
    m = manager(settings, clock)
    state = m.current()
    assert (state.tier, state.license, state.reason_code) == ("free", None, "no_license")
    assert not m.allows("load_weights")
    summary = m.summary()
    assert summary["tier"] == "free" and summary["license_id"] is None and summary["features"] == []
    assert str(settings.license_path) in summary["reason"]


def test_valid_license_is_pro_with_summary(settings: Settings, clock: FakeClock) -> None:
    write(settings.license_path, signed())
    m = manager(settings, clock)
    assert m.current().tier == "pro"
    assert m.allows("load_weights") and m.allows("host_mcp_call")
    assert not m.allows("multi_tenant") and not m.allows("gpu")
    assert m.summary() == {
        "tier": "pro",
        "licensee": "Example Labs GmbH",
        "license_id": "lic-test-0001",
        "expires_at": stamp(NOW + timedelta(days=365)),
        "days_left": 365,
        "features": ["load_weights", "host_mcp_call"],
        "limits": {"rate_limit_rps": 50.0, "max_cells": 100, "max_memory_mb": 1024},
        "effective_limits": {"rate_limit_rps": 20.0, "max_cells": 100, "max_memory_mb": 1024},
        "warnings": [],
        "reason_code": None,
        "reason": None,
    }


def test_hub_tier_allows_multi_tenant(settings: Settings, clock: FakeClock) -> None:
    write(settings.license_path, signed(tier="hub", features=["multi_tenant", "load_weights"]))
    m = manager(settings, clock)
    assert m.current().tier == "hub" and m.allows("multi_tenant") and m.allows("load_weights")


def test_T_LIC_1_test_license_refused_with_production_keys(settings: Settings, clock: FakeClock) -> None:
    write(settings.license_path, signed())
    m = LicenseManager(settings, clock=clock, machine_id=MACHINE)  # keys=None: the embedded vendor keys
    assert (m.current().tier, m.current().reason_code) == ("free", "unknown_key")


@pytest.mark.parametrize(
    "data, code",
    [
        (make_license(ATTACKER.signing_key, KP.key_id), "bad_signature"),
        (signed(expires_at=stamp(NOW - timedelta(seconds=1)), issued_at=stamp(NOW - timedelta(days=9)),
                not_before=stamp(NOW - timedelta(days=9))), "expired"),
        (signed(machine_id=fingerprint_from_machine_id("f" * 32)), "wrong_machine"),
        (b"\x00" * (64 * 1024 + 1), "too_large"),
    ],
    ids=["forged", "expired", "wrong-machine", "oversize"],
)
def test_T_LIC_1_rejected_file_at_start_is_free_with_reason(
    settings: Settings, clock: FakeClock, data: bytes, code: str
) -> None:
    write(settings.license_path, data)
    m = manager(settings, clock)
    state = m.current()
    assert (state.tier, state.license, state.reason_code) == ("free", None, code)
    assert state.reason and state.reason.endswith("Running the free tier.")
    assert m.summary()["reason_code"] == code


def test_effective_limits_free_tier_is_config_capped_by_hard(settings: Settings, clock: FakeClock) -> None:
    m = manager(settings.with_overrides(memory_ceiling_mb=HARD_MEMORY_MB, workers=2), clock)
    assert m.effective_limits() == Limits(20.0, 400, HARD_MEMORY_MB)
    assert m.effective_limits(Limits(1e9, 10**9, 10**9)) == HARD_CEILINGS


def test_license_limits_cannot_raise_config_or_hard_ceilings(settings: Settings, clock: FakeClock) -> None:
    write(settings.license_path, signed(limits={"rate_limit_rps": 10**6, "max_cells": 10**6, "max_memory_mb": 10**6}))
    m = manager(settings, clock)
    assert m.current().tier == "pro"
    limits = m.effective_limits()
    assert limits.max_memory_mb == settings.memory_ceiling_mb <= HARD_MEMORY_MB
    assert limits.rate_limit_rps == settings.rate_limit_rps


# -- hot reload -----------------------------------------------------------------


def test_hot_reload_switches_tiers_without_restart(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic
) -> None:
    write(settings.license_path, signed(tier="pro"))
    m = manager(settings, clock, tick)
    assert m.current().tier == "pro"
    write(settings.license_path, signed(tier="hub", license_id="lic-hub", features=["multi_tenant"]), bump=5)
    assert m.current().tier == "pro", "the file is polled at most once per second"
    tick.value += 1.01
    assert m.current().tier == "hub" and m.allows("multi_tenant")
    settings.license_path.unlink()
    tick.value += 1.01
    assert (m.current().tier, m.current().reason_code) == ("free", "no_license")
    write(settings.license_path, signed(), bump=10)
    tick.value += 1.01
    assert m.current().tier == "pro"


def test_T_LIC_1_bad_new_file_keeps_last_good_license(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic, caplog: pytest.LogCaptureFixture
) -> None:
    write(settings.license_path, signed())
    m = manager(settings, clock, tick)
    bad_files = [
        (b'{"payload": ', "malformed_json"),
        (make_license(ATTACKER.signing_key, KP.key_id, tier="hub"), "bad_signature"),
        (signed(license_id="lic-old", expires_at=stamp(NOW - timedelta(days=1)),
                issued_at=stamp(NOW - timedelta(days=9)), not_before=stamp(NOW - timedelta(days=9))), "expired"),
    ]
    for n, (data, code) in enumerate(bad_files, start=1):
        caplog.clear()
        write(settings.license_path, data, bump=n)
        tick.value += 1.01
        state = m.current()
        assert (state.tier, state.license and state.license.license_id) == ("pro", "lic-test-0001")
        assert any(f"({code})" in w and "Still using the previous license" in w for w in state.warnings)
        assert code in caplog.text, "the refusal is logged with its reason"
    write(settings.license_path, signed(tier="hub", license_id="lic-next"), bump=9)
    tick.value += 1.01
    assert m.current().tier == "hub" and m.current().warnings == ()


def test_renewal_installed_early_takes_over_when_it_starts(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic
) -> None:
    write(settings.license_path, signed(expires_at=stamp(NOW + timedelta(days=3))))
    m = manager(settings, clock, tick)
    renewal = signed(license_id="lic-renewal", tier="hub", not_before=stamp(NOW + timedelta(days=2)),
                     expires_at=stamp(NOW + timedelta(days=400)))
    write(settings.license_path, renewal, bump=3)
    tick.value += 1.01
    assert m.current().license.license_id == "lic-test-0001"  # type: ignore[union-attr]
    clock.now = NOW + timedelta(days=2, minutes=1)
    tick.value += 1.01
    assert m.current().license.license_id == "lic-renewal"  # type: ignore[union-attr]


def test_license_expiring_while_running_falls_back_to_free(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic
) -> None:
    write(settings.license_path, signed(expires_at=stamp(NOW + timedelta(days=10))))
    m = manager(settings, clock, tick)
    assert m.current().tier == "pro"
    assert "in 10 days" in m.summary()["warnings"][0] and m.summary()["days_left"] == 10
    clock.now = NOW + timedelta(days=10)
    tick.value += 1.01
    assert (m.current().tier, m.current().reason_code) == ("free", "expired")


def test_T_LIC_1_revocation_applies_without_reload(settings: Settings, clock: FakeClock, tick: FakeMonotonic) -> None:
    revoked: set[str] = set()
    write(settings.license_path, signed())
    m = manager(settings, clock, tick, revocations=revoked.__contains__)
    assert m.current().tier == "pro"
    revoked.add("lic-test-0001")  # a trust-registry update arrives
    tick.value += 1.01
    assert (m.current().tier, m.current().reason_code) == ("free", "revoked")


def test_T_LIC_1_revoked_signing_key_refused(settings: Settings, clock: FakeClock) -> None:
    write(settings.license_path, signed())
    m = manager(settings, clock, revoked_keys=lambda key_id: key_id == KP.key_id)
    assert m.current().reason_code == "key_revoked"


def test_T_LIC_1_signing_key_revoked_while_running_drops_license(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic
) -> None:
    revoked_keys: set[str] = set()
    write(settings.license_path, signed())
    m = manager(settings, clock, tick, revoked_keys=revoked_keys.__contains__)
    assert m.current().tier == "pro"
    revoked_keys.add(KP.key_id)
    tick.value += 1.01
    assert (m.current().tier, m.current().reason_code) == ("free", "key_revoked")


@pytest.fixture
def restore_sighup() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_sighup_reloads_at_once_and_chains_previous_handler(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic, restore_sighup: None
) -> None:
    seen: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
    write(settings.license_path, signed())
    m = manager(settings, clock, tick, poll_interval=3600)
    m.install_sighup_handler()
    write(settings.license_path, signed(tier="hub", features=["multi_tenant"]), bump=1)
    assert m.current().tier == "pro"
    os.kill(os.getpid(), signal.SIGHUP)
    assert seen == [signal.SIGHUP], "the config reload handler still runs"
    assert m.current().tier == "hub"


def test_T_LIC_1_fifo_at_license_path_does_not_hang(settings: Settings, clock: FakeClock) -> None:
    settings.license_path.parent.mkdir(parents=True)
    os.mkfifo(settings.license_path)
    m = manager(settings, clock)
    assert (m.current().tier, m.current().reason_code) == ("free", "unreadable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_free_with_reason(settings: Settings, clock: FakeClock, tick: FakeMonotonic) -> None:
    write(settings.license_path, signed())
    settings.license_path.chmod(0)
    m = manager(settings, clock, tick)
    assert m.current().reason_code == "unreadable"
    settings.license_path.chmod(0o640)  # the operator fixes permissions: ctime changes
    tick.value += 1.01
    assert m.current().tier == "pro"


# -- clock high-water mark ------------------------------------------------------


def test_T_LIC_1_clock_rollback_past_high_water_refused(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic
) -> None:
    write(settings.license_path, signed())
    m = manager(settings, clock, tick)
    clock.now = NOW + timedelta(days=30)
    tick.value += 1.01
    assert m.current().tier == "pro"
    clock.now = NOW  # someone winds the clock back a month
    tick.value += 1.01
    state = m.current()
    assert (state.tier, state.reason_code) == ("free", "clock_rollback")
    clock.now = NOW + timedelta(days=30, minutes=1)  # the clock is corrected
    tick.value += 1.01
    assert m.current().tier == "pro"


def test_T_LIC_1_clock_small_skew_tolerated(settings: Settings, clock: FakeClock, tick: FakeMonotonic) -> None:
    write(settings.license_path, signed())
    m = manager(settings, clock, tick)
    clock.now = NOW - timedelta(minutes=9)  # NTP stepping back a little
    tick.value += 1.01
    assert m.current().tier == "pro"


def test_T_LIC_1_clock_rollback_detected_across_restart(settings: Settings, clock: FakeClock) -> None:
    write(settings.license_path, signed(expires_at=stamp(NOW + timedelta(days=10))))
    clock.now = NOW + timedelta(days=20)  # the license has expired...
    assert manager(settings, clock).current().reason_code == "expired"
    assert read_high_water(settings.db_path) == clock.now
    clock.now = NOW  # ...so the clock is set back and the service restarted
    state = manager(settings, clock).current()
    assert (state.tier, state.reason_code) == ("free", "clock_rollback")


def test_high_water_stored_signed_in_license_clock_table_and_only_moves_forward(
    settings: Settings, clock: FakeClock, tick: FakeMonotonic
) -> None:
    m = manager(settings, clock, tick)
    clock.now = NOW + timedelta(hours=2)
    tick.value += 1.01
    m.current()
    clock.now = NOW - timedelta(hours=5)
    tick.value += 1.01
    m.current()
    conn = sqlite3.connect(settings.db_path)
    try:
        ((value, key_id, signature),) = conn.execute(
            "SELECT high_water_ms, key_id, signature FROM license_clock").fetchall()
    finally:
        conn.close()
    assert value == int((NOW + timedelta(hours=2)).timestamp() * 1000)
    node_key = NodeKey.load(settings.keys_dir)  # T-LIC-3: signed by this node's key
    assert key_id == node_key.key_id
    node_key.verify_key.verify(mark_message(value, key_id), base64.b64decode(signature))


def test_read_high_water_without_database_is_none(tmp_path: Path) -> None:
    assert read_high_water(tmp_path / "nope.sqlite") is None
    assert not (tmp_path / "nope.sqlite").exists()


def test_directory_at_license_path_is_free_with_reason(settings: Settings, clock: FakeClock) -> None:
    settings.license_path.mkdir(parents=True)
    assert manager(settings, clock).current().reason_code == "unreadable"


def test_concurrent_access_during_reloads_sees_only_whole_states(
    settings: Settings, clock: FakeClock, tmp_path: Path
) -> None:
    import threading

    from appliance.license.cli import write_atomic

    write(settings.license_path, signed())
    m = manager(settings, clock, poll_interval=0.0)
    tiers: set[str] = set()
    torn: list[Any] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            state = m.current()
            if (state.tier == "free") != (state.license is None):
                torn.append(state)
            tiers.add(state.tier)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for n in range(20):
        tier = "hub" if n % 2 else "pro"
        write_atomic(settings.license_path, signed(tier=tier, license_id=f"lic-{n}"))
    stop.set()
    for t in threads:
        t.join()
    assert not torn and tiers <= {"pro", "hub"}, "an atomic install never shows the free tier"
