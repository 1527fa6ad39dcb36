"""The operator console's view of the installer (stdlib only, like the rest).

``tui`` looks for ``ConsoleInstaller(settings)`` and drives it step by step:
verify, then install, then (on failure) roll back. The installer itself stays
one idempotent, resumable ``install()``; the console shows its output per step.
Verification always uses the embedded production release key — the console
offers no way to swap the trust root (T-SUPPLY-2).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from installer.errors import InstallError
from installer.extract import verify_bundle
from installer.install import InstallOptions, install, rollback
from installer.keys import embedded_keys
from installer.layout import Layout, linked_version

STEPS = (
    ("verify", "Verify the signature and every file's hash"),
    ("install", "Install: venv from the bundle's wheels, config, node key, precompile, service unit, switch"),
)


class ConsoleInstaller:
    def __init__(self, settings: Any = None, *, layout: Layout | None = None,
                 trusted: dict[str, bytes] | None = None) -> None:
        self.layout = layout or Layout()
        self._trusted = embedded_keys() if trusted is None else dict(trusted)

    def verify_bundle(self, path: str | Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="cell-console-verify-") as work:
            bundle = verify_bundle(Path(path), self._trusted, Path(work), extract=False)
        m = bundle.manifest
        return {
            "summary": f"{m.name} {m.version}: signature and {len(m.files)} file hashes verified",
            "details": {
                "name": m.name, "version": m.version, "python": m.python, "files": str(len(m.files)),
                "signed by key": bundle.statement.key_id,
                "installed now": linked_version(self.layout.current) or "nothing",
            },
        }

    def plan(self, path: str | Path) -> list[dict[str, str]]:
        return [{"id": sid, "title": title} for sid, title in STEPS]

    def run_step(self, path: str | Path, step_id: str) -> str:
        if step_id == "verify":
            return str(self.verify_bundle(path)["summary"])
        if step_id == "install":
            lines: list[str] = []
            result = install(InstallOptions(bundle=Path(path), layout=self.layout, trusted=self._trusted), out=lines.append)
            return f"installed {result.version}" + (f" (previous {result.previous} kept for rollback)" if result.previous else "")
        raise InstallError("unknown_step", f"unknown step {step_id!r}")

    def rollback(self, path: str | Path, done_step_ids: list[str]) -> list[str]:
        if "install" not in done_step_ids:
            return ["nothing was installed; the current version is untouched"]
        lines: list[str] = []
        try:
            now, before = rollback(self.layout, out=lines.append)
        except InstallError as exc:
            return [*lines, f"rollback not possible: {exc}"]
        return [*lines, f"current is {now} again (was {before})"]
