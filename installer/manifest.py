"""The bundle's manifest and its detached signature: pure functions over bytes.

A bundle is ``<name>-<version>.tar`` plus ``<name>-<version>.tar.sig``. The
signature file signs (Ed25519, role ``release``) the canonical JSON of::

    {"name", "version", "tarball", "tarball_size", "tarball_sha256", "manifest_sha256"}

so the air-gapped side can check the whole tarball against the signature
*before* parsing a single tar header, and the manifest inside it (first
member, ``manifest.json``) is bound to the same signature. The manifest lists
every file with its size and sha256 (threat T-SUPPLY-2).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from installer import ed25519
from installer.errors import BundleRejected

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "cell-bundle/1"
SIGNATURE_SCHEMA = "cell-bundle-signature/1"
TOP_LEVEL_DIRS = ("wheels", "docs", "registry")


@dataclass(frozen=True)
class Limits:
    """Every size limit of verification and extraction, in one place (T-SUPPLY-2)."""

    max_file_bytes: int = 512 * 1024 * 1024
    max_total_bytes: int = 3 * 1024 * 1024 * 1024
    max_files: int = 20_000
    max_manifest_bytes: int = 8 * 1024 * 1024
    max_signature_bytes: int = 64 * 1024
    max_path_chars: int = 512
    max_path_depth: int = 12


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    python: str
    requires_python: str
    platforms: tuple[str, ...]
    source_date_epoch: int
    project_wheel: str
    files: tuple[FileEntry, ...]

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}


@dataclass(frozen=True)
class SignedStatement:
    name: str
    version: str
    tarball: str
    tarball_size: int
    tarball_sha256: str
    manifest_sha256: str
    key_id: str


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different copies of a duplicated key; refuse it (T-SUPPLY-2).
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def strict_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleRejected("bad_json", f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BundleRejected("bad_json", f"{what} must be a JSON object")
    return doc


_COMPONENT = re.compile(r"[A-Za-z0-9_+@=,~-][A-Za-z0-9._+@=,~-]{0,199}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_path(path: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """A bundle path is relative, '/'-separated, made of plain names, under a known top dir.

    Absolute paths, '..', '.', empty components, backslashes, NUL and control
    characters would let an entry land outside the extraction directory
    (T-SUPPLY-2 path traversal), so the allowed alphabet is explicit.
    """
    if not isinstance(path, str) or not path or len(path) > limits.max_path_chars:
        raise BundleRejected("bad_path", f"bad path {path!r}")
    parts = path.split("/")
    if len(parts) > limits.max_path_depth or any(p in ("", ".", "..") for p in parts):
        raise BundleRejected("bad_path", f"path {path!r} is not a plain relative path")
    if not all(_COMPONENT.fullmatch(p) for p in parts):
        raise BundleRejected("bad_path", f"path {path!r} has characters outside the allowed set")
    if path != MANIFEST_NAME and (len(parts) < 2 or parts[0] not in TOP_LEVEL_DIRS):
        raise BundleRejected("bad_path", f"path {path!r} is not under {', '.join(TOP_LEVEL_DIRS)}")
    return path


def build_manifest(*, name: str, version: str, python: str, requires_python: str,
                   platforms: list[str], source_date_epoch: int, project_wheel: str,
                   files: list[FileEntry]) -> bytes:
    doc = {
        "schema": MANIFEST_SCHEMA,
        "name": name,
        "version": version,
        "python": python,
        "requires_python": requires_python,
        "platforms": sorted(platforms),
        "source_date_epoch": source_date_epoch,
        "project_wheel": project_wheel,
        # Sorted so two builds from the same inputs give the same bytes.
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256}
                  for f in sorted(files, key=lambda f: f.path)],
    }
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"


def parse_manifest(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    if len(data) > limits.max_manifest_bytes:
        raise BundleRejected("manifest_too_large", "manifest.json is over the size limit")
    doc = strict_json(data, "manifest.json")
    expected = {"schema", "name", "version", "python", "requires_python", "platforms",
                "source_date_epoch", "project_wheel", "files"}
    if set(doc) != expected or doc["schema"] != MANIFEST_SCHEMA:
        raise BundleRejected("bad_manifest", f"manifest.json must have exactly the keys {sorted(expected)} "
                             f"and schema {MANIFEST_SCHEMA}")
    for key in ("name", "version", "python", "requires_python", "project_wheel"):
        if not isinstance(doc[key], str):
            raise BundleRejected("bad_manifest", f"manifest field {key} must be a string")
    if not _NAME.fullmatch(doc["name"]) or not _NAME.fullmatch(doc["version"]):
        raise BundleRejected("bad_manifest", "manifest name or version has unexpected characters")
    raw_files = doc["files"]
    if not isinstance(raw_files, list) or len(raw_files) > limits.max_files:
        raise BundleRejected("bad_manifest", "manifest files must be a list within the file-count limit")
    files: list[FileEntry] = []
    seen: set[str] = set()
    total = 0
    for item in raw_files:
        if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
            raise BundleRejected("bad_manifest", f"bad file entry {item!r}")
        path = check_path(item["path"], limits)
        size, digest = item["size"], item["sha256"]
        if path == MANIFEST_NAME or path in seen:
            raise BundleRejected("bad_manifest", f"manifest lists {path} twice or lists itself")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= limits.max_file_bytes:
            raise BundleRejected("file_too_large", f"{path}: size {size!r} is outside the per-file limit")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise BundleRejected("bad_manifest", f"{path}: sha256 must be 64 lowercase hex")
        total += size
        if total > limits.max_total_bytes:
            raise BundleRejected("bundle_too_large", "files add up to more than the total size limit")
        seen.add(path)
        files.append(FileEntry(path, size, digest))
    if doc["project_wheel"] not in seen:
        raise BundleRejected("bad_manifest", "the project wheel is not in the file list")
    platforms = doc["platforms"]
    if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
        raise BundleRejected("bad_manifest", "platforms must be a list of strings")
    epoch = doc["source_date_epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise BundleRejected("bad_manifest", "source_date_epoch must be an integer")
    return Manifest(doc["name"], doc["version"], doc["python"], doc["requires_python"], tuple(platforms),
                    epoch, doc["project_wheel"], tuple(files))


def sign_statement(statement: Mapping[str, Any], seed: bytes, key_id: str) -> bytes:
    """The ``.sig`` file (vendor side)."""
    signature = ed25519.sign(seed, canonical_json(statement))
    doc = {"schema": SIGNATURE_SCHEMA, "key_id": key_id, "signed": dict(statement),
           "signature": base64.b64encode(signature).decode("ascii")}
    return json.dumps(doc, sort_keys=True, indent=1).encode("utf-8") + b"\n"


def verify_statement(data: bytes, trusted: Mapping[str, bytes],
                     limits: Limits = DEFAULT_LIMITS) -> SignedStatement:
    """Check the detached signature; return what it vouches for (T-SUPPLY-2)."""
    if len(data) > limits.max_signature_bytes:
        raise BundleRejected("bad_signature", "signature file is over the size limit")
    doc = strict_json(data, "signature file")
    if set(doc) != {"schema", "key_id", "signed", "signature"} or doc["schema"] != SIGNATURE_SCHEMA:
        raise BundleRejected("bad_signature", "signature file has the wrong shape or schema")
    key_id = doc["key_id"]
    if not isinstance(key_id, str) or key_id not in trusted:
        # An unknown key is a refusal, never a prompt: the trust root decides (T-SUPPLY-2).
        raise BundleRejected("unknown_key", f"bundle is signed by key {key_id!r}, not a trusted release key")
    signed = doc["signed"]
    fields = {"name", "version", "tarball", "tarball_size", "tarball_sha256", "manifest_sha256"}
    if not isinstance(signed, dict) or set(signed) != fields:
        raise BundleRejected("bad_signature", "signed statement has the wrong fields")
    try:
        signature = base64.b64decode(str(doc["signature"]), validate=True)
    except ValueError:
        raise BundleRejected("bad_signature", "signature is not base64") from None
    if not ed25519.verify(trusted[key_id], canonical_json(signed), signature):
        raise BundleRejected("bad_signature", "Ed25519 signature does not verify")
    size = signed["tarball_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BundleRejected("bad_signature", "tarball_size must be a non-negative integer")
    for key in ("tarball_sha256", "manifest_sha256"):
        if not isinstance(signed[key], str) or not _HEX64.fullmatch(signed[key]):
            raise BundleRejected("bad_signature", f"{key} must be 64 lowercase hex")
    return SignedStatement(str(signed["name"]), str(signed["version"]), str(signed["tarball"]), size,
                           signed["tarball_sha256"], signed["manifest_sha256"], key_id)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
