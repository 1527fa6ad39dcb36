"""LAN peers read the mirror under /mirror/, and nothing else of the host (T-SUPPLY-1)."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from mirror.checks import BadPeerURL
from mirror.importer import ImportRefused
from mirror.registry import Mirror
from mirror.web import register_mirror_routes
from tests.mirror import PY_BLOB, Vendor


@pytest.fixture
def vendor(tmp_path: Path) -> Vendor:
    return Vendor(tmp_path)


@pytest.fixture
def served(vendor: Vendor) -> Mirror:
    m = vendor.mirror("served")
    m.import_path(vendor.publish(licenses=("lic-1",)))
    return m


def make_app(mirror: Mirror) -> Flask:
    app = Flask("throwaway")
    register_mirror_routes(app, mirror)
    return app


@pytest.fixture
def client(served: Mirror) -> FlaskClient:
    return make_app(served).test_client()


def get(client: FlaskClient, path: str) -> tuple[int, str, bytes, dict[str, str]]:
    # Close every response: a served file stays open until the server closes it.
    with client.get(path) as r:
        return r.status_code, r.mimetype, r.get_data(), dict(r.headers)


def test_metadata_served_as_json(client: FlaskClient, served: Mirror) -> None:
    status, mimetype, data, headers = get(client, "/mirror/metadata/timestamp.json")
    assert status == 200 and mimetype == "application/json"
    assert data == (served.current_dir / "metadata" / "timestamp.json").read_bytes()
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert get(client, "/mirror/metadata/1.root.json")[0] == 200


def test_targets_served_as_octet_stream(client: FlaskClient, served: Mirror) -> None:
    t = served.state().templates["python3.wasm"]
    status, mimetype, data, _ = get(client, f"/mirror/targets/{t.sha256}.python3.wasm")
    assert status == 200 and mimetype == "application/octet-stream" and data == PY_BLOB


@pytest.mark.parametrize("path", [
    "/mirror/../mirror/metadata/root.json",
    "/mirror/metadata/../../state.json",
    "/mirror/metadata/%2e%2e/state.json",
    "/mirror/%2e%2e/%2e%2e/.lock",
    "/mirror//etc/passwd",
    "/mirror/%2fetc%2fpasswd",
    "/mirror/metadata/..%2f..%2fstate.json",
    "/mirror/metadata\\..\\state.json",
    "/mirror/state.json",
    "/mirror/metadata/root_history/1.root.json",
    "/mirror/metadata/.hidden",
])
def test_T_SUPPLY_1_traversal_and_absolute_paths_refused(client: FlaskClient, path: str) -> None:
    assert get(client, path)[0] == 404, path


@pytest.mark.parametrize("path", ["/mirror", "/mirror/", "/mirror/metadata", "/mirror/metadata/", "/mirror/targets/"])
def test_T_SUPPLY_1_directories_not_listed(client: FlaskClient, path: str) -> None:
    status, _, data, _ = get(client, path)
    assert status == 404 and b"timestamp.json" not in data and b"python3" not in data


def test_T_SUPPLY_1_symlink_planted_in_mirror_not_followed(client: FlaskClient, served: Mirror, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    (served.current_dir / "metadata" / "leak.json").symlink_to(secret)
    status, _, data, _ = get(client, "/mirror/metadata/leak.json")
    assert status == 404 and b"host secret" not in data


def test_only_get(client: FlaskClient) -> None:
    assert client.put("/mirror/metadata/timestamp.json", data=b"x").status_code == 405


@pytest.fixture
def peer(served: Mirror) -> Iterator[str]:
    """A peer appliance on loopback serving its mirror with the real routes."""
    server = make_server("127.0.0.1", 0, make_app(served), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def test_sync_from_peer_applies_its_registry(vendor: Vendor, served: Mirror, peer: str) -> None:
    m = vendor.mirror("local")
    report = m.sync(peer)  # the operator typed just the address; /mirror/ is implied
    assert report.applied and report.changes.templates_added == ("python3.wasm",)
    assert m.is_license_revoked("lic-1")
    assert m.trusted_template_hashes() == served.trusted_template_hashes()
    assert not m.sync(peer + "/mirror/").applied  # already up to date


def test_T_SUPPLY_1_sync_from_peer_with_other_root_rejected(tmp_path: Path, peer: str) -> None:
    from tests.mirror import key

    other = Vendor(tmp_path / "other", keys={r: key("x-" + r) for r in ("root", "timestamp", "snapshot", "targets")})
    m = other.mirror()
    with pytest.raises(ImportRefused):
        m.sync(peer)
    assert m.trusted_template_hashes() == {}


def test_T_SUPPLY_1_sync_refuses_non_lan_address(vendor: Vendor) -> None:
    m = vendor.mirror("local")
    for url in ("http://8.8.8.8/mirror/", "http://vendor.example.com/mirror/", "ftp://10.0.0.1/", "http://169.254.169.254/"):
        with pytest.raises(BadPeerURL):
            m.sync(url)


def test_T_SUPPLY_1_sync_does_not_follow_redirects(vendor: Vendor) -> None:
    app = Flask("redirector")

    @app.get("/mirror/<path:p>")
    def go(p: str) -> tuple[str, int, dict[str, str]]:
        return "", 302, {"Location": "http://127.0.0.2:9/evil"}

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        m = vendor.mirror("local")
        with pytest.raises(ImportRefused):
            m.sync(f"http://127.0.0.1:{server.server_port}/mirror/")
        assert m.trusted_template_hashes() == {}
    finally:
        server.shutdown()
        thread.join()
