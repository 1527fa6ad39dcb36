"""Vendor side: build a signed registry update (a TUF repository) from templates and a revocation list.

Runs on the vendor's signing machine, never on an appliance. Private keys are
read from files given on the command line (64 hex characters: the Ed25519
seed, the same format as license signing keys) and are never committed.

    python -m mirror.vendor keygen KEYFILE
    python -m mirror.vendor init REPO --key root=F --key timestamp=F --key snapshot=F --key targets=F
    python -m mirror.vendor publish REPO --templates DIR [--revocations FILE] --key timestamp=F ...
    python -m mirror.vendor rotate-root REPO --new-key root=F ... --sign-with F --sign-with F
    python -m mirror.vendor pack REPO OUT.tar.gz

A templates DIR holds the blobs and a ``manifest.json``:
``{"python3.wasm": {"template": "python3", "version": "3.12.0", "abi": "wasi-p1"}}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import MetaFile, Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from mirror.checks import check_target_name
from mirror.content import REVOCATIONS_TARGET, encode_revocations

ROLES = ("root", "timestamp", "snapshot", "targets")
DEFAULT_LIFETIMES = {
    "root": timedelta(days=365 * 3),
    "targets": timedelta(days=180),
    "snapshot": timedelta(days=180),
    # Air-gapped customers import by hand: a month between updates at least.
    "timestamp": timedelta(days=60),
}


def signer_from_seed(seed: bytes) -> CryptoSigner:
    return CryptoSigner(Ed25519PrivateKey.from_private_bytes(seed))


def load_signer(path: Path) -> CryptoSigner:
    text = Path(path).read_text().strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ValueError(f"{path}: a key file holds 64 hexadecimal characters (an Ed25519 seed)")
    return signer_from_seed(seed)


def generate_key_file(path: Path) -> str:
    """A new private key file (mode 0600, never overwrites); returns the TUF key id."""
    seed = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(seed.hex() + "\n")
    return signer_from_seed(seed).public_key.keyid


@dataclass(frozen=True)
class TemplateBlob:
    path: Path
    template: str
    version: str = ""
    abi: str = ""
    name: str | None = None  # target name; default the file name

    @property
    def target(self) -> str:
        return check_target_name(self.name or self.path.name)


def read_templates_folder(folder: Path) -> list[TemplateBlob]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [TemplateBlob(folder / check_target_name(name), str(spec["template"]), str(spec.get("version", "")),
                         str(spec.get("abi", ""))) for name, spec in sorted(manifest.items())]


def _as_list(value: Signer | Sequence[Signer]) -> list[Signer]:
    return [value] if isinstance(value, Signer) else list(value)


class VendorRepo:
    """A TUF repository on disk laid out as the appliance imports it: metadata/ and targets/."""

    def __init__(self, repo_dir: Path) -> None:
        self.dir = Path(repo_dir)
        self.metadata = self.dir / "metadata"
        self.targets = self.dir / "targets"

    def _write(self, md: Metadata[Any], *names: str) -> bytes:
        data = md.to_bytes(JSONSerializer(compact=False))
        self.metadata.mkdir(parents=True, exist_ok=True)
        for name in names:
            (self.metadata / name).write_bytes(data)
        return data

    def _load(self, name: str) -> Metadata[Any] | None:
        p = self.metadata / name
        return Metadata.from_bytes(p.read_bytes()) if p.is_file() else None

    def root(self) -> Root:
        md = self._load("root.json")
        if md is None:
            raise FileNotFoundError(f"{self.metadata}/root.json: run init first")
        assert isinstance(md.signed, Root)
        return md.signed

    def root_bytes(self, version: int | None = None) -> bytes:
        name = "root.json" if version is None else f"{version}.root.json"
        return (self.metadata / name).read_bytes()

    @classmethod
    def create(cls, repo_dir: Path, keys: Mapping[str, Signer | Sequence[Signer]], *,
               now: datetime | None = None, expires: datetime | None = None,
               thresholds: Mapping[str, int] | None = None, consistent_snapshot: bool = True) -> VendorRepo:
        """Root v1 naming the keys of every role, signed by the root keys."""
        now = now or datetime.now(timezone.utc)
        repo = cls(repo_dir)
        root = Root(expires=expires or now + DEFAULT_LIFETIMES["root"], consistent_snapshot=consistent_snapshot)
        for role in ROLES:
            for signer in _as_list(keys[role]):
                root.add_key(signer.public_key, role)
            root.roles[role].threshold = (thresholds or {}).get(role, 1)
        md = Metadata(root)
        for signer in _as_list(keys["root"]):
            md.sign(signer, append=True)
        repo._write(md, "1.root.json", "root.json")
        repo.targets.mkdir(parents=True, exist_ok=True)
        return repo

    def rotate_root(self, new_keys: Mapping[str, Signer | Sequence[Signer]], sign_with: Sequence[Signer], *,
                    now: datetime | None = None, expires: datetime | None = None) -> int:
        """Next root version with the given roles' keys replaced, signed by ``sign_with``.

        A client accepts it only if ``sign_with`` meets the threshold of both
        the old root and the new one; signing with fewer is how tests build
        the refused case.
        """
        now = now or datetime.now(timezone.utc)
        root = self.root()
        root.version += 1
        root.expires = expires or now + DEFAULT_LIFETIMES["root"]
        for role, signers in new_keys.items():
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            for signer in _as_list(signers):
                root.add_key(signer.public_key, role)
        md = Metadata(root)
        for signer in sign_with:
            md.sign(signer, append=True)
        self._write(md, f"{root.version}.root.json", "root.json")
        return root.version

    def publish(
        self,
        templates: Sequence[TemplateBlob],
        signers: Mapping[str, Signer | Sequence[Signer]],
        *,
        revoked_licenses: Sequence[str] = (),
        revoked_keys: Sequence[str] = (),
        now: datetime | None = None,
        expires: Mapping[str, datetime] | None = None,
        versions: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Write targets, snapshot and timestamp (each one version up unless ``versions`` says otherwise)."""
        now = now or datetime.now(timezone.utc)
        exp = {r: (expires or {}).get(r, now + DEFAULT_LIFETIMES[r]) for r in ROLES}
        consistent = bool(self.root().consistent_snapshot)
        blobs: list[tuple[str, bytes, dict[str, str]]] = [
            (t.target, t.path.read_bytes(), {"template": t.template, "version": t.version, "abi": t.abi})
            for t in templates
        ]
        blobs.append((REVOCATIONS_TARGET, encode_revocations(list(revoked_licenses), list(revoked_keys)), {}))
        self.targets.mkdir(parents=True, exist_ok=True)
        targets = Targets(version=self._next("targets", versions), expires=exp["targets"])
        for name, data, custom in blobs:
            sha = hashlib.sha256(data).hexdigest()
            fields = {"custom": custom} if custom else {}
            targets.targets[name] = TargetFile(len(data), {"sha256": sha}, name, fields)
            (self.targets / (f"{sha}.{name}" if consistent else name)).write_bytes(data)
        t_bytes = self._sign_write(targets, signers["targets"], consistent)
        snapshot = Snapshot(version=self._next("snapshot", versions), expires=exp["snapshot"])
        snapshot.meta["targets.json"] = _metafile(targets.version, t_bytes)
        s_bytes = self._sign_write(snapshot, signers["snapshot"], consistent)
        timestamp = Timestamp(version=self._next("timestamp", versions), expires=exp["timestamp"],
                              snapshot_meta=_metafile(snapshot.version, s_bytes))
        self._sign_write(timestamp, signers["timestamp"], False)
        return {"targets": targets.version, "snapshot": snapshot.version, "timestamp": timestamp.version}

    def _next(self, role: str, versions: Mapping[str, int] | None) -> int:
        if versions and role in versions:
            return versions[role]
        md = self._load(f"{role}.json")
        return md.signed.version + 1 if md is not None else 1

    def _sign_write(self, signed: Targets | Snapshot | Timestamp, signers: Signer | Sequence[Signer],
                    versioned: bool) -> bytes:
        md: Metadata[Any] = Metadata(signed)
        for signer in _as_list(signers):
            md.sign(signer, append=True)
        names = [f"{signed.type}.json"] + ([f"{signed.version}.{signed.type}.json"] if versioned else [])
        return self._write(md, *names)

    def pack(self, out: Path) -> Path:
        """A tarball of metadata/ and targets/ for removable media."""
        with tarfile.open(out, "w:gz") as tar:
            for sub in ("metadata", "targets"):
                tar.add(self.dir / sub, arcname=sub)
        return out


