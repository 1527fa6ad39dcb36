"""The embedded release key and the documented test/vendor override."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from installer.errors import InstallError
from installer.keys import EMBEDDED_RELEASE_KEYS, parse_trusted_keys, resolve_trusted_keys

REPO = Path(__file__).resolve().parents[2]


def test_embedded_key_matches_the_packaged_trusted_keys() -> None:
    packaged = parse_trusted_keys((REPO / "appliance" / "data" / "trusted_keys.json").read_text())
    assert {k: v.hex() for k, v in packaged.items()} == EMBEDDED_RELEASE_KEYS
    shared = Path("/work/shared/keys/trusted_keys.json")
    if shared.is_file():
        assert {k: v.hex() for k, v in parse_trusted_keys(shared.read_text()).items()} == EMBEDDED_RELEASE_KEYS


def test_default_trust_root_is_the_embedded_production_key() -> None:
    keys, desc = resolve_trusted_keys(None)
    assert {k: v.hex() for k, v in keys.items()} == EMBEDDED_RELEASE_KEYS
    assert "production" in desc


@pytest.mark.parametrize("doc", [
    {"release": []},
    {"license": [{"key_id": "8f02fd6f7a105ee4",
                  "ed25519_public_key": "92abf50730383400f1f9a22fe1d9d247dc64b29eed7201b4f882b3de947a729e"}]},
    {"release": [{"key_id": "0000000000000000",
                  "ed25519_public_key": "92abf50730383400f1f9a22fe1d9d247dc64b29eed7201b4f882b3de947a729e"}]},
])
def test_t_supply_2_malformed_override_is_refused(doc: object, tmp_path: Path) -> None:
    path = tmp_path / "trusted.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InstallError):
        resolve_trusted_keys(str(path))
