"""Pieces every console screen shares: the base screen, messages, modals.

Service calls block (SQLite, signature checks, file reads from a slow USB
stick), so screens never call them on the event loop: :meth:`ConsoleScreen.
background` runs one in a thread worker and posts a typed message back.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from tui.services import ConsoleServices, MediaFile, ServiceError

if TYPE_CHECKING:
    from tui.app import CellConsole

log = logging.getLogger("cell.console")

NAV = (
    ("1", "dashboard", "Dashboard"),
    ("2", "install", "Install"),
    ("3", "license", "License"),
    ("4", "trust", "Trust"),
    ("5", "tenants", "Tenants"),
    ("6", "receipts", "Receipts"),
    ("7", "telemetry", "Telemetry"),
)


class ActionFailed(Message):
    """A service call refused or crashed; ``error`` is shown to the operator as is."""

    def __init__(self, action: str, error: str) -> None:
        super().__init__()
        self.action = action
        self.error = error


class NavBar(Static):
    """The top line: every screen and its key, the current one highlighted."""

    def __init__(self, current: str) -> None:
        text = Text()
        for key, mode, title in NAV:
            style = "reverse bold" if mode == current else ""
            text.append(f" {key} ", style="bold")
            text.append(title, style=style)
        super().__init__(text, id="nav")


class ConsoleScreen(Screen[None]):
    MODE = ""

    @property
    def services(self) -> ConsoleServices:
        return cast("CellConsole", self.app).services

    def compose_header(self) -> ComposeResult:
        yield NavBar(self.MODE)

    def compose_footer(self) -> ComposeResult:
        yield Static("", id="message")
        yield Footer(compact=True, show_command_palette=False)

    def say(self, text: str, *, error: bool = False) -> None:
        """One line of feedback above the footer (errors stay until the next action)."""
        line = self.query_one("#message", Static)
        line.update(Text(text, style="bold red" if error else "green"))
        line.set_class(error, "error")

    @work(thread=True, group="service")
    def background(self, action: str, call: Callable[[], Any], reply: Callable[[Any], Message]) -> None:
        try:
            result = call()
        except ServiceError as exc:
            self.post_message(ActionFailed(action, str(exc)))
            return
        except Exception as exc:  # an appliance bug must reach the operator, not kill the console
            log.exception("console: %s failed", action)
            self.post_message(ActionFailed(action, f"{action} failed: {type(exc).__name__}: {exc}"))
            return
        self.post_message(reply(result))

    def show_files(self, files: list[MediaFile], empty: str | None = None) -> list[MediaFile]:
        """Fill the #files list from a media scan and focus it; say ``empty`` when none was found."""
        options = self.query_one("#files", OptionList)
        options.clear_options()
        options.add_options(file_options(files))
        if not files and empty:
            self.say(empty)
        options.focus()
        return files

    @on(ActionFailed)
    def _show_failure(self, message: ActionFailed) -> None:
        self.say(message.error, error=True)


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no for anything that changes the node; Escape is always "no"."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.question), id="question")
            yield Static(Text("Press y to confirm, n or Escape to cancel."))
        yield Footer(compact=True, show_command_palette=False)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class TextPrompt(ModalScreen["str | None"]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, prompt: str, placeholder: str = "") -> None:
        super().__init__()
        self.prompt = prompt
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.prompt))
            yield Input(placeholder=self.placeholder, id="prompt-input")
        yield Footer(compact=True, show_command_palette=False)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SecretOnce(ModalScreen[None]):
    """Shows a new API key once; dismissing it forgets the only copy on screen."""

    BINDINGS = [Binding("enter,escape", "done", "I stored it")]

    def __init__(self, title: str, secret: str) -> None:
        super().__init__()
        self.title_text = title
        self.secret = secret

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.title_text, style="bold"))
            yield Static(Text(self.secret, style="bold yellow"), id="secret")
            yield Static(Text("This key is shown once and cannot be recovered. Store it now."))
        yield Footer(compact=True, show_command_palette=False)

    def action_done(self) -> None:
        self.dismiss(None)


class ChooseDir(ModalScreen["Path | None"]):
    """Pick a mounted removable medium to write an export to."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, dirs: list[Path]) -> None:
        super().__init__()
        self.dirs = dirs

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("Export to which medium?"))
            yield OptionList(*[Option(Text(str(d)), id=str(i)) for i, d in enumerate(self.dirs)], id="dirs")
        yield Footer(compact=True, show_command_palette=False)

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.dirs[int(event.option_id or 0)])

    def action_cancel(self) -> None:
        self.dismiss(None)


def file_options(files: list[MediaFile]) -> list[Option]:
    return [Option(Text(f"{f.path}  ({f.size:,} bytes)"), id=str(i)) for i, f in enumerate(files)]


class FilesFound(Message):
    def __init__(self, files: list[MediaFile]) -> None:
        super().__init__()
        self.files = files


class DirsFound(Message):
    def __init__(self, dirs: list[Path]) -> None:
        super().__init__()
        self.dirs = dirs
