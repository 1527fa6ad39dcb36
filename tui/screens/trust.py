"""Trust registry: what is in force (templates, revocations) and importing a signed update."""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, OptionList, Static

from tui.common import ConfirmScreen, ConsoleScreen, FilesFound
from tui.services import ImportPreview, MediaFile, MirrorStatus


class MirrorLoaded(Message):
    def __init__(self, status: MirrorStatus) -> None:
        super().__init__()
        self.status = status


class ImportPreviewed(Message):
    def __init__(self, file: MediaFile, preview: ImportPreview) -> None:
        super().__init__()
        self.file = file
        self.preview = preview


class ImportApplied(Message):
    def __init__(self, summary: str) -> None:
        super().__init__()
        self.summary = summary


class TrustScreen(ConsoleScreen):
    MODE = "trust"
    BINDINGS = [
        Binding("a", "apply", "Apply update"),
        Binding("g", "reload", "Reload"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.files: list[MediaFile] = []
        self.previewed: tuple[MediaFile, ImportPreview] | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        yield Static("Loading the trust registry…", id="mirror")
        table: DataTable[str] = DataTable(id="templates", cursor_type="row")
        table.add_columns("template", "version", "sha256")
        table.styles.height = 6
        yield table
        yield Static("", id="revocations")
        yield Static(Text("Registry updates on removable media (Enter previews):", style="bold"))
        yield OptionList(id="files")
        yield Static("", id="preview", classes="panel")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        self.background("read trust registry", self.services.mirror_status, MirrorLoaded)
        self.background("scan removable media", lambda: self.services.media_files("registry"), FilesFound)

    @on(MirrorLoaded)
    def _loaded(self, message: MirrorLoaded) -> None:
        status = message.status
        self.query_one("#mirror", Static).update(
            Text(f"Trust registry: {status.detail}", style="bold" if status.available else "bold yellow"))
        table = self.query_one("#templates", DataTable)
        table.clear()
        for t in status.templates:
            table.add_row(Text(t.name), Text(t.version), t.sha256[:16])
        revoked = ", ".join(status.revocations) if status.revocations else "none"
        self.query_one("#revocations", Static).update(Text(f"Revocations in force: {revoked}"))

    @on(FilesFound)
    def _found(self, message: FilesFound) -> None:
        self.files = self.show_files(message.files)

    @on(OptionList.OptionSelected, "#files")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        chosen = self.files[int(event.option_id or 0)]
        self.previewed = None
        self.say(f"Verifying {chosen.path} …")
        self.background("preview registry update", lambda: self.services.preview_mirror_import(chosen.path),
                        lambda preview: ImportPreviewed(chosen, preview))

    @on(ImportPreviewed)
    def _previewed(self, message: ImportPreviewed) -> None:
        preview = message.preview
        text = Text(preview.summary, style="bold green" if preview.ok else "bold red")
        for change in preview.changes:
            text.append(f"\n  {change}")
        self.query_one("#preview", Static).update(text)
        if preview.ok:
            self.previewed = (message.file, preview)
            self.say("Review the changes above; press a to apply them.")
        else:
            self.say("This update will not be imported.", error=True)

    def action_apply(self) -> None:
        if self.previewed is None:
            self.say("Choose an update and review its changes first.", error=True)
            return
        file, preview = self.previewed
        changes = "\n".join(f"  {c}" for c in preview.changes[:8]) or "  (no changes)"

        def answer(yes: bool | None) -> None:
            if yes:
                self.background("apply registry update", lambda: self.services.apply_mirror_import(file.path),
                                ImportApplied)
            else:
                self.say("Not imported.")

        self.app.push_screen(ConfirmScreen(f"Apply {file.path.name}?\n{preview.summary}\n{changes}"), answer)

    @on(ImportApplied)
    def _applied(self, message: ImportApplied) -> None:
        self.previewed = None
        self.say(f"Imported: {message.summary}")
        self.background("read trust registry", self.services.mirror_status, MirrorLoaded)
