"""Verify a bundle and extract it, confined (threat T-SUPPLY-2).

Order matters and is the whole point:

1. Copy the tarball into a private directory, hashing as we go, so the bytes
   we verify are the bytes we later read (a USB stick can change under us).
2. Check the detached signature with the stdlib verifier, then compare the
   copy's size and sha256 with what the signature vouches for. Only now is a
   tar header parsed.
3. Walk the tar member by member: ``manifest.json`` first and bound to the
   signature; then only regular files, only plain relative paths, only paths
   the manifest lists, each once, each with the listed size and sha256,
   within the per-file and total limits; nothing the manifest lists missing.

Nothing here calls ``extractall``: each file is written with
``O_CREAT|O_EXCL|O_NOFOLLOW`` under a directory this code just created.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from installer.errors import BundleRejected, InstallError
from installer.manifest import (
    DEFAULT_LIMITS,
    MANIFEST_NAME,
    Limits,
    Manifest,
    SignedStatement,
    check_path,
    parse_manifest,
    verify_statement,
)

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    statement: SignedStatement
    tree: Path | None  # extracted files, or None when only verifying


def locate(bundle: Path) -> tuple[Path, Path]:
    """BUNDLE is the .tar (signature beside it as .tar.sig) or a directory holding one pair."""
    if bundle.is_dir():
        tars = sorted(p for p in bundle.glob("*.tar") if p.is_file())
        if len(tars) != 1:
            raise InstallError("no_bundle", f"{bundle} must hold exactly one .tar bundle, found {len(tars)}")
        bundle = tars[0]
    sig = bundle.with_name(bundle.name + ".sig")
    if not bundle.is_file():
        raise InstallError("no_bundle", f"no bundle at {bundle}")
    if not sig.is_file():
        # A bundle without its signature is refused, not installed "unverified" (T-SUPPLY-2).
        raise BundleRejected("missing_signature", f"no detached signature {sig.name} beside the bundle")
    return bundle, sig


def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleRejected("too_large", f"{path.name} is over the size limit")
    return data


def stage_copy(src: Path, dest: Path, limit: int) -> tuple[int, str]:
    """Private copy of the tarball with its size and sha256 (closes the TOCTOU window)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise BundleRejected("bundle_too_large", "bundle tarball is over the total size limit")
            digest.update(chunk)
            fout.write(chunk)
    return size, digest.hexdigest()


def _member_guard(member: tarfile.TarInfo, listed: Mapping[str, int], seen: set[str],
                  limits: Limits) -> str:
    # Only plain regular files: symlinks, hard links, devices, FIFOs, directories
    # and sparse/contiguous entries are all refused (T-SUPPLY-2).
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = ("symlink" if member.issym() else "hard link" if member.islnk() else
                "device" if member.isdev() else "directory" if member.isdir() else f"type {member.type!r}")
        raise BundleRejected("bad_entry_type", f"tar entry {member.name!r} is a {kind}; only regular files allowed")
    name = check_path(member.name, limits)
    if name == MANIFEST_NAME or name not in listed:
        raise BundleRejected("unlisted_file", f"tar entry {name!r} is not in the manifest")
    if name in seen:
        raise BundleRejected("duplicate_entry", f"tar entry {name!r} appears twice")
    if member.size != listed[name] or member.size > limits.max_file_bytes:
        raise BundleRejected("size_mismatch", f"{name}: tar says {member.size} bytes, manifest says {listed[name]}")
    return name


