"""`cell console` as the tmux smoke test runs it: the real console and the real
adapters on a real data root, with the license key of the test injected
through the adapter's constructor (never by weakening verification)."""
from __future__ import annotations

import sys
from pathlib import Path

from appliance.config import load_settings
from appliance.license.manager import LicenseManager
from appliance.receipts.nodekey import NodeKey
from appliance.receipts.store import ReceiptStore
from appliance.services import prepare_root
from appliance.storage import Store
from mirror.registry import Mirror
from tui.adapters import ApplianceConsoleServices, RegistryBridge
from tui.app import CellConsole


def main() -> None:
    key_id, public_hex, media_root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    keys = {key_id: bytes.fromhex(public_hex)}
    settings = load_settings()
    prepare_root(settings)
    # A registry the test built and imported with its own TUF root (T-LIC-3: licenses
    # are honoured only while an imported registry is fresh), else the node's own.
    if len(sys.argv) > 5:
        mirror = Mirror(Path(sys.argv[4]), trusted_root=Path(sys.argv[5]).read_bytes())
    else:
        mirror = Mirror(settings.mirror_dir)
    lic = LicenseManager(settings, keys=keys, revocations=mirror.is_license_revoked, revoked_keys=mirror.is_key_revoked,
                         poll_interval=0.2)
    services = ApplianceConsoleServices(settings, Store(settings.db_path),
                                        ReceiptStore(settings.db_path, NodeKey.load_or_create(settings.keys_dir)), lic,
                                        mirror=RegistryBridge(mirror), media_roots=[media_root], license_keys=keys)
    CellConsole(services).run()


if __name__ == "__main__":
    main()
