"""The API-key lookup is cached on the hot path, and a revoked key still stops
working (T-AUTH-1): at once when this process revokes it, within
AUTH_CACHE_S when another process (the `cell tenant revoke` CLI) does."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance import storage
from appliance.storage import AUTH_CACHE_S, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(storage.time, "monotonic", c)
    return c


def test_t_auth_1_key_lookups_are_cached(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "cell.sqlite")
    tenant, key = store.add_tenant("a", 0)
    reads: list[str] = []
    real = store._lookup_key
    monkeypatch.setattr(store, "_lookup_key", lambda digest: reads.append(digest) or real(digest))
    for _ in range(5):
        assert store.tenant_for_key(key) == tenant
    assert len(reads) == 1  # one database read, then the cache


@pytest.mark.parametrize("revoker", ["this-process", "another-process"])
def test_t_auth_1_a_revoked_key_stops_working(tmp_path: Path, clock: Clock, revoker: str) -> None:
    server = Store(tmp_path / "cell.sqlite")
    tenant, key = server.add_tenant("a", 0)
    other, other_key = server.add_tenant("b", 0)
    assert server.tenant_for_key(key) == tenant  # cached now
    assert server.tenant_for_key(other_key) == other
    if revoker == "this-process":
        assert server.revoke_tenant(tenant.id)
        assert server.tenant_for_key(key) is None  # at once: the revocation clears the cache
    else:
        cli = Store(tmp_path / "cell.sqlite")  # its own connections, as `cell tenant revoke` has
        assert cli.revoke_tenant(tenant.id)
        clock.now += AUTH_CACHE_S + 0.001
        assert server.tenant_for_key(key) is None  # within the cache's bound
    assert server.tenant_for_key(key) is None
    assert server.tenant_for_key(other_key) == other  # the other tenant is untouched


@pytest.mark.parametrize("presented", ["", "cell_", "cell_" + "x" * 43, "not-a-key", "cell_\x00"])
def test_t_auth_1_unknown_keys_are_refused_and_cached_as_unknown(tmp_path: Path, clock: Clock, presented: str) -> None:
    store = Store(tmp_path / "cell.sqlite")
    store.add_tenant("a", 0)
    assert store.tenant_for_key(presented) is None
    assert store.tenant_for_key(presented) is None
