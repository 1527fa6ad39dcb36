"""Installer errors, split by who is at fault (as python-tuf does).

``BundleRejected`` means the bundle failed verification (threat T-SUPPLY-2):
nothing from it may run, and the operator must get a new bundle from the
vendor. ``InstallError`` means the machine or the operator's request is the
problem (a downgrade without the flag, no previous version, a failing step);
the previous install keeps working.
"""
from __future__ import annotations


class InstallerError(Exception):
    code = "installer_error"
    exit_status = 1


class BundleRejected(InstallerError):
    """The bundle is not what the vendor signed, or is shaped to attack the extractor."""

    exit_status = 3

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"bundle rejected (T-SUPPLY-2, {self.code}): {self.args[0]}"


class InstallError(InstallerError):
    exit_status = 2

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.args[0]} [{self.code}]"
