"""Receipts: browse page by page, filter by tenant and status, verify the chain, export to USB."""
from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from tui.common import ChooseDir, ConsoleScreen, DirsFound
from tui.screens.dashboard import clock_text
from tui.services import ChainReport, ReceiptRow

PAGE = 15  # rows that fit an 80×24 screen with the filters and footer


class ReceiptsLoaded(Message):
    def __init__(self, rows: list[ReceiptRow]) -> None:
        super().__init__()
        self.rows = rows


class ChainVerified(Message):
    def __init__(self, report: ChainReport) -> None:
        super().__init__()
        self.report = report


class ReceiptsExported(Message):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path


class ReceiptsScreen(ConsoleScreen):
    MODE = "receipts"
    BINDINGS = [
        Binding("f", "filter", "Filter"),
        Binding("n", "next_page", "Next"),
        Binding("p", "first_page", "First"),
        Binding("v", "verify", "Verify chain"),
        Binding("e", "export", "Export USB"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[ReceiptRow] = []
        self.after: int | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        with Horizontal(id="filters"):
            yield Input(placeholder="tenant id (empty: all)", id="tenant")
            yield Input(placeholder="status (empty: all)", id="status")
        table: DataTable[str] = DataTable(id="receipts", cursor_type="row", zebra_stripes=True)
        table.add_columns("seq", "time (UTC)", "tenant", "template", "status", "execution id")
        yield table
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#filters").styles.height = 1
        for box in self.query(Input):
            box.styles.width = "1fr"
            box.compact = True
        self.load()

    def _filter(self, box_id: str) -> str | None:
        return self.query_one(f"#{box_id}", Input).value.strip() or None

    def load(self) -> None:
        tenant, status, after = self._filter("tenant"), self._filter("status"), self.after
        self.background("read receipts",
                        lambda: self.services.receipts_page(tenant_id=tenant, status=status, after=after, limit=PAGE),
                        ReceiptsLoaded)

    @on(ReceiptsLoaded)
    def _loaded(self, message: ReceiptsLoaded) -> None:
        self.rows = message.rows
        table = self.query_one("#receipts", DataTable)
        table.clear()
        for r in self.rows:
            table.add_row(str(r.seq), clock_text(r.timestamp), Text(r.tenant_id), r.template,
                          Text(r.status, style="red" if r.status not in ("ok", "—") else ""), r.execution_id)
        if not self.rows:
            self.say("No receipts match." if self.after is None else "No more receipts.")
        table.focus()

    @on(Input.Submitted)
    def _apply_filter(self, event: Input.Submitted) -> None:
        self.after = None
        self.load()

    def action_filter(self) -> None:
        self.query_one("#tenant", Input).focus()

    def action_next_page(self) -> None:
        if self.rows:
            self.after = self.rows[-1].seq
            self.load()

    def action_first_page(self) -> None:
        self.after = None
        self.load()

    def action_verify(self) -> None:
        self.say("Verifying every receipt, signature and checkpoint …")
        self.background("verify receipt chain", self.services.verify_receipts, ChainVerified)

    @on(ChainVerified)
    def _verified(self, message: ChainVerified) -> None:
        r = message.report
        if r.ok:
            self.say(f"Chain intact: {r.count} receipt(s), every signature and checkpoint verified.")
        else:
            self.say(f"CHAIN BROKEN after {r.count} receipt(s): {r.problem}", error=True)

    def action_export(self) -> None:
        self.background("find removable media", self.services.media_dirs, DirsFound)

    @on(DirsFound)
    def _dirs(self, message: DirsFound) -> None:
        if not message.dirs:
            self.say("No writable removable medium is mounted.", error=True)
            return

        def chosen(dest: Path | None) -> None:
            if dest is not None:
                self.say(f"Exporting to {dest} …")
                self.background("export receipts", lambda: self.services.export_receipts(dest), ReceiptsExported)

        self.app.push_screen(ChooseDir(message.dirs), chosen)

    @on(ReceiptsExported)
    def _exported(self, message: ReceiptsExported) -> None:
        self.say(f"Exported to {message.path}. An auditor checks it with `cell receipts verify`.")
