"""Builders for mirror tests: real TUF repositories signed with throw-away keys.

Every key is derived from a public test-only label; the production registry
root is never weakened: each test injects the root it built into Mirror.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner

from mirror.registry import Mirror
from mirror.vendor import TemplateBlob, VendorRepo, signer_from_seed

TOP = ("timestamp", "snapshot", "targets")
ALL = ("root",) + TOP
PY_BLOB = b"\x00asm\x01\x00\x00\x00" + b"python3-runtime" * 8
JS_BLOB = b"\x00asm\x01\x00\x00\x00" + b"javascript-runtime" * 8


def key(label: str) -> CryptoSigner:
    return signer_from_seed(hashlib.sha256(b"cell-mirror-test/" + label.encode()).digest())


def now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Vendor:
    """A vendor repository in ``tmp/repo`` and an appliance mirror in ``tmp/mirror`` trusting its root v1."""

    tmp: Path
    keys: dict[str, CryptoSigner] = field(default_factory=lambda: {r: key(r) for r in ALL})

    def __post_init__(self) -> None:
        self.repo = VendorRepo.create(self.tmp / "repo", self.keys)
        self.blobs_dir = self.tmp / "blobs"
        self.blobs_dir.mkdir()

    @property
    def trusted_root(self) -> bytes:
        return self.repo.root_bytes(1)

    def mirror(self, name: str = "mirror") -> Mirror:
        return Mirror(self.tmp / name, trusted_root=self.trusted_root)

    def publish(self, templates: dict[str, tuple[str, bytes]] | None = None, *, licenses: tuple[str, ...] = (),
                revoked_keys: tuple[str, ...] = (), signers: dict[str, Any] | None = None, **kw: Any) -> Path:
        """templates: target name -> (template, bytes); default one python3 runtime."""
        if templates is None:
            templates = {"python3.wasm": ("python3", PY_BLOB)}
        blobs = []
        for name, (template, data) in templates.items():
            (self.blobs_dir / name).write_bytes(data)
            blobs.append(TemplateBlob(self.blobs_dir / name, template, "1.0", "wasi-p1"))
        sign = {r: self.keys[r] for r in TOP}
        sign.update(signers or {})
        self.repo.publish(blobs, sign, revoked_licenses=licenses, revoked_keys=revoked_keys, **kw)
        return self.repo.dir

    def copy(self, name: str) -> Path:
        """A frozen copy of the repository as it is now (an old USB stick)."""
        dest = self.tmp / name
        shutil.copytree(self.repo.dir, dest)
        return dest


def past(days: int = 1) -> datetime:
    return now() - timedelta(days=days)
