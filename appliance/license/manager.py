"""The license adapter: reads the file, remembers the clock, answers "which tier?".

Pure verification lives in ``appliance.license.verify``; this module owns the
I/O around it:

* reads ``Settings.license_path`` (``$SYNAPSE_LICENSE``, default
  ``/etc/synapse/license.json``), at most 64 KiB;
* re-reads it when its inode, size or mtime change (checked at most once per
  ``poll_interval`` on access) or after SIGHUP, without a restart;
* keeps the last good license when a new file is refused, and says why;
* persists the clock high-water mark in the ``license_clock`` table of
  ``Settings.db_path``, signed by the node key, so a clock wound back is
  caught across a reboot (T-LIC-1) and a deleted or lowered mark is detected
  and fails closed (T-LIC-3).

No license, or no acceptable one, is the free tier.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from appliance.config import HARD_MEMORY_MB, Settings
from appliance.license.machine import machine_fingerprint
from appliance.license.verify import (
    CLOCK_SKEW,
    MAX_FILE_BYTES,
    License,
    LicenseRejected,
    Limits,
    check_license,
    days_left,
    effective_limits,
    format_time,
    load_trusted_keys,
    parse_license,
    tier_allows,
    warnings_for,
)
from appliance.receipts.nodekey import NodeKey

log = logging.getLogger("appliance.license")

# Ceilings no license can lift. Memory is config's HARD_MEMORY_MB; the rate and
# cell ceilings are the largest values config itself accepts (T-DOS-1).
HARD_CEILINGS = Limits(rate_limit_rps=100_000.0, max_cells=100_000, max_memory_mb=HARD_MEMORY_MB)
# Persisting every access would write on each request; a minute of lag is far
# inside CLOCK_SKEW, so it cannot hide a rollback.
_HIGH_WATER_WRITE_EVERY = timedelta(seconds=60)
_SCHEMA_SQL = "CREATE TABLE IF NOT EXISTS license_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
_HIGH_WATER_KEY = "high_water_ms"  # the unsigned mark of older releases, taken over once
_CLOCK_SQL = ("CREATE TABLE IF NOT EXISTS license_clock (id INTEGER PRIMARY KEY CHECK (id = 1), "
              "high_water_ms INTEGER NOT NULL, key_id TEXT NOT NULL, signature TEXT NOT NULL)")
_MARK_LABEL = b"cell-license-clock/1\n"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def embedded_license_keys() -> dict[str, bytes]:
    """The vendor's production license keys, shipped as package data."""
    text = resources.files("appliance").joinpath("data/trusted_keys.json").read_text(encoding="utf-8")
    return load_trusted_keys(text, "license")


def _to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _from_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=timezone.utc)


def read_high_water(db_path: Path) -> datetime | None:
    """The persisted high-water mark, read-only and unverified (CLI, doctor); None when none is recorded.

    The larger of the signed mark (``license_clock``) and a mark left by an
    older release (``license_state``); ``LicenseManager`` and
    ``inspect_high_water`` are what check the signature.
    """
    if not db_path.exists():
        return None
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            values = [_select(conn, "SELECT value FROM license_state WHERE key = ?", (_HIGH_WATER_KEY,)),
                      _select(conn, "SELECT high_water_ms FROM license_clock WHERE id = 1", ())]
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    found = [v for v in values if v is not None]
    return _from_ms(max(found)) if found else None


