"""Dashboard and navigation at 80×24, keyboard only (Textual pilot)."""
from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from textual.widgets import Footer

from tests.tui.fakes import FakeServices
from tests.tui.helpers import screen_text, settle, static_text, svg_lines, table_rows
from tui.app import CellConsole
from tui.common import NAV
from tui.screens.dashboard import render_status

SNAPSHOTS = Path(__file__).parent / "snapshots"
DOCS_SVG = Path(__file__).resolve().parents[2] / "docs" / "console-dashboard.svg"


def test_dashboard_shows_health_license_workers_cells_receipts(fake: FakeServices) -> None:
    async def scenario() -> None:
        app = CellConsole(fake)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            summary = static_text(app, "#summary")
            for text in ("Service ok", "Cell 0.1.0", "egress off", "pro tier", "ACME Corp",
                         "expires in 12 days", "Workers 2", "busy 1", "Runs/min 17",
                         "default 3", "analytics 1", "rate-limit 5", "policy 2", "registry version 7"):
                assert text in summary, text
            rows = table_rows(app, "#recent")
            assert rows[0][0] == "40" and rows[0][4] == "timeout"

    asyncio.run(scenario())


def test_service_calls_never_run_on_the_event_loop_thread(fake: FakeServices) -> None:
    async def scenario() -> None:
        app = CellConsole(fake)
        async with app.run_test() as pilot:
            await settle(pilot)
            for key, _, _ in NAV:
                await pilot.press(key)
                await settle(pilot)
            loop_thread = threading.get_ident()
            assert fake.threads and loop_thread not in fake.threads

    asyncio.run(scenario())


def test_every_screen_has_nav_and_footer_with_its_keys(fake: FakeServices) -> None:
    async def scenario() -> None:
        app = CellConsole(fake)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            for key, mode, title in NAV:
                await pilot.press(key)
                await settle(pilot)
                assert app.current_mode == mode
                assert app.screen.query(Footer), mode
                lines = screen_text(app).splitlines()
                assert title in lines[0]  # the top line lists every screen
                assert "q Quit" in lines[-1], (mode, lines[-1])  # the footer, on the last row

    asyncio.run(scenario())


def test_render_status_degrades_to_na_and_says_why() -> None:
    text = str(render_status({"service": "database locked", "workers": {"configured": 2}, "denials": None}))
    assert "database locked" in text
    assert "2 configured" in text
    assert "no license installed" in text
    assert "not counted" in text


def test_dashboard_snapshot_80x24(fake: FakeServices) -> None:
    """SVG at 80×24: key texts present, layout compared to the stored snapshot."""

    async def scenario() -> str:
        app = CellConsole(fake)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            return app.export_screenshot(title="cell console")

    svg = asyncio.run(scenario())
    lines = svg_lines(svg)
    text = "\n".join(lines)
    for needle in ("1 Dashboard", "7 Telemetry", "Service ok", "pro tier", "Runs/min 17", "Recent receipts",
                   "timeout", "g Refresh", "q Quit"):
        assert needle in text, needle
    assert all(len(line) <= 80 for line in lines)
    stored = SNAPSHOTS / "dashboard.txt"
    if os.environ.get("CELL_UPDATE_SNAPSHOTS") == "1":
        stored.write_text(text + "\n", encoding="utf-8")
        DOCS_SVG.write_text(svg, encoding="utf-8")
    assert text + "\n" == stored.read_text(encoding="utf-8")
