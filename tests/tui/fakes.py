"""In-memory ConsoleServices for pilot tests: same Protocol, scripted answers.

Telemetry uses the real ``appliance.telemetry.TelemetryStore`` in a temp
directory, so the console's consent flow is tested against the real consent
file. Every call records the thread it ran on, so tests can prove the UI
never calls a service from the event loop.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance.telemetry import TelemetryStore, aggregate
from tui.services import (
    BundleCheck,
    ChainReport,
    ConsoleServices,
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
)

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: fixed, so screenshots are stable
HASH = "9f2c4e1ab37d5c60" + "0" * 48


def receipt(seq: int, tenant: str = "default", status: str = "ok", template: str = "python3") -> ReceiptRow:
    return ReceiptRow(seq, f"0000000{seq}-aaaa-4bbb-8ccc-dddddddddddd", tenant, template,
                      NOW_MS - (100 - seq) * 1000, status, HASH)


GOOD_LICENSE = LicenseCheck(
    ok=True,
    verdict="VALID: this appliance will run the pro tier for ACME Corp until 2026-01-13T00:00:00Z.",
    fields=(("licensee", "ACME Corp"), ("tier", "pro"), ("expires_at", "2026-01-13T00:00:00Z"),
            ("license_id", "lic-0001"), ("days_left", "12")),
    fields_verified=True,
    warnings=("The license lic-0001 expires in 12 days (2026-01-13T00:00:00Z); renew it to keep the pro tier.",),
)
BAD_LICENSE = LicenseCheck(
    ok=False,
    verdict="REJECTED: the signature does not match the payload; the file was altered or forged.",
    code="bad_signature",
    reason="the signature does not match the payload; the file was altered or forged.",
    fields=(("licensee", "Mallory"), ("tier", "hub")),
    fields_verified=False,
)


class FakeServices:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.threads: list[int] = []
        self.telemetry = TelemetryStore(root / "state", clock=lambda: NOW_MS / 1000)
        self.tenants = [TenantInfo("default", "default", NOW_MS - 86_400_000, False),
                        TenantInfo("t1a2b3c", "analytics", NOW_MS - 3_600_000, False)]
        self.receipts = [receipt(i, "default" if i % 3 else "t1a2b3c", "ok" if i % 4 else "timeout")
                         for i in range(1, 41)]
        self.chain_ok = True
        self.media = root / "media" / "usb"
        self.media.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, list[MediaFile]] = {
            "license": [MediaFile(self.media / "good.json", 900), MediaFile(self.media / "forged.json", 880)],
            "bundle": [MediaFile(self.media / "cell-0.2.0.tar", 10_000), MediaFile(self.media / "tampered.tar", 10_000)],
            "registry": [MediaFile(self.media / "registry-8.tar", 4_000)],
        }
        self.licenses = {self.media / "good.json": GOOD_LICENSE, self.media / "forged.json": BAD_LICENSE}
        self.installed_license: Path | None = None
        self.mirror = MirrorStatus(True, "registry version 7, 2 template(s)", 7,
                                   (TemplateEntry("python3", "3.12.0", "ab" * 32),
                                    TemplateEntry("javascript", "0.10.1", "cd" * 32)),
                                   ("lic-0666",))
        self.applied: list[Path] = []
        self.plan = [PlanStep("unpack", "Unpack the bundle"), PlanStep("migrate", "Migrate the database"),
                     PlanStep("swap", "Switch to the new release")]
        self.fail_step: str | None = None
        self.steps_run: list[str] = []
        self.rolled_back: list[list[str]] = []
        self.exports: list[Path] = []

    def _call(self) -> None:
        self.threads.append(threading.get_ident())

    # -- health ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self._call()
        return {
            "version": "0.1.0", "node_id": "ab12cd34", "service": "ok", "tier": "pro",
            "license": {"tier": "pro", "licensee": "ACME Corp", "expires_at": "2026-01-13T00:00:00Z",
                        "days_left": 12, "warnings": list(GOOD_LICENSE.warnings)},
            "egress": "off", "telemetry": "on" if self.telemetry.consent() else "off",
            "workers": {"workers": 2, "busy": 1, "waiting": 0, "cells": 4},
            "cells_per_tenant": {"default": 3, "analytics": 1},
            "runs_per_minute": 17,
            "recent_receipts": list(reversed(self.receipts[-6:])),
            "denials": {"rate_limit": 5, "policy": 2},
            "mirror": self.mirror.detail,
        }

    # -- tenants --------------------------------------------------------------
    def list_tenants(self) -> list[TenantInfo]:
        self._call()
        return list(self.tenants)

    def add_tenant(self, name: str) -> tuple[TenantInfo, str]:
        self._call()
        if any(t.name == name for t in self.tenants):
            raise ServiceError(f"A tenant named {name!r} already exists.")
        tenant = TenantInfo(f"t{len(self.tenants):06d}", name, NOW_MS, False)
        self.tenants.append(tenant)
        return tenant, "cell_FAKEKEY" + name

    def revoke_tenant(self, tenant_id: str) -> bool:
        self._call()
        for i, t in enumerate(self.tenants):
            if t.id == tenant_id:
                self.tenants[i] = replace(t, revoked=True)
                return True
        return False

    # -- receipts -------------------------------------------------------------
    def receipts_page(self, *, tenant_id: str | None, status: str | None, after: int | None,
                      limit: int) -> list[ReceiptRow]:
        self._call()
        rows = [r for r in self.receipts if r.seq > (after or 0)
                and (tenant_id is None or r.tenant_id == tenant_id) and (status is None or r.status == status)]
        return rows[:limit]

    def verify_receipts(self) -> ChainReport:
        self._call()
        if self.chain_ok:
            return ChainReport(True, len(self.receipts))
        return ChainReport(False, 12, "seq 13: chain_hash does not follow prev_chain_hash")

    def export_receipts(self, dest_dir: Path) -> Path:
        self._call()
        path = dest_dir / "cell-receipts.jsonl"
        path.write_text("{}\n")
        self.exports.append(path)
        return path

    # -- media ----------------------------------------------------------------
    def media_files(self, kind: str) -> list[MediaFile]:
        self._call()
        return list(self.files.get(kind, []))

    def media_dirs(self) -> list[Path]:
        self._call()
        return [self.media]

    # -- license --------------------------------------------------------------
    def verify_license_file(self, path: Path) -> LicenseCheck:
        self._call()
        return self.licenses[path]

    def install_license(self, path: Path) -> LicenseCheck:
        self._call()
        check = self.licenses[path]
        if check.ok:
            self.installed_license = path
        return check

    # -- mirror ---------------------------------------------------------------
    def mirror_status(self) -> MirrorStatus:
        self._call()
        return self.mirror

    def preview_mirror_import(self, path: Path) -> ImportPreview:
        self._call()
        if "tampered" in path.name:
            return ImportPreview(False, "REJECTED: registry signature threshold not met")
        return ImportPreview(True, "Registry version 7 → 8 (signed by 2 of 2 registry keys)",
                             ("template python3 3.12.0 → 3.12.1", "revoke license lic-0999"))

    def apply_mirror_import(self, path: Path) -> str:
        self._call()
        self.applied.append(path)
        self.mirror = replace(self.mirror, version=8, detail="registry version 8, 2 template(s)",
                              revocations=("lic-0666", "lic-0999"))
        return "registry version 8 in force"

    # -- installer ------------------------------------------------------------
    def verify_bundle(self, path: Path) -> BundleCheck:
        self._call()
        if "tampered" in path.name:
            return BundleCheck(False, "REJECTED: sha256 of payload/app.tar does not match the signed manifest")
        return BundleCheck(True, "Cell 0.2.0 bundle, signed by the release key",
                           (("version", "0.2.0"), ("files", "42")))

    def plan_install(self, path: Path) -> list[PlanStep]:
        self._call()
        return list(self.plan)

    def run_install_step(self, path: Path, step: PlanStep) -> StepResult:
        self._call()
        self.steps_run.append(step.id)
        if step.id == self.fail_step:
            return StepResult(step.id, False, "database migration 0007 failed: disk full")
        return StepResult(step.id, True, "done")

    def rollback_install(self, path: Path, done: list[PlanStep]) -> list[str]:
        self._call()
        self.rolled_back.append([s.id for s in done])
        return [f"undid: {s.title}" for s in reversed(done)]

    # -- telemetry ------------------------------------------------------------
    def telemetry_state(self) -> TelemetryState:
        self._call()
        return TelemetryState(self.telemetry.consent(), len(self.telemetry.spooled()))

    def set_telemetry_consent(self, on: bool) -> TelemetryState:
        self._call()
        self.telemetry.set_consent(on)
        if on:
            self.telemetry.record(self.telemetry_preview())
        return self.telemetry_state()

    def telemetry_preview(self) -> dict[str, Any]:
        self._call()
        samples = [{"template": r.template, "status": r.status, "latency_ms": 10 + r.seq} for r in self.receipts]
        return aggregate(samples, version="0.1.0", tier="pro", period_start_ms=NOW_MS - 86_400_000,
                         period_end_ms=NOW_MS)

    def export_telemetry(self, dest_dir: Path) -> list[Path]:
        self._call()
        return self.telemetry.export(dest_dir)


def _conforms(services: FakeServices) -> ConsoleServices:
    return services  # mypy checks FakeServices against the Protocol here
