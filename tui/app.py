"""The operator console: one Textual App, services passed in, one mode per screen.

Built for an 80×24 terminal on a serial line or SSH, keyboard only: digits
switch screens (shown in the top line), each screen's own keys are in the
footer, and nothing depends on colour or a mouse.
"""
from __future__ import annotations

from typing import ClassVar

from textual.app import App
from textual.binding import Binding

from tui.common import NAV
from tui.screens.dashboard import DashboardScreen
from tui.screens.install import InstallScreen
from tui.screens.license import LicenseScreen
from tui.screens.receipts import ReceiptsScreen
from tui.screens.telemetry import TelemetryScreen
from tui.screens.tenants import TenantsScreen
from tui.screens.trust import TrustScreen
from tui.services import ConsoleServices

CSS = """
#nav { height: 1; background: $primary-background; }
#message { height: auto; max-height: 3; }
.heading { height: 1; margin-top: 1; }
.dialog { width: 76; height: auto; max-height: 20; border: round $accent; padding: 0 1; }
ConfirmScreen, TextPrompt, SecretOnce, ChooseDir { align: center middle; }
DataTable { height: 1fr; }
OptionList { height: auto; max-height: 8; }
#summary { height: auto; }
.panel { height: auto; max-height: 12; }
"""


class CellConsole(App[None]):
    TITLE = "Cell console"
    CSS = CSS
    # Digits, not F-keys: a serial console or a bare SSH client may not send F-keys.
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        *(Binding(key, f"switch_mode('{mode}')", title, show=False) for key, mode, title in NAV),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]
    MODES = {
        "dashboard": DashboardScreen,
        "install": InstallScreen,
        "license": LicenseScreen,
        "trust": TrustScreen,
        "tenants": TenantsScreen,
        "receipts": ReceiptsScreen,
        "telemetry": TelemetryScreen,
    }
    # The command palette is mouse-and-search oriented; the footer lists every key instead.
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, services: ConsoleServices) -> None:
        super().__init__()
        self.services = services

    def on_mount(self) -> None:
        self.switch_mode("dashboard")
