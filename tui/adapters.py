"""The real ConsoleServices, built from the appliance's own objects.

Two ways in: :meth:`ApplianceConsoleServices.from_services` wraps a running
``appliance.services.Services``; :func:`open_console_services` (used by
``cell console``) opens the database, receipt log, license file and mirror
directly and starts no worker pool, so the console can run beside the
service. The mirror and installer packages are optional: if they cannot be
imported, or do not offer what the console needs, their screens say "not
available" instead of the console failing to start.

The interfaces this adapter expects from them are written down in
``docs/console.md``.
"""
from __future__ import annotations

import importlib
import json
import logging
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import Settings
from appliance.license.cli import write_atomic
from appliance.license.machine import machine_fingerprint
from appliance.license.manager import LicenseManager, embedded_license_keys, read_high_water, utc_now
from appliance.license.verify import (
    LicenseRejected, decode_document, days_left, format_time, parse_license, verify_license, warnings_for,
)
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.services import prepare_root
from appliance.storage import Store
from appliance.telemetry import TelemetryStore, aggregate
from tui import media
from tui.services import (
    BundleCheck,
    ChainReport,
    ImportPreview,
    LicenseCheck,
    MediaFile,
    MirrorStatus,
    PlanStep,
    ReceiptRow,
    ServiceError,
    StepResult,
    TelemetryState,
    TemplateEntry,
    TenantInfo,
    Unavailable,
)

log = logging.getLogger("cell.console")
RECENT_RECEIPTS = 8
TELEMETRY_WINDOW_MS = 24 * 3600 * 1000
NOT_RECORDED = "—"  # the receipt log does not store a run's status


def _now_ms() -> int:
    return int(time.time() * 1000)


