"""Run inside `unshare -n` (only loopback): import a registry update from a
directory and from a tarball, serve it, and sync a second mirror from it."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from flask import Flask
from waitress.server import create_server

from mirror.registry import Mirror
from mirror.web import register_mirror_routes
from tests.installer.e2e_offline import bring_up_loopback, network_isolated
from tests.mirror import Vendor


def main() -> int:
    tmp = Path(sys.argv[1])
    bring_up_loopback()
    vendor = Vendor(tmp)
    repo = vendor.publish(licenses=("lic-revoked",))
    first = vendor.mirror("first")
    applied = first.import_path(repo).applied
    app = Flask("peer", static_folder=None)
    register_mirror_routes(app, first)
    server = create_server(app, host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        second = vendor.mirror("second")
        synced = second.sync(f"http://127.0.0.1:{server.effective_port}")  # type: ignore[union-attr]
    finally:
        server.close()
    print(json.dumps({"isolated": network_isolated(), "imported": applied, "synced": synced.applied,
                      "revoked_seen": second.is_license_revoked("lic-revoked")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
