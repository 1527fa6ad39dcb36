"""Install: bundle from USB → verify → plan → run steps with progress → rollback on failure."""
from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable, OptionList, ProgressBar, Static

from tui.common import ActionFailed, ConfirmScreen, ConsoleScreen, FilesFound
from tui.services import BundleCheck, MediaFile, PlanStep, ServiceError, StepResult


class BundleVerified(Message):
    def __init__(self, file: MediaFile, check: BundleCheck, plan: list[PlanStep]) -> None:
        super().__init__()
        self.file = file
        self.check = check
        self.plan = plan


class StepStarted(Message):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index


class StepFinished(Message):
    def __init__(self, index: int, result: StepResult) -> None:
        super().__init__()
        self.index = index
        self.result = result


class InstallEnded(Message):
    """``failed`` is the failing step's result, None on success; ``rollback`` its undo lines."""

    def __init__(self, failed: StepResult | None, rollback: list[str]) -> None:
        super().__init__()
        self.failed = failed
        self.rollback = rollback


class InstallScreen(ConsoleScreen):
    MODE = "install"
    BINDINGS = [
        Binding("x", "run", "Run install"),
        Binding("g", "rescan", "Rescan USB"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.files: list[MediaFile] = []
        self.bundle: MediaFile | None = None
        self.plan: list[PlanStep] = []
        self.running = False

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        yield Static(Text("Bundles on removable media (Enter verifies):", style="bold"))
        yield OptionList(id="files")
        yield Static("", id="verdict", classes="panel")
        yield ProgressBar(id="progress", show_eta=False)
        table: DataTable[str] = DataTable(id="steps", cursor_type="row")
        table.add_columns("#", "step", "status")
        yield table
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.action_rescan()

    def action_rescan(self) -> None:
        self.background("scan removable media", lambda: self.services.media_files("bundle"), FilesFound)

    @on(FilesFound)
    def _found(self, message: FilesFound) -> None:
        self.files = self.show_files(message.files, "No bundle found under the removable-media roots. Insert the stick, press g.")

    @on(OptionList.OptionSelected, "#files")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        if self.running:
            return
        chosen = self.files[int(event.option_id or 0)]
        self.bundle, self.plan = None, []
        self.say(f"Verifying {chosen.path} …")

        def verify() -> BundleVerified:
            check = self.services.verify_bundle(chosen.path)
            # The plan comes from the verified bundle only: never plan from unchecked bytes.
            plan = self.services.plan_install(chosen.path) if check.ok else []
            return BundleVerified(chosen, check, plan)

        self.background("verify bundle", verify, lambda message: message)

    @on(BundleVerified)
    def _verified(self, message: BundleVerified) -> None:
        check = message.check
        text = Text(check.summary, style="bold green" if check.ok else "bold red")
        for name, value in check.details:
            text.append(f"\n{name}: {value}")
        self.query_one("#verdict", Static).update(text)
        table = self.query_one("#steps", DataTable)
        table.clear()
        if not check.ok:
            self.say("This bundle will not be installed.", error=True)
            return
        self.bundle, self.plan = message.file, message.plan
        for i, step in enumerate(self.plan, 1):
            table.add_row(str(i), step.title, "pending")
        self.query_one("#progress", ProgressBar).update(total=len(self.plan), progress=0)
        self.say(f"Verified. {len(self.plan)} step(s) planned. Press x to install.")

    def action_run(self) -> None:
        if self.running:
            return
        if self.bundle is None or not self.plan:
            self.say("Choose a bundle and verify it first.", error=True)
            return
        bundle, plan = self.bundle, list(self.plan)

        def answer(yes: bool | None) -> None:
            if yes:
                self.running = True
                self.run_steps(bundle.path, plan)
            else:
                self.say("Install cancelled; nothing was changed.")

        self.app.push_screen(ConfirmScreen(f"Install {bundle.path.name}: {len(plan)} step(s)? "
                                           "A failed step is rolled back."), answer)

    @work(thread=True, exclusive=True, group="install")
    def run_steps(self, path: Path, plan: list[PlanStep]) -> None:
        done: list[PlanStep] = []
        try:
            for i, step in enumerate(plan):
                self.post_message(StepStarted(i))
                result = self.services.run_install_step(path, step)
                self.post_message(StepFinished(i, result))
                if not result.ok:
                    self.post_message(InstallEnded(result, self.services.rollback_install(path, done)))
                    return
                done.append(step)
        except ServiceError as exc:
            self.post_message(ActionFailed("install", str(exc)))
            self.post_message(InstallEnded(StepResult("?", False, str(exc)), []))
            return
        except Exception as exc:  # a crash mid-install still must end in a rollback attempt
            failed = StepResult("?", False, f"{type(exc).__name__}: {exc}")
            try:
                lines = self.services.rollback_install(path, done)
            except Exception as rb_exc:
                lines = [f"rollback failed: {rb_exc}"]
            self.post_message(InstallEnded(failed, lines))
            return
        self.post_message(InstallEnded(None, []))

    def _set_status(self, index: int, text: Text) -> None:
        table = self.query_one("#steps", DataTable)
        table.update_cell_at(Coordinate(index, 2), text)

    @on(StepStarted)
    def _started(self, message: StepStarted) -> None:
        self._set_status(message.index, Text("running…", style="yellow"))
        self.say(f"Step {message.index + 1}/{len(self.plan)}: {self.plan[message.index].title}")

    @on(StepFinished)
    def _finished(self, message: StepFinished) -> None:
        if message.result.ok:
            self._set_status(message.index, Text(f"ok: {message.result.message}", style="green"))
            self.query_one("#progress", ProgressBar).advance(1)
        else:
            self._set_status(message.index, Text(f"FAILED: {message.result.message}", style="bold red"))

    @on(InstallEnded)
    def _ended(self, message: InstallEnded) -> None:
        self.running = False
        if message.failed is None:
            self.say("Install complete.")
            return
        text = Text(f"Install failed: {message.failed.message}", style="bold red")
        if message.rollback:
            text.append("\nRolled back:")
            for line in message.rollback:
                text.append(f"\n  {line}")
        self.query_one("#verdict", Static).update(text)
        self.say(f"Install failed: {message.failed.message}", error=True)