def _load_optional(module: str, attr: str) -> Any:
    """An optional component, or None when this build does not have it."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        log.info("console: %s.%s not available: %s", module, attr, exc)
        return None


class ApplianceConsoleServices:
    def __init__(
        self,
        settings: Settings,
        store: Any,
        receipts: Any,
        license: Any = None,
        *,
        pool: Any = None,
        mirror: Any = None,
        installer: Any = None,
        media_roots: Sequence[Path] = media.DEFAULT_ROOTS,
        telemetry: TelemetryStore | None = None,
        license_keys: dict[str, bytes] | None = None,
        clock: Callable[[], datetime] | None = None,
        machine_id: str | None = None,
        now_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.settings = settings
        self._store = store
        self._receipts = receipts
        self._license = license
        self._pool = pool
        self._mirror = mirror
        self._installer = installer
        self._roots = tuple(media_roots)
        self._telemetry = telemetry or TelemetryStore(settings.root)
        self._license_keys = license_keys
        self._clock = clock
        self._machine_id = machine_id
        self._now_ms = now_ms

    @classmethod
    def from_services(cls, services: Any, **kw: Any) -> ApplianceConsoleServices:
        return cls(services.settings, services.store, services.receipts, services.license,
                   pool=getattr(services, "pool", None), **kw)

    # -- health ---------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        # Read-only: the console must never be the one holding a write lock.
        return sqlite3.connect(f"{self.settings.db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)

    def _runs_since(self, since_ms: int) -> int:
        try:
            conn = self._db()
            try:
                # Bounded to the newest rows: seq grows with time, no timestamp index.
                row = conn.execute(
                    "SELECT COUNT(*) FROM receipts WHERE seq > (SELECT COALESCE(MAX(seq), 0) - 10000 FROM receipts)"
                    " AND timestamp >= ?", (since_ms,)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return 0
        return int(row[0])

    def status(self) -> dict[str, Any]:
        lic = self._license.summary() if self._license is not None else None
        names = {t.id: t.name for t in self._store.list_tenants()}
        per_tenant = Counter(names.get(c.tenant_id, c.tenant_id) for c in self._store.list_cells())
        workers: dict[str, Any] = (self._pool.stats() if self._pool is not None
                                   else {"configured": self.settings.workers})
        return {
            "version": __version__,
            "node_id": self.settings.node_id,
            "service": "ok",
            "tier": lic["tier"] if lic else "free",
            "license": lic,
            "egress": self.settings.egress,
            "telemetry": "on" if self._telemetry.consent() else "off",
            "workers": workers,
            "cells_per_tenant": dict(sorted(per_tenant.items())),
            "runs_per_minute": self._runs_since(self._now_ms() - 60_000),
            "recent_receipts": self._recent(),
            # The service does not count denials in a place another process can read yet.
            "denials": None,
            "mirror": self.mirror_status().detail,
        }

    def _recent(self) -> list[ReceiptRow]:
        total = int(self._receipts.count())
        rows = self._receipts.page(tenant_id=None, after=max(0, total - RECENT_RECEIPTS), limit=RECENT_RECEIPTS)
        return list(reversed(self._rows(rows, None)))

    # -- tenants --------------------------------------------------------------

    def list_tenants(self) -> list[TenantInfo]:
        return [TenantInfo(t.id, t.name, t.created_at, t.revoked) for t in self._store.list_tenants()]

    def add_tenant(self, name: str) -> tuple[TenantInfo, str]:
        name = name.strip()
        if not name or len(name) > 64 or not name.isprintable():
            raise ServiceError("A tenant name is 1 to 64 printable characters.")
        if any(t.name == name for t in self._store.list_tenants()):
            raise ServiceError(f"A tenant named {name!r} already exists.")
        tenant, key = self._store.add_tenant(name, self._now_ms())
        return TenantInfo(tenant.id, tenant.name, tenant.created_at, tenant.revoked), key

    def revoke_tenant(self, tenant_id: str) -> bool:
        return bool(self._store.revoke_tenant(tenant_id))

    # -- receipts -------------------------------------------------------------

    def _tenant_of(self, seqs: list[int]) -> dict[int, str]:
        # page() omits tenant_id (it is not part of the signed receipt); read it alongside.
        if not seqs:
            return {}
        try:
            conn = self._db()
            try:
                marks = ",".join("?" * len(seqs))
                return dict(conn.execute(f"SELECT seq, tenant_id FROM receipts WHERE seq IN ({marks})", seqs).fetchall())
            finally:
                conn.close()
        except sqlite3.Error:
            return {}

    def _rows(self, rows: list[dict[str, Any]], tenant_id: str | None) -> list[ReceiptRow]:
        tenants = {} if tenant_id else self._tenant_of([int(r["seq"]) for r in rows])
        return [
            ReceiptRow(int(r["seq"]), r["execution_id"], tenant_id or tenants.get(int(r["seq"]), "?"),
                       r["template"], int(r["timestamp"]), str(r.get("status") or NOT_RECORDED), r["receipt_hash"])
            for r in rows
        ]

    def receipts_page(self, *, tenant_id: str | None, status: str | None, after: int | None,
                      limit: int) -> list[ReceiptRow]:
        rows = self._rows(self._receipts.page(tenant_id=tenant_id, after=after, limit=limit), tenant_id)
        return [r for r in rows if status is None or r.status == status]

    def verify_receipts(self) -> ChainReport:
        report = self._receipts.verify()
        problem = report.get("first_problem")
        text = None
        if problem:
            text = " ".join(f"{k}={v}" for k, v in problem.items()) if isinstance(problem, dict) else str(problem)
        return ChainReport(bool(report["ok"]), int(report["count"]), text)

    def export_receipts(self, dest_dir: Path) -> Path:
        if dest_dir not in self.media_dirs():
            raise ServiceError(f"{dest_dir} is not a mounted removable medium.")
        target = dest_dir / f"cell-receipts-{self.settings.node_id}-{self._now_ms()}.jsonl"
        self._receipts.export_to(target)
        return target

    # -- media ----------------------------------------------------------------

    def media_files(self, kind: str) -> list[MediaFile]:
        return media.scan(self._roots, kind)

    def media_dirs(self) -> list[Path]:
        return media.mounted_dirs(self._roots)

    # -- license --------------------------------------------------------------

    def _license_context(self) -> dict[str, Any]:
        return {
            "keys": self._license_keys if self._license_keys is not None else embedded_license_keys(),
            "now": (self._clock or utc_now)(),
            "machine_id": self._machine_id if self._machine_id is not None else machine_fingerprint(),
            "high_water": read_high_water(self.settings.db_path),
            "is_revoked": self._revoked_license,
            "is_key_revoked": self._revoked_key,
        }

    def _revoked_license(self, license_id: str) -> bool:
        probe = getattr(self._mirror, "is_license_revoked", None)
        # Fail closed like the service: without a registry, revocation cannot be ruled out,
        # and the console must not call "valid" what the service will refuse.
        return bool(probe(license_id)) if callable(probe) else True

    def _revoked_key(self, key_id: str) -> bool:
        probe = getattr(self._mirror, "is_key_revoked", None)
        return bool(probe(key_id)) if callable(probe) else True

    def verify_license_file(self, path: Path) -> LicenseCheck:
        return self._check_license(media.read_confined(path, self._roots, "license"))

    def _check_license(self, data: bytes) -> LicenseCheck:
        ctx = self._license_context()
        try:
            lic = verify_license(data, **ctx)
        except LicenseRejected as exc:
            fields: tuple[tuple[str, str], ...] = ()
            try:
                doc = decode_document(data)
                fields = _fields(doc["payload"], doc.get("key_id"))
            except (LicenseRejected, KeyError, TypeError):
                pass
            try:
                parse_license(data, ctx["keys"])
                signed = True
            except LicenseRejected:
                signed = False
            return LicenseCheck(False, f"REJECTED: {exc.reason}", exc.code, exc.reason, fields, signed)
        fields = (*_fields(lic.payload, lic.key_id), ("days_left", str(days_left(lic, ctx["now"]))))
        verdict = (f"VALID: this appliance will run the {lic.tier} tier for {lic.licensee} "
                   f"until {format_time(lic.expires_at)}.")
        return LicenseCheck(True, verdict, None, None, fields, True, tuple(warnings_for(lic, ctx["now"])))

    def install_license(self, path: Path) -> LicenseCheck:
        data = media.read_confined(path, self._roots, "license")
        check = self._check_license(data)  # T-LIC-1: never install what the service would refuse
        if not check.ok:
            return check
        try:
            write_atomic(self.settings.license_path, data)
        except OSError as exc:
            raise ServiceError(f"Cannot write {self.settings.license_path}: {exc.strerror or exc}.") from None
        return check

    # -- mirror ---------------------------------------------------------------

    def _need_mirror(self) -> Any:
        if self._mirror is None:
            raise Unavailable("The trust registry (mirror) is not available on this node.")
        return self._mirror

    def mirror_status(self) -> MirrorStatus:
        if self._mirror is None:
            return MirrorStatus(False, "not available")
        try:
            raw = self._mirror.status()
        except Exception as exc:  # a broken registry must not take the dashboard down
            return MirrorStatus(False, f"error: {exc}")
        templates = tuple(TemplateEntry(str(t.get("name")), str(t.get("version", "")), str(t.get("sha256", "")))
                          for t in raw.get("templates", []))
        version = raw.get("version")
        detail = (f"registry version {version}, {len(templates)} template(s)" if version is not None
                  else "trust root only: no registry update imported yet")
        return MirrorStatus(True, detail,
                            version, templates, tuple(str(r) for r in raw.get("revocations", [])))

    def preview_mirror_import(self, path: Path) -> ImportPreview:
        mirror = self._need_mirror()
        if not media.within(path, self._roots):
            raise ServiceError(f"{path} is not on removable media.")
        try:
            raw = mirror.preview_import(path)
        except Exception as exc:  # the registry's own refusal, shown as is
            return ImportPreview(False, f"REJECTED: {exc}")
        return ImportPreview(True, str(raw.get("summary", "update verified")),
                             tuple(str(c) for c in raw.get("changes", [])))

    def apply_mirror_import(self, path: Path) -> str:
        mirror = self._need_mirror()
        raw = mirror.apply_import(path)
        return str(raw.get("summary", "imported")) if isinstance(raw, dict) else str(raw)

    # -- installer ------------------------------------------------------------

    def _need_installer(self) -> Any:
        if self._installer is None:
            raise Unavailable("The installer is not available in this build.")
        return self._installer

    def verify_bundle(self, path: Path) -> BundleCheck:
        inst = self._need_installer()
        if not media.within(path, self._roots):
            return BundleCheck(False, f"REJECTED: {path} is not on removable media.")
        try:
            raw = inst.verify_bundle(path)
        except Exception as exc:  # a tampered bundle is the installer's refusal, shown as is
            return BundleCheck(False, f"REJECTED: {exc}")
        return BundleCheck(True, str(raw.get("summary", "bundle verified")),
                           tuple((str(k), str(v)) for k, v in raw.get("details", {}).items()))

    def plan_install(self, path: Path) -> list[PlanStep]:
        return [PlanStep(str(s["id"]), str(s["title"])) for s in self._need_installer().plan(path)]

    def run_install_step(self, path: Path, step: PlanStep) -> StepResult:
        try:
            message = self._need_installer().run_step(path, step.id)
        except Unavailable:
            raise
        except Exception as exc:
            return StepResult(step.id, False, str(exc))
        return StepResult(step.id, True, str(message or "done"))

    def rollback_install(self, path: Path, done: list[PlanStep]) -> list[str]:
        return [str(line) for line in self._need_installer().rollback(path, [s.id for s in done])]

    # -- telemetry ------------------------------------------------------------

    def telemetry_state(self) -> TelemetryState:
        return TelemetryState(self._telemetry.consent(), len(self._telemetry.spooled()))

    def set_telemetry_consent(self, on: bool) -> TelemetryState:
        self._telemetry.set_consent(on)
        if on:
            self._telemetry.record(self.telemetry_preview())
        return self.telemetry_state()

    def telemetry_preview(self) -> dict[str, Any]:
        end = self._now_ms()
        start = end - TELEMETRY_WINDOW_MS
        lic = self._license.summary() if self._license is not None else None
        samples: list[dict[str, Any]] = []
        try:
            conn = self._db()
            try:
                rows = conn.execute("SELECT template FROM receipts WHERE timestamp >= ?", (start,)).fetchall()
            finally:
                conn.close()
            # The receipt log keeps no status or latency; those counters stay empty until it does.
            samples = [{"template": r[0]} for r in rows]
        except sqlite3.Error:
            pass
        return aggregate(samples, version=__version__, tier=lic["tier"] if lic else "free",
                         period_start_ms=start, period_end_ms=end)

    def export_telemetry(self, dest_dir: Path) -> list[Path]:
        if dest_dir not in self.media_dirs():
            raise ServiceError(f"{dest_dir} is not a mounted removable medium.")
        return self._telemetry.export(dest_dir)

    def close(self) -> None:
        for part in (self._receipts, self._store):
            try:
                part.close()
            except Exception:  # closing on the way out: report, do not mask the exit
                log.exception("console: close failed")


def _fields(payload: Any, key_id: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for name in sorted(payload):
        value = payload[name]
        out.append((name, value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)))
    out.append(("key_id", str(key_id)))
    return tuple(out)


class RegistryBridge:
    """Adapts ``mirror.registry.Mirror`` to what the trust screen needs.

    The registry imports atomically (verify + install in one call) and has no
    dry run, so the preview imports into a throw-away copy of the registry
    directory: the operator sees the exact changes the registry computed,
    and the real registry is untouched until they confirm. Apply re-verifies
    from scratch, so a stick swapped after the preview gains nothing.
    """

    def __init__(self, mirror: Any) -> None:
        self._mirror = mirror

    def status(self) -> dict[str, Any]:
        raw = self._mirror.status()
        if not raw.get("ok"):
            raise ServiceError(str(raw.get("error", "the registry cannot be verified")))
        revoked = [*raw.get("revoked_licenses", []), *(f"key {k}" for k in raw.get("revoked_keys", []))]
        return {"version": raw.get("targets_version"), "templates": raw.get("templates", []), "revocations": revoked}

    def is_license_revoked(self, license_id: str) -> bool:
        return bool(self._mirror.is_license_revoked(license_id))

    def is_key_revoked(self, key_id: str) -> bool:
        return bool(self._mirror.is_key_revoked(key_id))

    def preview_import(self, path: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="cell-console-preview-") as tmp:
            copy = Path(tmp) / "mirror"
            shutil.copytree(self._mirror.root_dir, copy, symlinks=True)
            scratch = type(self._mirror)(copy, trusted_root=self._mirror.trusted_root)
            report = scratch.import_path(path)
        return {"summary": _report_summary(report), "changes": _change_lines(report)}

    def apply_import(self, path: Path) -> dict[str, Any]:
        report = self._mirror.import_path(path)
        return {"summary": _report_summary(report), "changes": _change_lines(report)}


def _report_summary(report: Any) -> str:
    if not report.applied:
        return f"Nothing to do: the registry is already at targets version {report.targets_version}."
    return f"Verified: root version {report.root_version}, targets version {report.targets_version}."


def _change_lines(report: Any) -> list[str]:
    changes = report.changes.as_dict()
    return [f"{kind.replace('_', ' ')}: {name}" for kind, names in changes.items() for name in names]


def _fail_closed(_id: str) -> bool:
    """Without a verified registry, revocation cannot be ruled out (as the service does)."""
    return True


def _revoked_license_fn(mirror: RegistryBridge | None) -> Callable[[str], bool]:
    return mirror.is_license_revoked if mirror is not None else _fail_closed


def _revoked_key_fn(mirror: RegistryBridge | None) -> Callable[[str], bool]:
    return mirror.is_key_revoked if mirror is not None else _fail_closed


def open_console_services(settings: Settings, *, media_roots: Sequence[Path] = media.DEFAULT_ROOTS,
                          ) -> ApplianceConsoleServices:
    """The lightweight graph for ``cell console``: storage and license, no worker pool."""
    prepare_root(settings)
    mirror: RegistryBridge | None = None
    mirror_cls = _load_optional("mirror.registry", "Mirror")
    if mirror_cls is not None:
        try:
            mirror = RegistryBridge(mirror_cls(settings.mirror_dir))
        except Exception as exc:  # a mirror that cannot open is "not available", not a crash
            log.warning("console: mirror unavailable: %s", exc)
    store = Store(settings.db_path)
    receipts = ReceiptStore(settings.db_path, NodeKey.load_or_create(settings.keys_dir))
    try:
        lic: Any = LicenseManager(settings, revocations=_revoked_license_fn(mirror), revoked_keys=_revoked_key_fn(mirror))
    except Exception as exc:  # same rule as the service: no license subsystem is the free tier
        log.warning("console: license subsystem unavailable: %s", exc)
        lic = None
    installer = None
    installer_cls = _load_optional("installer.console", "ConsoleInstaller")
    if installer_cls is not None:
        try:
            installer = installer_cls(settings)
        except Exception as exc:  # same rule as the mirror
            log.warning("console: installer unavailable: %s", exc)
    return ApplianceConsoleServices(settings, store, receipts, lic, mirror=mirror, installer=installer,
                                    media_roots=media_roots)
