"""What the console needs from the appliance, as one Protocol and plain values.

The App receives an object implementing :class:`ConsoleServices` through its
constructor. The real one is
``tui.adapters.ApplianceConsoleServices``; tests use ``tests.tui.fakes``.
Every method may block (SQLite, file reads, signature checks), so screens
call them only from thread workers. Methods raise :class:`ServiceError` with
a sentence for the operator when they refuse; :class:`Unavailable` when the
subsystem is not installed on this node (mirror and installer are optional).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class ServiceError(Exception):
    """A refusal the operator should read as is (the message is plain words)."""


class Unavailable(ServiceError):
    """The subsystem is not part of this build or not set up on this node."""


@dataclass(frozen=True)
class TenantInfo:
    id: str
    name: str
    created_at: int  # Unix ms
    revoked: bool


@dataclass(frozen=True)
class ReceiptRow:
    seq: int
    execution_id: str
    tenant_id: str
    template: str
    timestamp: int  # Unix ms
    status: str
    receipt_hash: str


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    count: int
    problem: str | None = None


@dataclass(frozen=True)
class MediaFile:
    """A file found on removable media, already confined to a media root."""

    path: Path
    size: int


@dataclass(frozen=True)
class LicenseCheck:
    """The verdict on a license file, in the words the operator will read."""

    ok: bool
    verdict: str  # e.g. "VALID: pro tier" or "REJECTED: the license expired ..."
    code: str | None = None  # stable rejection code, None when valid
    reason: str | None = None  # the verifier's exact sentence
    fields: tuple[tuple[str, str], ...] = ()
    fields_verified: bool = False  # False: shown for diagnosis, signature did not check out
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class BundleCheck:
    ok: bool
    summary: str  # what the bundle is, or why it is refused
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PlanStep:
    id: str
    title: str


@dataclass(frozen=True)
class StepResult:
    step_id: str
    ok: bool
    message: str


@dataclass(frozen=True)
class TemplateEntry:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class MirrorStatus:
    available: bool
    detail: str  # "registry version 12, updated ..." or why it is not available
    version: int | None = None
    templates: tuple[TemplateEntry, ...] = ()
    revocations: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportPreview:
    ok: bool
    summary: str
    changes: tuple[str, ...] = field(default=())  # one plain line per change


@dataclass(frozen=True)
class TelemetryState:
    consent: bool
    spooled: int


class ConsoleServices(Protocol):
    # -- health -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Keys the dashboard reads (all optional, missing shows as "n/a"):
        version, node_id, service ("ok"/text), tier, license (summary dict),
        egress, telemetry, workers (dict), cells_per_tenant ({name: n}),
        runs_per_minute, recent_receipts (list[ReceiptRow]), denials
        ({"rate_limit": n, "policy": n}), mirror (str)."""
        ...

    # -- tenants ------------------------------------------------------------
    def list_tenants(self) -> list[TenantInfo]: ...
    def add_tenant(self, name: str) -> tuple[TenantInfo, str]:
        """Returns the tenant and its API key; the key is never retrievable again."""
        ...
    def revoke_tenant(self, tenant_id: str) -> bool: ...

    # -- receipts -----------------------------------------------------------
    def receipts_page(
        self, *, tenant_id: str | None, status: str | None, after: int | None, limit: int
    ) -> list[ReceiptRow]: ...
    def verify_receipts(self) -> ChainReport: ...
    def export_receipts(self, dest_dir: Path) -> Path: ...

    # -- removable media ----------------------------------------------------
    def media_files(self, kind: str) -> list[MediaFile]:
        """Candidate files of one kind ("bundle", "license", "registry")."""
        ...
    def media_dirs(self) -> list[Path]:
        """Mounted removable media an export may be written to."""
        ...

    # -- license ------------------------------------------------------------
    def verify_license_file(self, path: Path) -> LicenseCheck: ...
    def install_license(self, path: Path) -> LicenseCheck:
        """Verifies again (the file may have changed) and installs only if valid."""
        ...

    # -- trust registry (mirror) ----------------------------------------------
    def mirror_status(self) -> MirrorStatus: ...
    def preview_mirror_import(self, path: Path) -> ImportPreview: ...
    def apply_mirror_import(self, path: Path) -> str: ...

    # -- offline bundle install ---------------------------------------------
    def verify_bundle(self, path: Path) -> BundleCheck: ...
    def plan_install(self, path: Path) -> list[PlanStep]: ...
    def run_install_step(self, path: Path, step: PlanStep) -> StepResult: ...
    def rollback_install(self, path: Path, done: list[PlanStep]) -> list[str]:
        """Undo the steps in ``done`` (newest first); one plain line per action."""
        ...

    # -- telemetry ----------------------------------------------------------
    def telemetry_state(self) -> TelemetryState: ...
    def set_telemetry_consent(self, on: bool) -> TelemetryState: ...
    def telemetry_preview(self) -> dict[str, Any]:
        """The report that would be spooled now; computing it records nothing."""
        ...
    def export_telemetry(self, dest_dir: Path) -> list[Path]: ...
