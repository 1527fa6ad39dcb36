"""Import a registry update (USB bundle, tarball, LAN peer) with python-tuf's client workflow.

python-tuf's ngclient ``Updater`` makes every check of the TUF spec (root
chain and rotation, rollback of every role, freeze via expiry, signatures and
thresholds, snapshot/targets consistency, target length and hashes). This
module only decides where bytes come from, keeps all writes in a fresh
generation directory, and swaps it in atomically when everything verified
(T-SUPPLY-1).
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from mirror.checks import TarMember, UnsafePath, bundle_relative_name, check_tar_members, check_target_name
from mirror.content import REVOCATIONS_TARGET, BadRegistryContent, Changes, diff
from mirror.fetcher import BundleFetcher, FetchLimits, PeerFetcher
from mirror.registry import CLIENT_FILES, STATE_FILE, LoadedState, Mirror
from mirror.trust import UntrustedState


@dataclass(frozen=True)
class ImportLimits:
    """Every ceiling of an import in one place (python-tuf's own are in UpdaterConfig)."""

    max_file_bytes: int = 512 * 1024 * 1024
    max_tar_members: int = 10_000
    max_tar_bytes: int = 4 * 1024 * 1024 * 1024
    max_targets: int = 1_000


class ImportRefused(Exception):
    """The update is at fault (stale, rolled back, tampered, wrongly signed, unsafe): nothing changed."""


@dataclass(frozen=True)
class ImportReport:
    applied: bool
    source: str
    generation: str | None
    root_version: int
    targets_version: int | None
    changes: Changes = field(default_factory=Changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "source": self.source,
            "generation": self.generation,
            "root_version": self.root_version,
            "targets_version": self.targets_version,
            "changes": self.changes.as_dict(),
        }


def _updater_config() -> UpdaterConfig:
    # Metadata ceilings well above a real registry, far below a memory bomb.
    return UpdaterConfig(
        max_root_rotations=64,
        max_delegations=1,
        root_max_length=512 * 1024,
        timestamp_max_length=64 * 1024,
        snapshot_max_length=4 * 1024 * 1024,
        targets_max_length=16 * 1024 * 1024,
    )


def _seed_cache(old_gen: Path, md: Path) -> None:
    """Start from the metadata in force, so rollback checks compare against it."""
    old_md = old_gen / "metadata"
    (md / "root_history").mkdir(exist_ok=True)
    for p in (old_md / "root_history").glob("*.root.json"):
        shutil.copyfile(p, md / "root_history" / p.name)
    for name in CLIENT_FILES:
        if (old_md / name).is_file():
            shutil.copyfile(old_md / name, md / name)


def _same_bytes(a: Path, b: Path, name: str) -> bool:
    pa, pb = a / name, b / name
    return pa.is_file() and pb.is_file() and pa.read_bytes() == pb.read_bytes()


def _place_target(updater: Updater, info: TargetFile, old_gen: Path, new_targets: Path) -> None:
    """Reuse an unchanged blob from the old generation, else download and verify it."""
    sha = info.hashes.get("sha256")
    if sha is None:
        raise BadRegistryContent(f"target {info.path!r} has no sha256 hash")
    dest = new_targets / f"{sha}.{info.path}"
    old = old_gen / "targets" / dest.name
    if old.is_file():
        try:
            with open(old, "rb") as f:
                info.verify_length_and_hashes(f)  # never trust the old copy blindly
            os.link(old, dest)
        except (tuf_exc.LengthOrHashMismatchError, OSError):
            dest.unlink(missing_ok=True)
    if not dest.exists():
        # python-tuf checks signed length and every signed hash (T-SUPPLY-1).
        updater.download_target(info, filepath=str(dest))
    os.link(dest, new_targets / info.path)  # plain name too, for non-consistent-snapshot peers


def _serve_layout(md: Path) -> tuple[int, int | None]:
    """Add the repository names peers fetch (N.root.json, V.snapshot.json, V.targets.json)."""
    hist = md / "root_history"
    versions = sorted(int(p.name.split(".")[0]) for p in hist.glob("*.root.json"))
    for v in versions:
        os.link(hist / f"{v}.root.json", md / f"{v}.root.json")
    # python-tuf leaves root.json as a symlink; the served tree holds no links.
    (md / "root.json").unlink(missing_ok=True)
    shutil.copyfile(hist / f"{versions[-1]}.root.json", md / "root.json")
    targets_version = None
    for role in ("snapshot", "targets"):
        p = md / f"{role}.json"
        if p.is_file():
            v = Metadata.from_bytes(p.read_bytes()).signed.version
            os.link(p, md / f"{v}.{role}.json")
            if role == "targets":
                targets_version = v
    return versions[-1], targets_version


def run_import(mirror: Mirror, fetcher: FetcherInterface, source: str, *,
               now: datetime | None = None, limits: ImportLimits | None = None) -> ImportReport:
    """The whole import; either a new generation is in force afterwards or nothing changed."""
    now = now or datetime.now(timezone.utc)
    limits = limits or ImportLimits()
    with mirror.lock():
        mirror.collect_leftovers(keep=set())  # leftovers of an import that was killed
        old: LoadedState = mirror.state()
        old_gen = mirror.generations_dir / old.generation
        work = mirror.new_workdir()
        try:
            report = _build(mirror, fetcher, source, old, old_gen, work, now, limits)
            if not report.applied:
                shutil.rmtree(work, ignore_errors=True)
                return report
            name = mirror.install(work, now)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return ImportReport(True, source, name, report.root_version, report.targets_version, report.changes)


def _build(mirror: Mirror, fetcher: FetcherInterface, source: str, old: LoadedState, old_gen: Path,
           work: Path, now: datetime, limits: ImportLimits) -> ImportReport:
    md, targets_dir = work / "metadata", work / "targets"
    _seed_cache(old_gen, md)
    try:
        # T-SUPPLY-1: bootstrap is always the embedded (or injected) trust
        # root, so the cached history must chain to it again on every import.
        updater = Updater(
            metadata_dir=str(md),
            metadata_base_url=fetcher.metadata_url,  # type: ignore[attr-defined]
            target_dir=str(targets_dir),
            target_base_url=fetcher.targets_url,  # type: ignore[attr-defined]
            fetcher=fetcher,
            config=_updater_config(),
            bootstrap=mirror.trusted_root,
        )
        updater.refresh()
        # An equal timestamp version is discarded by python-tuf: nothing new.
        unchanged = _same_bytes(md, old_gen / "metadata", "timestamp.json") and sorted(
            os.listdir(md / "root_history")) == sorted(os.listdir(old_gen / "metadata" / "root_history"))
        targets_md = Metadata.from_bytes((md / "targets.json").read_bytes())
        names = sorted(targets_md.signed.targets)  # type: ignore[attr-defined]
        if len(names) > limits.max_targets:
            raise BadRegistryContent(f"the update lists {len(names)} targets, more than {limits.max_targets}")
        for name in names:
            check_target_name(name)  # a signed name still must not become a path (T-SUPPLY-1)
            info = updater.get_targetinfo(name)
            if info is None:
                raise BadRegistryContent(f"target {name!r} vanished during the update")
            _place_target(updater, info, old_gen, targets_dir)
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
        raise ImportRefused(f"{type(exc).__name__}: {exc}") from exc
    except (BadRegistryContent, UnsafePath) as exc:
        raise ImportRefused(str(exc)) from exc

    root_version, targets_version = _serve_layout(md)
    # Re-read the new state exactly as the Mirror will, before it goes live.
    probe = _probe(mirror, work)
    changes = diff(old.templates, probe.templates, old.revocations, probe.revocations)
    if unchanged:
        return ImportReport(False, source, None, root_version, targets_version, changes)
    (work / STATE_FILE).write_text(json.dumps(
        {"imported_at": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "source": source, "changes": changes.as_dict()}, indent=1))
    return ImportReport(True, source, None, root_version, targets_version, changes)


def _probe(mirror: Mirror, work: Path) -> LoadedState:
    try:
        return mirror.load_dir(work, work.name)
    except UntrustedState as exc:
        raise ImportRefused(str(exc)) from exc


def import_path(mirror: Mirror, path: Path, *, now: datetime | None = None,
                limits: ImportLimits | None = None) -> ImportReport:
    """``cell mirror import PATH``: a bundle directory or a tarball of one."""
    limits = limits or ImportLimits()
    path = Path(path)
    if path.is_dir():
        return run_import(mirror, BundleFetcher(path, FetchLimits(max_file_bytes=limits.max_file_bytes)),
                          f"bundle {path}", now=now, limits=limits)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="cell-mirror-") as tmp:
            unpack_tarball(path, Path(tmp), limits)
            return run_import(mirror, BundleFetcher(Path(tmp), FetchLimits(max_file_bytes=limits.max_file_bytes)),
                              f"tarball {path}", now=now, limits=limits)
    raise ImportRefused(f"{path} is neither a bundle directory nor a tarball")


