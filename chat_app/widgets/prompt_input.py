"""The multi-line box where the user writes a message."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    """Enter sends; Shift+Enter or Ctrl+J starts a new line.

    What terminals send: Enter is CR. Shift+Enter is also plain CR in a legacy terminal (and inside
    tmux without `extended-keys`), so there it cannot be told from Enter; Textual switches on the
    kitty keyboard protocol, and terminals that speak it (kitty, WezTerm, foot, Ghostty, Alacritty,
    iTerm2 with the option on) report it as "shift+enter". Ctrl+J is LF, distinct from CR in every
    terminal, so it always works. Both bindings have priority: TextArea would otherwise take Enter as
    a newline before any binding saw it, and a non-priority binding runs only once the key has bubbled
    up to the app, after characters typed later (a fast typist's or a script's "a^jb" became "ab\n").

    The text is not cleared on submit: whoever sends it clears it once the message is safely stored,
    so a failed send leaves the prompt where it was.
    """

    BINDINGS = [
        # Not in the footer: the placeholder says it, and the footer needs the room.
        Binding("enter", "submit", "Send", id="prompt.send", priority=True, show=False),
        Binding("shift+enter,ctrl+j", "newline", "New line", id="prompt.newline", priority=True, show=False),
    ]

    class Submitted(Message):
        """The user asked to send `text` (never blank)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            id=id,
            highlight_cursor_line=False,
            placeholder="Message (Enter sends, Shift+Enter or Ctrl+J: new line)",
        )

    def action_submit(self) -> None:
        if self.text.strip():
            self.post_message(self.Submitted(self.text))

    def action_newline(self) -> None:
        self.insert("\n")
