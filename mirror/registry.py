"""The local trust-registry mirror: on-disk layout, the state in force, enforcement hooks.

Layout under ``root_dir`` (SYNAPSE_ROOT/mirror)::

    generations/g-<stamp>-<rand>/metadata/   TUF metadata (client cache + served repository)
    generations/g-<stamp>-<rand>/targets/    <sha256>.<name> blobs
    generations/g-<stamp>-<rand>/state.json  when and from where it was imported, what changed
    current  -> generations/g-...            the one state in force, swapped by rename
    metadata -> current/metadata             stable paths for operators and backups
    targets  -> current/targets

A generation is never modified after it is renamed into place; an import
builds a new one beside it and swaps ``current`` with one atomic rename, so a
reader, or a crash, sees the old registry or the new one, never a mix
(T-SUPPLY-1).
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from tuf.api.metadata import Metadata, Root

from mirror.content import (
    REVOCATIONS_TARGET,
    Revocations,
    Template,
    days_until,
    expiry_state,
)
from mirror.trust import UntrustedState, VerifiedState, verify_revocations, verify_state

GENERATIONS = "generations"
CURRENT = "current"
LOCK = ".lock"
STATE_FILE = "state.json"
CLIENT_FILES = ("timestamp.json", "snapshot.json", "targets.json")


class MirrorError(Exception):
    """The local mirror itself is broken or busy (the appliance's side, not the update's)."""


class ImportBusy(MirrorError):
    pass


class RegistryStale(MirrorError):
    """The installed registry cannot vouch that its revocation list is current (T-LIC-3).

    ``registry_code`` is ``registry_missing`` (no update was ever imported)
    or ``registry_expired`` (its signed metadata has expired); the license
    check turns it into a refusal with that code.
    """

    def __init__(self, registry_code: str, message: str) -> None:
        super().__init__(message)
        self.registry_code = registry_code


def embedded_root() -> bytes:
    """The production TUF root shipped with the appliance (appliance/data/registry-root.json)."""
    return resources.files("appliance").joinpath("data", "registry-root.json").read_bytes()


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(top: Path) -> None:
    """Flush a freshly built generation before it can become current."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            p = Path(dirpath, name)
            if not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(dirpath), directory=True)


@dataclass(frozen=True)
class LoadedState:
    generation: str
    verified: VerifiedState
    revocations: Revocations
    templates: dict[str, Template]
    imported_at: str | None
    source: str | None
    changes: dict[str, Any] | None


