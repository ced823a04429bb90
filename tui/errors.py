"""How a failure reaches the user in the TUI: one sentence in a dialog, never a traceback on screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


def sentence(error: BaseException) -> str:
    """An ApplianceError's own sentence; anything else is a bug, said briefly as such."""
    from appliance.errors import ApplianceError

    if isinstance(error, ApplianceError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


class ErrorDialog(ModalScreen[None]):
    """A modal showing one sentence; Enter, Escape or the button closes it and the app carries on."""

    BINDINGS = [Binding("escape", "close", "close"), Binding("enter", "close", "close", show=False)]
    DEFAULT_CSS = """
    ErrorDialog { align: center middle; }
    ErrorDialog > Vertical { width: 70; max-width: 90%; height: auto; border: thick $error; padding: 1 2;
                             background: $surface; }
    ErrorDialog #title { text-style: bold; color: $error; }
    ErrorDialog #message { margin: 1 0; }
    """

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("error", id="title")
            yield Static(self.message, id="message", markup=False)
            yield Button("OK", id="ok", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()

    def action_close(self) -> None:
        self.dismiss()
