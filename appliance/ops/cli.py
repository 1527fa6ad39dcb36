"""`cell doctor`, `cell backup --out FILE`, `cell restore FILE` (docs/operations.md).

``register(subparsers)`` adds the commands; each handler returns the exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.config import Settings, settings_for_command
from appliance.ops.backup import BackupError, create_backup, restore_backup
from appliance.ops.doctor import Context, exit_code, run_checks
from appliance.ops.incident import clear, snapshot


def _settings(args: argparse.Namespace) -> Settings:
    return settings_for_command(dev=bool(getattr(args, "dev", False)))  # same layout as `cell serve --dev`


def register(subparsers: Any) -> None:
    doctor = subparsers.add_parser("doctor", help="check this node and explain each fix (exit 0/1)")
    doctor.add_argument("--dev", action="store_true", help="the ./.synapse data of `cell serve --dev`")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.set_defaults(func=cmd_doctor)

    backup = subparsers.add_parser("backup", help="database (online), node key, config, license and cell snapshots into a tar.gz (0600)")
    backup.add_argument("--out", required=True, type=Path)
    backup.add_argument("--dev", action="store_true")
    backup.set_defaults(func=cmd_backup)

    restore = subparsers.add_parser("restore", help="restore a backup onto a stopped appliance")
    restore.add_argument("file", type=Path)
    restore.add_argument("--dev", action="store_true")
    restore.set_defaults(func=cmd_restore)

    incident = subparsers.add_parser("incident", help="take the node out of rotation and snapshot it for investigation")
    isub = incident.add_subparsers(dest="incident_cmd", required=True)
    snap = isub.add_parser("snapshot", help="stop new runs, then write a tarball of db, config, logs, cache manifest, volumes list")
    snap.add_argument("--out", required=True, type=Path)
    snap.add_argument("--with-volume-contents", action="store_true", help="include the cells' files, not only their hashes")
    snap.add_argument("--reason", default="")
    snap.add_argument("--dev", action="store_true")
    snap.set_defaults(func=cmd_incident_snapshot)
    clr = isub.add_parser("clear", help="put the node back into rotation")
    clr.add_argument("--dev", action="store_true")
    clr.set_defaults(func=cmd_incident_clear)


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(_settings(args), Context(now=datetime.now(timezone.utc)))
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
    return exit_code(checks)


def cmd_backup(args: argparse.Namespace) -> int:
    try:
        manifest = create_backup(_settings(args), args.out)
    except (BackupError, OSError) as exc:
        print(f"cell backup: {exc}", file=sys.stderr)
        return 1
    print(f"cell backup: wrote {args.out} (mode 0600; it holds the node signing key: keep it private)")
    for name, entry in sorted(manifest["files"].items()):
        print(f"  {entry['sha256']}  {entry['size']:>12}  {name}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        result = restore_backup(_settings(args), args.file)
    except (BackupError, OSError) as exc:
        print(f"cell restore: refused: {exc}", file=sys.stderr)
        return 1
    chain = result["chain"]
    print(f"cell restore: restored {', '.join(result['restored'])}")
    if "keys/snapshot-secret" in result["restored"]:
        print(f"cell restore: replaced the cells' snapshots with the archived ones ({result['snapshots']})")
    print(f"cell restore: receipt chain verifies ({chain['count']} receipts, node key {chain['public_key']})")
    if result["replaced_key"]:
        print("cell restore: note: the node key differs from the one that was here; auditors need the restored public key")
    return 0


def cmd_incident_snapshot(args: argparse.Namespace) -> int:
    report = snapshot(_settings(args), args.out, with_contents=args.with_volume_contents, reason=args.reason)
    print(f"node out of rotation (new runs answer 503 incident); snapshot {report['out']}: "
          f"{report['files']} files, {report['volumes_listed']} volume entries, {report['seconds']} s")
    if report["volume_errors"] or report["volumes_truncated"]:
        print(f"volumes: {report['volume_errors']} entries could not be read (listed with an error)"
              + (", listing truncated" if report["volumes_truncated"] else ""))
    print("put it back with: cell incident clear")
    return 0


def cmd_incident_clear(args: argparse.Namespace) -> int:
    print("back in rotation" if clear(_settings(args)) else "the node was not out of rotation")
    return 0
