"""Telemetry: off by default; shows exactly what would be collected before asking."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static

from appliance.telemetry import COLLECTED, NEVER_COLLECTED
from tui.common import ChooseDir, ConfirmScreen, ConsoleScreen, DirsFound
from tui.services import TelemetryState


class TelemetryLoaded(Message):
    def __init__(self, state: TelemetryState, preview: dict[str, Any]) -> None:
        super().__init__()
        self.state = state
        self.preview = preview


class TelemetryExported(Message):
    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self.paths = paths


def explanation() -> Text:
    out = Text("Collected (aggregated counters only):\n", style="bold")
    for name, meaning in COLLECTED:
        out.append(f"  {name}: ", style="bold")
        out.append(f"{meaning}\n", style="")
    out.append("Never collected: ", style="bold")
    out.append(", ".join(NEVER_COLLECTED) + ".\n")
    out.append("Reports go only to a local spool you export to USB; nothing is sent over the network.\n")
    return out


class TelemetryScreen(ConsoleScreen):
    MODE = "telemetry"
    BINDINGS = [
        Binding("c", "toggle_consent", "Consent on/off"),
        Binding("e", "export", "Export spool"),
        Binding("g", "reload", "Refresh"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.state: TelemetryState | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        yield Static("", id="state")
        with VerticalScroll(id="body"):
            yield Static(explanation(), id="explain")
            yield Static("", id="preview")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.action_reload()
        self.query_one("#body").focus()

    def action_reload(self) -> None:
        services = self.services
        self.background("read telemetry", lambda: (services.telemetry_state(), services.telemetry_preview()),
                        lambda pair: TelemetryLoaded(*pair))

    @on(TelemetryLoaded)
    def _loaded(self, message: TelemetryLoaded) -> None:
        self.state = message.state
        if message.state.consent:
            line = Text(f"Telemetry: ON (you consented). {message.state.spooled} report(s) in the local spool.",
                        style="bold yellow")
        else:
            line = Text("Telemetry: OFF. Nothing is recorded and nothing is sent.", style="bold green")
        self.query_one("#state", Static).update(line)
        preview = Text("Preview of the report that would be spooled now:\n", style="bold")
        preview.append(json.dumps(message.preview, indent=1, sort_keys=True))
        self.query_one("#preview", Static).update(preview)

    def action_toggle_consent(self) -> None:
        if self.state is None:
            return
        turn_on = not self.state.consent

        def answer(yes: bool | None) -> None:
            if yes:
                self.background("change telemetry consent",
                                lambda: (self.services.set_telemetry_consent(turn_on), self.services.telemetry_preview()),
                                lambda pair: TelemetryLoaded(*pair))

        if turn_on:
            self.app.push_screen(ConfirmScreen(
                "Turn telemetry ON? Aggregated counters (as previewed) will be written to a local spool "
                "that you export to USB yourself. Nothing is sent over the network."), answer)
        else:
            self.app.push_screen(ConfirmScreen(
                "Turn telemetry OFF? Nothing more is recorded and unexported reports are deleted."), answer)

    def action_export(self) -> None:
        if self.state is None or not self.state.consent:
            self.say("Telemetry is off: there is nothing to export.", error=True)
            return
        self.background("find removable media", self.services.media_dirs, DirsFound)

    @on(DirsFound)
    def _dirs(self, message: DirsFound) -> None:
        if not message.dirs:
            self.say("No writable removable medium is mounted.", error=True)
            return

        def chosen(dest: Path | None) -> None:
            if dest is not None:
                self.background("export telemetry", lambda: self.services.export_telemetry(dest), TelemetryExported)

        self.app.push_screen(ChooseDir(message.dirs), chosen)

    @on(TelemetryExported)
    def _exported(self, message: TelemetryExported) -> None:
        self.say(f"Exported {len(message.paths)} report(s).")
