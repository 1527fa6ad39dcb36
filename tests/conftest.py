from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.liveserver import ServerProcess, start_server, warm_cache

pytest_plugins = ["tests.netguard"]


@pytest.fixture(scope="session")
def module_cache() -> None:
    """Compile the guest runtimes once per machine (the shared ~/.cache/cell/modules)."""
    warm_cache()


@pytest.fixture(scope="session")
def live(module_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server (waitress + workers) on an ephemeral loopback port for the session."""
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    server.stop()
