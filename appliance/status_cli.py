"""`cell status`: what this node is, read from its data directory (works
whether or not the service runs; never starts workers)."""
from __future__ import annotations

import argparse
import json
import sqlite3
from typing import Any

from appliance import __version__
from appliance.config import Settings, settings_for_command
from appliance.license.manager import LicenseManager
from appliance.ops.backup import server_running
from appliance.ops.incident import in_incident
from mirror.registry import Mirror


def node_status(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"version": __version__, "node_id": s.node_id, "data_root": str(s.root),
                           "service": server_running(s) or "not running", "out_of_rotation": in_incident(s),
                           "egress": s.egress, "telemetry": s.telemetry}
    if s.db_path.is_file():
        conn = sqlite3.connect(f"{s.db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            out["tenants"] = conn.execute("SELECT COUNT(*) FROM tenants WHERE revoked = 0").fetchone()[0]
            out["cells"] = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            count, head = conn.execute("SELECT COUNT(*), MAX(seq) FROM receipts").fetchone()
            out["receipts"] = {"count": count, "last_seq": head}
        except sqlite3.Error as e:
            out["database"] = f"unreadable: {e}"
        finally:
            conn.close()
    try:
        mirror = Mirror(s.mirror_dir)
        out["registry"] = mirror.status()
        lic = LicenseManager(s, revocations=mirror.is_license_revoked, revoked_keys=mirror.is_key_revoked)
        out["license"] = lic.summary()
    except Exception as e:  # a broken registry or license is reported, not fatal
        out.setdefault("license", {"tier": "free", "reason": f"unavailable: {e}"})
    return out


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="this node: service, tier and license, registry, cells, receipts")
    p.add_argument("--dev", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    status = node_status(settings_for_command(dev=bool(getattr(args, "dev", False))))
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    lic = status.get("license") or {}
    reg = status.get("registry") or {}
    print(f"Cell {status['version']}  node {status['node_id']}  data {status['data_root']}")
    print(f"service: {status['service']}{'  (OUT OF ROTATION: incident)' if status['out_of_rotation'] else ''}")
    print(f"tier: {lic.get('tier', 'free')}  licensee: {lic.get('licensee') or '-'}  expires: {lic.get('expires_at') or '-'}"
          + (f"  ({lic.get('reason')})" if lic.get("reason") else ""))
    for warning in lic.get("warnings") or []:
        print(f"warning: {warning}")
    print(f"egress: {status['egress']}  telemetry: {status['telemetry']}")
    print(f"tenants: {status.get('tenants', '-')}  cells: {status.get('cells', '-')}  "
          f"receipts: {(status.get('receipts') or {}).get('count', '-')}")
    print(f"registry: root v{reg.get('root_version', '?')}, targets v{reg.get('targets_version') or '-'}, "
          f"expires in {reg.get('days_until_expiry', '?')} days ({reg.get('expiry_state', reg.get('error', '?'))})")
    for warning in reg.get("warnings") or []:
        print(f"registry warning: {warning}")
    return 0
