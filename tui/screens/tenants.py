"""Tenants: list, add (the key is shown once), revoke after a confirmation."""
from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from tui.common import ConfirmScreen, ConsoleScreen, SecretOnce, TextPrompt
from tui.services import TenantInfo


class TenantsLoaded(Message):
    def __init__(self, tenants: list[TenantInfo]) -> None:
        super().__init__()
        self.tenants = tenants


class TenantAdded(Message):
    def __init__(self, tenant: TenantInfo, key: str) -> None:
        super().__init__()
        self.tenant = tenant
        self.key = key


class TenantRevoked(Message):
    def __init__(self, tenant_id: str, done: bool) -> None:
        super().__init__()
        self.tenant_id = tenant_id
        self.done = done


class TenantsScreen(ConsoleScreen):
    MODE = "tenants"
    BINDINGS = [
        Binding("a", "add", "Add"),
        Binding("x", "revoke", "Revoke"),
        Binding("g", "reload", "Reload"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.tenants: list[TenantInfo] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        table: DataTable[str] = DataTable(id="tenants", cursor_type="row")
        table.add_columns("id", "name", "created (UTC)", "state")
        yield table
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        self.background("list tenants", self.services.list_tenants, TenantsLoaded)

    @on(TenantsLoaded)
    def _loaded(self, message: TenantsLoaded) -> None:
        self.tenants = message.tenants
        table = self.query_one("#tenants", DataTable)
        table.clear()
        for t in self.tenants:
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.created_at / 1000))
            table.add_row(t.id, Text(t.name), created,
                          Text("revoked", style="red") if t.revoked else Text("active", style="green"))
        table.focus()

    def action_add(self) -> None:
        def submit(name: str | None) -> None:
            if name:
                self.background("add tenant", lambda: self.services.add_tenant(name),
                                lambda pair: TenantAdded(*pair))

        self.app.push_screen(TextPrompt("Name of the new tenant (Enter to create, Escape to cancel):",
                                        "e.g. analytics-team"), submit)

    @on(TenantAdded)
    def _added(self, message: TenantAdded) -> None:
        self.say(f"Tenant {message.tenant.id} ({message.tenant.name}) created.")
        self.app.push_screen(SecretOnce(f"API key of tenant {message.tenant.name}", message.key))
        self.action_reload()

    def _selected(self) -> TenantInfo | None:
        table = self.query_one("#tenants", DataTable)
        if not self.tenants or table.cursor_row < 0 or table.cursor_row >= len(self.tenants):
            return None
        return self.tenants[table.cursor_row]

    def action_revoke(self) -> None:
        tenant = self._selected()
        if tenant is None:
            self.say("No tenant selected.", error=True)
            return
        if tenant.revoked:
            self.say(f"Tenant {tenant.id} is already revoked.", error=True)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.background("revoke tenant", lambda: self.services.revoke_tenant(tenant.id),
                                lambda done: TenantRevoked(tenant.id, bool(done)))
            else:
                self.say("Revocation cancelled.")

        self.app.push_screen(ConfirmScreen(
            f"Revoke tenant {tenant.id} ({tenant.name})? Its API key stops working at once "
            "and cannot be restored."), answer)

    @on(TenantRevoked)
    def _revoked(self, message: TenantRevoked) -> None:
        if message.done:
            self.say(f"Tenant {message.tenant_id} revoked.")
        else:
            self.say(f"No tenant {message.tenant_id}.", error=True)
        self.action_reload()
