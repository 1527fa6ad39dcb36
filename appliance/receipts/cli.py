"""``cell receipts export`` and ``cell receipts verify`` (docs/operations.md).

``register`` adds the sub-commands; each handler is stored as ``func`` on the
parsed namespace and returns the process exit code. Verification itself lives
in the standalone ``verify`` module so operators and auditors run the same code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.config import load_settings
from appliance.receipts import verify as _verify
from appliance.receipts.nodekey import NodeKey, NodeKeyError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    receipts = subparsers.add_parser("receipts", help="export and verify the receipt log")
    sub = receipts.add_subparsers(dest="receipts_command", required=True)

    export = sub.add_parser("export", help="write a JSON Lines export for an auditor")
    export.add_argument("--out", required=True, type=Path, help="file to write")
    export.add_argument("--db", type=Path, help="node database (default: from config)")
    export.add_argument("--keys-dir", type=Path, help="node key directory (default: from config)")
    export.set_defaults(func=_export)

    check = sub.add_parser("verify", help="verify an export or a database offline (exit 0/1)")
    src = check.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", type=Path, help="an export written by `receipts export`")
    src.add_argument("--db", type=Path, help="a node database, opened read-only")
    src.add_argument("--cluster", action="store_true",
                     help="fetch every cluster node's export over the LAN and verify each (docs/cluster.md)")
    check.add_argument("--public-key", action="append", default=[], metavar="HEX",
                       help="trusted node public key (default for --db: this node's key)")
    check.add_argument("--checkpoint", action="append", default=[], type=Path, metavar="FILE",
                       help="an older checkpoint (or export header) the log must extend")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_verify_cmd)


def _settings_paths(db: Path | None, keys_dir: Path | None) -> tuple[Path, Path]:
    if db is not None and keys_dir is not None:
        return db, keys_dir
    settings = load_settings()  # only when a path is missing: the config file may be absent
    return db or settings.db_path, keys_dir or settings.keys_dir


def _export(args: argparse.Namespace) -> int:
    from appliance.receipts.store import ReceiptStore  # start-up: sqlite_utils, needed only by `receipts export`

    db, keys_dir = _settings_paths(args.db, args.keys_dir)
    if not db.is_file():
        print(f"error: no database at {db}", file=sys.stderr)
        return 1
    try:
        key = NodeKey.load(keys_dir)  # never create a key just to export
    except NodeKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with ReceiptStore(db, key) as store:
        summary = store.export_to(args.out)
    cp = summary["checkpoint"]
    print(f"exported {summary['count']} receipts to {args.out}; "
          f"checkpoint root {cp['root_hash']}, key_id {key.key_id}, public key {key.public_key_hex}")
    return 0


def _verify_cmd(args: argparse.Namespace) -> int:
    if args.cluster:
        from appliance.cluster import receipts as cluster_receipts  # start-up: only `verify --cluster` needs it

        return cluster_receipts.run(load_settings(), as_json=args.json)
    checkpoints = [str(p) for p in args.checkpoint]
    if args.file is not None:
        report = _verify.verify_export(args.file, public_keys=args.public_key or None, checkpoints=checkpoints)
        return _verify.render(report, as_json=args.json)
    pins: list[str] = list(args.public_key)
    if not pins:
        # On the node itself the operator's trust anchor is the node key file.
        try:
            pins = [NodeKey.load(_settings_paths(args.db, None)[1]).public_key_hex]
        except (NodeKeyError, OSError):
            pins = []
    report = _verify.verify_db(args.db, pins or None, checkpoints=checkpoints)
    return _verify.render(report, as_json=args.json)
