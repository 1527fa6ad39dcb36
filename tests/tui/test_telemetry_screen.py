"""Telemetry screen: off by default, consent stored, spool exported, no socket ever."""
from __future__ import annotations

import json
import socket
import stat
from typing import Any

import pytest
from textual.pilot import Pilot

from tests.tui.fakes import FakeServices
from tests.tui.helpers import screen_text, settle, static_text
from tests.tui.test_screens import drive, message
from tui.app import CellConsole
from tui.common import ChooseDir, ConfirmScreen


def test_telemetry_off_by_default_shows_what_would_be_collected(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        assert "Telemetry: OFF" in static_text(app, "#state")
        explain = static_text(app, "#explain")
        for text in ("runs_per_template", "errors_by_code", "latency_ms", "version", "tier",
                     "Never collected: code, program output, file names, IP addresses, tenant names"):
            assert text in explain, text
        preview = static_text(app, "#preview")
        report = json.loads(preview.split("\n", 1)[1])
        assert report["runs_per_template"] == {"python3": 40}
        assert "default" not in preview and "t1a2b3c" not in preview  # no tenant names
        await pilot.press("e")
        await settle(pilot)
        assert "nothing to export" in message(app)

    drive(fake, "7", scenario)


def test_consent_on_is_stored_0600_and_spool_exports_to_usb(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await pilot.press("c")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        assert "Turn telemetry ON?" in screen_text(app)
        await pilot.press("y")
        await settle(pilot)
        assert fake.telemetry.consent() is True
        assert stat.S_IMODE(fake.telemetry.consent_path.stat().st_mode) == 0o600
        assert "Telemetry: ON" in static_text(app, "#state") and "1 report(s)" in static_text(app, "#state")
        await pilot.press("e")
        await settle(pilot)
        assert isinstance(app.screen, ChooseDir)
        await pilot.press("enter")
        await settle(pilot)
        exported = sorted(p.name for p in fake.media.glob("cell-report-*.json"))
        assert exported and "Exported 1 report(s)" in message(app)
        await pilot.press("c")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
        assert fake.telemetry.consent() is False and fake.telemetry.spooled() == []

    drive(fake, "7", scenario)


def test_consent_off_records_nothing_and_opens_no_socket(fake: FakeServices, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Any] = []

    def no_socket(*args: Any, **kwargs: Any) -> socket.socket:
        opened.append(args)
        raise AssertionError("the console opened a socket")

    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        # Patched once the event loop exists: asyncio's own self-pipe is not telemetry.
        monkeypatch.setattr(socket, "socket", no_socket)
        monkeypatch.setattr(socket, "create_connection", no_socket)
        for key in ("g", "e", "g"):
            await pilot.press(key)
            await settle(pilot)
        assert "Telemetry: OFF" in static_text(app, "#state")
        monkeypatch.undo()

    drive(fake, "7", scenario)
    assert opened == []
    assert not (fake.root / "state" / "telemetry").exists()  # no consent file, no spool
    assert list(fake.media.iterdir()) == []
