"""`cell license show | verify FILE | install FILE | issue ...`.

``register(subparsers)`` adds the commands; each sets ``func`` to a callable
taking the parsed arguments and returning the exit code. The dependencies
(settings, keys, clock, machine fingerprint, revocation predicate) are bound
at registration: the production CLI passes nothing and gets the embedded
vendor keys, the real clock and the node's trust registry (refusing with
``registry_missing``/``registry_expired`` like the service); tests pass their own. There is deliberately
no command-line flag for trusted keys, so an operator cannot talk the
appliance into trusting a key (T-LIC-1).

`show`, `verify` and `install` only read the clock high-water mark; they
never create or write the node database, which belongs to the service user.
`clock-reset` (run as the service user) re-signs a mark found tampered with.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO

from appliance.config import Settings, load_settings
from appliance.fileio import write_atomic as _write_atomic
from appliance.license.issue import DEFAULT_LIMITS, build_payload, issue_license, load_signing_key
from appliance.license.machine import machine_fingerprint
from appliance.license.manager import (
    ClockResetRefused,
    clock_tampered_reason,
    embedded_license_keys,
    read_clock_problem,
    read_high_water,
    reset_clock_mark,
    utc_now,
)
from appliance.license.verify import (
    MAX_FILE_BYTES,
    TIERS,
    License,
    LicenseRejected,
    decode_document,
    days_left,
    format_time,
    parse_license,
    parse_timestamp,
    verify_license,
    warnings_for,
)
from appliance.receipts.nodekey import NodeKey, NodeKeyError

LICENSE_FILE_MODE = 0o640


@dataclass
class _Deps:
    settings: Settings | None
    keys: dict[str, bytes] | None
    clock: Callable[[], datetime]
    machine_id: str | None
    revocations: Callable[[str], bool] | None
    out: TextIO | None
    registry_root: bytes | None = None  # None: the embedded registry trust root

    def get_settings(self, args: argparse.Namespace) -> Settings:
        return self.settings or getattr(args, "settings", None) or load_settings()

    def get_keys(self) -> dict[str, bytes]:
        return embedded_license_keys() if self.keys is None else self.keys

    def get_machine_id(self) -> str | None:
        return machine_fingerprint() if self.machine_id is None else self.machine_id

    def get_revocations(self, settings: Settings) -> tuple[Callable[[str], bool] | None, Callable[[str], bool] | None]:
        """(license lookup, key lookup). Tests inject theirs; otherwise the node's trust
        registry is asked, read-only, as the service does (T-LIC-3)."""
        if self.revocations is not None:
            return self.revocations, None
        return _registry_lookups(settings, self.clock, self.registry_root)

    def stream(self) -> TextIO:
        return self.out or sys.stdout


def register(
    subparsers: Any,
    *,
    settings: Settings | None = None,
    keys: dict[str, bytes] | None = None,
    clock: Callable[[], datetime] = utc_now,
    machine_id: str | None = None,
    revocations: Callable[[str], bool] | None = None,
    out: TextIO | None = None,
    registry_root: bytes | None = None,
) -> None:
    deps = _Deps(settings, keys, clock, machine_id, revocations, out, registry_root)
    parser = subparsers.add_parser("license", help="show, verify, install or issue a license")
    commands = parser.add_subparsers(dest="license_command", metavar="COMMAND", required=True)

    show = commands.add_parser("show", help="the installed license and this machine's fingerprint")
    show.set_defaults(func=lambda args: _show(args, deps))

    verify = commands.add_parser("verify", help="check a license file; exit 0 if this appliance would honour it")
    verify.add_argument("file", type=Path)
    verify.set_defaults(func=lambda args: _verify(args, deps))

    install = commands.add_parser("install", help="verify a license file, then install it (mode 0640)")
    install.add_argument("file", type=Path)
    install.set_defaults(func=lambda args: _install(args, deps))

    reset = commands.add_parser("clock-reset",
                                help="re-sign a clock high-water mark found tampered with, at the current clock")
    reset.set_defaults(func=lambda args: _clock_reset(args, deps))

    issue = commands.add_parser("issue", help="vendor side: sign a new license with a private key")
    issue.add_argument("--signing-key", type=Path, required=True, help="file with the 32-byte seed in hex")
    issue.add_argument("--key-id", required=True)
    issue.add_argument("--licensee", required=True)
    issue.add_argument("--tier", required=True, choices=TIERS)
    issue.add_argument("--features", default="", help="comma-separated, e.g. load_weights,host_mcp_call")
    issue.add_argument("--expires", required=True, help="RFC 3339 UTC, e.g. 2027-12-31T23:59:59Z")
    issue.add_argument("--not-before", help="RFC 3339 UTC; default: now")
    issue.add_argument("--license-id", help="default: lic-<uuid4>")
    issue.add_argument("--machine-id", help="the customer's fingerprint from `cell license show`")
    issue.add_argument("--rate-limit-rps", type=float, default=DEFAULT_LIMITS["rate_limit_rps"])
    issue.add_argument("--max-cells", type=int, default=DEFAULT_LIMITS["max_cells"])
    issue.add_argument("--max-memory-mb", type=int, default=DEFAULT_LIMITS["max_memory_mb"])
    issue.add_argument("--out", type=Path, required=True)
    issue.set_defaults(func=lambda args: _issue(args, deps))


def _read(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(MAX_FILE_BYTES + 1)  # the verifier refuses anything longer


def _registry_lookups(settings: Settings, clock: Callable[[], datetime],
                      registry_root: bytes | None) -> tuple[Callable[[str], bool], Callable[[str], bool]]:
    """The registry's revocation lookups, without creating anything: a node with no
    registry installed answers like a registry to which nothing was imported."""
    # layering: the mirror sits beside the core (see appliance/web/app.py), and the
    # console imports this module while loading the mirror only by name
    from mirror.registry import CURRENT, Mirror, RegistryStale

    if not os.path.lexists(settings.mirror_dir / CURRENT):
        def missing(_value: str) -> bool:
            raise RegistryStale("registry_missing", "No trust registry is installed yet, so license revocations are unknown.")

        return missing, missing
    mirror = Mirror(settings.mirror_dir, trusted_root=registry_root, clock=clock)
    return mirror.is_license_revoked, mirror.is_key_revoked


def _check(data: bytes, settings: Settings, deps: _Deps) -> License:
    is_revoked, is_key_revoked = deps.get_revocations(settings)
    try:
        problem = read_clock_problem(settings.db_path, settings.keys_dir)
    except (NodeKeyError, sqlite3.Error):
        problem = None  # not the service user: the service itself still checks the mark
    if problem is not None:
        # T-LIC-3: the service refuses every license while the clock mark is tampered with.
        raise LicenseRejected("clock_tampered", clock_tampered_reason(problem))
    return verify_license(
        data,
        keys=deps.get_keys(),
        now=deps.clock(),
        machine_id=deps.get_machine_id(),
        is_revoked=is_revoked,
        is_key_revoked=is_key_revoked,
        high_water=read_high_water(settings.db_path),
    )


def _print_fields(data: bytes, deps: _Deps, out: TextIO) -> None:
    """Every field of the file, marked unverified when the signature did not check out."""
    try:
        lic = parse_license(data, deps.get_keys())
    except LicenseRejected:
        lic = None
    if lic is not None:
        fields: dict[str, Any] = {
            **{k: lic.payload[k] for k in sorted(lic.payload)},
            "key_id": lic.key_id,
            "days_left": days_left(lic, deps.clock()),
        }
        print("fields (signature verified):", file=out)
    else:
        try:
            doc = decode_document(data)
        except LicenseRejected:
            return
        payload = doc["payload"]
        fields = {**{k: payload[k] for k in sorted(payload)}, "key_id": doc["key_id"]}
        print("fields (NOT verified; do not trust them):", file=out)
    for name, value in fields.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        print(f"  {name}: {shown}", file=out)


def _verdict(data: bytes | None, settings: Settings, deps: _Deps, out: TextIO) -> License | None:
    if data is None:
        return None
    try:
        lic = _check(data, settings, deps)
    except LicenseRejected as exc:
        print(f"verdict: REJECTED ({exc.code})", file=out)
        print(f"reason: {exc.reason}", file=out)
        _print_fields(data, deps, out)
        return None
    print(f"verdict: VALID ({lic.tier} tier)", file=out)
    for warning in warnings_for(lic, deps.clock()):
        print(f"warning: {warning}", file=out)
    _print_fields(data, deps, out)
    return lic


def _load(path: Path, out: TextIO) -> bytes | None:
    try:
        return _read(path)
    except OSError as exc:
        print(f"verdict: REJECTED (unreadable)\nreason: {path} cannot be read: {exc.strerror or exc}.", file=out)
        return None


def _show(args: argparse.Namespace, deps: _Deps) -> int:
    settings = deps.get_settings(args)
    out = deps.stream()
    print(f"license file: {settings.license_path}", file=out)
    print(f"machine fingerprint: {deps.get_machine_id() or 'none (no /etc/machine-id)'}", file=out)
    if not settings.license_path.exists():
        print("verdict: NO LICENSE (free tier)", file=out)
        return 0
    lic = _verdict(_load(settings.license_path, out), settings, deps, out)
    return 0 if lic is not None else 1


def _verify(args: argparse.Namespace, deps: _Deps) -> int:
    out = deps.stream()
    lic = _verdict(_load(args.file, out), deps.get_settings(args), deps, out)
    return 0 if lic is not None else 1


def write_atomic(path: Path, data: bytes, mode: int = LICENSE_FILE_MODE) -> None:
    """Write via a temp file in the same directory and rename, so the service
    never reads half a license (it would keep the old one, but say so)."""
    _write_atomic(path, data, mode, dir_mode=None)  # the umask must not decide who reads a license


def _install(args: argparse.Namespace, deps: _Deps) -> int:
    settings = deps.get_settings(args)
    out = deps.stream()
    data = _load(args.file, out)
    # T-LIC-1: never install a file the service would refuse.
    if _verdict(data, settings, deps, out) is None or data is None:
        print(f"not installed: {settings.license_path} is unchanged.", file=out)
        return 1
    try:
        write_atomic(settings.license_path, data)
    except OSError as exc:
        print(f"not installed: cannot write {settings.license_path}: {exc.strerror or exc}", file=out)
        return 1
    print(
        f"installed: {settings.license_path} (mode 0640); the running service picks it up "
        "within a second, or at once on SIGHUP.",
        file=out,
    )
    return 0


def _clock_reset(args: argparse.Namespace, deps: _Deps) -> int:
    """T-LIC-3: the repair for a deleted or edited clock mark; never lowers an intact one."""
    settings = deps.get_settings(args)
    out = deps.stream()
    try:
        mark = reset_clock_mark(settings.db_path, NodeKey.load(settings.keys_dir), deps.clock())
    except (ClockResetRefused, NodeKeyError, sqlite3.Error) as exc:
        print(f"clock mark not reset: {exc}", file=out)
        return 1
    print(f"clock mark re-signed at {format_time(mark)}; send the service SIGHUP (or restart it) to check "
          "licenses again.", file=out)
    return 0


def _issue(args: argparse.Namespace, deps: _Deps) -> int:
    out = deps.stream()
    try:
        signing_key = load_signing_key(args.signing_key)
        issued_at = deps.clock()
        payload = build_payload(
            licensee=args.licensee,
            tier=args.tier,
            features=[f.strip() for f in args.features.split(",") if f.strip()],
            expires_at=parse_timestamp(args.expires),
            issued_at=issued_at,
            not_before=parse_timestamp(args.not_before) if args.not_before else None,
            license_id=args.license_id,
            machine_id=args.machine_id,
            limits={
                "rate_limit_rps": args.rate_limit_rps,
                "max_cells": args.max_cells,
                "max_memory_mb": args.max_memory_mb,
            },
        )
        data = issue_license(payload, signing_key, args.key_id)
        write_atomic(args.out, data, mode=0o644)  # a license is not secret; its key is
    except (OSError, ValueError) as exc:
        print(f"not issued: {exc}", file=sys.stderr)
        return 1
    except LicenseRejected as exc:
        print(f"not issued: {exc.reason}", file=sys.stderr)
        return 1
    print(f"issued {payload['license_id']} to {args.out} (expires {format_time(parse_timestamp(args.expires))})", file=out)
    return 0
