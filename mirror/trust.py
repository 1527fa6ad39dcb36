"""Re-verify an installed registry state against the trust root (pure).

The importer runs the full python-tuf client workflow; this module is the
cheap re-check the Mirror makes whenever it loads a state from disk, so a file
edited on disk after the import (to drop a revocation, say) is not believed
(T-SUPPLY-1). Bytes in, values out: no file system, no clock.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from mirror.content import (
    REVOCATIONS_TARGET,
    BadRegistryContent,
    Revocations,
    Template,
    parse_revocations,
    template_from_target,
)


class UntrustedState(Exception):
    """The installed state does not chain to the trust root: fail closed."""


@dataclass(frozen=True)
class VerifiedState:
    root: Root
    timestamp: Timestamp | None
    snapshot: Snapshot | None
    targets: Targets | None

    def target_files(self) -> dict[str, TargetFile]:
        return dict(self.targets.targets) if self.targets else {}

    def templates(self) -> dict[str, Template]:
        out: dict[str, Template] = {}
        for name, info in self.target_files().items():
            t = template_from_target(name, info.length, info.hashes, info.unrecognized_fields.get("custom", {}) or {})
            if t is not None:
                out[name] = t
        return out


def verify_root_chain(trusted_root: bytes, newer_roots: Sequence[bytes]) -> Root:
    """The newest root reachable from ``trusted_root`` through ``newer_roots``.

    Each step is what TUF's update_root checks: signed by a threshold of the
    previous root's keys (stops a root swapped in by someone without them) and
    of its own, with version exactly one more (stops rollback and skips).
    """
    try:
        md = Metadata[Root].from_bytes(trusted_root)
        if md.signed.type != Root.type:
            raise UntrustedState("the trust root is not root metadata")
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        current = md.signed
        for data in newer_roots:
            new = Metadata[Root].from_bytes(data)
            if new.signed.version <= md.signed.version:
                continue  # history older than the embedded root: already superseded
            if new.signed.version != current.version + 1:
                raise UntrustedState(f"root history jumps from v{current.version} to v{new.signed.version}")
            current.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            current = new.signed
    except (RepositoryError, ValueError, KeyError, TypeError) as exc:
        raise UntrustedState(f"root chain does not verify: {exc}") from exc
    return current


def verify_state(
    trusted_root: bytes,
    newer_roots: Sequence[bytes],
    timestamp: bytes | None,
    snapshot: bytes | None,
    targets: bytes | None,
) -> VerifiedState:
    """Roots chain to the trust root, and each top-level role is signed by the final root."""
    root = verify_root_chain(trusted_root, newer_roots)
    loaded: dict[str, object] = {}
    for role, data, cls in (
        (Timestamp.type, timestamp, Timestamp),
        (Snapshot.type, snapshot, Snapshot),
        (Targets.type, targets, Targets),
    ):
        if data is None:
            loaded[role] = None
            continue
        try:
            md = Metadata.from_bytes(data)
            if not isinstance(md.signed, cls):
                raise UntrustedState(f"{role}.json holds {md.signed.type} metadata")
            root.verify_delegate(role, md.signed_bytes, md.signatures)
        except (RepositoryError, ValueError, KeyError, TypeError) as exc:
            raise UntrustedState(f"{role}.json does not verify against root v{root.version}: {exc}") from exc
        loaded[role] = md.signed
    state = VerifiedState(
        root=root,
        timestamp=loaded[Timestamp.type],  # type: ignore[arg-type]
        snapshot=loaded[Snapshot.type],  # type: ignore[arg-type]
        targets=loaded[Targets.type],  # type: ignore[arg-type]
    )
    try:
        state.templates()
    except BadRegistryContent as exc:
        raise UntrustedState(str(exc)) from exc
    return state


def verify_revocations(info: TargetFile | None, data: bytes | None) -> Revocations:
    """The revocation list, checked against its signed length and hashes.

    No revocations target at all means nothing is revoked; a target whose
    bytes are missing or differ means the state is broken, not "nothing
    revoked" (fail closed, T-SUPPLY-1).
    """
    if info is None:
        return Revocations()
    if data is None:
        raise UntrustedState(f"{REVOCATIONS_TARGET} is signed but missing from the mirror")
    try:
        info.verify_length_and_hashes(data)
    except RepositoryError as exc:
        raise UntrustedState(f"{REVOCATIONS_TARGET} on disk differs from its signed hash") from exc
    try:
        return parse_revocations(data)
    except BadRegistryContent as exc:
        raise UntrustedState(str(exc)) from exc