def _open_new(tree: Path, rel: str) -> int:
    parent = tree
    for part in rel.split("/")[:-1]:
        parent = parent / part
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            pass
        if parent.is_symlink() or not parent.is_dir():  # cannot happen with our own names; belt and braces
            raise BundleRejected("bad_path", f"{rel}: parent is not a plain directory")
    return os.open(tree / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def verify_bundle(bundle: Path, trusted: Mapping[str, bytes], workdir: Path, *, extract: bool,
                  limits: Limits = DEFAULT_LIMITS) -> VerifiedBundle:
    """Verify every byte; extract into ``workdir/tree`` when asked. Raises BundleRejected."""
    tar_path, sig_path = locate(bundle)
    statement = verify_statement(_read_bounded(sig_path, limits.max_signature_bytes), trusted, limits)
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = workdir / "bundle.tar"
    if staged.exists():
        staged.unlink()  # a leftover from an interrupted run is re-copied, never trusted
    size, digest = stage_copy(tar_path, staged, limits.max_total_bytes + limits.max_manifest_bytes
                              + 1024 * (limits.max_files + 16))
    if size != statement.tarball_size or digest != statement.tarball_sha256:
        raise BundleRejected("tarball_mismatch", "bundle tarball does not match its signature "
                             f"(sha256 {digest[:16]}…, signed {statement.tarball_sha256[:16]}…)")
    tree = workdir / "tree" if extract else None
    if tree is not None and tree.exists():
        shutil.rmtree(tree)
    try:
        manifest = _walk(staged, statement, tree, limits)
    except BaseException:
        if tree is not None:
            shutil.rmtree(tree, ignore_errors=True)
        raise
    finally:
        staged.unlink(missing_ok=True)
    return VerifiedBundle(manifest, statement, tree)


def _walk(staged: Path, statement: SignedStatement, tree: Path | None, limits: Limits) -> Manifest:
    if tree is not None:
        tree.mkdir(mode=0o700)
    try:
        tf = tarfile.open(staged, mode="r:")
    except tarfile.TarError as exc:
        raise BundleRejected("bad_tar", f"not a plain tar archive: {exc}") from None
    with tf:
        try:
            first = tf.next()
            if first is None or first.name != MANIFEST_NAME or first.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise BundleRejected("bad_manifest", "manifest.json must be the first entry, a regular file")
            if first.size > limits.max_manifest_bytes:
                raise BundleRejected("manifest_too_large", "manifest.json is over the size limit")
            fobj = tf.extractfile(first)
            assert fobj is not None
            data = fobj.read()
            if hashlib.sha256(data).hexdigest() != statement.manifest_sha256:
                raise BundleRejected("manifest_mismatch", "manifest.json does not match its signature")
            manifest = parse_manifest(data, limits)
            if (manifest.name, manifest.version) != (statement.name, statement.version):
                raise BundleRejected("manifest_mismatch", "manifest name/version differ from the signed ones")
            if tree is not None:
                fd = _open_new(tree, MANIFEST_NAME)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
            listed = {f.path: f.size for f in manifest.files}
            expected = manifest.by_path()
            seen: set[str] = set()
            count = 1
            while (member := tf.next()) is not None:
                count += 1
                if count > limits.max_files + 1:
                    raise BundleRejected("too_many_files", "more tar entries than the file-count limit")
                name = _member_guard(member, listed, seen, limits)
                seen.add(name)
                _copy_member(tf, member, name, expected[name].sha256, tree)
        except tarfile.TarError as exc:
            raise BundleRejected("bad_tar", f"corrupt tar archive: {exc}") from None
    missing = sorted(set(listed) - seen)
    if missing:
        raise BundleRejected("missing_file", f"{len(missing)} listed file(s) missing, e.g. {missing[0]}")
    return manifest


def _copy_member(tf: tarfile.TarFile, member: tarfile.TarInfo, name: str, sha256: str, tree: Path | None) -> None:
    src = tf.extractfile(member)
    assert src is not None
    digest = hashlib.sha256()
    fd = _open_new(tree, name) if tree is not None else None
    out = os.fdopen(fd, "wb") if fd is not None else None
    try:
        remaining = member.size
        while remaining:
            chunk = src.read(min(CHUNK, remaining))
            if not chunk:
                raise BundleRejected("truncated", f"{name} is truncated")
            remaining -= len(chunk)
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if digest.hexdigest() != sha256:
        raise BundleRejected("hash_mismatch", f"{name}: sha256 does not match the manifest")
