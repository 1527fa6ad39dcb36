from __future__ import annotations

from pathlib import Path

import pytest

from tests.tui.fakes import FakeServices


@pytest.fixture
def fake(tmp_path: Path) -> FakeServices:
    return FakeServices(tmp_path)
