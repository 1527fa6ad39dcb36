"""Licenses: which tier this appliance runs, proven by a vendor signature (docs/licenses.md).

``verify`` is pure (no I/O, no clock); ``manager`` is the adapter the service
builds once; ``cli`` adds ``cell license ...``; ``issue`` is the vendor's side.
Importing this package loads only the pure part, so the layering test holds;
the manager is imported on first use.
"""
from __future__ import annotations

from typing import Any

from appliance.license.verify import (
    SCHEMA,
    TIERS,
    License,
    LicenseRejected,
    Limits,
    canonical_json,
    check_license,
    parse_license,
    verify_license,
)

__all__ = [
    "SCHEMA",
    "TIERS",
    "License",
    "LicenseManager",
    "LicenseRejected",
    "LicenseState",
    "Limits",
    "canonical_json",
    "check_license",
    "parse_license",
    "verify_license",
]


def __getattr__(name: str) -> Any:
    # The manager needs sqlite3; keep it out of `import appliance.license.verify`.
    if name in ("LicenseManager", "LicenseState"):
        from appliance.license import manager  # layering: verify stays pure; the manager loads sqlite3

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
