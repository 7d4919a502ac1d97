"""A one-line question: a new title, a file to import or export."""

from __future__ import annotations

from collections.abc import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class TextPromptScreen(ModalScreen[str | None]):
    """Asks for one line of text; Enter accepts, Esc gives None.

    `accept(text)` does the work and returns None on success or a message saying what is wrong; the
    dialog then stays open with that message and the text as typed, so nothing has to be retyped."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="prompt_dialog.cancel")]

    def __init__(self, question: str, value: str, accept: Callable[[str], str | None]) -> None:
        super().__init__()
        self.question = question
        self.value = value
        self.accept = accept

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="question", markup=False)
            yield Input(self.value, select_on_focus=False)
            yield Label("", classes="error", markup=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        error = self.accept(text) if text else "Please type something, or press Esc to cancel."
        if error is None:
            self.dismiss(text)
        else:
            self.query_one(".error", Label).update(error)

    def action_cancel(self) -> None:
        self.dismiss(None)