class Mirror:
    """The registry in force. Cheap to ask on every request; safe across threads."""

    def __init__(self, root_dir: Path, trusted_root: bytes | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.root_dir = Path(root_dir)
        # Tests pass roots made with throw-away keys; production passes None.
        self.trusted_root = trusted_root if trusted_root is not None else embedded_root()
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._cache_key: tuple[Any, ...] | None = None
        self._cache: LoadedState | None = None
        self._cache_lock = threading.Lock()
        self.initialize()

    # -- layout -----------------------------------------------------------

    @property
    def generations_dir(self) -> Path:
        return self.root_dir / GENERATIONS

    @property
    def current_dir(self) -> Path:
        return self.root_dir / CURRENT

    def current_generation(self) -> str | None:
        try:
            target = os.readlink(self.current_dir)
        except FileNotFoundError:
            return None
        head, _, name = target.rpartition("/")
        if head != GENERATIONS or not name.startswith("g-"):
            raise MirrorError(f"{self.current_dir} points at {target!r}, not at a generation")
        return name

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time (imports, first start), across processes."""
        self.root_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ImportBusy("another mirror import is running") from None
            yield
        finally:
            os.close(fd)  # closing drops the lock, also when a killed process exits

    def new_workdir(self) -> Path:
        self.generations_dir.mkdir(parents=True, exist_ok=True)
        work = self.generations_dir / f".tmp-{secrets.token_hex(6)}"
        (work / "metadata").mkdir(parents=True)
        (work / "targets").mkdir()
        return work

    def install(self, work: Path, now: datetime) -> str:
        """Seal ``work`` as a generation and make it current (caller holds the lock)."""
        name = f"g-{now.astimezone(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
        fsync_tree(work)
        final = self.generations_dir / name
        os.rename(work, final)
        fsync_path(self.generations_dir, directory=True)
        try:
            self._activate(name)
        except BaseException:
            # The swap did not happen (or we cannot tell): if current does not
            # point at the new generation, the old registry stays in force.
            if self.current_generation() != name:
                shutil.rmtree(final, ignore_errors=True)
            raise
        self.collect_leftovers(keep={name})
        return name

    def _activate(self, name: str) -> None:
        link = self.root_dir / f".current-{secrets.token_hex(4)}"
        os.symlink(f"{GENERATIONS}/{name}", link)
        try:
            os.replace(link, self.current_dir)  # the one atomic step of an import
        except BaseException:
            link.unlink(missing_ok=True)
            raise
        fsync_path(self.root_dir, directory=True)

    def collect_leftovers(self, keep: set[str]) -> None:
        """Drop half-built work dirs and all but the current and one previous generation."""
        if not self.generations_dir.is_dir():
            return
        current = self.current_generation()
        gens = sorted(p.name for p in self.generations_dir.iterdir() if p.name.startswith("g-"))
        keep = set(keep) | ({current} if current else set())
        older = [g for g in gens if g not in keep]
        keep |= set(older[-1:])  # one previous state stays for an operator's inspection
        for p in self.generations_dir.iterdir():
            if p.name.startswith(".tmp-") or (p.name.startswith("g-") and p.name not in keep):
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root_dir.glob(".current-*"):
            p.unlink(missing_ok=True)

    def initialize(self) -> None:
        """First start: install a generation that holds only the trust root."""
        self.root_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metadata", "targets"):
            link = self.root_dir / name
            if not link.is_symlink() and not link.exists():
                os.symlink(f"{CURRENT}/{name}", link)
        if self.current_generation() is not None:
            return
        try:
            with self.lock():
                if self.current_generation() is not None:
                    return
                root = Metadata[Root].from_bytes(self.trusted_root).signed
                work = self.new_workdir()
                md = work / "metadata"
                (md / "root_history").mkdir()
                for p in (md / "root.json", md / f"{root.version}.root.json",
                          md / "root_history" / f"{root.version}.root.json"):
                    p.write_bytes(self.trusted_root)
                (work / STATE_FILE).write_text(json.dumps({"imported_at": None, "source": "embedded trust root"}))
                self.install(work, datetime.now(timezone.utc))
        except ImportBusy:
            pass  # another process is initialising or importing right now

    # -- reading the state in force ----------------------------------------

    def _key(self) -> tuple[Any, ...]:
        gen = self.current_generation()
        stats: list[Any] = [gen]
        for name in CLIENT_FILES:
            try:
                st = os.stat(self.current_dir / "metadata" / name)
                stats.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stats.append(None)
        return tuple(stats)

    def state(self) -> LoadedState:
        """The verified state in force, re-read only when the generation or its files change."""
        key = self._key()
        with self._cache_lock:
            if self._cache is not None and self._cache_key == key:
                return self._cache
            loaded = self._load(key[0])
            self._cache, self._cache_key = loaded, key
            return loaded

    def _load(self, generation: str | None) -> LoadedState:
        if generation is None:
            raise MirrorError(f"{self.root_dir} has no registry installed")
        return self.load_dir(self.generations_dir / generation, generation)

    def load_dir(self, gen: Path, generation: str) -> LoadedState:
        md = gen / "metadata"
        hist = md / "root_history"
        versions = sorted(int(p.name.split(".")[0]) for p in hist.glob("*.root.json") if p.name.split(".")[0].isdigit())
        roots = [(hist / f"{v}.root.json").read_bytes() for v in versions]

        def opt(name: str) -> bytes | None:
            p = md / name
            return p.read_bytes() if p.is_file() else None

        # T-SUPPLY-1: re-verify on load, so what the hooks answer always
        # chains to the trust root, even if files were edited on disk.
        verified = verify_state(self.trusted_root, roots, opt("timestamp.json"), opt("snapshot.json"), opt("targets.json"))
        info = verified.target_files().get(REVOCATIONS_TARGET)
        data = None
        if info is not None:
            blob = gen / "targets" / f"{info.hashes['sha256']}.{REVOCATIONS_TARGET}" if "sha256" in info.hashes else None
            data = blob.read_bytes() if blob is not None and blob.is_file() else None
        revocations = verify_revocations(info, data)
        meta: dict[str, Any] = {}
        try:
            meta = json.loads((gen / STATE_FILE).read_text())
        except (OSError, ValueError):
            pass
        return LoadedState(generation, verified, revocations, verified.templates(),
                           meta.get("imported_at"), meta.get("source"), meta.get("changes"))

    # -- enforcement hooks -------------------------------------------------
    # They raise (MirrorError / UntrustedState) rather than answer "not
    # revoked" when the state cannot be verified: callers fail closed.

    def trusted_template_hashes(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for t in self.state().templates.values():
            out.setdefault(t.template, set()).add(t.sha256)
        return out

    def current_revocations(self) -> Revocations:
        """The revocation list, only while the signed state is fresh (T-LIC-3).

        Templates keep working from an expired state (an air-gapped node must
        not lose its runtimes because an update is late), but a revocation
        list nobody has refreshed cannot say a license is still good: not
        importing updates must not be a way around a revocation. So license
        lookups raise ``RegistryStale`` when no update was ever imported, or
        when any top-level role (root, timestamp, snapshot, targets) has
        expired; the license check then refuses to honour the license.
        """
        s = self.state()
        v = s.verified
        if v.timestamp is None or v.snapshot is None or v.targets is None:
            raise RegistryStale("registry_missing",
                                "No trust registry update has been imported yet (only the trust root is installed), "
                                "so license revocations are unknown.")
        roles: dict[str, Any] = {"root": v.root, "timestamp": v.timestamp, "snapshot": v.snapshot, "targets": v.targets}
        role = min(roles, key=lambda r: roles[r].expires)
        expires = roles[role].expires
        if self._clock() >= expires:
            raise RegistryStale("registry_expired",
                                f"The trust registry's {role} metadata expired at {_iso(expires)}, "
                                "so its revocation list may be out of date.")
        return s.revocations

    def is_license_revoked(self, license_id: str) -> bool:
        return license_id in self.current_revocations().licenses

    def is_key_revoked(self, key_id: str) -> bool:
        return key_id in self.current_revocations().keys

    def template_blob(self, target: str) -> Path | None:
        """Path of a trusted template blob in the state in force (content-addressed)."""
        t = self.state().templates.get(target)
        if t is None:
            return None
        p = self.current_dir / "targets" / f"{t.sha256}.{t.target}"
        return p if p.is_file() else None

    # -- operator view -----------------------------------------------------

    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """The figures of `cell mirror status` and GET /v1/status."""
        now = now or self._clock()
        try:
            s = self.state()
        except (MirrorError, UntrustedState, OSError) as exc:
            return {"ok": False, "error": str(exc)}
        v = s.verified
        roles: dict[str, Any] = {"root": v.root, "timestamp": v.timestamp, "snapshot": v.snapshot, "targets": v.targets}
        expiries = {r: m.expires for r, m in roles.items() if m is not None}
        first_role = min(expiries, key=lambda r: expiries[r])
        expires = expiries[first_role]
        state = expiry_state(expires, now)
        warnings = []
        if v.targets is None:
            warnings.append("no registry update imported yet: only the trust root is installed")
        if state != "ok":
            warnings.append(f"{first_role} metadata {'expired' if state == 'expired' else 'expires'} "
                            f"on {expires:%Y-%m-%d}: import a registry update")
        return {
            "ok": True,
            "generation": s.generation,
            "root_version": v.root.version,
            "root_expires": _iso(v.root.expires),
            "timestamp_version": v.timestamp.version if v.timestamp else None,
            "snapshot_version": v.snapshot.version if v.snapshot else None,
            "targets_version": v.targets.version if v.targets else None,
            "targets_expires": _iso(v.targets.expires) if v.targets else None,
            "expires": _iso(expires),
            "expires_role": first_role,
            "days_until_expiry": round(days_until(expires, now), 1),
            "expiry_state": state,
            "last_import": s.imported_at,
            "last_source": s.source,
            "last_changes": s.changes,
            "templates": [
                {"name": t.template, "target": t.target, "version": t.version, "abi": t.abi,
                 "sha256": t.sha256, "size": t.length}
                for t in sorted(s.templates.values(), key=lambda t: (t.template, t.target))
            ],
            "revoked_licenses": sorted(s.revocations.licenses),
            "revoked_keys": sorted(s.revocations.keys),
            "warnings": warnings,
        }

    # -- updates (see mirror.importer) -------------------------------------

    def import_path(self, path: Path, now: datetime | None = None) -> Any:
        from mirror.importer import import_path  # cycle: mirror.importer imports this module

        return import_path(self, path, now=now)

    def sync(self, url: str, now: datetime | None = None) -> Any:
        from mirror.importer import sync_from_peer  # cycle: mirror.importer imports this module

        return sync_from_peer(self, url, now=now)


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
