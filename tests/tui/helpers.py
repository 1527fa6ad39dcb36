"""Small helpers for pilot tests: settle workers, read what is on screen."""
from __future__ import annotations

import html
import re
from typing import Any

from textual.app import App
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

CELL_WIDTH_PX = 12.2  # rich's export_svg char width
_TEXT = re.compile(r'<text [^>]*?x="([\d.]+)"[^>]*?clip-path="url\(#[\w-]*?-line-(\d+)\)"[^>]*>([^<]*)</text>')


async def settle(pilot: Pilot[Any]) -> None:
    """Wait until thread workers finished and the messages they posted were handled."""
    for _ in range(4):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def svg_lines(svg: str, width: int = 80, height: int = 24) -> list[str]:
    """The terminal text of an export_screenshot() SVG, one string per row."""
    rows = [[" "] * width for _ in range(height)]
    for x, line, chunk in _TEXT.findall(svg):
        col = round(float(x) / CELL_WIDTH_PX)
        for i, ch in enumerate(html.unescape(chunk).replace("\xa0", " ")):
            if int(line) < height and col + i < width:
                rows[int(line)][col + i] = ch
    return ["".join(r).rstrip() for r in rows]


def screen_text(app: App[Any]) -> str:
    return "\n".join(svg_lines(app.export_screenshot(), *app.size))


def static_text(app: App[Any], selector: str) -> str:
    return str(app.screen.query_one(selector, Static).content)


def table_rows(app: App[Any], selector: str) -> list[list[str]]:
    table: DataTable[Any] = app.screen.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