def _metafile(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _role_keys(pairs: Sequence[str]) -> dict[str, list[Signer]]:
    out: dict[str, list[Signer]] = {}
    for pair in pairs:
        role, sep, path = pair.partition("=")
        if not sep or role not in ROLES:
            raise SystemExit(f"--key wants ROLE=FILE with ROLE one of {', '.join(ROLES)}, got {pair!r}")
        out.setdefault(role, []).append(load_signer(Path(path)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mirror.vendor", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="write a new private key file (0600)")
    kg.add_argument("keyfile", type=Path)
    init = sub.add_parser("init", help="create root v1")
    init.add_argument("repo", type=Path)
    init.add_argument("--key", action="append", default=[], help="ROLE=KEYFILE, every role at least once")
    init.add_argument("--root-days", type=int, default=DEFAULT_LIFETIMES["root"].days)
    pub = sub.add_parser("publish", help="sign a new targets/snapshot/timestamp")
    pub.add_argument("repo", type=Path)
    pub.add_argument("--templates", type=Path, help="folder with blobs and manifest.json")
    pub.add_argument("--revocations", type=Path, help='JSON {"licenses": [...], "keys": [...]}')
    pub.add_argument("--key", action="append", default=[], help="ROLE=KEYFILE for targets, snapshot, timestamp")
    pub.add_argument("--timestamp-days", type=int, default=DEFAULT_LIFETIMES["timestamp"].days)
    rot = sub.add_parser("rotate-root", help="next root version with new keys")
    rot.add_argument("repo", type=Path)
    rot.add_argument("--new-key", action="append", default=[], help="ROLE=KEYFILE replacing that role's keys")
    rot.add_argument("--sign-with", action="append", default=[], type=Path, help="old and new root key files")
    pk = sub.add_parser("pack", help="tarball of the repository for a USB stick")
    pk.add_argument("repo", type=Path)
    pk.add_argument("out", type=Path)
    args = p.parse_args(argv)
    now = datetime.now(timezone.utc)
    if args.cmd == "keygen":
        print(generate_key_file(args.keyfile))
    elif args.cmd == "init":
        keys = _role_keys(args.key)
        missing = [r for r in ROLES if r not in keys]
        if missing:
            raise SystemExit(f"init needs a --key for {', '.join(missing)}")
        VendorRepo.create(args.repo, keys, now=now, expires=now + timedelta(days=args.root_days))
        print(f"{args.repo}: root v1 written")
    elif args.cmd == "publish":
        keys = _role_keys(args.key)
        templates = read_templates_folder(args.templates) if args.templates else []
        rev = json.loads(args.revocations.read_text()) if args.revocations else {}
        versions = VendorRepo(args.repo).publish(
            templates, keys, revoked_licenses=rev.get("licenses", []), revoked_keys=rev.get("keys", []), now=now,
            expires={"timestamp": now + timedelta(days=args.timestamp_days)})
        print(f"{args.repo}: published {versions}")
    elif args.cmd == "rotate-root":
        v = VendorRepo(args.repo).rotate_root(_role_keys(args.new_key), [load_signer(f) for f in args.sign_with], now=now)
        print(f"{args.repo}: root v{v} written")
    elif args.cmd == "pack":
        print(VendorRepo(args.repo).pack(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
