"""License import: pick a file on USB, verify it in a worker, read every field, confirm, install."""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, OptionList, Static

from tui.common import ConfirmScreen, ConsoleScreen, FilesFound
from tui.services import LicenseCheck, MediaFile


class LicenseChecked(Message):
    def __init__(self, file: MediaFile, check: LicenseCheck) -> None:
        super().__init__()
        self.file = file
        self.check = check


class LicenseInstalled(Message):
    def __init__(self, check: LicenseCheck) -> None:
        super().__init__()
        self.check = check


def verdict_text(check: LicenseCheck) -> Text:
    out = Text(check.verdict, style="bold green" if check.ok else "bold red")
    if check.code:
        out.append(f"\n(reason code: {check.code})", style="red")
    for warning in check.warnings:
        out.append(f"\n! {warning}", style="bold yellow")
    if check.fields and not check.fields_verified:
        out.append("\nThe fields below are NOT verified; do not trust them.", style="yellow")
    return out


class LicenseScreen(ConsoleScreen):
    MODE = "license"
    BINDINGS = [
        Binding("i", "install", "Install"),
        Binding("g", "rescan", "Rescan USB"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.files: list[MediaFile] = []
        self.checked: tuple[MediaFile, LicenseCheck] | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        yield Static(Text("License files on removable media (Enter verifies):", style="bold"))
        yield OptionList(id="files")
        yield Static("", id="verdict", classes="panel")
        table: DataTable[str] = DataTable(id="fields", cursor_type="row", show_header=False)
        table.add_columns("field", "value")
        yield table
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.action_rescan()

    def action_rescan(self) -> None:
        self.background("scan removable media", lambda: self.services.media_files("license"), FilesFound)

    @on(FilesFound)
    def _found(self, message: FilesFound) -> None:
        self.files = self.show_files(
            message.files, "No license file (.json, .lic) found under the removable-media roots. Insert a stick, press g.")

    @on(OptionList.OptionSelected, "#files")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        chosen = self.files[int(event.option_id or 0)]
        self.checked = None
        self.say(f"Verifying {chosen.path} …")
        self.background("verify license", lambda: self.services.verify_license_file(chosen.path),
                        lambda check: LicenseChecked(chosen, check))

    @on(LicenseChecked)
    def _checked(self, message: LicenseChecked) -> None:
        check = message.check
        self.checked = (message.file, check)
        self.query_one("#verdict", Static).update(verdict_text(check))
        table = self.query_one("#fields", DataTable)
        table.clear()
        for name, value in check.fields:
            table.add_row(name, Text(value))
        if check.ok:
            self.say("This license is valid. Press i to install it.")
        else:
            self.say(f"Not installable: {check.reason}", error=True)

    def action_install(self) -> None:
        if self.checked is None or not self.checked[1].ok:
            self.say("Choose a file and verify it first; only a valid license can be installed.", error=True)
            return
        file, check = self.checked

        def answer(yes: bool | None) -> None:
            if yes:
                self.background("install license", lambda: self.services.install_license(file.path),
                                LicenseInstalled)
            else:
                self.say("Not installed.")

        self.app.push_screen(ConfirmScreen(f"Install {file.path}?\n{check.verdict}\n"
                                           "It replaces the current license."), answer)

    @on(LicenseInstalled)
    def _installed(self, message: LicenseInstalled) -> None:
        if message.check.ok:
            self.say("Installed. The service picks it up within a second.")
        else:  # the file changed between verify and install, and the re-check refused it
            self.query_one("#verdict", Static).update(verdict_text(message.check))
            self.say(f"Not installed: {message.check.reason}", error=True)