def unpack_tarball(path: Path, dest: Path, limits: ImportLimits) -> None:
    """Unpack a bundle tarball after checking every member; refuse it whole if one is unsafe.

    T-SUPPLY-1: members are vetted before anything is written ('..',
    absolute names, links and devices refused), then written by this code
    (never tarfile.extract) into a fresh private directory.
    """
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ImportRefused(f"{path} is not a readable tarball: {exc}") from None
    with tar:
        members = tar.getmembers()
        kinds = [TarMember(m.name, "file" if m.isreg() else "dir" if m.isdir() else _kind(m), m.size) for m in members]
        try:
            check_tar_members(kinds, max_members=limits.max_tar_members, max_total=limits.max_tar_bytes,
                              max_file=limits.max_file_bytes)
        except UnsafePath as exc:
            raise ImportRefused(str(exc)) from None
        for m in members:
            rel = bundle_relative_name(m.name)
            if not rel:
                continue
            target = dest.joinpath(*rel.split("/"))
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:
                raise ImportRefused(f"tarball member {m.name!r} cannot be read")
            with src, open(target, "xb") as out:  # 'x': a duplicate member cannot overwrite
                shutil.copyfileobj(src, out)


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.ischr() or m.isblk():
        return "device"
    if m.isfifo():
        return "fifo"
    return "special"


def sync_from_peer(mirror: Mirror, url: str, *, now: datetime | None = None,
                   limits: ImportLimits | None = None) -> ImportReport:
    """``cell mirror sync URL``: the same import, fetching from one operator-named peer."""
    limits = limits or ImportLimits()
    fetcher = PeerFetcher(url, FetchLimits(max_file_bytes=limits.max_file_bytes))
    return run_import(mirror, fetcher, f"peer {fetcher.base_url}", now=now, limits=limits)
