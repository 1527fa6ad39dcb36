"""``cell mirror import|sync|status``: the operator's side of the trust registry."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.config import load_settings
from mirror.checks import BadPeerURL
from mirror.registry import ImportBusy, Mirror, MirrorError
from mirror.trust import UntrustedState


def _mirror(args: argparse.Namespace) -> Mirror:
    return Mirror(load_settings().mirror_dir)


def _print_report(report: Any) -> None:
    d = report.as_dict()
    if not d["applied"]:
        print(f"mirror: already up to date (root v{d['root_version']}, targets v{d['targets_version']})")
        return
    print(f"mirror: imported from {d['source']}: root v{d['root_version']}, targets v{d['targets_version']}")
    labels = {
        "templates_added": "template added", "templates_replaced": "template replaced",
        "templates_removed": "template removed", "licenses_revoked": "license revoked",
        "licenses_unrevoked": "license no longer revoked", "keys_revoked": "key revoked",
        "keys_unrevoked": "key no longer revoked",
    }
    for field, label in labels.items():
        for item in d["changes"][field]:
            print(f"  {label}: {item}")


def _update(args: argparse.Namespace) -> int:
    from mirror.importer import ImportRefused  # start-up: the importer loads tuf's updater, urllib3 and ssl

    try:
        mirror = _mirror(args)
        report = mirror.import_path(Path(args.path)) if args.mirror_cmd == "import" else mirror.sync(args.url)
    except (ImportRefused, BadPeerURL) as exc:
        print(f"mirror: update refused, registry unchanged: {exc}", file=sys.stderr)
        return 1
    except (ImportBusy, MirrorError, UntrustedState) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    _print_report(report)
    return 0


def format_status(s: dict[str, Any]) -> str:
    if not s.get("ok"):
        return f"mirror: registry unusable: {s.get('error')}"
    lines = [
        f"root:       v{s['root_version']}, expires {s['root_expires']}",
        f"targets:    v{s['targets_version'] or '-'}",
        f"expires:    {s['expires']} ({s['expires_role']}), in {s['days_until_expiry']} days",
        f"imported:   {s['last_import'] or 'never'} from {s['last_source'] or '-'}",
        f"templates:  {len(s['templates'])}",
    ]
    lines += [f"  {t['name']} {t['version']} ({t['abi']}) sha256:{t['sha256'][:16]}... {t['size']} bytes"
              for t in s["templates"]]
    lines.append(f"revoked:    {len(s['revoked_licenses'])} license(s), {len(s['revoked_keys'])} key(s)")
    lines += [f"  license {x}" for x in s["revoked_licenses"]] + [f"  key {x}" for x in s["revoked_keys"]]
    lines += [f"WARNING: {w}" for w in s["warnings"]]
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    s = _mirror(args).status(datetime.now(timezone.utc))
    print(json.dumps(s, indent=1) if args.json else format_status(s))
    if not s.get("ok"):
        return 2
    return 1 if s["expiry_state"] == "expired" else 0


def register(subparsers: Any) -> None:
    mirror = subparsers.add_parser("mirror", help="trust-registry mirror: import, sync, status")
    sub = mirror.add_subparsers(dest="mirror_cmd", required=True)
    imp = sub.add_parser("import", help="import a registry update from a bundle directory or tarball")
    imp.add_argument("path")
    imp.set_defaults(func=_update)
    syn = sub.add_parser("sync", help="pull the registry from a peer appliance, e.g. http://192.168.1.20:8080/mirror/")
    syn.add_argument("url")
    syn.set_defaults(func=_update)
    st = sub.add_parser("status", help="versions, expiry, templates and revocations in force")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)