def _select(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> int | None:
    try:
        row = conn.execute(sql, args).fetchone()
    except sqlite3.OperationalError:  # no such table: nothing recorded there
        return None
    return int(row[0]) if row and row[0] is not None else None


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def read_clock_problem(db_path: Path, keys_dir: Path) -> str | None:
    """Why the signed clock mark cannot be believed, or None; read-only (doctor, CLI).

    Raises ``NodeKeyError`` when the node key cannot be read (another user),
    ``sqlite3.Error`` when the database cannot.
    """
    if not db_path.exists():
        return None
    key = NodeKey.load(keys_dir)
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        seen = inspect_high_water(conn, key.verify_key, key.key_id, table_existed=_table_exists(conn, "license_clock"))
    finally:
        conn.close()
    return seen.problem


def mark_message(high_water_ms: int, key_id: str) -> bytes:
    """The bytes the node key signs for a clock mark (domain-separated from receipts)."""
    return _MARK_LABEL + f"{key_id}|{high_water_ms}".encode("ascii")


class ClockTampered(Exception):
    """The signed clock high-water mark was deleted, altered or lowered (T-LIC-3)."""


@dataclass(frozen=True)
class MarkInspection:
    """What the database says about the clock mark: its value, or why it cannot be believed."""

    mark: datetime | None
    problem: str | None  # None, or a sentence for the operator (the mark was tampered with)
    latest_receipt: datetime | None


def inspect_high_water(conn: sqlite3.Connection, verify_key: VerifyKey, key_id: str,
                       *, table_existed: bool = True, expect_row: bool = False) -> MarkInspection:
    """Check the signed mark against the node key and the receipt log (T-LIC-3).

    * a row whose signature does not verify (value lowered or edited, or
      signed by another key) is tampering;
    * no row while the node has history (a receipt, or a mark written by an
      older release) is a deletion; only a node with no history, or the first
      start after an upgrade (``table_existed`` False, an old unsigned mark
      present), starts without one; ``expect_row`` (this process wrote or
      read one) makes any missing row a deletion.
    """
    latest = _select(conn, "SELECT timestamp FROM receipts ORDER BY seq DESC LIMIT 1", ())
    latest_receipt = _from_ms(latest) if latest is not None else None
    legacy = _select(conn, "SELECT value FROM license_state WHERE key = ?", (_HIGH_WATER_KEY,))
    try:
        row = conn.execute("SELECT high_water_ms, key_id, signature FROM license_clock WHERE id = 1").fetchone()
    except sqlite3.OperationalError:
        row = None
    if row is not None:
        ms, row_key, sig = row
        try:
            if not isinstance(ms, int) or row_key != key_id:
                raise BadSignatureError("signed by another key")
            verify_key.verify(mark_message(ms, key_id), base64.b64decode(str(sig), validate=True))
        except (BadSignatureError, ValueError, binascii.Error):
            return MarkInspection(None, "the license clock mark in the node database does not match its "
                                  "node-key signature: it was edited or lowered", latest_receipt)
        mark = _from_ms(ms)
        if legacy is not None and _from_ms(legacy) > mark:
            mark = _from_ms(legacy)  # an older release's mark, never lower than the signed one
        return MarkInspection(mark, None, latest_receipt)
    if table_existed or (legacy is None and latest is not None):
        if expect_row or latest is not None or legacy is not None:
            return MarkInspection(None, "the license clock mark was deleted from the node database "
                                  "although the node has history (receipts or an earlier mark)", latest_receipt)
    return MarkInspection(_from_ms(legacy) if legacy is not None else None, None, latest_receipt)


def _write_mark(conn: sqlite3.Connection, key: NodeKey, ms: int) -> None:
    sig = base64.b64encode(key.sign(mark_message(ms, key.key_id))).decode("ascii")
    conn.execute("INSERT INTO license_clock (id, high_water_ms, key_id, signature) VALUES (1, ?, ?, ?) "
                 "ON CONFLICT(id) DO UPDATE SET high_water_ms = excluded.high_water_ms, "
                 "key_id = excluded.key_id, signature = excluded.signature", (ms, key.key_id, sig))


class ClockResetRefused(Exception):
    """`cell license clock-reset` will not write the mark (it is intact, or the clock is behind the receipts)."""


def reset_clock_mark(db_path: Path, node_key: NodeKey, now: datetime, skew: timedelta = CLOCK_SKEW) -> datetime:
    """Re-sign a clock mark found tampered with, at ``now`` (``cell license clock-reset``, T-LIC-3).

    Refused when the mark is intact (a good mark is never lowered), and when
    the newest receipt is more than ``skew`` ahead of ``now``: the signed,
    append-only receipt log then shows the clock was wound back, and a reset
    must not launder that. The new mark is never below the newest receipt.
    """
    conn = sqlite3.connect(db_path, timeout=5, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_SCHEMA_SQL)
        conn.execute(_CLOCK_SQL)
        seen = inspect_high_water(conn, node_key.verify_key, node_key.key_id)
        if seen.problem is None:
            raise ClockResetRefused("the clock mark is intact; there is nothing to repair")
        if seen.latest_receipt is not None and now < seen.latest_receipt - skew:
            raise ClockResetRefused(f"the clock ({format_time(now)}) is behind the newest receipt "
                                    f"({format_time(seen.latest_receipt)}); set the clock right first")
        mark = max(now, seen.latest_receipt) if seen.latest_receipt is not None else now
        _write_mark(conn, node_key, _to_ms(mark))
        conn.execute("DELETE FROM license_state WHERE key = ?", (_HIGH_WATER_KEY,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    log.warning("license clock mark re-signed at %s after it was found tampered with (%s)", format_time(mark), seen.problem)
    return mark


def clock_tampered_reason(problem: str) -> str:
    return (f"The license clock record cannot be trusted: {problem}. Pro features are off (free tier) until "
            "it is repaired: restore the node database from a backup (cell restore), or run "
            "`cell license clock-reset` with the clock set right, then send the service SIGHUP.")


class HighWaterStore:
    """The latest time this appliance has seen, signed by the node key (T-LIC-1, T-LIC-3).

    One row of ``license_clock``: ``(high_water_ms, key_id, signature)``,
    the signature being Ed25519 by the node key over ``mark_message``. A row
    that was edited, lowered or deleted is detected (``ClockTampered``);
    the unsigned ``license_state`` row of older releases is taken over once
    and then removed.
    """

    def __init__(self, db_path: Path, node_key: NodeKey) -> None:
        self._db_path = db_path
        self._key = node_key
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            existed = _table_exists(conn, "license_clock")
            conn.execute(_SCHEMA_SQL)
            conn.execute(_CLOCK_SQL)
            seen = inspect_high_water(conn, node_key.verify_key, node_key.key_id, table_existed=existed)
            self.problem = seen.problem
            self._initial = seen.mark
            self._expect_row = seen.mark is not None
            if seen.problem is None and not existed and seen.mark is not None:
                self._write(conn, _to_ms(seen.mark))  # upgrade: sign the older release's mark
            if seen.problem is None:
                conn.execute("DELETE FROM license_state WHERE key = ?", (_HIGH_WATER_KEY,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, timeout=5, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _write(self, conn: sqlite3.Connection, ms: int) -> None:
        _write_mark(conn, self._key, ms)

    def get(self) -> datetime | None:
        """The mark as found when the store was opened (None: nothing recorded, or tampered)."""
        return self._initial

    def raise_to(self, when: datetime) -> None:
        """Raise the signed mark to ``when`` (never lower it); ``ClockTampered`` if it was tampered with."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")  # read, check and write as one step: racing writers only move it up
            seen = inspect_high_water(conn, self._key.verify_key, self._key.key_id, expect_row=self._expect_row)
            if seen.problem is not None:
                conn.execute("ROLLBACK")
                raise ClockTampered(seen.problem)
            ms = _to_ms(when)
            if seen.mark is None or ms > _to_ms(seen.mark):
                self._write(conn, ms)
            conn.execute("COMMIT")
            self._expect_row = True
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()


@dataclass(frozen=True)
class LicenseState:
    """What the appliance honours right now."""

    tier: str
    license: License | None
    reason_code: str | None
    reason: str | None
    warnings: tuple[str, ...] = ()


_FileSig = tuple[int, int, int, int, int]


def _sig(st: os.stat_result) -> _FileSig:
    # ctime too: chmod/chown (fixing permissions) and rename change it, not mtime.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class LicenseManager:
    """One per process, built once by the service factory and shared by all threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        keys: dict[str, bytes] | None = None,
        clock: Callable[[], datetime] = utc_now,
        machine_id: str | None = None,
        revocations: Callable[[str], bool] | None = None,
        revoked_keys: Callable[[str], bool] | None = None,
        skew: timedelta = CLOCK_SKEW,
        poll_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        node_key: NodeKey | None = None,
    ) -> None:
        self._settings = settings
        self._path = settings.license_path
        # None means production: only the embedded vendor keys (docs/licenses.md);
        # tests inject their own, verification itself never gets weaker.
        self._keys = embedded_license_keys() if keys is None else dict(keys)
        self._clock = clock
        self._machine_id = machine_fingerprint() if machine_id is None else machine_id
        self._is_revoked = revocations
        self._is_key_revoked = revoked_keys
        self._skew = skew
        self._poll_interval = poll_interval
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._reload_requested = False
        # T-LIC-3: the mark is signed by the node key (the service passes its
        # own; other tools load it), so deleting or lowering it is detected.
        self._node_key = node_key if node_key is not None else NodeKey.load_or_create(settings.keys_dir)
        self._high_water_store = HighWaterStore(settings.db_path, self._node_key)
        self._clock_problem: str | None = self._high_water_store.problem
        if self._clock_problem is not None:
            log.error("license clock high-water mark tampered with: %s; Pro features are off", self._clock_problem)
        self._high_water = self._high_water_store.get()
        self._high_water_written = self._high_water
        self._file_sig: _FileSig | None = None
        self._file_missing = True
        self._file_license: License | None = None
        self._file_error: LicenseRejected | None = None
        self._last_good: License | None = None
        self._logged_rejection: tuple[_FileSig | None, str] | None = None
        self._last_check = float("-inf")
        self._state = LicenseState("free", None, "no_license", "No license loaded yet.")
        self.reload(force=True)

    @property
    def machine_id(self) -> str | None:
        return self._machine_id

    # -- reloading -----------------------------------------------------------

    def request_reload(self) -> None:
        """Signal-safe: only sets a flag; the next access re-reads the file."""
        self._reload_requested = True

    def install_sighup_handler(self) -> None:
        """Make SIGHUP re-read the license on next access. Call from the main thread.

        The handler only sets a flag: it may run while this thread holds the
        manager's lock, so it must not take it. A previous Python handler
        (config reload, say) is still called.
        """
        previous = signal.getsignal(signal.SIGHUP)

        def on_sighup(signum: int, frame: FrameType | None) -> None:
            self._reload_requested = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGHUP, on_sighup)

    def reload(self, force: bool = False) -> LicenseState:
        """Re-read the file if it changed (always, with force) and re-evaluate."""
        with self._lock:
            self._last_check = self._monotonic()
            if force and self._clock_problem is not None:
                self._recheck_clock_mark()  # SIGHUP after `cell license clock-reset` or a restore
            try:
                st = os.stat(self._path)
            except FileNotFoundError:
                self._file_missing = True
                self._file_sig = None
                self._file_license = None
                self._file_error = None
            except OSError as exc:  # e.g. the directory is not readable by the service user
                already = self._file_error is not None and self._file_error.code == "unreadable"
                self._file_sig = None
                if force or not already:
                    self._set_file_error(LicenseRejected("unreadable", self._unreadable(exc)))
            else:
                sig = _sig(st)
                if not stat.S_ISREG(st.st_mode):
                    # A FIFO would block the reader forever; a directory is a mistake.
                    if force or sig != self._file_sig:
                        self._file_sig = sig
                        self._set_file_error(
                            LicenseRejected("unreadable", f"The license path {self._path} is not a regular file.")
                        )
                elif force or sig != self._file_sig:
                    self._load(sig)
            self._state = self._evaluate()
            return self._state

    def _recheck_clock_mark(self) -> None:
        try:
            store = HighWaterStore(self._settings.db_path, self._node_key)
        except sqlite3.Error as exc:
            log.warning("cannot re-read the license clock high-water mark: %s", exc)
            return
        if store.problem is None:
            self._high_water_store, self._clock_problem = store, None
            mark = store.get()
            if mark is not None and (self._high_water is None or mark > self._high_water):
                self._high_water = mark
            self._high_water_written = mark
            log.warning("license clock high-water mark repaired; licenses are checked again")

    def _unreadable(self, exc: OSError) -> str:
        return f"The license file {self._path} cannot be read ({exc.strerror or exc}); check its permissions."

    def _set_file_error(self, error: LicenseRejected) -> None:
        self._file_missing = False
        self._file_license = None
        self._file_error = error

    def _load(self, sig: _FileSig) -> None:
        # Remember the sig even on failure: retry when the file changes, not every second.
        self._file_sig = sig
        try:
            with open(self._path, "rb") as fh:
                # Describe the file actually read, in case it was replaced after stat().
                self._file_sig = _sig(os.fstat(fh.fileno()))
                data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self._set_file_error(LicenseRejected("unreadable", self._unreadable(exc)))
            return
        try:
            lic = parse_license(data, self._keys, is_key_revoked=self._is_key_revoked)
        except LicenseRejected as exc:
            self._set_file_error(exc)
            return
        self._file_missing = False
        self._file_license = lic
        self._file_error = None
        log.info("license file %s read: %s, tier %s, licensee %r", self._path, lic.license_id, lic.tier, lic.licensee)

    # -- evaluation ----------------------------------------------------------

    def _check(self, lic: License, now: datetime) -> LicenseRejected | None:
        try:
            check_license(
                lic,
                now=now,
                machine_id=self._machine_id,
                is_revoked=self._is_revoked,
                is_key_revoked=self._is_key_revoked,
                high_water=self._high_water,
                skew=self._skew,
            )
        except LicenseRejected as exc:
            return exc
        return None

    def _evaluate(self) -> LicenseState:
        now = self._clock()
        if self._file_missing:
            # Removing the file is the operator's choice: back to free, and
            # the old license is not resurrected by a later bad file.
            self._last_good = None
            state = LicenseState(
                "free", None, "no_license", f"No license file at {self._path}; running the free tier."
            )
        else:
            rejection = self._file_error
            if self._file_license is not None:
                rejection = self._check(self._file_license, now)
                if rejection is None:
                    self._last_good = self._file_license
            if rejection is not None and (self._file_sig, rejection.code) != self._logged_rejection:
                # Once per file and reason: polling must not repeat it every second.
                self._logged_rejection = (self._file_sig, rejection.code)
                log.warning("license file %s refused (%s): %s", self._path, rejection.code, rejection.reason)
            if rejection is None and self._file_license is not None:
                lic = self._file_license
                state = LicenseState(lic.tier, lic, None, None, tuple(warnings_for(lic, now)))
            elif (
                rejection is not None
                and self._last_good is not None
                and self._last_good is not self._file_license
                and self._check(self._last_good, now) is None
            ):
                lic = self._last_good
                kept = (
                    f"The license file {self._path} was refused ({rejection.code}): {rejection.reason} "
                    f"Still using the previous license {lic.license_id}."
                )
                state = LicenseState(lic.tier, lic, None, None, (kept, *warnings_for(lic, now)))
            else:
                assert rejection is not None
                state = LicenseState(
                    "free", None, rejection.code, f"{rejection.reason} Running the free tier."
                )
        self._remember(now)
        if self._clock_problem is not None:
            # T-LIC-3: fail closed while the clock mark cannot be believed.
            state = LicenseState("free", None, "clock_tampered", clock_tampered_reason(self._clock_problem))
        if (state.tier, state.reason_code, state.license and state.license.license_id) != (
            self._state.tier,
            self._state.reason_code,
            self._state.license and self._state.license.license_id,
        ):
            level = logging.WARNING if state.reason_code not in (None, "no_license") else logging.INFO
            log.log(level, "license tier is now %s%s", state.tier, f": {state.reason}" if state.reason else "")
        return state

    def _remember(self, now: datetime) -> None:
        # T-LIC-1: the high-water mark only moves forward.
        if self._high_water is None or now > self._high_water:
            self._high_water = now
        if self._clock_problem is not None:
            return  # never re-sign over a tampered mark: that would launder it
        written = self._high_water_written
        if written is None or self._high_water - written >= _HIGH_WATER_WRITE_EVERY:
            try:
                self._high_water_store.raise_to(self._high_water)
                self._high_water_written = self._high_water
            except ClockTampered as exc:
                # T-LIC-3: deleted or edited while the service runs (checked at each write).
                self._clock_problem = str(exc)
                log.error("license clock high-water mark tampered with: %s; Pro features are off", exc)
            except sqlite3.Error as exc:
                log.warning("cannot persist the license clock high-water mark: %s", exc)

    # -- queries -------------------------------------------------------------

    def current(self) -> LicenseState:
        """The state now; re-checks file and clock at most once per poll_interval."""
        if self._reload_requested or self._monotonic() - self._last_check >= self._poll_interval:
            with self._lock:
                force, self._reload_requested = self._reload_requested, False
                return self.reload(force=force)
        return self._state

    def allows(self, feature: str) -> bool:
        """True when the honoured license grants ``feature`` (e.g. "load_weights")."""
        state = self.current()
        return tier_allows(state.tier, state.license.features if state.license else (), feature)

    def granted(self, features: Iterable[str]) -> frozenset[str]:
        """Those of ``features`` the honoured license grants, from one reading of the state (T-LIC-2)."""
        state = self.current()
        listed = state.license.features if state.license else ()
        return frozenset(f for f in features if tier_allows(state.tier, listed, f))

    def config_limits(self) -> Limits:
        s = self._settings
        return Limits(
            rate_limit_rps=s.rate_limit_rps,
            max_cells=s.max_cells_per_worker * s.workers,
            max_memory_mb=s.memory_ceiling_mb,
        )

    def effective_limits(self, config: Limits | None = None) -> Limits:
        """min(config, license, hard ceilings); the free tier gets min(config, hard)."""
        state = self.current()
        return effective_limits(
            config or self.config_limits(), state.license.limits if state.license else None, HARD_CEILINGS
        )

    def summary(self) -> dict[str, Any]:
        """The license part of GET /v1/status."""
        state = self.current()
        lic = state.license
        now = self._clock()
        return {
            "tier": state.tier,
            "licensee": lic.licensee if lic else None,
            "license_id": lic.license_id if lic else None,
            "expires_at": format_time(lic.expires_at) if lic else None,
            "days_left": days_left(lic, now) if lic else None,
            "features": list(lic.features) if lic else [],
            "limits": lic.limits.as_dict() if lic else None,
            "effective_limits": self.effective_limits().as_dict(),
            "warnings": list(state.warnings),
            "reason_code": state.reason_code,
            "reason": state.reason,
        }
