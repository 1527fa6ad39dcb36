"""Dashboard: health at a glance, refreshed by a thread worker every few seconds."""
from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Static

from tui.common import ActionFailed, ConsoleScreen
from tui.services import ReceiptRow

REFRESH_SECONDS = 3.0


class StatusLoaded(Message):
    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__()
        self.status = status


def clock_text(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000))


def _na(value: Any) -> str:
    return "n/a" if value is None else str(value)


def render_status(status: dict[str, Any]) -> Text:
    """The summary block; pure, so its wording is tested without a terminal."""
    out = Text()
    service = str(status.get("service", "unknown"))
    out.append("Service ", style="bold")
    out.append(service, style="green" if service == "ok" else "bold red")
    out.append(f"  Cell {_na(status.get('version'))}  node {_na(status.get('node_id'))}")
    out.append(f"  egress {_na(status.get('egress'))}  telemetry {_na(status.get('telemetry'))}\n")

    lic = status.get("license") or {}
    out.append("License ", style="bold")
    out.append(f"{status.get('tier', 'free')} tier")
    if lic.get("licensee"):
        out.append(f" · {lic['licensee']} · expires {lic.get('expires_at')} ({lic.get('days_left')} days)")
    elif lic.get("reason"):
        out.append(f" · {lic['reason']}")
    else:
        out.append(" · no license installed")
    out.append("\n")
    for warning in lic.get("warnings") or []:
        out.append(f"  ! {warning}\n", style="bold yellow")

    workers = status.get("workers") or {}
    out.append("Workers ", style="bold")
    if "workers" in workers:
        out.append(f"{workers['workers']} · busy {workers.get('busy', 0)} · queued {workers.get('waiting', 0)}"
                   f" · cells {workers.get('cells', 0)}")
    else:
        out.append(f"{_na(workers.get('configured'))} configured (load is in the service process)")
    out.append("   Runs/min ", style="bold")
    out.append(f"{_na(status.get('runs_per_minute'))}\n")

    cells = status.get("cells_per_tenant") or {}
    out.append("Live cells ", style="bold")
    out.append((" · ".join(f"{name} {n}" for name, n in cells.items()) or "none") + "\n")

    denials = status.get("denials")
    out.append("Denials ", style="bold")
    if denials is None:
        out.append("not counted by this service version\n")
    else:
        out.append(f"rate-limit {denials.get('rate_limit', 0)} · policy {denials.get('policy', 0)}\n")

    out.append("Mirror ", style="bold")
    out.append(f"{_na(status.get('mirror'))}")
    return out


class DashboardScreen(ConsoleScreen):
    MODE = "dashboard"
    BINDINGS = [Binding("g", "refresh", "Refresh"), Binding("q", "app.quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        yield Static(Text("Loading status…"), id="summary")
        yield Static(Text("Recent receipts", style="bold"), classes="heading")
        table: DataTable[str] = DataTable(id="recent", cursor_type="row", zebra_stripes=True)
        table.add_columns("seq", "time (UTC)", "tenant", "template", "status", "receipt")
        yield table
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.action_refresh()
        self.set_interval(REFRESH_SECONDS, self.action_refresh)

    def action_refresh(self) -> None:
        self.load_status()

    # exclusive: a slow database must not pile up refreshes behind each other.
    @work(thread=True, exclusive=True, group="status")
    def load_status(self) -> None:
        try:
            status = self.services.status()
        except Exception as exc:  # the dashboard says what is wrong instead of freezing
            self.post_message(ActionFailed("status", f"Status unavailable: {type(exc).__name__}: {exc}"))
            return
        self.post_message(StatusLoaded(status))

    @on(StatusLoaded)
    def _show(self, message: StatusLoaded) -> None:
        self.query_one("#summary", Static).update(render_status(message.status))
        table = self.query_one("#recent", DataTable)
        table.clear()
        rows: list[ReceiptRow] = message.status.get("recent_receipts") or []
        for r in rows:
            table.add_row(str(r.seq), clock_text(r.timestamp), Text(r.tenant_id), r.template,
                          Text(r.status, style="red" if r.status not in ("ok", "—") else ""), r.receipt_hash[:12])
        if not rows:
            table.add_row("", "", "no receipts yet", "", "", "")
