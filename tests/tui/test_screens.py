"""Pilot tests of each console screen against FakeServices: happy paths and refusals."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from textual.pilot import Pilot
from textual.widgets import OptionList, ProgressBar

from tests.tui.fakes import FakeServices
from tests.tui.helpers import screen_text, settle, static_text, table_rows
from tui.app import CellConsole
from tui.common import ConfirmScreen, SecretOnce, TextPrompt

Scenario = Callable[[CellConsole, Pilot[Any]], Awaitable[None]]


def drive(fake: FakeServices, screen_key: str, scenario: Scenario) -> None:
    async def main() -> None:
        app = CellConsole(fake)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            await pilot.press(screen_key)
            await settle(pilot)
            await scenario(app, pilot)

    asyncio.run(main())


async def choose(app: CellConsole, pilot: Pilot[Any], index: int) -> None:
    options = app.screen.query_one("#files", OptionList)
    options.focus()
    options.highlighted = index
    await pilot.press("enter")
    await settle(pilot)


def message(app: CellConsole) -> str:
    return static_text(app, "#message")


# -- tenants ------------------------------------------------------------------

def test_tenants_add_shows_key_once(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        assert [r[1] for r in table_rows(app, "#tenants")] == ["default", "analytics"]
        await pilot.press("a")
        await settle(pilot)
        assert isinstance(app.screen, TextPrompt)
        await pilot.press(*"ops", "enter")
        await settle(pilot)
        assert isinstance(app.screen, SecretOnce)
        assert "cell_FAKEKEYops" in screen_text(app)
        await pilot.press("enter")
        await settle(pilot)
        assert not isinstance(app.screen, SecretOnce)
        assert "cell_FAKEKEYops" not in screen_text(app)  # shown once, gone after
        assert "ops" in [r[1] for r in table_rows(app, "#tenants")]

    drive(fake, "5", scenario)


def test_tenants_duplicate_name_is_refused_with_reason(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await pilot.press("a")
        await settle(pilot)
        await pilot.press(*"analytics", "enter")
        await settle(pilot)
        assert not isinstance(app.screen, SecretOnce)
        assert "already exists" in message(app)

    drive(fake, "5", scenario)


def test_tenants_revoke_needs_confirmation(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await pilot.press("x")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await settle(pilot)
        assert not fake.tenants[0].revoked
        await pilot.press("x")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
        assert fake.tenants[0].revoked
        assert table_rows(app, "#tenants")[0][3] == "revoked"
        assert "revoked" in message(app)

    drive(fake, "5", scenario)


# -- license ------------------------------------------------------------------

def test_license_verify_show_fields_confirm_install(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await choose(app, pilot, 0)
        verdict = static_text(app, "#verdict")
        assert "VALID" in verdict and "pro tier" in verdict and "expires in 12 days" in verdict
        fields = dict((r[0], r[1]) for r in table_rows(app, "#fields"))
        assert fields["licensee"] == "ACME Corp" and fields["days_left"] == "12"
        await pilot.press("i")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot)
        assert fake.installed_license == fake.media / "good.json"
        assert "Installed" in message(app)

    drive(fake, "3", scenario)


def test_bad_license_rejected_with_exact_reason_and_not_installable(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await choose(app, pilot, 1)
        verdict = static_text(app, "#verdict")
        assert "REJECTED: the signature does not match the payload" in verdict
        assert "bad_signature" in verdict and "NOT verified" in verdict
        await pilot.press("i")
        await settle(pilot)
        assert not isinstance(app.screen, ConfirmScreen)
        assert fake.installed_license is None
        assert "only a valid license" in message(app)

    drive(fake, "3", scenario)


# -- install ------------------------------------------------------------------

def test_install_verify_plan_run_all_steps(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await choose(app, pilot, 0)
        assert "signed by the release key" in static_text(app, "#verdict")
        assert [r[2] for r in table_rows(app, "#steps")] == ["pending"] * 3
        await pilot.press("x")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot)
        assert fake.steps_run == ["unpack", "migrate", "swap"]
        assert all(r[2].startswith("ok") for r in table_rows(app, "#steps"))
        bar = app.screen.query_one("#progress", ProgressBar)
        assert bar.progress == bar.total == 3
        assert "Install complete" in message(app)

    drive(fake, "2", scenario)


def test_tampered_bundle_rejected_and_nothing_runs(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await choose(app, pilot, 1)
        assert "REJECTED: sha256 of payload/app.tar does not match" in static_text(app, "#verdict")
        await pilot.press("x")
        await settle(pilot)
        assert not isinstance(app.screen, ConfirmScreen)
        assert fake.steps_run == []
        assert "verify it first" in message(app)

    drive(fake, "2", scenario)


def test_failed_install_step_shows_error_and_rollback(fake: FakeServices) -> None:
    fake.fail_step = "migrate"

    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await choose(app, pilot, 0)
        await pilot.press("x")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
        assert fake.steps_run == ["unpack", "migrate"]  # stops at the failure
        assert fake.rolled_back == [["unpack"]]
        statuses = [r[2] for r in table_rows(app, "#steps")]
        assert statuses[0].startswith("ok") and statuses[1].startswith("FAILED: database migration")
        assert statuses[2] == "pending"
        verdict = static_text(app, "#verdict")
        assert "Install failed: database migration 0007 failed: disk full" in verdict
        assert "Rolled back" in verdict and "undid: Unpack the bundle" in verdict
        assert app.screen.query_one("#progress", ProgressBar).progress == 1

    drive(fake, "2", scenario)


# -- trust registry -----------------------------------------------------------

def test_trust_shows_state_previews_and_applies_update(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        assert [r[0] for r in table_rows(app, "#templates")] == ["python3", "javascript"]
        assert "lic-0666" in static_text(app, "#revocations")
        await pilot.press("a")
        await settle(pilot)
        assert "review its changes first" in message(app)  # no apply without a preview
        await choose(app, pilot, 0)
        preview = static_text(app, "#preview")
        assert "7 → 8" in preview and "revoke license lic-0999" in preview
        await pilot.press("a")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        assert "revoke license lic-0999" in screen_text(app)  # the summary is in the question
        await pilot.press("y")
        await settle(pilot)
        assert fake.applied == [fake.media / "registry-8.tar"]
        assert "lic-0999" in static_text(app, "#revocations")

    drive(fake, "4", scenario)


def test_tampered_registry_update_is_refused(fake: FakeServices) -> None:
    fake.files["registry"] = [type(fake.files["registry"][0])(fake.media / "tampered-9.tar", 10)]

    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await choose(app, pilot, 0)
        assert "REJECTED: registry signature threshold not met" in static_text(app, "#preview")
        await pilot.press("a")
        await settle(pilot)
        assert fake.applied == []

    drive(fake, "4", scenario)


# -- receipts -----------------------------------------------------------------

def test_receipts_browse_filter_page_verify_export(fake: FakeServices) -> None:
    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        rows = table_rows(app, "#receipts")
        assert [r[0] for r in rows][:2] == ["1", "2"] and len(rows) == 15
        await pilot.press("n")
        await settle(pilot)
        assert table_rows(app, "#receipts")[0][0] == "16"
        await pilot.press("f", *"t1a2b3c", "enter")
        await settle(pilot)
        assert {r[2] for r in table_rows(app, "#receipts")} == {"t1a2b3c"}
        await pilot.press("f", "tab", *"timeout", "enter")
        await settle(pilot)
        rows = table_rows(app, "#receipts")
        assert rows and {(r[2], r[4]) for r in rows} == {("t1a2b3c", "timeout")}
        await pilot.press("v")
        await settle(pilot)
        assert "Chain intact: 40 receipt(s)" in message(app)
        await pilot.press("e")
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert fake.exports == [fake.media / "cell-receipts.jsonl"]
        assert "Exported to" in message(app)

    drive(fake, "6", scenario)


def test_receipts_broken_chain_is_reported(fake: FakeServices) -> None:
    fake.chain_ok = False

    async def scenario(app: CellConsole, pilot: Pilot[Any]) -> None:
        await pilot.press("v")
        await settle(pilot)
        assert "CHAIN BROKEN after 12 receipt(s): seq 13" in message(app)

    drive(fake, "6", scenario)
